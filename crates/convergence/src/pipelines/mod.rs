//! Pipelines: a model_index.json directory assembled into conditioning -> sampler -> image.

pub mod dit;
pub mod sd3;
