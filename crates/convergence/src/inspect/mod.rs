//! `convergence inspect`: a model's pipeline stage by stage with tensor shapes, token counts,
//! exact parameter counts (from the real construction code, no weights) and forward FLOPs.

pub mod dit;
pub mod mmdit;
pub mod text;
pub mod unet;
pub mod vae;

use crate::models::text::clip::{CLIP_TEXT_MODEL, CLIP_TEXT_MODEL_WITH_PROJECTION};
use crate::models::text::t5::T5_ENCODER_MODEL;
use crate::weights::ParamList;
use serde_json::json;
use std::collections::BTreeMap;

/// Everything `inspect` prints about one model at one resolution.
#[derive(Clone, Debug)]
pub struct Summary {
    pub model: String,
    pub class_name: String,
    /// Input size in pixels (W, H); none for the text encoders, whose input is `tokens`.
    pub resolution: Option<(usize, usize)>,
    /// Stage-by-stage shape trace.
    pub pipeline: Vec<String>,
    /// Token counts by kind (image, text, ...).
    pub tokens: Vec<(String, usize)>,
    /// Attention matrix per head, [L, L], and the head count.
    pub attention: (usize, usize),
    /// Other facts worth a line (e.g. tokens per patch size).
    pub notes: Vec<String>,
    pub params: ParamList,
    /// Persistent buffers stored in checkpoints but not parameters (SD3's position table).
    pub buffers: u64,
    /// The original checkpoint layout's count where it differs (DiT).
    pub parameters_original: Option<u64>,
    pub flops: u64,
}

/// Groups parameter names by component: the first path segment, or for a block list the path
/// to it with the index folded and the next segment (`transformer_blocks.*.attn1`,
/// `text_model.encoder.layers.*.mlp`), so a 28-block model reads as a handful of lines.
pub fn components(params: &ParamList) -> Vec<(String, u64)> {
    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
    for (name, shape) in &params.0 {
        let parts: Vec<&str> = name.split('.').collect();
        let index = parts.iter().position(|p| p.parse::<usize>().is_ok());
        let key = match index {
            Some(i) if i > 0 && i + 1 < parts.len() => format!("{}.*.{}", parts[..i].join("."), parts[i + 1]),
            _ => parts[0].to_string(),
        };
        *groups.entry(key).or_default() += shape.iter().product::<usize>() as u64;
    }
    groups.into_iter().collect()
}

