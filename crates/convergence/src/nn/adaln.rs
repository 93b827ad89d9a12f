//! Adaptive LayerNorm modulation: the conditioning vector sets each block's shift, scale and gate.

use candle_core::{Result, Tensor};

/// `x * (1 + scale) + shift`, with `shift`/`scale` of shape [B, D] broadcast over the tokens of
/// `x` [B, L, D].
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// The adaLN-Zero residual `x + gate * branch`, `gate` [B, D]: a zero gate makes the block the
/// identity, which is why DiT initialises the modulation to zero.
pub fn gated_residual(x: &Tensor, gate: &Tensor, branch: &Tensor) -> Result<Tensor> {
    x + branch.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// Splits a modulation vector [B, n*D] into its `n` chunks [B, D] (diffusers' `.chunk(n, dim=1)`).
pub fn chunks(emb: &Tensor, n: usize) -> Result<Vec<Tensor>> {
    emb.chunk(n, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
