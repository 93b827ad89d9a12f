//! FLUX.1 (Black Forest Labs): an MMDiT whose first blocks are double-stream (separate image and
//! text weights around one joint attention, as in SD3) and whose remaining blocks are
//! single-stream (one set of weights over the concatenated [text, image] sequence, attention and
//! MLP computed in parallel from one input). Positions enter through 3-axis RoPE instead of a
//! position table; FLUX.1-dev also embeds its distilled guidance scale. The model works on
//! 2x2-packed latent tokens ([`pack_latents`]). Key names mirror diffusers'
//! `FluxTransformer2DModel`; `weights::keymap::flux` converts BFL's original layout.

use crate::error::{Error, Result};
use crate::models::{Conditioning, Denoiser, FlopCount, Prediction, TokenCounts};
use crate::nn::adaln::{adaln_zero, gated_residual, modulated_norm};
use crate::nn::attention::{AttentionShape, SAMPLE_STREAM};
use crate::nn::{
    joint_attention, linear, patchify, unpatchify, AdaLayerNormContinuous, AttentionCapture, CaptureSite,
    Init, JointBlockConfig, JointLayout, JointTransformerBlock, Linear, PatchOrder, QkvProjection, Rope,
    TimeTextEmbedding, TokenOrder,
};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The RoPE base of every Flux model.
const ROPE_THETA: f64 = 10000.0;

/// `FluxTransformer2DModel`'s config.json, field for field (defaults as diffusers has them =
/// FLUX.1-schnell).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FluxConfig {
    pub patch_size: usize,
    /// Channels of a packed token: 4 x the VAE's latent channels.
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    /// Single-stream blocks.
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub guidance_embeds: bool,
    /// Head channels given to each position axis (they sum to attention_head_dim).
    pub axes_dims_rope: Vec<usize>,
}

