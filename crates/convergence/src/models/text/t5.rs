//! T5's encoder (Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
//! Text-to-Text Transformer"; v1.1 for SD3 and Flux), as transformers' `T5EncoderModel`: token
//! embeddings without positions, pre-RMSNorm blocks whose unscaled attention logits get a
//! learned bias per bucketed relative distance (owned by block 0, shared by all), a gated-GELU
//! (v1.1) or ReLU (v1.0) feed-forward, and a final RMSNorm.

use super::{embed, table};
use crate::error::{Error, Result};
use crate::models::FlopCount;
use crate::nn::{linear, rms_norm, Activation, AttentionShape, BiasedSelfAttention, Init, Linear, QkvNames};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

pub const T5_ENCODER_MODEL: &str = "T5EncoderModel";

/// transformers' `T5Config` fields the encoder reads (defaults as transformers has them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Size of one attention head; heads * d_kv need not equal d_model.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `relu` (T5 v1.0) or `gated-gelu` (v1.1): transformers derives the activation and the
    /// gating from it (a saved `dense_act_fn` is derived too, so it is not read).
    pub feed_forward_proj: String,
}

impl Default for T5Config {
    fn default() -> Self {
        T5Config {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
        }
    }
}

impl T5Config {
    /// `t5-xxl`: the T5 v1.1 XXL encoder of SD3 (`text_encoder_3`) and Flux (`text_encoder_2`).
    pub fn preset(name: &str) -> Option<Self> {
        (name.eq_ignore_ascii_case("t5-xxl")).then(|| T5Config {
            d_model: 4096,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            feed_forward_proj: "gated-gelu".into(),
            ..Default::default()
        })
    }

    pub fn preset_names() -> Vec<String> {
        vec!["t5-xxl".into()]
    }

    fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// (activation, gated) from `feed_forward_proj` as transformers parses it: `[gated-]ACT`,
    /// with `gated-gelu` meaning the tanh GELU.
    pub fn activation(&self) -> std::result::Result<(Activation, bool), String> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, name) = match proj.split_once('-') {
            None => (false, proj),
            Some(("gated", act)) if !act.contains('-') => (true, act),
            _ => return Err(format!("feed_forward_proj `{proj}` is not ACT or gated-ACT")),
        };
        let name = if proj == "gated-gelu" { "gelu_new" } else { name };
        let act = serde_json::from_value(name.into())
            .map_err(|_| format!("feed_forward_proj `{proj}`: activation `{name}` is not supported"))?;
        Ok((act, gated))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_heads == 0 || self.d_kv == 0 || self.relative_attention_num_buckets < 4 {
            return Err("num_heads, d_kv must be positive and relative_attention_num_buckets >= 4".into());
        }
        self.activation().map(|_| ())
    }

    /// Parameters (`shared.weight` standing for the tied `encoder.embed_tokens.weight`) from the
    /// real construction code.
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        T5EncoderModel::new(rec.var_builder(), self, Init::Default)?;
        Ok(rec.params())
    }

    /// Forward FLOPs over `tokens` tokens, batch 1, as FlopCounterMode counts them.
    pub fn flops(&self, tokens: usize) -> FlopCount {
        let (l, d, inner, ff) = (tokens as u64, self.d_model as u64, self.inner() as u64, self.d_ff as u64);
        let mm = |rows: u64, fan_in: u64, fan_out: u64| 2 * rows * fan_in * fan_out;
        let gated = self.activation().is_ok_and(|(_, g)| g);
        let ff_in = if gated { 2 } else { 1 } * mm(l, d, ff);
        let block = mm(l, d, 3 * inner) + mm(l, inner, d) + ff_in + mm(l, ff, d);
        let layers = self.num_layers as u64;
        FlopCount { linear: layers * block, attention: layers * 2 * mm(l, inner, l), conv: 0 }
    }
}

/// The bucket of a key at `relative` = key - query positions (bidirectional): half the buckets
/// per direction, exact below a quarter of them, then logarithmic up to `max_distance`. The
/// logarithm is taken in f32 as transformers does, which decides the boundary cases.
fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let n = relative.unsigned_abs() as usize;
    let side = if relative > 0 { half } else { 0 };
    if n < max_exact {
        return side + n;
    }
    let log_ratio =
        (n as f32 / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
    let large = max_exact + (log_ratio * (half - max_exact) as f32) as usize;
    side + large.min(half - 1)
}

