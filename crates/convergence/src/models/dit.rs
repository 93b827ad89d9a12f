//! DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"): patchify the latent,
//! run transformer blocks whose LayerNorms are modulated by the timestep + class embedding
//! (adaLN-Zero), and un-patchify to noise and variance predictions. Key names mirror diffusers'
//! `DiTTransformer2DModel`; `weights::keymap::dit` converts the official layout.

use crate::error::{Error, Result};
use crate::models::{Conditioning, Denoiser, Prediction};
use crate::nn::adaln::{chunks, gated_residual, modulate, modulated_norm};
use crate::nn::{
    layer_norm, linear, timestep_embedding, unpatchify, Attention, FeedForward, Init, LabelEmbedding, Linear,
    PatchEmbed, PatchOrder, SincosPositions, Sinusoid, TimestepEmbedding,
};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// `DiTTransformer2DModel`'s config.json, field for field (defaults = DiT-XL/2 as diffusers has them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DiTConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub dropout: f64,
    pub norm_num_groups: usize,
    pub attention_bias: bool,
    pub sample_size: usize,
    pub patch_size: usize,
    pub activation_fn: String,
    pub num_embeds_ada_norm: Option<usize>,
    pub upcast_attention: bool,
    pub norm_type: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
}

impl Default for DiTConfig {
    fn default() -> Self {
        DiTConfig {
            num_attention_heads: 16,
            attention_head_dim: 72,
            in_channels: 4,
            out_channels: None,
            num_layers: 28,
            dropout: 0.0,
            norm_num_groups: 32,
            attention_bias: true,
            sample_size: 32,
            patch_size: 2,
            activation_fn: "gelu-approximate".into(),
            num_embeds_ada_norm: Some(1000),
            upcast_attention: false,
            norm_type: "ada_norm_zero".into(),
            norm_elementwise_affine: false,
            norm_eps: 1e-5,
        }
    }
}

/// The paper's family: (name, depth, hidden, heads).
const FAMILY: [(&str, usize, usize, usize); 4] =
    [("s", 12, 384, 6), ("b", 12, 768, 12), ("l", 24, 1024, 16), ("xl", 28, 1152, 16)];

impl DiTConfig {
    /// `dit-s-2` ... `dit-xl-8`: the paper's configurations at 256x256 (latent 32x32, 1000 classes).
    pub fn preset(name: &str) -> Option<Self> {
        let rest = name.to_ascii_lowercase();
        let rest = rest.strip_prefix("dit-")?;
        let (size, patch) = rest.rsplit_once(['-', '/'])?;
        let patch: usize = patch.parse().ok().filter(|p| [2, 4, 8].contains(p))?;
        let (_, depth, hidden, heads) = FAMILY.iter().find(|f| f.0 == size)?;
        Some(DiTConfig {
            num_attention_heads: *heads,
            attention_head_dim: hidden / heads,
            out_channels: Some(8),
            num_layers: *depth,
            patch_size: patch,
            ..Default::default()
        })
    }

    pub fn preset_names() -> Vec<String> {
        FAMILY.iter().flat_map(|f| [2, 4, 8].map(|p| format!("dit-{}-{p}", f.0))).collect()
    }

    /// The head count of an official checkpoint of this width (presets know it).
    pub fn heads_for_width(hidden: usize) -> Option<usize> {
        FAMILY.iter().find(|f| f.2 == hidden).map(|f| f.3)
    }

    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn num_classes(&self) -> usize {
        self.num_embeds_ada_norm.unwrap_or(1000)
    }

    /// The classifier-free-guidance null class id (the table's last row).
    pub fn null_class(&self) -> usize {
        self.num_classes()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.norm_type != "ada_norm_zero" {
            return Err(format!("norm_type `{}` is not supported (DiT uses ada_norm_zero)", self.norm_type));
        }
        if !["gelu-approximate", "gelu"].contains(&self.activation_fn.as_str()) {
            return Err(format!("activation_fn `{}` is not supported", self.activation_fn));
        }
        if self.patch_size == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return Err("patch_size, num_attention_heads and attention_head_dim must be positive".into());
        }
        Ok(())
    }

    /// config.json as diffusers writes it (with `_class_name`).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let m = v.as_object_mut().expect("object");
        m.insert("_class_name".into(), "DiTTransformer2DModel".into());
        m.insert("_diffusers_version".into(), "0.42.1".into());
        v
    }

    /// Parameters (diffusers layout) from the real construction code, without allocating.
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        DiT::new(rec.var_builder(), self, Numerics::Diffusers, Init::Default)?;
        Ok(rec.params())
    }

    /// Forward FLOPs at a latent of `h` x `w`, batch 1, counted as FlopCounterMode counts them
    /// (matmuls, convolutions and attention only; a multiply-add is 2).
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        let (d, p) = (self.hidden() as u64, self.patch_size as u64);
        let n = ((h / self.patch_size) * (w / self.patch_size)) as u64;
        let (c_in, c_out) = (self.in_channels as u64, self.out_channels() as u64);
        let embedder = 2 * (256 * d + d * d);
        let block = embedder + 2 * d * 6 * d + 8 * n * d * d + 4 * n * n * d + 16 * n * d * d;
        let patch = 2 * n * d * c_in * p * p;
        let head = embedder + 2 * d * 2 * d + 2 * n * d * p * p * c_out;
        patch + self.num_layers as u64 * block + head
    }
}