impl Default for FluxConfig {
    fn default() -> Self {
        FluxConfig {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: false,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

impl FluxConfig {
    /// `flux-dev` (guidance-distilled) and `flux-schnell` (timestep-distilled): the same 12B
    /// architecture, dev with a guidance embedder.
    pub fn preset(name: &str) -> Option<Self> {
        let guidance_embeds = match name.to_ascii_lowercase().as_str() {
            "flux-dev" => true,
            "flux-schnell" => false,
            _ => return None,
        };
        Some(FluxConfig { guidance_embeds, ..Default::default() })
    }

    pub fn preset_names() -> Vec<String> {
        ["flux-dev", "flux-schnell"].map(String::from).to_vec()
    }

    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The MLP width of both block kinds (mlp_ratio 4).
    fn mlp_hidden(&self) -> usize {
        4 * self.hidden()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return Err("num_attention_heads and attention_head_dim must be positive".into());
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 == 1)
        {
            return Err(format!(
                "axes_dims_rope {:?} must be even sizes summing to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }

    /// config.json as diffusers writes it (with `_class_name`).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let m = v.as_object_mut().expect("object");
        m.insert("_class_name".into(), "FluxTransformer2DModel".into());
        m.insert("_diffusers_version".into(), "0.42.1".into());
        v
    }

    /// Parameters (diffusers layout) from the real construction code, without allocating.
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        FluxTransformer2DModel::new(rec.var_builder(), self, Init::Default)?;
        Ok(rec.params())
    }

    /// Tokens of a `h` x `w` VAE latent (packed 2x2) with `text_len` text tokens.
    pub fn tokens(&self, h: usize, w: usize, text_len: usize) -> TokenCounts {
        TokenCounts { text: text_len, image: (h / 2) * (w / 2) }
    }

    /// Forward FLOPs at a `h` x `w` VAE latent with `text_len` text tokens, batch 1, counted as
    /// FlopCounterMode counts them.
    pub fn flops(&self, h: usize, w: usize, text_len: usize) -> FlopCount {
        let TokenCounts { text, image } = self.tokens(h, w, text_len);
        let (n, t, d, m) = (image as u64, text as u64, self.hidden() as u64, self.mlp_hidden() as u64);
        let l = n + t;
        let mm = |rows: u64, fan_in: u64, fan_out: u64| 2 * rows * fan_in * fan_out;
        let vector_mlp = |fan_in: u64| mm(1, fan_in, d) + mm(1, d, d);
        let guidance = if self.guidance_embeds { vector_mlp(256) } else { 0 };
        let embedders = mm(n, self.in_channels as u64, d)
            + mm(t, self.joint_attention_dim as u64, d)
            + vector_mlp(256)
            + guidance
            + vector_mlp(self.pooled_projection_dim as u64);
        let stream = |rows: u64| mm(rows, d, 3 * d) + mm(rows, d, d) + mm(rows, d, m) + mm(rows, m, d);
        let double = 2 * mm(1, d, 6 * d) + stream(n) + stream(t);
        let single = mm(1, d, 3 * d) + mm(l, d, 3 * d) + mm(l, d, m) + mm(l, d + m, d);
        let head = mm(1, d, 2 * d) + mm(n, d, self.out_channels() as u64);
        let (doubles, singles) = (self.num_layers as u64, self.num_single_layers as u64);
        FlopCount {
            linear: embedders + doubles * double + singles * single + head,
            attention: (doubles + singles) * 2 * mm(l, d, l),
            conv: 0,
        }
    }

    fn double_block_config(&self) -> JointBlockConfig {
        JointBlockConfig {
            dim: self.hidden(),
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            qk_norm: true,
            context_pre_only: false,
            dual_attention: false,
            order: TokenOrder::TextFirst,
        }
    }
}

/// The single-stream block (diffusers' `FluxSingleTransformerBlock`, BFL's `SingleStreamBlock`):
/// one modulated LayerNorm feeds attention and the MLP side by side; their outputs are
/// concatenated and projected back by one linear, then added through one gate.
#[derive(Clone, Debug)]
pub struct FluxSingleTransformerBlock {
    norm: Linear,
    attn: QkvProjection,
    proj_mlp: Linear,
    proj_out: Linear,
}

impl FluxSingleTransformerBlock {
    fn new(vb: &VarBuilder, cfg: &FluxConfig, init: Init) -> candle_core::Result<Self> {
        let (d, m) = (cfg.hidden(), cfg.mlp_hidden());
        let shape = AttentionShape {
            dim: d,
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
            bias: true,
            qk_norm: true,
        };
        Ok(FluxSingleTransformerBlock {
            norm: linear(&vb.pp("norm.linear"), d, 3 * d, true, init)?,
            // No output projection of its own: proj_out takes attention and MLP together.
            attn: QkvProjection::new(&vb.pp("attn"), SAMPLE_STREAM, &shape, init)?,
            proj_mlp: linear(&vb.pp("proj_mlp"), d, m, true, init)?,
            proj_out: linear(&vb.pp("proj_out"), d + m, d, true, init)?,
        })
    }

    /// The joint sequence x [B, T + N, D] ([text, image]) -> the same shape.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        rope: &Rope,
        site: Option<CaptureSite>,
    ) -> candle_core::Result<Tensor> {
        let m = adaln_zero(&self.norm, temb, 3)?;
        let h = modulated_norm(x, &m[0], &m[1], 1e-6)?;
        let mlp = self.proj_mlp.forward_gelu(&h)?;
        let attn = joint_attention(&[self.attn.forward(&h)?], Some(rope), site)?.remove(0);
        gated_residual(x, &m[2], &self.proj_out.forward(&Tensor::cat(&[attn, mlp], 2)?)?)
    }
}

/// A FLUX.1 transformer. Capture layers are numbered in forward order: double-stream block i is
/// layer i, single-stream block j is layer `num_layers + j`; tokens are [text, image].
#[derive(Clone)]
pub struct FluxTransformer2DModel {
    cfg: FluxConfig,
    x_embedder: Linear,
    time_text_embed: TimeTextEmbedding,
    context_embedder: Linear,
    transformer_blocks: Vec<JointTransformerBlock>,
    single_transformer_blocks: Vec<FluxSingleTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    capture: Option<Arc<AttentionCapture>>,
}

impl FluxTransformer2DModel {
    /// Builds the model from `vb` (a checkpoint, a fresh `VarMap` initialised with `init`, or a
    /// shape recorder).
    pub fn new(vb: VarBuilder, cfg: &FluxConfig, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let d = cfg.hidden();
        let double = cfg.double_block_config();
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| JointTransformerBlock::new(&vb.pp(format!("transformer_blocks.{i}")), &double, init))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single_transformer_blocks = (0..cfg.num_single_layers)
            .map(|i| {
                FluxSingleTransformerBlock::new(&vb.pp(format!("single_transformer_blocks.{i}")), cfg, init)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        Ok(FluxTransformer2DModel {
            cfg: cfg.clone(),
            x_embedder: linear(&vb.pp("x_embedder"), cfg.in_channels, d, true, init)?,
            time_text_embed: TimeTextEmbedding::new(
                vb.pp("time_text_embed"),
                d,
                cfg.pooled_projection_dim,
                cfg.guidance_embeds,
                init,
            )?,
            context_embedder: linear(&vb.pp("context_embedder"), cfg.joint_attention_dim, d, true, init)?,
            transformer_blocks,
            single_transformer_blocks,
            norm_out: AdaLayerNormContinuous::new(&vb.pp("norm_out"), d, d, init)?,
            proj_out: linear(&vb.pp("proj_out"), d, out, true, init)?,
            capture: None,
        })
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    /// Records joint-attention maps of the layers the capture asks for; `None` switches it off.
    pub fn set_attention_capture(&mut self, capture: Option<Arc<AttentionCapture>>) {
        self.capture = capture;
    }

    /// Packed latent tokens [B, N, in_channels] -> [B, N, D].
    pub fn embed_image(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.x_embedder.forward(x)
    }

    /// temb [B, D] from sigma t [B] in [0, 1], the guidance scale [B] (FLUX.1-dev) and the pooled
    /// text [B, P]. Both scalars are scaled by 1000 in the model's dtype, as diffusers does.
    pub fn conditioning(
        &self,
        t: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let scaled = |x: &Tensor| x.to_dtype(pooled.dtype())? * 1000.0;
        let guidance = guidance.map(scaled).transpose()?;
        self.time_text_embed.forward(&scaled(t)?, guidance.as_ref(), pooled)
    }

    /// Text tokens [B, T, joint_attention_dim] -> [B, T, D].
    pub fn embed_context(&self, context: &Tensor) -> candle_core::Result<Tensor> {
        self.context_embedder.forward(context)
    }

    /// RoPE tables for the joint sequence [text, image]: ids [T, 3] and [N, 3] (3-D ids with a
    /// batch axis, an older diffusers convention, use the first element).
    pub fn rope(&self, txt_ids: &Tensor, img_ids: &Tensor) -> candle_core::Result<Rope> {
        let unbatch = |ids: &Tensor| {
            if ids.rank() == 3 {
                ids.get(0)
            } else {
                Ok(ids.clone())
            }
        };
        let ids = Tensor::cat(&[unbatch(txt_ids)?, unbatch(img_ids)?], 0)?;
        Rope::new(&ids, &self.cfg.axes_dims_rope, ROPE_THETA)
    }

    pub fn transformer_blocks(&self) -> &[JointTransformerBlock] {
        &self.transformer_blocks
    }

    pub fn single_transformer_blocks(&self) -> &[FluxSingleTransformerBlock] {
        &self.single_transformer_blocks
    }

    /// Packed tokens [B, N, in_channels], text tokens [B, T, joint_attention_dim], pooled text
    /// [B, P], sigma t [B] (or scalar), position ids [N, 3] and [T, 3], and the guidance scale [B]
    /// of FLUX.1-dev -> velocity in packed tokens [B, N, out_channels].
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packed(
        &self,
        hidden_states: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        t: &Tensor,
        img_ids: &Tensor,
        txt_ids: &Tensor,
        guidance: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let b = hidden_states.dim(0)?;
        let per_sample = |x: &Tensor| {
            if x.rank() == 0 {
                x.broadcast_as(b)
            } else {
                Ok(x.clone())
            }
        };
        let guidance = guidance.map(per_sample).transpose()?;
        let mut x = self.embed_image(hidden_states)?;
        let temb = self.conditioning(&per_sample(t)?, guidance.as_ref(), pooled)?;
        let mut context = self.embed_context(context)?;
        let rope = self.rope(txt_ids, img_ids)?;
        let (n, text) = (x.dim(1)?, context.dim(1)?);
        let layout = JointLayout { order: TokenOrder::TextFirst, image: n, text };
        let site = |layer| self.capture.as_deref().map(|capture| CaptureSite { capture, layer, layout });
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let (ctx, out) = block.forward(&x, &context, &temb, Some(&rope), site(i))?;
            x = out;
            if let Some(ctx) = ctx {
                context = ctx;
            }
        }
        // The single-stream blocks see one sequence; concatenate once, split once.
        let mut joint = Tensor::cat(&[&context, &x], 1)?;
        for (j, block) in self.single_transformer_blocks.iter().enumerate() {
            joint = block.forward(&joint, &temb, &rope, site(self.cfg.num_layers + j))?;
        }
        let x = joint.narrow(1, text, n)?;
        self.proj_out.forward(&self.norm_out.forward(&x, &temb)?)
    }
}

/// FluxPipeline's `_pack_latents`: [B, C, H, W] -> [B, (H/2)(W/2), 4C], channel c*4 + dy*2 + dx.
pub fn pack_latents(latents: &Tensor) -> candle_core::Result<Tensor> {
    patchify(latents, 2, PatchOrder::ChannelFirst)
}

/// FluxPipeline's `_unpack_latents`: [B, (H/2)(W/2), 4C] -> [B, C, H, W].
pub fn unpack_latents(tokens: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    unpatchify(tokens, h / 2, w / 2, 2, PatchOrder::ChannelFirst)
}

/// Position ids [0, row, col] of the packed tokens of a `h` x `w` latent, row-major.
pub fn latent_image_ids(h: usize, w: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let (gh, gw) = (h / 2, w / 2);
    let ids: Vec<f32> = (0..gh * gw).flat_map(|k| [0.0, (k / gw) as f32, (k % gw) as f32]).collect();
    Tensor::from_vec(ids, (gh * gw, 3), dev)
}

/// Text position ids: all zeros, so text tokens are rotated by nothing.
pub fn text_ids(len: usize, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((len, 3), DType::F32, dev)
}

impl Denoiser for FluxTransformer2DModel {
    /// x is the unpacked latent [B, C, H, W] and t is sigma; packing and ids are done here.
    fn forward(&self, x: &Tensor, t: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let (Some(text), Some(pooled)) = (&cond.text_tokens, &cond.pooled) else {
            candle_core::bail!("Flux needs text tokens and a pooled text vector");
        };
        let (_, _, h, w) = x.dims4()?;
        let img_ids = latent_image_ids(h, w, x.device())?;
        let txt_ids = text_ids(text.dim(1)?, x.device())?;
        let guidance = cond.guidance.as_ref();
        let out = self.forward_packed(&pack_latents(x)?, text, pooled, t, &img_ids, &txt_ids, guidance)?;
        unpack_latents(&out, h, w)
    }

    fn prediction(&self) -> Prediction {
        Prediction::Velocity
    }
}
