//! Adaptive LayerNorm modulation: the conditioning vector sets each block's shift, scale and gate.

use super::linear::{linear, Init, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `x * (1 + scale) + shift`, with `shift`/`scale` of shape [B, D] broadcast over the tokens of
/// `x` [B, L, D] (a fused kernel with its own backward on the CPU).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    crate::kernels::modulate(x, shift, scale)
}

/// `modulate(layer_norm(x, eps), shift, scale)`, the LayerNorm computed inside the same kernel
/// (the normalised tensor is never stored).
pub fn modulated_norm(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    crate::kernels::modulated_norm(x, shift, scale, eps)
}

/// The adaLN-Zero residual `x + gate * branch`, `gate` [B, D]: a zero gate makes the block the
/// identity, which is why DiT initialises the modulation to zero.
pub fn gated_residual(x: &Tensor, gate: &Tensor, branch: &Tensor) -> Result<Tensor> {
    crate::kernels::gated_residual(x, gate, branch)
}

/// Splits a modulation vector [B, n*D] into its `n` chunks [B, D] (diffusers' `.chunk(n, dim=1)`).
pub fn chunks(emb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    emb.chunk(n, 1)
}

/// adaLN-Zero's modulation: Linear(SiLU(c)) split into `n` [B, D] chunks, a shift, scale and
/// gate per residual branch (DiT, SD3 and Flux blocks alike).
pub fn adaln_zero(linear: &Linear, c: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    chunks(&linear.forward(&c.silu()?)?, n)
}

/// diffusers' `AdaLayerNormContinuous` (SD3/Flux `norm_out`, SD3's last text-stream norm):
/// LayerNorm without affine, then `x * (1 + scale) + shift` with [scale, shift] = Linear(SiLU(c)).
/// The original SAI and BFL checkpoints store [shift, scale]; `weights::keymap` swaps the halves.
#[derive(Clone, Debug)]
pub struct AdaLayerNormContinuous {
    linear: Linear,
}

impl AdaLayerNormContinuous {
    const EPS: f64 = 1e-6;

    /// `vb` is the norm's own prefix (its linear sits at `linear`).
    pub fn new(vb: &VarBuilder, dim: usize, cond_dim: usize, init: Init) -> Result<Self> {
        Ok(AdaLayerNormContinuous { linear: linear(&vb.pp("linear"), cond_dim, 2 * dim, true, init)? })
    }

    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let m = adaln_zero(&self.linear, c, 2)?;
        modulated_norm(x, &m[1], &m[0], Self::EPS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn continuous_norm_reads_scale_before_shift() -> Result<()> {
        let dev = Device::Cpu;
        let (vm, d) = (candle_nn::VarMap::new(), 2);
        let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
        let norm = AdaLayerNormContinuous::new(&vb, d, 1, Init::Zeros)?;
        // bias [scale = 1, 1, shift = 3, 3], weight 0: x_hat * 2 + 3
        vm.data().lock().unwrap()["linear.bias"].set(&Tensor::new(&[1f32, 1., 3., 3.], &dev)?)?;
        let x = Tensor::new(&[[[1f32, -1.]]], &dev)?;
        let y = norm.forward(&x, &Tensor::zeros((1, 1), candle_core::DType::F32, &dev)?)?;
        let y = y.flatten_all()?.to_vec1::<f32>()?;
        assert!((y[0] - 5.0).abs() < 1e-4 && (y[1] - 1.0).abs() < 1e-4, "{y:?}");
        Ok(())
    }

    #[test]
    fn zero_gate_is_identity_and_zero_modulation_is_noop() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 3, 4), &dev)?;
        let branch = Tensor::randn(0f32, 1., (2, 3, 4), &dev)?;
        let zero = Tensor::zeros((2, 4), candle_core::DType::F32, &dev)?;
        let same = gated_residual(&x, &zero, &branch)?;
        assert_eq!(same.to_vec3::<f32>()?, x.to_vec3::<f32>()?);
        assert_eq!(modulate(&x, &zero, &zero)?.to_vec3::<f32>()?, x.to_vec3::<f32>()?);
        let shift = Tensor::ones((2, 4), candle_core::DType::F32, &dev)?;
        let moved = (modulate(&x, &shift, &zero)? - &x)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(moved.iter().all(|d| (d - 1.0).abs() < 1e-6));
        Ok(())
    }
}
