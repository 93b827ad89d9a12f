//! Text-conditioned DiT for the conditioning ablation of issue 7: SD3's embeddings, final layer
//! and timestep convention around DiT blocks, so that it differs from the MMDiT only in how the
//! text reaches the image tokens. "cross-attention": each block adds a one-way cross-attention
//! from the image tokens to the text tokens (PixArt-alpha, diffusers' `BasicTransformerBlock`);
//! "pooled": the text enters only through the pooled vector in the adaLN conditioning.

use crate::error::{Error, Result};
use crate::models::{Conditioning, Denoiser, Prediction};
use crate::nn::{
    adaln_zero, gated_residual, layer_norm, linear, modulated_norm, unpatchify, AdaLayerNormContinuous,
    Attention, AttentionShape, FeedForward, Init, Linear, PatchEmbed, PatchOrder, SincosPositions,
    TimeTextEmbedding,
};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The `_class_name` of this model's config.json (ours; diffusers has no such class).
pub const TEXT_DIT_CLASS: &str = "TextDiTTransformer2DModel";

/// The LayerNorm eps of every block and of the final layer (DiT, MMDiT).
const EPS: f64 = 1e-6;

/// How the text reaches the image tokens.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TextConditioning {
    /// Text tokens through a cross-attention in every block, plus the pooled vector in adaLN.
    CrossAttention,
    /// The pooled vector in adaLN only.
    Pooled,
}

/// config.json, with SD3's field names (defaults: the 32x32 RGB scenes of issue 7).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct TextDiTConfig {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    /// Width of the text tokens.
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub text_conditioning: TextConditioning,
}

impl Default for TextDiTConfig {
    fn default() -> Self {
        TextDiTConfig {
            sample_size: 32,
            patch_size: 2,
            in_channels: 3,
            out_channels: None,
            num_layers: 6,
            num_attention_heads: 4,
            attention_head_dim: 32,
            joint_attention_dim: 128,
            pooled_projection_dim: 128,
            text_conditioning: TextConditioning::CrossAttention,
        }
    }
}

impl TextDiTConfig {
    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.patch_size == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return Err("patch_size, num_attention_heads and attention_head_dim must be positive".into());
        }
        if !self.sample_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "sample_size {} is not a multiple of patch_size {}",
                self.sample_size, self.patch_size
            ));
        }
        if !self.hidden().is_multiple_of(4) {
            return Err(format!("the 2-D sin-cos table needs a width divisible by 4, not {}", self.hidden()));
        }
        if self.joint_attention_dim == 0 || self.pooled_projection_dim == 0 {
            return Err("joint_attention_dim and pooled_projection_dim must be positive".into());
        }
        Ok(())
    }

    /// config.json with `_class_name`.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        v.as_object_mut().expect("object").insert("_class_name".into(), TEXT_DIT_CLASS.into());
        v
    }

    /// Parameters from the real construction code, without allocating (the position table is
    /// computed, not a parameter).
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        TextDiTTransformer2DModel::new(rec.var_builder(), self, Init::Default)?;
        Ok(rec.params())
    }
}

#[derive(Clone, Debug)]
struct TextDiTBlock {
    /// adaLN-Zero: shift, scale, gate of the self-attention and of the MLP.
    norm1: Linear,
    attn: Attention,
    /// Image -> text cross-attention ("cross-attention" only), a plain residual.
    attn2: Option<Attention>,
    ff: FeedForward,
}

