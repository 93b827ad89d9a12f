//! Timestep sinusoids, 2-D sin-cos position tables and the small embedding MLPs/tables.

use super::linear::{linear, Init};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// The sinusoid flags of diffusers' `get_timestep_embedding` (and official DiT with shift 0).
#[derive(Clone, Copy, Debug)]
pub struct Sinusoid {
    pub dim: usize,
    /// [cos, sin] instead of [sin, cos].
    pub flip_sin_to_cos: bool,
    /// Frequencies are exp(-ln(max_period) * i / (half - shift)): DiT diffusers 1, official DiT 0.
    pub downscale_freq_shift: f32,
    pub scale: f32,
    pub max_period: f32,
}

impl Sinusoid {
    pub fn new(dim: usize, flip_sin_to_cos: bool, downscale_freq_shift: f32) -> Self {
        Sinusoid {
            dim,
            flip_sin_to_cos,
            downscale_freq_shift,
            scale: 1.0,
            max_period: 10000.0,
        }
    }
}

/// Sinusoidal features of timesteps `t` [B] (int or float) -> [B, dim], always computed in f32
/// exactly as diffusers does (exponent, division and product each rounded to f32).
pub fn timestep_embedding(t: &Tensor, s: &Sinusoid) -> Result<Tensor> {
    let half = s.dim / 2;
    let log_period = -(s.max_period as f64).ln() as f32;
    let denom = half as f32 - s.downscale_freq_shift;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let t = t.to_dtype(DType::F32)?.reshape(((), 1))?;
    let mut args = t.broadcast_mul(&freqs)?;
    if s.scale != 1.0 {
        args = (args * s.scale as f64)?;
    }
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if s.flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if s.dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers' `get_2d_sincos_pos_embed(dim, (gh, gw), base_size, interpolation_scale)` as [gh*gw, dim]:
/// token k = row*gw + col; channels [0, dim/2) encode the column, [dim/2, dim) the row; each half
/// is [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i/(dim/4)) and p = index * base_size / grid / scale.
pub fn sincos_2d(
    dim: usize,
    gh: usize,
    gw: usize,
    base_size: f32,
    interpolation_scale: f32,
    dev: &Device,
) -> Result<Tensor> {
    // Positions are f32 in diffusers, frequencies and the products f64: keep both.
    let pos = |i: usize, g: usize| (i as f32 / (g as f32 / base_size) / interpolation_scale) as f64;
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / (dim / 4) as f64))
        .collect();
    let mut table = Vec::with_capacity(gh * gw * dim);
    for row in 0..gh {
        for col in 0..gw {
            for p in [pos(col, gw), pos(row, gh)] {
                table.extend(omega.iter().map(|w| (p * w).sin() as f32));
                table.extend(omega.iter().map(|w| (p * w).cos() as f32));
            }
        }
    }
    Tensor::from_vec(table, (gh * gw, dim), dev)
}

/// diffusers' `TimestepEmbedding`: linear_1 -> SiLU -> linear_2 (official DiT: `t_embedder.mlp`).
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, dim: usize, init: Init) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: linear(&vb.pp("linear_1"), in_dim, dim, true, init)?,
            linear_2: linear(&vb.pp("linear_2"), dim, dim, true, init)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// Class-label table with one extra row for the classifier-free-guidance null class.
#[derive(Clone, Debug)]
pub struct LabelEmbedding {
    pub embedding_table: Tensor,
}

impl LabelEmbedding {
    pub fn new(vb: VarBuilder, num_classes: usize, dim: usize) -> Result<Self> {
        let embedding_table = Init::Normal(0.02).tensor(&vb, &[num_classes + 1, dim], "embedding_table.weight")?;
        Ok(LabelEmbedding { embedding_table })
    }

    pub fn forward(&self, labels: &Tensor) -> Result<Tensor> {
        self.embedding_table
            .embedding(&labels.to_dtype(DType::U32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_zero_is_cos_one_sin_zero() -> Result<()> {
        let t = Tensor::new(&[0f32], &Device::Cpu)?;
        let e = timestep_embedding(&t, &Sinusoid::new(8, true, 1.0))?.to_vec2::<f32>()?;
        assert_eq!(e[0], vec![1., 1., 1., 1., 0., 0., 0., 0.]);
        let e = timestep_embedding(&t, &Sinusoid::new(8, false, 1.0))?.to_vec2::<f32>()?;
        assert_eq!(e[0], vec![0., 0., 0., 0., 1., 1., 1., 1.]);
        Ok(())
    }

    #[test]
    fn timestep_frequencies_follow_shift() -> Result<()> {
        // shift 1: the last frequency is exactly 1/max_period; shift 0: it is above that.
        let t = Tensor::new(&[1000f32], &Device::Cpu)?;
        let e = timestep_embedding(&t, &Sinusoid::new(8, false, 1.0))?.to_vec2::<f32>()?;
        assert!((e[0][3] - (1000f32 / 10000.0).sin()).abs() < 1e-6);
        let e0 = timestep_embedding(&t, &Sinusoid::new(8, false, 0.0))?.to_vec2::<f32>()?;
        let f3 = (-(10000f32.ln()) * 3.0 / 4.0).exp();
        assert!((e0[0][3] - (1000.0 * f3).sin()).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn sincos_2d_columns_first_then_rows() -> Result<()> {
        let t = sincos_2d(8, 2, 3, 2.0, 1.0, &Device::Cpu)?.to_vec2::<f32>()?;
        // token (row 1, col 2) = index 5; base_size 2, grid 3 -> column position 2 * 2/3.
        let p_col = (2f32 / (3f32 / 2.0)) as f64;
        assert!((t[5][0] - p_col.sin() as f32).abs() < 1e-7);
        assert!((t[5][2] - p_col.cos() as f32).abs() < 1e-7);
        assert!((t[5][4] - 1f64.sin() as f32).abs() < 1e-7); // row 1, grid 2, base 2 -> p = 1
        assert!((t[5][7] - (0.01f64).cos() as f32).abs() < 1e-7); // w_1 = 10000^(-1/2)
        Ok(())
    }
}
