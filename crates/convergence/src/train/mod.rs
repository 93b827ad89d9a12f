//! Training: datasets, objectives, the optimiser loop with EMA and exact resume.

pub mod data;
pub mod objective;
pub mod optim;
pub mod run;
pub mod trainer;
