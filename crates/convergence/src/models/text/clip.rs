//! CLIP's text transformer (Radford et al., "Learning Transferable Visual Models From Natural
//! Language Supervision"), as transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`:
//! token + learned position embeddings, pre-LN causal self-attention layers, a final LayerNorm,
//! and the pooled vector read at the end-of-text token (projected without bias for the
//! `WithProjection` class). SDXL and SD3 condition on the penultimate layer, which skips the
//! final norm; Flux and SDXL/SD3 take the pooled vector as their global text embedding.

use super::{embed, gather_rows, table};
use crate::error::{Error, Result};
use crate::models::FlopCount;
use crate::nn::{linear, Activation, AttentionShape, BiasedSelfAttention, Init, LayerNorm, Linear, QkvNames};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// transformers' `CLIPTextConfig` as config.json has it (defaults as transformers has them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClipTextConfig {
    /// `CLIPTextModel` or `CLIPTextModelWithProjection` (which adds `text_projection`).
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// 2 in the original hub configs (a legacy value), where the pooled token is the largest id.
    pub eos_token_id: u32,
}

pub const CLIP_TEXT_MODEL: &str = "CLIPTextModel";
pub const CLIP_TEXT_MODEL_WITH_PROJECTION: &str = "CLIPTextModelWithProjection";

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            architectures: vec![CLIP_TEXT_MODEL.into()],
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// `clip-l` (OpenAI ViT-L/14, SDXL/SD3/Flux `text_encoder`) and `clip-g` (OpenCLIP ViT-bigG/14,
    /// SDXL/SD3 `text_encoder_2`), with the hub configs' legacy eos id 2.
    pub fn preset(name: &str) -> Option<Self> {
        let (class, width, layers, heads, act) = match name.to_ascii_lowercase().as_str() {
            "clip-l" => (CLIP_TEXT_MODEL, 768, 12, 12, Activation::QuickGelu),
            "clip-g" | "clip-bigg" => (CLIP_TEXT_MODEL_WITH_PROJECTION, 1280, 32, 20, Activation::Gelu),
            _ => return None,
        };
        Some(ClipTextConfig {
            architectures: vec![class.into()],
            hidden_size: width,
            intermediate_size: 4 * width,
            projection_dim: width,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            hidden_act: act,
            eos_token_id: 2,
            ..Default::default()
        })
    }

    pub fn preset_names() -> Vec<String> {
        ["clip-l", "clip-g"].map(String::from).to_vec()
    }

    pub fn class_name(&self) -> &str {
        self.architectures.first().map_or(CLIP_TEXT_MODEL, String::as_str)
    }

    pub fn with_projection(&self) -> bool {
        self.class_name() == CLIP_TEXT_MODEL_WITH_PROJECTION
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if ![CLIP_TEXT_MODEL, CLIP_TEXT_MODEL_WITH_PROJECTION].contains(&self.class_name()) {
            return Err(format!("`{}` is not a CLIP text model class", self.class_name()));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    /// Parameters (hub layout, `text_model.` prefix) from the real construction code.
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        ClipTextModel::new(rec.var_builder(), self, Init::Default)?;
        Ok(rec.params())
    }

    /// Forward FLOPs over `tokens` tokens, batch 1, as FlopCounterMode counts them: the causal
    /// mask does not shrink QK^T and PV, and the projection reads one pooled vector.
    pub fn flops(&self, tokens: usize) -> FlopCount {
        let (l, d, ff) = (tokens as u64, self.hidden_size as u64, self.intermediate_size as u64);
        let mm = |rows: u64, fan_in: u64, fan_out: u64| 2 * rows * fan_in * fan_out;
        let layer = mm(l, d, 4 * d) + mm(l, d, ff) + mm(l, ff, d);
        let projection = if self.with_projection() { mm(1, d, self.projection_dim as u64) } else { 0 };
        let layers = self.num_hidden_layers as u64;
        FlopCount { linear: layers * layer + projection, attention: layers * 2 * mm(l, d, l), conv: 0 }
    }
}

/// What the text model returns (transformers' output fields).
#[derive(Clone, Debug)]
pub struct ClipTextOutput {
    /// final_layer_norm(output of the last layer) [B, L, D].
    pub last_hidden_state: Tensor,
    /// [embeddings, layer 0 out, ..., layer n-1 out], none of them final-normed.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at the end-of-text token [B, D].
    pub pooler_output: Tensor,
    /// `text_projection(pooler_output)` [B, projection_dim] (`CLIPTextModelWithProjection` only).
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// `hidden_states[-2]`, the input of the last layer: the token sequence SDXL and SD3 condition on.
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }
}