/// Which implementation's numerics to reproduce. The official code differs from diffusers in its
/// timestep frequencies (exponent / half instead of / (half - 1)) and the MLP LayerNorm eps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numerics {
    Diffusers,
    Official,
}

/// `norm1` of a diffusers block: the per-block conditioning embedder plus the adaLN linear.
#[derive(Clone, Debug)]
struct AdaLayerNormZero {
    timestep_embedder: TimestepEmbedding,
    class_embedder: LabelEmbedding,
    linear: Linear,
}

impl AdaLayerNormZero {
    fn new(vb: VarBuilder, d: usize, classes: usize, init: Init) -> candle_core::Result<Self> {
        let emb = vb.pp("emb");
        Ok(AdaLayerNormZero {
            timestep_embedder: TimestepEmbedding::new(
                emb.pp("timestep_embedder"),
                256,
                d,
                init_embedder(init),
            )?,
            class_embedder: LabelEmbedding::new(emb.pp("class_embedder"), classes, d)?,
            linear: linear(&vb.pp("linear"), d, 6 * d, true, init.zero_when_training())?,
        })
    }

    /// c = MLP(sinusoid(t)) + table[y]
    fn condition(&self, t_freq: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        self.timestep_embedder.forward(t_freq)? + self.class_embedder.forward(labels)?
    }
}

/// DiT's initialisation: Xavier linears, N(0, 0.02) embedders, zero adaLN and final layer.
fn init_embedder(init: Init) -> Init {
    match init {
        Init::XavierUniform => Init::Normal(0.02),
        other => other,
    }
}

#[derive(Clone, Debug)]
struct DiTBlock {
    norm1: AdaLayerNormZero,
    attn1: Attention,
    ff: FeedForward,
    norm2_affine: Option<(Tensor, Tensor)>,
    norm2_eps: f64,
}

impl DiTBlock {
    fn new(vb: VarBuilder, cfg: &DiTConfig, numerics: Numerics, init: Init) -> candle_core::Result<Self> {
        let d = cfg.hidden();
        let norm2_affine = if cfg.norm_elementwise_affine {
            let n = vb.pp("norm2");
            Some((
                n.get_with_hints(d, "weight", candle_nn::Init::Const(1.0))?,
                n.get_with_hints(d, "bias", candle_nn::Init::Const(0.0))?,
            ))
        } else {
            None
        };
        Ok(DiTBlock {
            norm1: AdaLayerNormZero::new(vb.pp("norm1"), d, cfg.num_classes(), init)?,
            attn1: Attention::new(
                vb.pp("attn1"),
                d,
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                cfg.attention_bias,
                init,
            )?,
            ff: FeedForward::new(vb.pp("ff"), d, 4 * d, d, init)?,
            norm2_affine,
            norm2_eps: match numerics {
                Numerics::Diffusers => cfg.norm_eps,
                Numerics::Official => 1e-6,
            },
        })
    }

    fn forward(&self, x: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
        let m = self.norm1.linear.forward(&c.silu()?)?;
        match self.fused(x, &m)? {
            Some(y) => Ok(y),
            None => self.composed(x, &m),
        }
    }

    /// The whole block as one op while training on the CPU (`kernels::dit_block`): none of its
    /// activations is then a graph node. Not with the LayerNorm affine of `norm_elementwise_affine`.
    fn fused(&self, x: &Tensor, m: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (Some((attention, heads)), Some(mlp), None) =
            (self.attn1.self_attention_params(), self.ff.gelu_params(), &self.norm2_affine)
        else {
            return Ok(None);
        };
        crate::kernels::dit_block(x, m, attention, mlp, heads, [1e-6, self.norm2_eps])
    }