impl TextDiTBlock {
    fn new(vb: VarBuilder, cfg: &TextDiTConfig, init: Init) -> candle_core::Result<Self> {
        let d = cfg.hidden();
        let shape = AttentionShape {
            dim: d,
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
            bias: true,
            qk_norm: false,
        };
        let attn2 = match cfg.text_conditioning {
            TextConditioning::Pooled => None,
            TextConditioning::CrossAttention => {
                // A fresh variable keeps the hint of its first request, so claiming the output
                // projection zeroed before `Attention::cross` asks for it makes a fresh block the
                // identity without a gate (PixArt); a checkpoint ignores hints.
                linear(&vb.pp("attn2.to_out.0"), d, d, true, init.zero_when_training())?;
                Some(Attention::cross(vb.pp("attn2"), &shape, cfg.joint_attention_dim, init)?)
            }
        };
        Ok(TextDiTBlock {
            norm1: linear(&vb.pp("norm1.linear"), d, 6 * d, true, init.zero_when_training())?,
            attn: Attention::with_shape(vb.pp("attn"), &shape, init)?,
            attn2,
            ff: FeedForward::new(vb.pp("ff"), d, 4 * d, d, init)?,
        })
    }

    /// x [B, N, D], conditioning c [B, D], text tokens [B, L, joint_attention_dim] when the block
    /// cross-attends (the model checks they are there).
    fn forward(&self, x: &Tensor, c: &Tensor, text: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let m = adaln_zero(&self.norm1, c, 6)?;
        let h = modulated_norm(x, &m[0], &m[1], EPS)?;
        let mut x = gated_residual(x, &m[2], &self.attn.forward(&h, None)?)?;
        if let (Some(attn2), Some(text)) = (&self.attn2, text) {
            x = (&x + attn2.forward_context(&layer_norm(&x, EPS)?, text, None)?)?;
        }
        let h = modulated_norm(&x, &m[3], &m[4], EPS)?;
        gated_residual(&x, &m[5], &self.ff.forward(&h)?)
    }
}

/// A DiT conditioned on text by cross-attention or by the pooled vector alone.
#[derive(Clone, Debug)]
pub struct TextDiTTransformer2DModel {
    cfg: TextDiTConfig,
    patch_embed: PatchEmbed,
    /// The sin-cos table of the native patch grid [N, D] (computed, not stored).
    pos_table: SincosPositions,
    time_text_embed: TimeTextEmbedding,
    transformer_blocks: Vec<TextDiTBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
}

impl TextDiTTransformer2DModel {
    /// Builds the model from `vb` (a checkpoint, a fresh `VarMap` initialised with `init`, or a
    /// shape recorder). `Init::XavierUniform` gives DiT's adaLN-Zero initialisation.
    pub fn new(vb: VarBuilder, cfg: &TextDiTConfig, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let (d, p) = (cfg.hidden(), cfg.patch_size);
        let grid = cfg.sample_size / p;
        let blocks = (0..cfg.num_layers)
            .map(|i| TextDiTBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg, init))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(TextDiTTransformer2DModel {
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::new(&vb.pp("pos_embed.proj"), cfg.in_channels, d, p, init)?,
            pos_table: SincosPositions::new(d, grid, vb.dtype(), vb.device())?,
            time_text_embed: TimeTextEmbedding::new(
                vb.pp("time_text_embed"),
                d,
                cfg.pooled_projection_dim,
                false,
                init,
            )?,
            transformer_blocks: blocks,
            norm_out: AdaLayerNormContinuous::new(&vb.pp("norm_out"), d, d, init.zero_when_training())?,
            proj_out: linear(
                &vb.pp("proj_out"),
                d,
                p * p * cfg.out_channels(),
                true,
                init.zero_when_training(),
            )?,
        })
    }

    pub fn config(&self) -> &TextDiTConfig {
        &self.cfg
    }

    /// x [B, C, H, W] (sides multiples of the patch size), t [B] or scalar (sigma * 1000), text
    /// tokens [B, L, joint_attention_dim] (required by "cross-attention", unused by "pooled"),
    /// pooled text [B, pooled_projection_dim] -> velocity [B, out_channels, H, W].
    pub fn forward_text(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: Option<&Tensor>,
        pooled: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!(
                "TextDiT input has shape [{b}, {c}, {h}, {w}]: expected {} channels and sides divisible by patch size {p}",
                self.cfg.in_channels
            );
        }
        expect_dims(pooled, &[Some(b), Some(self.cfg.pooled_projection_dim)], "pooled text")?;
        let text = match (self.cfg.text_conditioning, text) {
            (TextConditioning::Pooled, _) => None,
            (TextConditioning::CrossAttention, Some(text)) => {
                expect_dims(text, &[Some(b), None, Some(self.cfg.joint_attention_dim)], "text tokens")?;
                Some(text)
            }
            (TextConditioning::CrossAttention, None) => candle_core::bail!(
                "TextDiT with cross-attention needs text tokens [B, L, {}]",
                self.cfg.joint_attention_dim
            ),
        };
        let t = if t.rank() == 0 { t.broadcast_as(b)? } else { t.clone() };
        let temb = self.time_text_embed.forward(&t, None, pooled)?;
        let (gh, gw) = (h / p, w / p);
        let mut x =
            self.patch_embed.forward(x)?.broadcast_add(&self.pos_table.grid(gh, gw)?.unsqueeze(0)?)?;
        for block in &self.transformer_blocks {
            x = block.forward(&x, &temb, text)?;
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&x, &temb)?)?;
        unpatchify(&x, gh, gw, p, PatchOrder::ChannelLast)
    }
}