/// transformers' float16 guard after each residual update: a stream that overflowed to inf is
/// clamped to max - 1000, one that did not to the f16 range.
fn clamp_f16(x: Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x);
    }
    const F16_MAX: f64 = 65504.0;
    let overflowed = x.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_infinite();
    let limit = if overflowed { F16_MAX - 1000.0 } else { F16_MAX };
    x.clamp(-limit, limit)
}

/// `T5DenseGatedActDense` (wo(act(wi_0 x) * wi_1 x)) or `T5DenseActDense` (wo(act(wi x))).
#[derive(Clone, Debug)]
struct DenseActDense {
    wi: Linear,
    gate: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl DenseActDense {
    fn new(vb: &VarBuilder, cfg: &T5Config, init: Init) -> Result<Self> {
        let (act, gated) = cfg.activation().map_err(Error::msg)?;
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        let (wi, gate) = if gated {
            (linear(&vb.pp("wi_0"), d, ff, false, init)?, Some(linear(&vb.pp("wi_1"), d, ff, false, init)?))
        } else {
            (linear(&vb.pp("wi"), d, ff, false, init)?, None)
        };
        Ok(DenseActDense { wi, gate, wo: linear(&vb.pp("wo"), ff, d, false, init)?, act })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.act.forward(&self.wi.forward(x)?)?;
        if let Some(gate) = &self.gate {
            h = (h * gate.forward(x)?)?;
        }
        self.wo.forward(&h)
    }
}

/// QKV names of transformers' `T5Attention` (it has no q/k norm).
const T5_ATTENTION: QkvNames = QkvNames { q: "q", k: "k", v: "v", norm_q: "", norm_k: "" };

/// `T5Block` of the encoder: x + attn(norm(x)) with the shared position bias, then
/// x + ff(norm(x)).
#[derive(Clone, Debug)]
struct Block {
    attn_norm: Tensor,
    attn: BiasedSelfAttention,
    ff_norm: Tensor,
    ff: DenseActDense,
    eps: f64,
}

impl Block {
    fn new(vb: &VarBuilder, cfg: &T5Config, init: Init) -> Result<Self> {
        let (d, heads, head_dim) = (cfg.d_model, cfg.num_heads, cfg.d_kv);
        let shape = AttentionShape { dim: d, heads, head_dim, bias: false, qk_norm: false };
        let one = candle_nn::Init::Const(1.0);
        let (attn, ff) = (vb.pp("layer.0"), vb.pp("layer.1"));
        Ok(Block {
            attn_norm: attn.pp("layer_norm").get_with_hints(d, "weight", one)?,
            // T5 folds 1/sqrt(d) into its initialisation: the logits are not scaled.
            attn: BiasedSelfAttention::new(&attn.pp("SelfAttention"), T5_ATTENTION, "o", &shape, 1.0, init)?,
            ff_norm: ff.pp("layer_norm").get_with_hints(d, "weight", one)?,
            ff: DenseActDense::new(&ff.pp("DenseReluDense"), cfg, init)?,
            eps: cfg.layer_norm_epsilon,
        })
    }

    fn forward(&self, x: &Tensor, position_bias: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.attn.forward(&rms_norm(x, Some(&self.attn_norm), self.eps)?, Some(position_bias))?;
        let x = clamp_f16((x + h)?)?;
        let h = self.ff.forward(&rms_norm(&x, Some(&self.ff_norm), self.eps)?)?;
        clamp_f16((x + h)?)
    }
}

/// What the encoder returns (transformers' output fields).
#[derive(Clone, Debug)]
pub struct T5Output {
    /// final_layer_norm(output of the last block) [B, L, d_model].
    pub last_hidden_state: Tensor,
    /// [embeddings, block 0 out, ..., block n-2 out, last_hidden_state]: unlike CLIP's, the last
    /// entry is final-normed.
    pub hidden_states: Vec<Tensor>,
}

impl T5Output {
    /// `hidden_states[-2]`, the output of block n-2 (no final norm).
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }
}

/// A T5 encoder.
#[derive(Clone, Debug)]
pub struct T5EncoderModel {
    cfg: T5Config,
    embed_tokens: Tensor,
    /// Block 0's `relative_attention_bias` [num_buckets, heads].
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_layer_norm: Tensor,
}