    /// The block from its parts, `m` = Linear(SiLU(c)) in six chunks.
    fn composed(&self, x: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
        let m = chunks(m, 6)?;
        let (shift_msa, scale_msa, gate_msa) = (&m[0], &m[1], &m[2]);
        let (shift_mlp, scale_mlp, gate_mlp) = (&m[3], &m[4], &m[5]);
        let h = modulated_norm(x, shift_msa, scale_msa, 1e-6)?;
        let x = gated_residual(x, gate_msa, &self.attn1.forward(&h, None)?)?;
        let h = match &self.norm2_affine {
            None => modulated_norm(&x, shift_mlp, scale_mlp, self.norm2_eps)?,
            Some((w, b)) => {
                let n = layer_norm(&x, self.norm2_eps)?.broadcast_mul(w)?.broadcast_add(b)?;
                modulate(&n, shift_mlp, scale_mlp)?
            }
        };
        gated_residual(&x, gate_mlp, &self.ff.forward(&h)?)
    }
}

/// A class-conditional DiT.
#[derive(Clone, Debug)]
pub struct DiT {
    cfg: DiTConfig,
    numerics: Numerics,
    prediction: Prediction,
    patch_embed: PatchEmbed,
    /// The native-resolution position table (stored in official checkpoints, computed otherwise).
    pos_table: SincosPositions,
    transformer_blocks: Vec<DiTBlock>,
    proj_out_1: Linear,
    proj_out_2: Linear,
}

impl DiT {
    /// Builds the model from `vb` (a checkpoint, a fresh `VarMap` initialised with `init`, or a
    /// shape recorder). `Init::XavierUniform` gives the paper's adaLN-Zero initialisation.
    pub fn new(vb: VarBuilder, cfg: &DiTConfig, numerics: Numerics, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let (d, p, c) = (cfg.hidden(), cfg.patch_size, cfg.in_channels);
        let grid = cfg.sample_size / p;
        let pe = vb.pp("pos_embed");
        let patch_embed = PatchEmbed::new(&pe.pp("proj"), c, d, p, init)?;
        let pos_table = if pe.contains_tensor("pos_embed") {
            SincosPositions::stored(pe.get((1, grid * grid, d), "pos_embed")?.squeeze(0)?, grid)
        } else {
            SincosPositions::new(d, grid, vb.dtype(), vb.device())?
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| DiTBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg, numerics, init))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let proj_out_1 = linear(&vb.pp("proj_out_1"), d, 2 * d, true, init.zero_when_training())?;
        let proj_out_2 =
            linear(&vb.pp("proj_out_2"), d, p * p * cfg.out_channels(), true, init.zero_when_training())?;
        let prediction = if cfg.out_channels() == 2 * cfg.in_channels {
            Prediction::EpsilonLearnedSigma
        } else {
            Prediction::Epsilon
        };
        Ok(DiT {
            cfg: cfg.clone(),
            numerics,
            prediction,
            patch_embed,
            pos_table,
            transformer_blocks: blocks,
            proj_out_1,
            proj_out_2,
        })
    }

    /// Sets what the output means (diffusers' DiT is a DDPM model; ours may be rectified flow).
    pub fn with_prediction(mut self, p: Prediction) -> Self {
        self.prediction = p;
        self
    }

    pub fn config(&self) -> &DiTConfig {
        &self.cfg
    }

    fn time_freq(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let shift = match self.numerics {
            Numerics::Diffusers => 1.0,
            Numerics::Official => 0.0,
        };
        timestep_embedding(t, &Sinusoid::new(256, true, shift))?.to_dtype(self.pos_table.dtype())
    }

    /// x [B, C, H, W] (H, W multiples of the patch size, any aspect), t [B] or scalar (DDPM
    /// index 0..1000, or sigma * 1000 for flow models), labels [B] -> [B, out_channels, H, W].
    pub fn forward_labels(&self, x: &Tensor, t: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels || h % p != 0 || w % p != 0 {
            candle_core::bail!(
                "DiT input has shape [{b}, {c}, {h}, {w}]: expected {} channels and sides divisible by patch size {p}",
                self.cfg.in_channels
            );
        }
        let (gh, gw) = (h / p, w / p);
        let t = if t.rank() == 0 { t.broadcast_as(b)? } else { t.clone() };
        let labels = if labels.rank() == 0 { labels.broadcast_as(b)? } else { labels.clone() };
        let tokens = self.patch_embed.forward(x)?;
        let mut x = tokens.broadcast_add(&self.pos_table.grid(gh, gw)?.unsqueeze(0)?)?;
        let t_freq = self.time_freq(&t)?;
        for block in &self.transformer_blocks {
            let c = block.norm1.condition(&t_freq, &labels)?;
            x = block.forward(&x, &c)?;
        }
        // The final layer reuses block 0's embedder (diffusers; the official model has only one).
        let c = match self.transformer_blocks.first() {
            Some(b0) => b0.norm1.condition(&t_freq, &labels)?,
            None => candle_core::bail!("DiT has no transformer blocks"),
        };
        let m = chunks(&self.proj_out_1.forward(&c.silu()?)?, 2)?;
        let x = modulated_norm(&x, &m[0], &m[1], 1e-6)?;
        let x = self.proj_out_2.forward(&x)?;
        unpatchify(&x, gh, gw, p, PatchOrder::ChannelLast)
    }
}

