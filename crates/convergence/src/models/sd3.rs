//! SD3 / SD3.5 (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
//! Synthesis"): an MMDiT. The latent is patchified and given a 2-D sin-cos position table;
//! the text tokens (CLIP + T5) are projected to the same width; both streams run through joint
//! blocks whose modulation comes from the timestep + pooled-text vector; the image stream is
//! normed and un-patchified into a velocity. SD3.5 adds RMSNorm on q/k, and SD3.5-medium
//! (MMDiT-X) a second image-only attention in its first blocks. Key names mirror diffusers'
//! `SD3Transformer2DModel`; `weights::keymap::sd3` converts Stability's original layout.

use crate::error::{Error, Result};
use crate::models::{Conditioning, Denoiser, FlopCount, Prediction, TokenCounts};
use crate::nn::{
    linear, sincos_2d, sincos_2d_window, unpatchify, AdaLayerNormContinuous, AttentionCapture, CaptureSite,
    Init, JointBlockConfig, JointLayout, JointTransformerBlock, Linear, PatchEmbed, PatchOrder,
    TimeTextEmbedding, TokenOrder,
};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// `SD3Transformer2DModel`'s config.json, field for field (defaults as diffusers has them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SD3Config {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub out_channels: Option<usize>,
    /// Side of the stored position table, centre-cropped to each latent's patch grid.
    pub pos_embed_max_size: Option<usize>,
    /// Blocks with MMDiT-X's second, image-only attention.
    pub dual_attention_layers: Vec<usize>,
    /// `"rms_norm"` (SD3.5) or none.
    pub qk_norm: Option<String>,
}

impl Default for SD3Config {
    fn default() -> Self {
        SD3Config {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 18,
            attention_head_dim: 64,
            num_attention_heads: 18,
            joint_attention_dim: 4096,
            caption_projection_dim: 1152,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: Some(96),
            dual_attention_layers: vec![],
            qk_norm: None,
        }
    }
}

impl SD3Config {
    /// `sd3-medium`, `sd3.5-medium`, `sd3.5-large`: the released transformers (1024px, 64-channel
    /// heads, depth = head count).
    pub fn preset(name: &str) -> Option<Self> {
        let (depth, max, dual, qk_norm) = match name.to_ascii_lowercase().as_str() {
            "sd3-medium" => (24, 192, 0, false),
            "sd3.5-medium" => (24, 384, 13, true),
            "sd3.5-large" => (38, 192, 0, true),
            _ => return None,
        };
        Some(SD3Config {
            num_layers: depth,
            num_attention_heads: depth,
            caption_projection_dim: 64 * depth,
            pos_embed_max_size: Some(max),
            dual_attention_layers: (0..dual).collect(),
            qk_norm: qk_norm.then(|| "rms_norm".into()),
            ..Default::default()
        })
    }

