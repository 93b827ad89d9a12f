//! The transformer MLP: Linear -> GELU(tanh) -> Linear (diffusers `FeedForward`, keys
//! `net.0.proj` and `net.2`).

use super::linear::{linear, Init};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

#[derive(Clone, Debug)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    /// diffusers' key layout: `net.0.proj` (dim -> hidden), `net.2` (hidden -> dim_out).
    pub fn new(vb: VarBuilder, dim: usize, hidden: usize, dim_out: usize, init: Init) -> Result<Self> {
        Ok(FeedForward {
            proj_in: linear(&vb.pp("net.0.proj"), dim, hidden, true, init)?,
            proj_out: linear(&vb.pp("net.2"), hidden, dim_out, true, init)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (`gelu-approximate` in diffusers).
        self.proj_out.forward(&self.proj_in.forward(x)?.gelu()?)
    }
}
