//! The transformer MLP: Linear -> GELU(tanh) -> Linear (diffusers `FeedForward`, keys
//! `net.0.proj` and `net.2`).

use super::linear::{linear, Init, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

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
        self.proj_out.forward(&crate::kernels::gelu_tanh(&self.proj_in.forward(x)?)?)
    }
}