    pub fn preset_names() -> Vec<String> {
        ["sd3-medium", "sd3.5-medium", "sd3.5-large"].map(String::from).to_vec()
    }

    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    fn qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.patch_size == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            return Err("patch_size, num_attention_heads and attention_head_dim must be positive".into());
        }
        if self.caption_projection_dim != self.hidden() {
            return Err(format!(
                "caption_projection_dim {} must equal num_attention_heads * attention_head_dim = {}",
                self.caption_projection_dim,
                self.hidden()
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => return Err(format!("qk_norm `{other}` is not supported (SD3.5 uses rms_norm)")),
        }
        if let Some(&l) = self.dual_attention_layers.iter().find(|&&l| l >= self.num_layers) {
            return Err(format!("dual_attention_layers names block {l} of {}", self.num_layers));
        }
        Ok(())
    }

    /// config.json as diffusers writes it (with `_class_name`).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let m = v.as_object_mut().expect("object");
        m.insert("_class_name".into(), "SD3Transformer2DModel".into());
        m.insert("_diffusers_version".into(), "0.42.1".into());
        v
    }

    /// Parameters (diffusers layout) from the real construction code, without allocating. The
    /// position table is a buffer, not a parameter: see [`Self::pos_embed_elements`].
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        SD3Transformer2DModel::new(rec.var_builder(), self, Init::Default)?;
        Ok(rec.params())
    }

    /// Elements of the stored position table (diffusers' persistent buffer `pos_embed.pos_embed`,
    /// a tensor like any other in Stability's checkpoints).
    pub fn pos_embed_elements(&self) -> u64 {
        self.pos_embed_max_size.map_or(0, |m| (m * m * self.hidden()) as u64)
    }

    /// Tokens of a `h` x `w` latent with `text_len` text tokens.
    pub fn tokens(&self, h: usize, w: usize, text_len: usize) -> TokenCounts {
        let p = self.patch_size;
        TokenCounts { text: text_len, image: (h / p) * (w / p) }
    }

    /// Forward FLOPs at a `h` x `w` latent with `text_len` text tokens, batch 1, counted as
    /// FlopCounterMode counts them.
    pub fn flops(&self, h: usize, w: usize, text_len: usize) -> FlopCount {
        let TokenCounts { text, image } = self.tokens(h, w, text_len);
        let (n, t, d) = (image as u64, text as u64, self.hidden() as u64);
        let (p, c_in, c_out) = (self.patch_size as u64, self.in_channels as u64, self.out_channels() as u64);
        let mm = |rows: u64, fan_in: u64, fan_out: u64| 2 * rows * fan_in * fan_out;
        // QK^T and PV over l tokens.
        let attention = |l: u64| 2 * mm(l, d, l);
        // q, k, v, output projection and the 4x MLP of one stream.
        let stream =
            |rows: u64| mm(rows, d, 3 * d) + mm(rows, d, d) + mm(rows, d, 4 * d) + mm(rows, 4 * d, d);
        let embedders = mm(1, 256, d)
            + mm(1, d, d)
            + mm(1, self.pooled_projection_dim as u64, d)
            + mm(1, d, d)
            + mm(t, self.joint_attention_dim as u64, d);
        let head = mm(1, d, 2 * d) + mm(n, d, p * p * c_out);
        let mut f = FlopCount { linear: embedders + head, attention: 0, conv: mm(n, c_in * p * p, d) };
        for i in 0..self.num_layers {
            let dual = self.dual_attention_layers.contains(&i);
            f.linear += mm(1, d, if dual { 9 } else { 6 } * d) + stream(n);
            // The last block's text stream only supplies keys and values.
            f.linear += if i + 1 == self.num_layers {
                mm(1, d, 2 * d) + mm(t, d, 3 * d)
            } else {
                mm(1, d, 6 * d) + stream(t)
            };
            f.attention += attention(n + t);
            if dual {
                f.linear += mm(n, d, 3 * d) + mm(n, d, d);
                f.attention += attention(n);
            }
        }
        f
    }

    fn block_config(&self, i: usize) -> JointBlockConfig {
        JointBlockConfig {
            dim: self.hidden(),
            heads: self.num_attention_heads,
            head_dim: self.attention_head_dim,
            qk_norm: self.qk_norm(),
            context_pre_only: i + 1 == self.num_layers,
            dual_attention: self.dual_attention_layers.contains(&i),
            order: TokenOrder::ImageFirst,
        }
    }
}

/// diffusers' `PatchEmbed` with `pos_embed_max_size`: Conv2d patches plus the centre window of
/// one large sin-cos table, so every resolution up to the table's sees the same positions near
/// the image centre.
#[derive(Clone, Debug)]
struct PosEmbed {
    proj: PatchEmbed,
    /// The stored table [max * max, D], when the checkpoint has one.
    pos_embed: Option<Tensor>,
    max: Option<usize>,
    /// diffusers' `base_size` = sample_size / patch_size: the grid the positions are scaled to.
    base_size: f32,
    dim: usize,
}

impl PosEmbed {
    fn new(vb: VarBuilder, cfg: &SD3Config, init: Init) -> Result<Self> {
        let d = cfg.hidden();
        let pos_embed = match cfg.pos_embed_max_size {
            Some(m) if vb.contains_tensor("pos_embed") => {
                Some(vb.get((1, m * m, d), "pos_embed")?.squeeze(0)?)
            }
            _ => None,
        };
        Ok(PosEmbed {
            proj: PatchEmbed::new(&vb.pp("proj"), cfg.in_channels, d, cfg.patch_size, init)?,
            pos_embed,
            max: cfg.pos_embed_max_size,
            base_size: (cfg.sample_size / cfg.patch_size) as f32,
            dim: d,
        })
    }

    /// Position table [gh * gw, D] for a gh x gw patch grid.
    fn table(&self, gh: usize, gw: usize, like: &Tensor) -> candle_core::Result<Tensor> {
        let Some(max) = self.max else {
            return sincos_2d(self.dim, gh, gw, self.base_size, 1.0, like.device())?.to_dtype(like.dtype());
        };
        if gh > max || gw > max {
            candle_core::bail!("a {gh}x{gw} patch grid exceeds pos_embed_max_size {max}");
        }
        let (top, left) = ((max - gh) / 2, (max - gw) / 2);
        match &self.pos_embed {
            Some(t) => t
                .reshape((max, max, self.dim))?
                .narrow(0, top, gh)?
                .narrow(1, left, gw)?
                .reshape((gh * gw, self.dim)),
            None => sincos_2d_window(self.dim, max, self.base_size, top, left, gh, gw, like.device())?
                .to_dtype(like.dtype()),
        }
    }

