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

impl FeedForward {
    /// [W1, b1, W2, b2] of a GELU-tanh MLP with biases (what `kernels::dit_block` takes); `None`
    /// for GEGLU or without biases.
    pub fn gelu_params(&self) -> Option<[&Tensor; 4]> {
        let (lin, lout) = (&self.proj_in, &self.proj_out);
        if self.gated {
            return None;
        }
        Some([lin.weight(), lin.bias()?, lout.weight(), lout.bias()?])
    }

    /// Both linears and the GELU as one op, while training on the CPU in f32: the hidden layer is
    /// then no graph node (see `kernels::mlp_gelu`). Not for inference, where gathering the
    /// parameters into one flat tensor would copy them on every call for nothing in return.
    fn fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some([w1, b1, w2, b2]) = self.gelu_params() else {
            return Ok(None);
        };
        if !Linear::training(x, &[&self.proj_in, &self.proj_out]) || !crate::kernels::f32_cpu(x) {
            return Ok(None);
        }
        let w = Tensor::cat(&[w1.flatten_all()?, w2.flatten_all()?], 0)?;
        let b = Tensor::cat(&[b1, b2], 0)?;
        crate::kernels::mlp_gelu(x, &w, &b, w1.dim(0)?)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused(x)? {
            return Ok(y);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn training_takes_the_fused_op_with_the_same_values_and_gradients() -> Result<()> {
        // Trainable weights: the MLP runs as one op. Against its two linears called in turn.
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let ff = FeedForward::new(vb, 24, 96, 24, Init::Default)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 30, 24), &dev)?)?;
        assert!(ff.fused(&x)?.is_some(), "a trainable MLP on the CPU takes the fused op");
        let fused = ff.forward(&x)?;
        let plain = ff.proj_out.forward(&ff.proj_in.forward_gelu(&x)?)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        assert!(diff(&fused, &plain)? < 1e-5, "outputs differ by {}", diff(&fused, &plain)?);
        let w = Tensor::randn(0f32, 1., fused.dims(), &dev)?;
        let (gf, gp) = ((fused * &w)?.sum_all()?.backward()?, (plain * &w)?.sum_all()?.backward()?);
        let vars = varmap.all_vars();
        assert_eq!(vars.len(), 4, "two weights, two biases");
        for v in vars.iter().chain([&x]) {
            let (a, b) = (gf.get(v.as_tensor()).expect("gradient"), gp.get(v.as_tensor()).expect("gradient"));
            assert!(diff(a, b)? < 1e-4, "gradients of {:?} differ by {}", v.dims(), diff(a, b)?);
        }
        // Inference (nothing tracked) keeps the two linears.
        let frozen = |l: &Linear| Linear::new(l.weight().detach(), l.bias().map(Tensor::detach));
        let ff = FeedForward { proj_in: frozen(&ff.proj_in), proj_out: frozen(&ff.proj_out), gated: false };
        assert!(ff.fused(&x.as_tensor().detach())?.is_none());
        Ok(())
    }
}
