//! The text encoders diffusion pipelines condition on, under transformers' class and key names:
//! CLIP (`CLIPTextModel`, `CLIPTextModelWithProjection`) and T5 (`T5EncoderModel`).

pub mod clip;
pub mod t5;

pub use clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use t5::{T5Config, T5EncoderModel, T5Output};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// An `nn.Embedding(rows, dim)` table at `vb`; fresh tables are N(0, 0.02) as transformers
/// initialises CLIP's (T5 checkpoints always supply theirs).
fn table(vb: &VarBuilder, rows: usize, dim: usize) -> Result<Tensor> {
    crate::nn::Init::Normal(0.02).tensor(vb, &[rows, dim], "weight")
}

/// Rows of `table` [V, D] for ids [B, L] (any integer dtype) -> [B, L, D].
fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, l) = ids.dims2()?;
    table.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, table.dim(1)?))
}

/// x [B, L, D] at one position per row -> [B, D].
fn gather_rows(x: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    let flat: Vec<u32> = positions.iter().enumerate().map(|(i, &p)| (i * l + p) as u32).collect();
    let index = Tensor::from_vec(flat, b, x.device())?;
    x.reshape((b * l, d))?.index_select(&index, 0)
}