    fn forward(&self, x: &Tensor, gh: usize, gw: usize) -> candle_core::Result<Tensor> {
        let tokens = self.proj.forward(x)?;
        tokens.broadcast_add(&self.table(gh, gw, &tokens)?.unsqueeze(0)?)
    }
}

/// An SD3 / SD3.5 transformer.
#[derive(Clone)]
pub struct SD3Transformer2DModel {
    cfg: SD3Config,
    pos_embed: PosEmbed,
    time_text_embed: TimeTextEmbedding,
    context_embedder: Linear,
    transformer_blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    capture: Option<Arc<AttentionCapture>>,
}

impl SD3Transformer2DModel {
    /// Builds the model from `vb` (a checkpoint, a fresh `VarMap` initialised with `init`, or a
    /// shape recorder). A checkpoint without `pos_embed.pos_embed` gets the computed table.
    pub fn new(vb: VarBuilder, cfg: &SD3Config, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let d = cfg.hidden();
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                JointTransformerBlock::new(
                    &vb.pp(format!("transformer_blocks.{i}")),
                    &cfg.block_config(i),
                    init,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        Ok(SD3Transformer2DModel {
            cfg: cfg.clone(),
            pos_embed: PosEmbed::new(vb.pp("pos_embed"), cfg, init)?,
            time_text_embed: TimeTextEmbedding::new(
                vb.pp("time_text_embed"),
                d,
                cfg.pooled_projection_dim,
                false,
                init,
            )?,
            context_embedder: linear(
                &vb.pp("context_embedder"),
                cfg.joint_attention_dim,
                cfg.caption_projection_dim,
                true,
                init,
            )?,
            transformer_blocks: blocks,
            norm_out: AdaLayerNormContinuous::new(&vb.pp("norm_out"), d, d, init.zero_when_training())?,
            proj_out: linear(&vb.pp("proj_out"), d, out, true, init.zero_when_training())?,
            capture: None,
        })
    }

    pub fn config(&self) -> &SD3Config {
        &self.cfg
    }

    /// Records joint-attention maps of the blocks the capture asks for (layer i = joint block i,
    /// tokens [image, text]); `None` switches recording off.
    pub fn set_attention_capture(&mut self, capture: Option<Arc<AttentionCapture>>) {
        self.capture = capture;
    }

    /// The patch tokens plus their cropped position table [B, N, D].
    pub fn embed_image(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        self.pos_embed.forward(x, h / p, w / p)
    }

    /// The conditioning vector temb [B, D] from t [B] (sigma * 1000) and the pooled text [B, P].
    pub fn conditioning(&self, t: &Tensor, pooled: &Tensor) -> candle_core::Result<Tensor> {
        self.time_text_embed.forward(t, None, pooled)
    }

    /// Text tokens [B, T, joint_attention_dim] -> [B, T, D].
    pub fn embed_context(&self, context: &Tensor) -> candle_core::Result<Tensor> {
        self.context_embedder.forward(context)
    }

    pub fn transformer_blocks(&self) -> &[JointTransformerBlock] {
        &self.transformer_blocks
    }

    /// x [B, C, H, W] (sides multiples of the patch size), t [B] or scalar (sigma * 1000), text
    /// tokens [B, T, joint_attention_dim], pooled text [B, P] -> velocity [B, out_channels, H, W].
    pub fn forward_text(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_channels || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!(
                "SD3 input has shape [{b}, {c}, {h}, {w}]: expected {} channels and sides divisible by patch size {p}",
                self.cfg.in_channels
            );
        }
        let t = if t.rank() == 0 { t.broadcast_as(b)? } else { t.clone() };
        let mut x = self.embed_image(x)?;
        let temb = self.conditioning(&t, pooled)?;
        let mut context = self.embed_context(context)?;
        let layout = JointLayout { order: TokenOrder::ImageFirst, image: x.dim(1)?, text: context.dim(1)? };
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let site = self.capture.as_deref().map(|capture| CaptureSite { capture, layer: i, layout });
            let (ctx, out) = block.forward(&x, &context, &temb, None, site)?;
            x = out;
            // Only the last block (context_pre_only) ends the text stream.
            if let Some(ctx) = ctx {
                context = ctx;
            }
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&x, &temb)?)?;
        unpatchify(&x, h / p, w / p, p, PatchOrder::ChannelLast)
    }
}

impl Denoiser for SD3Transformer2DModel {
    fn forward(&self, x: &Tensor, t: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let (Some(text), Some(pooled)) = (&cond.text_tokens, &cond.pooled) else {
            candle_core::bail!("SD3 needs text tokens and a pooled text vector");
        };
        self.forward_text(x, t, text, pooled)
    }

    fn prediction(&self) -> Prediction {
        Prediction::Velocity
    }
}
