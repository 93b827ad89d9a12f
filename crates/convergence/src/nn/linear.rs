//! `nn.Linear` with an initialisation hint: loaded weights ignore it, fresh models use it.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// y = x W^T + b over the last axis of x (any rank).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layers as one, their weights (and biases) stacked along the output axis: one product
    /// writes all their outputs side by side.
    pub fn stacked(layers: &[&Linear]) -> Result<Linear> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let biases: Option<Vec<&Tensor>> = layers.iter().map(|l| l.bias.as_ref()).collect();
        if biases.is_none() && layers.iter().any(|l| l.bias.is_some()) {
            candle_core::bail!("stacking linear layers: some have a bias and some do not");
        }
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Linear { weight: Tensor::cat(&weights, 0)?, bias })
    }

    /// Whether a backward will run through these layers applied to x: x or a weight records its
    /// ops. The fused training paths (stacked q/k/v, the one-op MLP) are taken only then.
    pub fn training(x: &Tensor, layers: &[&Linear]) -> bool {
        x.track_op() || layers.iter().any(|l| l.weight.track_op())
    }

    /// Forward FLOPs over `rows` rows as torch's FlopCounterMode counts them (a multiply-add is 2,
    /// the bias is free).
    pub fn flops(&self, rows: usize) -> u64 {
        let d = self.weight.dims();
        2 * (rows * d[0] * d[1]) as u64
    }
}

impl Linear {
    /// GELU-tanh(x W^T + b) (an MLP's first layer), fused into the linear when it has a bias.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => crate::kernels::linear_bias_gelu(x, &self.weight, b),
            None => crate::kernels::gelu_tanh(&self.forward(x)?),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => crate::kernels::linear_bias(x, &self.weight, b),
            None => crate::kernels::flat_matmul_t(x, &self.weight),
        }
    }
}

/// How a freshly built parameter is initialised (DiT's recipe: Xavier-uniform linears, zero
/// adaLN-Zero layers, N(0, 0.02) embeddings). Loading a checkpoint ignores it.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// PyTorch's `nn.Linear` default (Kaiming-uniform with a = sqrt(5)).
    Default,
    XavierUniform,
    Zeros,
    Normal(f64),
}

impl Init {
    /// adaLN-Zero's rule for modulation and output layers: zeros when training from scratch
    /// (`XavierUniform`), so every block starts as the identity and the output at zero; the
    /// given rule otherwise (checkpoints overwrite it anyway).
    pub fn zero_when_training(self) -> Init {
        match self {
            Init::XavierUniform => Init::Zeros,
            other => other,
        }
    }

    fn weight(self, fan_in: usize, fan_out: usize) -> candle_nn::Init {
        match self {
            Init::Default => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                candle_nn::Init::Uniform { lo: -bound, up: bound }
            }
            Init::XavierUniform => {
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                candle_nn::Init::Uniform { lo: -bound, up: bound }
            }
            Init::Zeros => candle_nn::Init::Const(0.0),
            Init::Normal(stdev) => candle_nn::Init::Randn { mean: 0.0, stdev },
        }
    }

    pub(crate) fn bias(self, fan_in: usize) -> candle_nn::Init {
        match self {
            Init::Default => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                candle_nn::Init::Uniform { lo: -bound, up: bound }
            }
            _ => candle_nn::Init::Const(0.0),
        }
    }

    /// A tensor (embedding table, position table) initialised with this rule.
    pub fn tensor(self, vb: &VarBuilder, shape: &[usize], name: &str) -> Result<candle_core::Tensor> {
        let fan_in = shape.iter().skip(1).product::<usize>().max(1);
        vb.get_with_hints(shape, name, self.weight(fan_in, shape[0]))
    }
}

/// `nn.Linear(in_dim, out_dim, bias)` at `vb` (`weight` is (out, in) as PyTorch stores it).
pub fn linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool, init: Init) -> Result<Linear> {
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init.weight(in_dim, out_dim))?;
    let bias = if bias { Some(vb.get_with_hints(out_dim, "bias", init.bias(in_dim))?) } else { None };
    Ok(Linear::new(weight, bias))
}
