//! Convergence: diffusion transformers (DiT, SD3/MMDiT, Flux) and SDXL in Rust, run, trained
//! and inspected. Data flows one way: conditioning -> denoiser under a sampler -> latent -> image.

pub mod bench;
pub mod error;
pub mod eval;
pub mod flow;
pub mod inspect;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod noise;
pub mod pipelines;
pub mod shapes;
pub mod study;
pub mod text;
pub mod train;
pub mod viz;
pub mod weights;

pub use error::{Error, Result};
