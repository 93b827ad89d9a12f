//! Normalisations, composed from differentiable ops (candle-nn's fused LayerNorm has no backward).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm over the last axis without affine parameters (DiT's `norm1`, `norm_out`); a fused
/// kernel with its own backward on the CPU, computed in f32.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    crate::kernels::layer_norm(x, eps)
}

/// LayerNorm with optional elementwise affine (`weight`, `bias`).
pub fn layer_norm_affine(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mut y = layer_norm(x, eps)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// `nn.LayerNorm(dim, eps)` with its `weight` and `bias` (CLIP's layer norms, the UNet's
/// transformer blocks); fresh parameters start at 1 and 0 as in PyTorch.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_affine(x, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight (SD3.5 / Flux q-k norm, T5).
pub fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(dtype)?;
    match weight {
        Some(w) => y.broadcast_mul(w),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_has_zero_mean_unit_variance() -> Result<()> {
        let x = Tensor::new(&[[1f32, 2., 3., 6.], [-1., 0., 0., 5.]], &Device::Cpu)?;
        let y = layer_norm(&x, 0.0)?;
        let mean = y.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        let var = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        for (m, v) in mean.iter().zip(var.iter()) {
            assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-5, "mean {m} var {v}");
        }
        // First row by hand: mean 3, var 3.5.
        let first = y.get(0)?.to_vec1::<f32>()?;
        assert!((first[0] - (-2.0 / 3.5f32.sqrt())).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn rms_norm_matches_formula() -> Result<()> {
        let x = Tensor::new(&[[3f32, 4.]], &Device::Cpu)?;
        let w = Tensor::new(&[2f32, 0.5], &Device::Cpu)?;
        let y = rms_norm(&x, Some(&w), 0.0)?.flatten_all()?.to_vec1::<f32>()?;
        let rms = (12.5f32).sqrt();
        assert!((y[0] - 6.0 / rms).abs() < 1e-6 && (y[1] - 2.0 / rms).abs() < 1e-6);
        Ok(())
    }
}