/// 1234567 -> "1,234,567"
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Summary {
    pub fn text(&self) -> String {
        let input = match self.resolution {
            Some((w, h)) => format!("at {w}x{h}"),
            None => format!("over {} tokens", self.tokens.iter().map(|t| t.1).sum::<usize>()),
        };
        let mut s = format!("{} ({}) {input}\n\npipeline\n", self.model, self.class_name);
        for line in &self.pipeline {
            s += &format!("  {line}\n");
        }
        let tokens: Vec<String> =
            self.tokens.iter().map(|(k, n)| format!("{} {k}", thousands(*n as u64))).collect();
        let total: usize = self.tokens.iter().map(|t| t.1).sum();
        // Kinds add up only when they form one attention sequence (joint attention); a UNet's
        // levels and its cross-attended text are separate sequences.
        if self.tokens.len() > 1 && total == self.attention.0 {
            s += &format!("\ntokens: {} = {}", tokens.join(" + "), thousands(total as u64));
        } else {
            s += &format!("\ntokens: {}", tokens.join(", "));
        }
        s += &format!(
            "\nattention per head: [{},{}] x {} heads per layer\n",
            self.attention.0, self.attention.0, self.attention.1
        );
        for n in &self.notes {
            s += &format!("{n}\n");
        }
        s += "\nparameters by component\n";
        for (name, n) in components(&self.params) {
            s += &format!("  {name:<44} {:>16}\n", thousands(n));
        }
        s += &format!("parameters: {}\n", thousands(self.params.total()));
        if self.buffers > 0 {
            s += &format!(
                "  + persistent buffers {} = {} stored in checkpoints\n",
                thousands(self.buffers),
                thousands(self.params.total() + self.buffers)
            );
        }
        if let Some(o) = self.parameters_original {
            s += &format!("parameters (original checkpoint layout): {}\n", thousands(o));
        }
        s += &format!(
            "forward FLOPs (batch 1; multiply-add = 2): {} ({:.1} GFLOPs)\n",
            thousands(self.flops),
            self.flops as f64 / 1e9
        );
        s
    }

    pub fn json(&self) -> serde_json::Value {
        let comps: serde_json::Map<String, serde_json::Value> =
            components(&self.params).into_iter().map(|(k, v)| (k, json!(v))).collect();
        let mut v = json!({
            "model": self.model,
            "class_name": self.class_name,
            "resolution": self.resolution.map(|(w, h)| [w, h]),
            "pipeline": self.pipeline,
            "tokens": self.tokens.iter().map(|(k, n)| (k.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "attention_matrix_per_head": [self.attention.0, self.attention.0],
            "heads": self.attention.1,
            "parameters": self.params.total(),
            "parameters_by_component": comps,
            "persistent_buffers": self.buffers,
            "flops": self.flops,
        });
        if let Some(o) = self.parameters_original {
            v["parameters_original"] = json!(o);
        }
        v
    }
}

/// Summarises `model`: a preset name (`dit-xl-2`, ...), a config.json, or a model directory.
/// `resolution` (W, H) in pixels defaults to the model's native size.
pub fn summarize(model: &str, resolution: Option<(usize, usize)>) -> crate::Result<Summary> {
    use crate::models::dit::DiTConfig;
    use crate::models::text::{ClipTextConfig, T5Config};
    use crate::models::unet::UNetConfig;
    use crate::models::vae::VaeConfig;
    if let Some(cfg) = DiTConfig::preset(model) {
        let r = resolution.unwrap_or_else(|| dit::native_resolution(&cfg));
        return dit::summary(model, &cfg, r);
    }
    let no_resolution = || match resolution {
        Some(_) => {
            Err(crate::Error::msg(format!("`{model}` is a text encoder: it takes tokens, not a resolution")))
        }
        None => Ok(()),
    };
    if let Some(cfg) = crate::models::sd3::SD3Config::preset(model) {
        return mmdit::sd3_summary(model, &cfg, resolution.unwrap_or(mmdit::NATIVE));
    }
    if let Some(cfg) = crate::models::flux::FluxConfig::preset(model) {
        return mmdit::flux_summary(model, &cfg, resolution.unwrap_or(mmdit::NATIVE));
    }
    if let Some(cfg) = ClipTextConfig::preset(model) {
        no_resolution()?;
        return text::clip_summary(model, &cfg);
    }
    if let Some(cfg) = T5Config::preset(model) {
        no_resolution()?;
        return text::t5_summary(model, &cfg, text::T5_TOKENS[1]);
    }
    if let Some(cfg) = UNetConfig::preset(model) {
        return unet::summary(model, &cfg, resolution.unwrap_or_else(|| unet::native_resolution(&cfg)));
    }
    if let Some(cfg) = VaeConfig::preset(model) {
        return vae::summary(model, &cfg, resolution.unwrap_or_else(|| vae::native_resolution(&cfg)));
    }
    let path = std::path::Path::new(model);
    let config = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    if !config.exists() {
        let presets = [
            DiTConfig::preset_names(),
            crate::models::sd3::SD3Config::preset_names(),
            crate::models::flux::FluxConfig::preset_names(),
            ClipTextConfig::preset_names(),
            T5Config::preset_names(),
            UNetConfig::preset_names(),
            VaeConfig::preset_names(),
        ];
        return Err(crate::Error::msg(format!(
            "`{model}` is neither a preset ({}) nor an existing config.json or model directory",
            presets.concat().join(", ")
        )));
    }
    let class = crate::weights::load::class_name(&config)?;
    match class.as_str() {
        "DiTTransformer2DModel" => {
            let cfg: DiTConfig = crate::weights::read_json(&config)?;
            cfg.validate().map_err(|m| crate::Error::config(&config, m))?;
            let r = resolution.unwrap_or_else(|| dit::native_resolution(&cfg));
            dit::summary(&config.display().to_string(), &cfg, r)
        }
        "SD3Transformer2DModel" => {
            let cfg: crate::models::sd3::SD3Config = crate::weights::read_json(&config)?;
            mmdit::sd3_summary(&config.display().to_string(), &cfg, resolution.unwrap_or(mmdit::NATIVE))
        }
        "FluxTransformer2DModel" => {
            let cfg: crate::models::flux::FluxConfig = crate::weights::read_json(&config)?;
            mmdit::flux_summary(&config.display().to_string(), &cfg, resolution.unwrap_or(mmdit::NATIVE))
        }
        CLIP_TEXT_MODEL | CLIP_TEXT_MODEL_WITH_PROJECTION => {
            no_resolution()?;
            let cfg: ClipTextConfig = crate::weights::read_json(&config)?;
            cfg.validate().map_err(|m| crate::Error::config(&config, m))?;
            text::clip_summary(&config.display().to_string(), &cfg)
        }
        T5_ENCODER_MODEL => {
            no_resolution()?;
            let cfg: T5Config = crate::weights::read_json(&config)?;
            cfg.validate().map_err(|m| crate::Error::config(&config, m))?;
            text::t5_summary(&config.display().to_string(), &cfg, text::T5_TOKENS[1])
        }
        "UNet2DConditionModel" => {
            let cfg: UNetConfig = crate::weights::read_json(&config)?;
            cfg.validate().map_err(|m| crate::Error::config(&config, m))?;
            let r = resolution.unwrap_or_else(|| unet::native_resolution(&cfg));
            unet::summary(&config.display().to_string(), &cfg, r)
        }
        "AutoencoderKL" => {
            let cfg: VaeConfig = crate::weights::read_json(&config)?;
            cfg.validate().map_err(|m| crate::Error::config(&config, m))?;
            let r = resolution.unwrap_or_else(|| vae::native_resolution(&cfg));
            vae::summary(&config.display().to_string(), &cfg, r)
        }
        other => Err(crate::Error::config(&config, format!("unsupported model class `{other}`"))),
    }
}
