//! Timestep sinusoids, 2-D sin-cos position tables and the small embedding MLPs/tables.

use super::linear::{linear, Init, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

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
        Sinusoid { dim, flip_sin_to_cos, downscale_freq_shift, scale: 1.0, max_period: 10000.0 }
    }
}

/// Sinusoidal features of timesteps `t` [B] (int or float) -> [B, dim], always computed in f32
/// exactly as diffusers does (exponent, division and product each rounded to f32).
pub fn timestep_embedding(t: &Tensor, s: &Sinusoid) -> Result<Tensor> {
    let half = s.dim / 2;
    let log_period = -(s.max_period as f64).ln() as f32;
    let denom = half as f32 - s.downscale_freq_shift;
    let freqs: Vec<f32> = (0..half).map(|i| ((log_period * i as f32) / denom).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let t = t.to_dtype(DType::F32)?.reshape(((), 1))?;
    let mut args = t.broadcast_mul(&freqs)?;
    if s.scale != 1.0 {
        args = (args * s.scale as f64)?;
    }
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if s.flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
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
    let rows: Vec<f64> = (0..gh).map(|r| pos(r, gh)).collect();
    let cols: Vec<f64> = (0..gw).map(|c| pos(c, gw)).collect();
    sincos_grid(dim, &rows, &cols, dev)
}

/// A fixed 2-D sin-cos position table kept for the native `native` x `native` patch grid (DiT's
/// and TextDiT's `pos_embed`); other grids are computed with positions scaled to the native one,
/// as diffusers' `PatchEmbed` does.
#[derive(Clone, Debug)]
pub struct SincosPositions {
    table: Tensor,
    native: usize,
}

impl SincosPositions {
    /// The computed table for width `dim` on a `native` grid.
    pub fn new(dim: usize, native: usize, dtype: candle_core::DType, dev: &Device) -> Result<Self> {
        Ok(Self::stored(sincos_2d(dim, native, native, native as f32, 1.0, dev)?.to_dtype(dtype)?, native))
    }

    /// A table [native^2, dim] a checkpoint stores.
    pub fn stored(table: Tensor, native: usize) -> Self {
        SincosPositions { table, native }
    }

    /// The table [gh * gw, dim] for a `gh` x `gw` grid.
    pub fn grid(&self, gh: usize, gw: usize) -> Result<Tensor> {
        if gh == self.native && gw == self.native {
            return Ok(self.table.clone());
        }
        sincos_2d(self.table.dim(1)?, gh, gw, self.native as f32, 1.0, self.table.device())?
            .to_dtype(self.table.dtype())
    }

    pub fn dtype(&self) -> candle_core::DType {
        self.table.dtype()
    }
}

/// The `gh` x `gw` window at (`top`, `left`) of the square table
/// `sincos_2d(dim, max, max, base_size, 1.0)`, computed without the rest of the table (SD3 crops
/// its stored `pos_embed_max_size` table to the latent's patch grid).
#[allow(clippy::too_many_arguments)]
pub fn sincos_2d_window(
    dim: usize,
    max: usize,
    base_size: f32,
    top: usize,
    left: usize,
    gh: usize,
    gw: usize,
    dev: &Device,
) -> Result<Tensor> {
    let pos = |i: usize| (i as f32 / (max as f32 / base_size)) as f64;
    let rows: Vec<f64> = (top..top + gh).map(pos).collect();
    let cols: Vec<f64> = (left..left + gw).map(pos).collect();
    sincos_grid(dim, &rows, &cols, dev)
}

/// [rows * cols, dim] sin-cos features of a grid given its row and column positions.
fn sincos_grid(dim: usize, rows: &[f64], cols: &[f64], dev: &Device) -> Result<Tensor> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64)).collect();
    let mut table = Vec::with_capacity(rows.len() * cols.len() * dim);
    for &row in rows {
        for &col in cols {
            for p in [col, row] {
                table.extend(omega.iter().map(|w| (p * w).sin() as f32));
                table.extend(omega.iter().map(|w| (p * w).cos() as f32));
            }
        }
    }
    Tensor::from_vec(table, (rows.len() * cols.len(), dim), dev)
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

    /// Forward FLOPs over `rows` embeddings (both linears).
    pub fn flops(&self, rows: usize) -> u64 {
        self.linear_1.flops(rows) + self.linear_2.flops(rows)
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// diffusers' `PixArtAlphaTextProjection(act_fn="silu")`, the pooled-text MLP of SD3 and Flux
/// (BFL's `vector_in`): the same linear_1 -> SiLU -> linear_2 under the same key names.
pub type TextProjection = TimestepEmbedding;

/// diffusers' `CombinedTimestep[Guidance]TextProjEmbeddings` (SD3, Flux): the conditioning
/// vector MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled text) that drives every
/// adaLN modulation.
#[derive(Clone, Debug)]
pub struct TimeTextEmbedding {
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
    text_embedder: TextProjection,
}

impl TimeTextEmbedding {
    /// The 256 sinusoid channels ([cos, sin], shift 0) both SD3 and Flux use.
    const SINUSOID: Sinusoid = Sinusoid {
        dim: 256,
        flip_sin_to_cos: true,
        downscale_freq_shift: 0.0,
        scale: 1.0,
        max_period: 10000.0,
    };

    pub fn new(vb: VarBuilder, dim: usize, pooled_dim: usize, guidance: bool, init: Init) -> Result<Self> {
        let guidance_embedder = if guidance {
            Some(TimestepEmbedding::new(vb.pp("guidance_embedder"), 256, dim, init)?)
        } else {
            None
        };
        Ok(TimeTextEmbedding {
            timestep_embedder: TimestepEmbedding::new(vb.pp("timestep_embedder"), 256, dim, init)?,
            guidance_embedder,
            text_embedder: TextProjection::new(vb.pp("text_embedder"), pooled_dim, dim, init)?,
        })
    }

    /// t [B] and pooled text [B, P] -> [B, D]. `guidance` [B] is required by a model with a
    /// guidance embedder (Flux-dev) and has nothing to act on without one.
    pub fn forward(&self, t: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Result<Tensor> {
        let embed = |mlp: &TimestepEmbedding, x: &Tensor| {
            mlp.forward(&timestep_embedding(x, &Self::SINUSOID)?.to_dtype(pooled.dtype())?)
        };
        let mut emb = embed(&self.timestep_embedder, t)?;
        if let Some(mlp) = &self.guidance_embedder {
            let g = guidance.ok_or_else(|| {
                candle_core::Error::Msg("this model embeds a guidance scale: pass one".into())
            })?;
            emb = (emb + embed(mlp, g)?)?;
        }
        emb + self.text_embedder.forward(pooled)?
    }
}

/// Class-label table with one extra row for the classifier-free-guidance null class.
#[derive(Clone, Debug)]
pub struct LabelEmbedding {
    pub embedding_table: Tensor,
}

impl LabelEmbedding {
    pub fn new(vb: VarBuilder, num_classes: usize, dim: usize) -> Result<Self> {
        let embedding_table =
            Init::Normal(0.02).tensor(&vb, &[num_classes + 1, dim], "embedding_table.weight")?;
        Ok(LabelEmbedding { embedding_table })
    }

    pub fn forward(&self, labels: &Tensor) -> Result<Tensor> {
        self.embedding_table.embedding(&labels.to_dtype(DType::U32)?)
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
    fn sincos_window_is_the_crop_of_the_full_table() -> Result<()> {
        let full = sincos_2d(8, 6, 6, 2.0, 1.0, &Device::Cpu)?.reshape((6, 6, 8))?;
        let crop = full.narrow(0, 1, 3)?.narrow(1, 2, 2)?.reshape((6, 8))?;
        let window = sincos_2d_window(8, 6, 2.0, 1, 2, 3, 2, &Device::Cpu)?;
        assert_eq!(window.to_vec2::<f32>()?, crop.to_vec2::<f32>()?);
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