/// A clear error instead of a matmul shape mismatch deep inside; `None` accepts any size.
fn expect_dims(t: &Tensor, expected: &[Option<usize>], what: &str) -> candle_core::Result<()> {
    let ok =
        t.rank() == expected.len() && t.dims().iter().zip(expected).all(|(d, e)| e.is_none_or(|e| e == *d));
    if !ok {
        let want: Vec<String> = expected.iter().map(|e| e.map_or("L".into(), |e| e.to_string())).collect();
        candle_core::bail!("TextDiT {what}: shape {:?}, expected [{}]", t.dims(), want.join(", "));
    }
    Ok(())
}

impl Denoiser for TextDiTTransformer2DModel {
    fn forward(&self, x: &Tensor, t: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let Some(pooled) = &cond.pooled else {
            candle_core::bail!("TextDiT needs a pooled text vector");
        };
        self.forward_text(x, t, cond.text_tokens.as_ref(), pooled)
    }

    fn prediction(&self) -> Prediction {
        Prediction::Velocity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::init::seeded_var_builder;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;
    use std::collections::HashMap;

    fn tiny(text_conditioning: TextConditioning) -> TextDiTConfig {
        TextDiTConfig {
            sample_size: 8,
            in_channels: 3,
            num_layers: 2,
            num_attention_heads: 2,
            attention_head_dim: 4,
            joint_attention_dim: 6,
            pooled_projection_dim: 5,
            text_conditioning,
            ..Default::default()
        }
    }

    /// A fresh model (DiT's init) and its variables.
    fn fresh(cfg: &TextDiTConfig) -> Result<(TextDiTTransformer2DModel, VarMap)> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 7, DType::F32, &Device::Cpu);
        Ok((TextDiTTransformer2DModel::new(vb, cfg, Init::XavierUniform)?, vm))
    }

    /// Moves every variable off its initialisation (zero-init ones included) so that every path
    /// carries signal, as after some training.
    fn perturb(vm: &VarMap) -> Result<()> {
        for var in vm.all_vars() {
            let t = var.as_tensor();
            var.set(&(t + (Tensor::randn(0f32, 0.2, t.shape(), t.device())?))?)?;
        }
        Ok(())
    }

    /// A batch of 2 at 8x8 with 3 text tokens.
    struct Inputs {
        x: Tensor,
        t: Tensor,
        text: Tensor,
        pooled: Tensor,
    }

    fn inputs(cfg: &TextDiTConfig) -> Result<Inputs> {
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &Device::Cpu);
        Ok(Inputs {
            x: randn(&[2, cfg.in_channels, 8, 8])?,
            t: Tensor::new(&[250f32, 900.], &Device::Cpu)?,
            text: randn(&[2, 3, cfg.joint_attention_dim])?,
            pooled: randn(&[2, cfg.pooled_projection_dim])?,
        })
    }

    fn run(m: &TextDiTTransformer2DModel, i: &Inputs) -> Result<Tensor> {
        Ok(m.forward_text(&i.x, &i.t, Some(&i.text), &i.pooled)?)
    }

    fn max_abs(t: &Tensor) -> Result<f32> {
        Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    #[test]
    fn fresh_model_outputs_zero_and_zero_gated_block_is_identity() -> Result<()> {
        let cfg = tiny(TextConditioning::CrossAttention);
        let (model, _) = fresh(&cfg)?;
        let inp = inputs(&cfg)?;
        assert_eq!(max_abs(&run(&model, &inp)?)?, 0.0);
        // Random everything, then only the self-attention and MLP gates and attn2's output
        // projection zeroed: the block must pass its input through untouched.
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let block = TextDiTBlock::new(vb, &cfg, Init::Default)?;
        let d = cfg.hidden();
        let data = vm.data().lock().expect("varmap");
        for name in ["norm1.linear.weight", "norm1.linear.bias"] {
            let v = &data[name];
            let rows: Vec<Tensor> = v.as_tensor().chunk(6, 0)?;
            let zero = rows[2].zeros_like()?;
            let gated = [&rows[0], &rows[1], &zero, &rows[3], &rows[4], &zero];
            v.set(&Tensor::cat(&gated, 0)?)?;
        }
        for name in ["attn2.to_out.0.weight", "attn2.to_out.0.bias"] {
            data[name].set(&data[name].as_tensor().zeros_like()?)?;
        }
        let tokens = Tensor::randn(0f32, 1., (2, 16, d), &Device::Cpu)?;
        let c = Tensor::randn(0f32, 1., (2, d), &Device::Cpu)?;
        let out = block.forward(&tokens, &c, Some(&inp.text))?;
        assert_eq!(out.to_vec3::<f32>()?, tokens.to_vec3::<f32>()?);
        Ok(())
    }

    #[test]
    fn every_parameter_gets_a_gradient_and_param_list_names_them() -> Result<()> {
        for mode in [TextConditioning::CrossAttention, TextConditioning::Pooled] {
            let cfg = tiny(mode);
            let (model, vm) = fresh(&cfg)?;
            perturb(&vm)?;
            let grads = run(&model, &inputs(&cfg)?)?.sqr()?.mean_all()?.backward()?;
            let data = vm.data().lock().expect("varmap");
            for (name, var) in data.iter() {
                let g = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| Error::msg(format!("{mode:?}: no gradient for {name}")))?;
                assert!(max_abs(g)? > 0.0, "{mode:?}: zero gradient for {name}");
            }
            let listed = cfg.param_list()?;
            let mut names: Vec<&String> = listed.0.iter().map(|(n, _)| n).collect();
            names.sort();
            let mut held: Vec<&String> = data.keys().collect();
            held.sort();
            assert_eq!(names, held);
            assert_eq!(listed.total(), data.values().map(|v| v.elem_count() as u64).sum::<u64>());
            let has_attn2 = names.iter().any(|n| n.contains(".attn2."));
            assert_eq!(has_attn2, mode == TextConditioning::CrossAttention);
        }
        Ok(())
    }

    #[test]
    fn cross_attention_gradient_matches_finite_differences() -> Result<()> {
        let cfg = tiny(TextConditioning::CrossAttention);
        let (model, vm) = fresh(&cfg)?;
        perturb(&vm)?;
        let inp = inputs(&cfg)?;
        // Linear in the output, so the finite difference only sees the network's curvature.
        let weights = Tensor::randn(0f32, 1., inp.x.shape(), &Device::Cpu)?;
        let loss = || -> Result<Tensor> { Ok(run(&model, &inp)?.mul(&weights)?.sum_all()?) };
        let var: Var = vm.data().lock().expect("varmap")["transformer_blocks.1.attn2.to_k.weight"].clone();
        let grad = loss()?.backward()?;
        let grad = grad
            .get(var.as_tensor())
            .ok_or_else(|| Error::msg("no gradient reaches attn2.to_k"))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // The largest entry, so that a relative tolerance means something.
        let k = (0..grad.len()).max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs())).unwrap_or(0);
        let (analytic, h) = (grad[k] as f64, 1e-2f32);
        let base = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let at = |delta: f32| -> Result<f64> {
            let mut v = base.clone();
            v[k] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), var.device())?)?;
            Ok(loss()?.to_scalar::<f32>()? as f64)
        };
        let fd = (at(h)? - at(-h)?) / (2.0 * h as f64);
        assert!((fd - analytic).abs() < 1e-2 * analytic.abs(), "fd {fd} vs analytic {analytic}");
        Ok(())
    }

    #[test]
    fn shapes_are_kept_and_bad_conditioning_is_named() -> Result<()> {
        let cfg = tiny(TextConditioning::CrossAttention);
        let (model, _) = fresh(&cfg)?;
        // Non-native, non-square sides get their own position table.
        let x = Tensor::randn(0f32, 1., (2, 3, 8, 12), &Device::Cpu)?;
        let mut inp = Inputs { x: x.clone(), ..inputs(&cfg)? };
        assert_eq!(run(&model, &inp)?.dims(), x.dims());
        let err = model.forward_text(&x, &inp.t, None, &inp.pooled).unwrap_err().to_string();
        assert!(err.contains("needs text tokens"), "{err}");
        let err = Denoiser::forward(&model, &x, &inp.t, &Conditioning::default()).unwrap_err().to_string();
        assert!(err.contains("pooled"), "{err}");
        inp.text = Tensor::zeros((2, 3, 7), DType::F32, &Device::Cpu)?;
        let err = run(&model, &inp).unwrap_err().to_string();
        assert!(err.contains("text tokens") && err.contains("[2, L, 6]"), "{err}");
        // The pooled-only model ignores text tokens of any width.
        let (pooled_model, _) = fresh(&tiny(TextConditioning::Pooled))?;
        assert_eq!(run(&pooled_model, &inp)?.dims(), x.dims());
        Ok(())
    }

    #[test]
    fn saved_model_loads_back_with_the_same_outputs() -> Result<()> {
        let cfg = tiny(TextConditioning::CrossAttention);
        let (model, vm) = fresh(&cfg)?;
        perturb(&vm)?;
        let dir = std::env::temp_dir().join(format!("conv-text-dit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let config = serde_json::to_string(&cfg.to_diffusers_json()).map_err(Error::msg)?;
        std::fs::write(dir.join("config.json"), config).map_err(|e| Error::io(&dir, e))?;
        let tensors: HashMap<String, Tensor> = vm
            .data()
            .lock()
            .expect("varmap")
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        crate::weights::write_safetensors(&tensors, &dir.join("diffusion_pytorch_model.safetensors"))?;
        let loaded = crate::weights::load_model(&dir, &Default::default());
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let loaded = loaded?;
        assert_eq!(loaded.class_name(), TEXT_DIT_CLASS);
        let inp = inputs(&cfg)?;
        let io: HashMap<String, Tensor> = [
            ("input.hidden_states", &inp.x),
            ("input.timestep", &inp.t),
            ("input.encoder_hidden_states", &inp.text),
            ("input.pooled_projections", &inp.pooled),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
        let out = loaded.forward_io(&io)?.remove("output.sample").expect("output.sample");
        let want = run(&model, &inp)?;
        assert!(max_abs(&want)? > 0.0);
        // Not bit for bit: the fresh model's weights are trainable, so its self-attention takes
        // the training path (q, k, v from one stacked product), whose sums round differently.
        let diff = max_abs(&(&out - &want)?)?;
        assert!(diff < 1e-5, "loaded model differs by {diff}");
        Ok(())
    }
}