impl T5EncoderModel {
    /// Builds the encoder from `vb`. `encoder.embed_tokens` is tied to `shared`: a file written
    /// by `save_pretrained` holds only `shared.weight`, so that is read unless the file has both.
    pub fn new(vb: VarBuilder, cfg: &T5Config, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let enc = vb.pp("encoder");
        let embed_vb =
            if enc.contains_tensor("embed_tokens.weight") { enc.pp("embed_tokens") } else { vb.pp("shared") };
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(&enc.pp(format!("block.{i}")), cfg, init))
            .collect::<Result<Vec<_>>>()?;
        let bias_vb = enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias");
        Ok(T5EncoderModel {
            cfg: cfg.clone(),
            embed_tokens: table(&embed_vb, cfg.vocab_size, cfg.d_model)?,
            relative_attention_bias: table(&bias_vb, cfg.relative_attention_num_buckets, cfg.num_heads)?,
            blocks,
            final_layer_norm: enc.pp("final_layer_norm").get_with_hints(
                cfg.d_model,
                "weight",
                candle_nn::Init::Const(1.0),
            )?,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The logit bias [1, heads, L, L] every block adds: entry (h, i, j) is the learned bias of
    /// head h for key j's bucket relative to query i.
    pub fn position_bias(&self, len: usize) -> Result<Tensor> {
        let (buckets, distance) =
            (self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance);
        let index: Vec<u32> = (0..len as i64)
            .flat_map(|i| {
                (0..len as i64).map(move |j| relative_position_bucket(j - i, buckets, distance) as u32)
            })
            .collect();
        let index = Tensor::from_vec(index, len * len, self.relative_attention_bias.device())?;
        let values = self.relative_attention_bias.index_select(&index, 0)?;
        Ok(values.reshape((len, len, self.cfg.num_heads))?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
    }

    /// Runs the encoder over ids [B, L] (any integer dtype). SD3 and Flux pass no attention
    /// mask: padding is attended like any token.
    pub fn forward(&self, ids: &Tensor) -> Result<T5Output> {
        let mut x = embed(&self.embed_tokens, ids)?;
        let position_bias = self.position_bias(ids.dim(1)?)?.to_dtype(x.dtype())?;
        let mut hidden_states = vec![x.clone()];
        for block in &self.blocks {
            x = block.forward(&x, &position_bias)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = rms_norm(&x, Some(&self.final_layer_norm), self.cfg.layer_norm_epsilon)?;
        *hidden_states.last_mut().expect("embeddings are always there") = last_hidden_state.clone();
        Ok(T5Output { last_hidden_state, hidden_states })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn buckets_follow_t5_rule_at_the_log_boundaries() {
        let bucket = |r| relative_position_bucket(r, 32, 128);
        // Exact below 8 per side; keys after the query use the upper 16 buckets.
        assert_eq!((bucket(0), bucket(-7), bucket(7), bucket(1)), (0, 7, 23, 17));
        // Logarithmic: 8 + floor(8 * log(n/8) / log(16)), hitting integers exactly at 16, 32, 64.
        assert_eq!((bucket(-15), bucket(-16), bucket(-31), bucket(-32), bucket(-64)), (9, 10, 11, 12, 14));
        assert_eq!((bucket(-127), bucket(-128), bucket(-500), bucket(500)), (15, 15, 15, 31));
    }

    #[test]
    fn f16_streams_are_clamped_only_after_overflow() -> candle_core::Result<()> {
        let x = Tensor::new(&[1f32, -2.0], &Device::Cpu)?.to_dtype(DType::F16)?;
        assert_eq!(clamp_f16(x.clone())?.to_dtype(DType::F32)?.to_vec1::<f32>()?, vec![1.0, -2.0]);
        let inf = Tensor::new(&[f32::INFINITY, -f32::INFINITY, 3.0], &Device::Cpu)?.to_dtype(DType::F16)?;
        let clamped = clamp_f16(inf)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        // 65504 - 1000 rounds to the nearest f16, 64512 (as torch's clamp stores it).
        assert_eq!(clamped, vec![64512.0, -64512.0, 3.0]);
        Ok(())
    }
}
