//! The text encoders' inspect summaries: CLIP (`CLIPTextModel`, `...WithProjection`) and the
//! T5 encoder, over a fixed number of tokens instead of a resolution.

use super::Summary;
use crate::error::Result;
use crate::models::text::{ClipTextConfig, T5Config};

/// The token counts the pipelines use: CLIP's 77; T5's 256 (SD3) and 512 (Flux).
pub const CLIP_TOKENS: usize = 77;
pub const T5_TOKENS: [usize; 2] = [256, 512];

pub fn clip_summary(name: &str, cfg: &ClipTextConfig) -> Result<Summary> {
    let (l, d, ff, heads) = (CLIP_TOKENS, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads);
    let n = cfg.num_hidden_layers;
    let mut pipeline = vec![
        format!("prompt -> CLIP BPE ids [{l}] (<|startoftext|> text <|endoftext|>, padded)"),
        format!("token embedding [{} x {d}] + position embedding [{l} x {d}] -> [{l},{d}]", cfg.vocab_size),
        format!(
            "{n} pre-LN layers (causal attention {heads} heads x {}, MLP {d} -> {ff} -> {d}, {:?}) \
             -> [{l},{d}]",
            cfg.head_dim(),
            cfg.hidden_act
        ),
        format!("hidden_states[-2] = input of the last layer (no final norm) [{l},{d}]: SDXL / SD3 tokens"),
        format!("final LayerNorm -> last_hidden_state [{l},{d}]; pooled at <|endoftext|> [{d}]"),
    ];
    if cfg.with_projection() {
        pipeline.push(format!("text_projection (no bias) -> text_embeds [{}]", cfg.projection_dim));
    }
    Ok(Summary {
        model: name.to_string(),
        class_name: cfg.class_name().to_string(),
        resolution: None,
        pipeline,
        tokens: vec![("text".into(), l)],
        attention: (l, heads),
        notes: vec![],
        params: cfg.param_list()?,
        buffers: 0,
        parameters_original: None,
        flops: cfg.flops(l).total(),
    })
}

/// Summarised at `tokens` tokens; the notes give both pipeline lengths.
pub fn t5_summary(name: &str, cfg: &T5Config, tokens: usize) -> Result<Summary> {
    let (l, d, heads) = (tokens, cfg.d_model, cfg.num_heads);
    let (act, gated) = cfg.activation().map_err(crate::Error::msg)?;
    let ff = if gated {
        format!("gated {act:?}: wo(act(wi_0 x) * wi_1 x), {d} -> 2 x {} -> {d}", cfg.d_ff)
    } else {
        format!("{act:?}: {d} -> {} -> {d}", cfg.d_ff)
    };
    let pipeline = vec![
        format!("prompt -> SentencePiece ids [{l}] (text </s>, padded with <pad>)"),
        format!("token embedding [{} x {d}] -> [{l},{d}] (no position embedding)", cfg.vocab_size),
        format!(
            "relative position bias: {} buckets up to distance {} -> [{heads},{l},{l}] in every layer",
            cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        ),
        format!(
            "{} pre-RMSNorm blocks (attention {heads} heads x {}, unscaled logits; FF {ff}) -> [{l},{d}]",
            cfg.num_layers, cfg.d_kv
        ),
        format!("final RMSNorm -> last_hidden_state [{l},{d}]: SD3 / Flux tokens"),
    ];
    let notes = T5_TOKENS
        .iter()
        .map(|&t| format!("  {t} tokens: {:.1} GFLOPs", cfg.flops(t).total() as f64 / 1e9))
        .collect();
    Ok(Summary {
        model: name.to_string(),
        class_name: crate::models::text::t5::T5_ENCODER_MODEL.into(),
        resolution: None,
        pipeline,
        tokens: vec![("text".into(), l)],
        attention: (l, heads),
        notes,
        params: cfg.param_list()?,
        buffers: 0,
        parameters_original: None,
        flops: cfg.flops(l).total(),
    })
}
