//! `convergence inspect`: a model's pipeline stage by stage with tensor shapes, token counts,
//! exact parameter counts (from the real construction code, no weights) and forward FLOPs.

pub mod dit;

use crate::weights::ParamList;
use serde_json::json;
use std::collections::BTreeMap;

/// Everything `inspect` prints about one model at one resolution.
#[derive(Clone, Debug)]
pub struct Summary {
    pub model: String,
    pub class_name: String,
    /// Input size in pixels (W, H).
    pub resolution: (usize, usize),
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

/// Groups parameter names by component: the first path segment, with block indices folded
/// (`transformer_blocks.*.attn1`), so a 28-block model reads as a handful of lines.
pub fn components(params: &ParamList) -> Vec<(String, u64)> {
    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
    for (name, shape) in &params.0 {
        let parts: Vec<&str> = name.split('.').collect();
        let key = match parts.as_slice() {
            [blocks, i, sub, ..] if i.parse::<usize>().is_ok() => format!("{blocks}.*.{sub}"),
            [first, ..] => first.to_string(),
            [] => String::new(),
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
        let mut s = format!(
            "{} ({}) at {}x{}\n\npipeline\n",
            self.model, self.class_name, self.resolution.0, self.resolution.1
        );
        for line in &self.pipeline {
            s += &format!("  {line}\n");
        }
        let tokens: Vec<String> =
            self.tokens.iter().map(|(k, n)| format!("{} {k}", thousands(*n as u64))).collect();
        let total: usize = self.tokens.iter().map(|t| t.1).sum();
        s += &format!("\ntokens: {}", tokens.join(" + "));
        if self.tokens.len() > 1 {
            s += &format!(" = {}", thousands(total as u64));
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
            "resolution": [self.resolution.0, self.resolution.1],
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
    if let Some(cfg) = DiTConfig::preset(model) {
        let r = resolution.unwrap_or_else(|| dit::native_resolution(&cfg));
        return dit::summary(model, &cfg, r);
    }
    let path = std::path::Path::new(model);
    let config = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
    if !config.exists() {
        return Err(crate::Error::msg(format!(
            "`{model}` is neither a preset ({}) nor an existing config.json or model directory",
            DiTConfig::preset_names().join(", ")
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
        other => Err(crate::Error::config(&config, format!("unsupported model class `{other}`"))),
    }
}