/// QKV names of transformers' `CLIPAttention` (it has no q/k norm).
const CLIP_ATTENTION: QkvNames = QkvNames { q: "q_proj", k: "k_proj", v: "v_proj", norm_q: "", norm_k: "" };

/// `CLIPEncoderLayer`: x + attn(LN1(x)), then x + fc2(act(fc1(LN2(x)))).
#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: BiasedSelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: &VarBuilder, cfg: &ClipTextConfig, init: Init) -> candle_core::Result<Self> {
        let (d, ff, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let heads = cfg.num_attention_heads;
        let shape = AttentionShape { dim: d, heads, head_dim: cfg.head_dim(), bias: true, qk_norm: false };
        let scale = 1.0 / (cfg.head_dim() as f64).sqrt();
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), d, eps)?,
            self_attn: BiasedSelfAttention::new(
                &vb.pp("self_attn"),
                CLIP_ATTENTION,
                "out_proj",
                &shape,
                scale,
                init,
            )?,
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), d, eps)?,
            fc1: linear(&vb.pp("mlp.fc1"), d, ff, true, init)?,
            fc2: linear(&vb.pp("mlp.fc2"), ff, d, true, init)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, causal: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, Some(causal))?)?;
        let h = self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?)?;
        x + h
    }
}

/// [L, L] additive mask: 0 on and below the diagonal, -inf above, so token i reads tokens <= i.
fn causal_mask(len: usize, like: &Tensor) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> =
        (0..len).flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (len, len), like.device())?.to_dtype(like.dtype())
}

/// A CLIP text encoder, with or without the pooled-vector projection.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Builds the model from `vb`. Hub checkpoints nest the transformer under `text_model.`;
    /// transformers 5's `save_pretrained` drops that prefix, so both layouts load.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let unprefixed = vb.contains_tensor("embeddings.token_embedding.weight");
        let tm = if unprefixed { vb.clone() } else { vb.pp("text_model") };
        let d = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&tm.pp(format!("encoder.layers.{i}")), cfg, init))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let text_projection = if cfg.with_projection() {
            Some(linear(&vb.pp("text_projection"), d, cfg.projection_dim, false, init)?)
        } else {
            None
        };
        let emb = tm.pp("embeddings");
        Ok(ClipTextModel {
            cfg: cfg.clone(),
            token_embedding: table(&emb.pp("token_embedding"), cfg.vocab_size, d)?,
            position_embedding: table(&emb.pp("position_embedding"), cfg.max_position_embeddings, d)?,
            layers,
            final_layer_norm: LayerNorm::new(&tm.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            text_projection,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// Token plus position embeddings of ids [B, L] (`hidden_states[0]`).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let len = ids.dim(1)?;
        if len > self.cfg.max_position_embeddings {
            return Err(Error::msg(format!(
                "CLIP text input has {len} tokens, more than max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let positions = self.position_embedding.narrow(0, 0, len)?;
        Ok(embed(&self.token_embedding, ids)?.broadcast_add(&positions)?)
    }

    /// Runs the encoder over ids [B, L] (any integer dtype). Pipelines pass no attention mask:
    /// padding is attended like any token, and the causal mask hides it from earlier positions.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let mut x = self.embed(ids)?;
        let causal = causal_mask(ids.dim(1)?, &x)?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, &causal)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        let pooler_output = gather_rows(&last_hidden_state, &self.eos_positions(ids)?)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooler_output)?),
            None => None,
        };
        Ok(ClipTextOutput { last_hidden_state, hidden_states, pooler_output, text_embeds })
    }

    /// The end-of-text position of each row, as transformers finds it: with the legacy
    /// `eos_token_id == 2` the first largest id (the real EOS, 49407, is the largest in the
    /// vocabulary), otherwise the first `eos_token_id` (row start when absent).
    fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let eos = self.cfg.eos_token_id as i64;
        Ok(rows
            .iter()
            .map(|row| {
                let target = if eos == 2 { row.iter().copied().max().unwrap_or(0) } else { eos };
                row.iter().position(|&id| id == target).unwrap_or(0)
            })
            .collect())
    }
}