impl Denoiser for DiT {
    fn forward(&self, x: &Tensor, t: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let labels = match &cond.class_labels {
            Some(l) => l.clone(),
            None => Tensor::full(self.cfg.null_class() as u32, x.dim(0)?, x.device())?,
        };
        self.forward_labels(x, t, &labels.to_dtype(DType::U32)?)
    }

    fn prediction(&self) -> Prediction {
        self.prediction
    }
}

/// Parameter count of the official layout (one shared embedder, stored `pos_embed`), derived
/// from the diffusers parameter list through the key map.
pub fn official_param_count(cfg: &DiTConfig) -> Result<u64> {
    let params = cfg.param_list()?;
    let map = params.0.into_iter().collect();
    let official = crate::weights::keymap::dit::from_diffusers(&map)?;
    let grid = cfg.sample_size / cfg.patch_size;
    let pos_embed = (grid * grid * cfg.hidden()) as u64;
    Ok(official.values().map(|s| s.iter().product::<usize>() as u64).sum::<u64>() + pos_embed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The block as one op (taken while training) against the block from its parts: the same
    /// output, the same gradients for x, c and every parameter, and a central difference on x.
    #[test]
    fn block_as_one_op_matches_its_parts_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // A large MLP-norm eps, so that mixing up the two norms' eps would show.
        let cfg =
            DiTConfig { num_attention_heads: 2, attention_head_dim: 8, norm_eps: 0.1, ..Default::default() };
        // Default (Kaiming) initialisation: adaLN-Zero's zero modulation would hide the branches.
        let varmap = candle_nn::VarMap::new();
        let vb = crate::weights::init::seeded_var_builder(&varmap, 7, DType::F32, &dev);
        let block = DiTBlock::new(vb, &cfg, Numerics::Diffusers, Init::Default)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5, 16), &dev)?)?;
        let c = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 16), &dev)?)?;
        let m = |c: &Tensor| block.norm1.linear.forward(&c.silu()?);
        let fused = block.fused(x.as_tensor(), &m(c.as_tensor())?)?.expect("the fused block while training");
        let composed = block.composed(x.as_tensor(), &m(c.as_tensor())?)?;
        let w = Tensor::randn(0f32, 1., fused.dims(), &dev)?;
        let diff = (&fused - &composed)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "outputs differ by {diff}");
        let (ga, gb) = ((&fused * &w)?.sum_all()?.backward()?, (&composed * &w)?.sum_all()?.backward()?);
        // The attention's 8 parameters, the MLP's 4 and the adaLN linear's 2 (the embedders of
        // norm1 make c, given here).
        let vars: Vec<Var> =
            varmap.all_vars().into_iter().filter(|v| gb.get(v.as_tensor()).is_some()).collect();
        assert_eq!(vars.len(), 8 + 4 + 2);
        for v in vars.iter().chain([&x, &c]) {
            let (a, b) =
                (ga.get(v.as_tensor()).expect("fused gradient"), gb.get(v.as_tensor()).expect("gradient"));
            let d = (a - b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "gradients of a {:?} parameter differ by {d}", v.dims());
        }
        let loss = |h: f32| -> Result<f64> {
            let mut data = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            data[17] += h;
            let x = Tensor::from_vec(data, x.dims(), &dev)?;
            let y = block.forward(&x, c.as_tensor())?.to_dtype(DType::F64)?;
            Ok((y * w.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()?)
        };
        let fd = ((loss(1e-2)? - loss(-1e-2)?) / 2e-2) as f32;
        let an = ga.get(x.as_tensor()).expect("dx").flatten_all()?.to_vec1::<f32>()?[17];
        assert!((fd - an).abs() < 1e-2 * an.abs().max(1.0), "finite difference {fd} vs {an}");
        Ok(())
    }
}
