//! The transformer MLP: Linear -> GELU(tanh) -> Linear, or the gated GEGLU of the SD/SDXL UNets
//! (diffusers `FeedForward`, keys `net.0.proj` and `net.2` either way).

use super::linear::{linear, Init, Linear};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Clone, Debug)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
    /// GEGLU: `proj_in` yields [value, gate] and the hidden state is value * GELU(gate) (exact).
    gated: bool,
}

impl FeedForward {
    /// diffusers' key layout: `net.0.proj` (dim -> hidden), `net.2` (hidden -> dim_out).
    pub fn new(vb: VarBuilder, dim: usize, hidden: usize, dim_out: usize, init: Init) -> Result<Self> {
        Ok(FeedForward {
            proj_in: linear(&vb.pp("net.0.proj"), dim, hidden, true, init)?,
            proj_out: linear(&vb.pp("net.2"), hidden, dim_out, true, init)?,
            gated: false,
        })
    }

    /// `activation_fn="geglu"` (the UNets' transformer blocks): `net.0.proj` is dim -> 2 * hidden.
    pub fn geglu(vb: VarBuilder, dim: usize, hidden: usize, dim_out: usize, init: Init) -> Result<Self> {
        Ok(FeedForward {
            proj_in: linear(&vb.pp("net.0.proj"), dim, 2 * hidden, true, init)?,
            proj_out: linear(&vb.pp("net.2"), hidden, dim_out, true, init)?,
            gated: true,
        })
    }

    /// FLOPs over `rows` tokens.
    pub fn flops(&self, rows: usize) -> u64 {
        self.proj_in.flops(rows) + self.proj_out.flops(rows)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = if self.gated {
            let h = self.proj_in.forward(x)?;
            let half = h.dim(D::Minus1)? / 2;
            h.narrow(D::Minus1, 0, half)?.mul(&h.narrow(D::Minus1, half, half)?.gelu_erf()?)?
        } else {
            self.proj_in.forward_gelu(x)?
        };
        self.proj_out.forward(&h)
    }
}
