//! Rotary position embedding over several position axes (Flux: a 3-axis id per token, [0, row,
//! col] for image tokens and zeros for text). Each axis owns a slice of the head dimension; inside
//! it, consecutive channel pairs (x0, x1), (x2, x3), ... are rotated by angle `pos * freq_i`.

use candle_core::{DType, Result, Tensor};

/// cos/sin tables [L, head_dim] for one joint sequence, each frequency repeated for its pair.
#[derive(Clone, Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Tables for the position ids [L, n_axes]: axis a contributes `axes_dims[a]` channels with
    /// frequencies `theta^(-2i / axes_dims[a])`. Angles are computed in f64 and stored in f32, as
    /// diffusers' `FluxPosEmbed` does, so large positions keep their precision.
    pub fn new(ids: &Tensor, axes_dims: &[usize], theta: f64) -> Result<Rope> {
        let (len, n_axes) = ids.dims2()?;
        if n_axes != axes_dims.len() || axes_dims.iter().any(|d| d % 2 == 1) {
            candle_core::bail!(
                "rope: ids have {n_axes} axes but axes_dims is {axes_dims:?} (one even size per axis)"
            );
        }
        let head_dim: usize = axes_dims.iter().sum();
        let (mut cos, mut sin) = (Vec::with_capacity(len * head_dim), Vec::with_capacity(len * head_dim));
        for row in ids.to_dtype(DType::F32)?.to_vec2::<f32>()? {
            for (&pos, &dim) in row.iter().zip(axes_dims) {
                for i in 0..dim / 2 {
                    let (s, c) = (pos as f64 / theta.powf((2 * i) as f64 / dim as f64)).sin_cos();
                    cos.extend([c as f32; 2]);
                    sin.extend([s as f32; 2]);
                }
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (len, head_dim), ids.device())?,
            sin: Tensor::from_vec(sin, (len, head_dim), ids.device())?,
        })
    }

    /// Rotates q or k [B, L, H*d] (`heads` heads): (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
    /// per pair, in f32, every head by the same angles.
    pub fn apply(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, hd) = x.dims3()?;
        let (dtype, d) = (x.dtype(), hd / heads);
        let x = x.to_dtype(DType::F32)?.reshape((b, l, heads, d))?;
        let pairs = x.reshape((b, l, heads, d / 2, 2))?;
        let (even, odd) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
        let rotated = Tensor::cat(&[&odd.neg()?, &even], 4)?.reshape((b, l, heads, d))?;
        let per_head = |t: &Tensor| t.reshape((l, 1, d));
        let y = (x.broadcast_mul(&per_head(&self.cos)?)? + rotated.broadcast_mul(&per_head(&self.sin)?)?)?;
        y.reshape((b, l, hd))?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tables_follow_axes_and_repeat_each_frequency() -> Result<()> {
        let ids = Tensor::new(&[[0f32, 0., 0.], [0., 3., 5.]], &Device::Cpu)?;
        let rope = Rope::new(&ids, &[2, 4, 4], 10000.0)?;
        let cos = rope.cos.to_vec2::<f32>()?;
        let sin = rope.sin.to_vec2::<f32>()?;
        assert!(cos[0].iter().all(|c| *c == 1.0) && sin[0].iter().all(|s| *s == 0.0));
        // axis 1 (row 3) channels 2..6: frequencies 1 and 10000^(-2/4) = 0.01, each twice.
        assert_eq!(sin[1][2], 3f64.sin() as f32);
        assert_eq!(sin[1][3], sin[1][2]);
        assert_eq!(cos[1][4], 0.03f64.cos() as f32);
        // axis 2 (col 5) channels 6..10
        assert_eq!(sin[1][6], 5f64.sin() as f32);
        Ok(())
    }

    #[test]
    fn rotation_acts_on_consecutive_pairs_and_keeps_norm() -> Result<()> {
        let ids = Tensor::new(&[[0f32, 1.]], &Device::Cpu)?;
        let rope = Rope::new(&ids, &[2, 2], 10000.0)?;
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]]], &Device::Cpu)?;
        let y = rope.apply(&x, 1)?.flatten_all()?.to_vec1::<f32>()?;
        // pair (1, 2) at position 0 is unchanged; pair (3, 4) turns by 1 radian.
        let (s, c) = 1f32.sin_cos();
        assert_eq!(&y[..2], &[1., 2.]);
        assert!((y[2] - (3. * c - 4. * s)).abs() < 1e-6 && (y[3] - (4. * c + 3. * s)).abs() < 1e-6);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y) - 30.0).abs() < 1e-5);
        Ok(())
    }
}
