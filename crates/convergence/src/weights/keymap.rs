//! Original checkpoint layouts <-> diffusers names, one table per family. Rules are applied to
//! anything that can be split and concatenated (tensors, or shapes when counting parameters).

use candle_core::{Result, Tensor};
use std::collections::BTreeMap;

/// What a key-mapping rule moves around: a real tensor or just its shape.
pub trait Piece: Clone {
    fn rows(&self) -> usize;
    /// Consecutive row blocks of the given sizes (`torch.split(sizes, dim=0)`).
    fn split_rows(&self, sizes: &[usize]) -> Result<Vec<Self>>;
    fn cat_rows(parts: &[&Self]) -> Result<Self>;
}

impl Piece for Tensor {
    fn rows(&self) -> usize {
        self.dims().first().copied().unwrap_or(0)
    }
    fn split_rows(&self, sizes: &[usize]) -> Result<Vec<Self>> {
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                start += n;
                self.narrow(0, start - n, n)
            })
            .collect()
    }
    fn cat_rows(parts: &[&Self]) -> Result<Self> {
        Tensor::cat(parts, 0)
    }
}

impl Piece for Vec<usize> {
    fn rows(&self) -> usize {
        self.first().copied().unwrap_or(0)
    }
    fn split_rows(&self, sizes: &[usize]) -> Result<Vec<Self>> {
        Ok(sizes
            .iter()
            .map(|&n| {
                let mut s = self.clone();
                s[0] = n;
                s
            })
            .collect())
    }
    fn cat_rows(parts: &[&Self]) -> Result<Self> {
        let mut s = parts[0].clone();
        s[0] = parts.iter().map(|p| p[0]).sum();
        Ok(s)
    }
}

/// How many numbered blocks `prefix{i}.` the names hold (highest index + 1).
pub fn count_blocks<P>(m: &BTreeMap<String, P>, prefix: &str) -> usize {
    m.keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// One correspondence between an original tensor and its diffusers counterpart(s).
enum Rule {
    Rename {
        original: String,
        diffusers: String,
    },
    /// The original fuses the parts along rows (q, k, v [, mlp]); every part but the last has
    /// `rows` rows.
    Fuse {
        original: String,
        parts: Vec<String>,
        rows: usize,
    },
    /// AdaLayerNormContinuous: [shift, scale] in the original, [scale, shift] in diffusers.
    SwapHalves {
        original: String,
        diffusers: String,
    },
}

/// The rule table of one checkpoint, built in order. Names are relative to the current scope
/// (a block's prefix on each side); `linear` rules cover weight and bias.
#[derive(Default)]
struct Rules {
    rules: Vec<Rule>,
    scope: (String, String),
}

impl Rules {
    /// Prefixes for the rules that follow (`""`, `""` for top-level tensors).
    fn scope(&mut self, original: &str, diffusers: &str) {
        self.scope = (original.to_string(), diffusers.to_string());
    }

    fn names(&self, original: &str, diffusers: &str, kind: &str) -> (String, String) {
        let (o, d) = &self.scope;
        (format!("{o}{original}{kind}"), format!("{d}{diffusers}{kind}"))
    }

    fn rename(&mut self, original: &str, diffusers: &str) {
        let (original, diffusers) = self.names(original, diffusers, "");
        self.rules.push(Rule::Rename { original, diffusers });
    }

    fn linear(&mut self, original: &str, diffusers: &str) {
        for kind in [".weight", ".bias"] {
            let (original, diffusers) = self.names(original, diffusers, kind);
            self.rules.push(Rule::Rename { original, diffusers });
        }
    }

    /// The original linear fuses the diffusers linears `parts` (in order) along its rows.
    fn fused_linear(&mut self, original: &str, parts: &[&str], rows: usize) {
        for kind in [".weight", ".bias"] {
            let original = self.names(original, "", kind).0;
            let parts = parts.iter().map(|p| self.names("", p, kind).1).collect();
            self.rules.push(Rule::Fuse { original, parts, rows });
        }
    }

    fn swapped_linear(&mut self, original: &str, diffusers: &str) {
        for kind in [".weight", ".bias"] {
            let (original, diffusers) = self.names(original, diffusers, kind);
            self.rules.push(Rule::SwapHalves { original, diffusers });
        }
    }

    /// Original -> diffusers; every original tensor must be claimed by a rule.
    fn to_diffusers<P: Piece>(
        &self,
        mut original: BTreeMap<String, P>,
        family: &str,
    ) -> Result<BTreeMap<String, P>> {
        let mut take = |name: &str| {
            original.remove(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("{family} checkpoint: missing tensor `{name}`"))
            })
        };
        let mut out = BTreeMap::new();
        for rule in &self.rules {
            match rule {
                Rule::Rename { original, diffusers } => {
                    out.insert(diffusers.clone(), take(original)?);
                }
                Rule::Fuse { original, parts, rows } => {
                    let fused = take(original)?;
                    let mut sizes = vec![*rows; parts.len() - 1];
                    sizes.push(fused.rows().saturating_sub(rows * (parts.len() - 1)));
                    for (name, part) in parts.iter().zip(fused.split_rows(&sizes)?) {
                        out.insert(name.clone(), part);
                    }
                }
                Rule::SwapHalves { original, diffusers } => {
                    out.insert(diffusers.clone(), swap_halves(&take(original)?)?);
                }
            }
        }
        match original.keys().next() {
            Some(extra) => candle_core::bail!("{family} checkpoint: unexpected tensor `{extra}`"),
            None => Ok(out),
        }
    }

    /// Diffusers -> original names (each prefixed by `prefix`); every tensor must be used.
    fn to_original<P: Piece>(
        &self,
        diffusers: &BTreeMap<String, P>,
        family: &str,
        prefix: &str,
    ) -> Result<BTreeMap<String, P>> {
        let get = |name: &str| {
            diffusers.get(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("diffusers {family}: missing tensor `{name}`"))
            })
        };
        let mut out = BTreeMap::new();
        let mut used = 0;
        for rule in &self.rules {
            let (original, piece) = match rule {
                Rule::Rename { original, diffusers } => (original, get(diffusers)?.clone()),
                Rule::Fuse { original, parts, .. } => {
                    let parts = parts.iter().map(|p| get(p)).collect::<Result<Vec<_>>>()?;
                    used += parts.len() - 1;
                    (original, P::cat_rows(&parts)?)
                }
                Rule::SwapHalves { original, diffusers } => (original, swap_halves(get(diffusers)?)?),
            };
            used += 1;
            out.insert(format!("{prefix}{original}"), piece);
        }
        if used != diffusers.len() {
            candle_core::bail!(
                "diffusers {family}: {} tensors have no original counterpart",
                diffusers.len() - used
            );
        }
        Ok(out)
    }
}

/// [a, b] -> [b, a] along rows; its own inverse.
fn swap_halves<P: Piece>(p: &P) -> Result<P> {
    let half = p.rows() / 2;
    let parts = p.split_rows(&[half, half])?;
    P::cat_rows(&[&parts[1], &parts[0]])
}

/// Keys under Stability's / ComfyUI's `model.diffusion_model.` prefix (other components of an
/// all-in-one file are left out), or all keys when none has it.
fn strip_model_prefix<P>(m: BTreeMap<String, P>) -> BTreeMap<String, P> {
    if !m.keys().any(|k| k.starts_with(MODEL_PREFIX)) {
        return m;
    }
    m.into_iter().filter_map(|(k, v)| Some((k.strip_prefix(MODEL_PREFIX)?.to_string(), v))).collect()
}

const MODEL_PREFIX: &str = "model.diffusion_model.";

/// True when some name, with or without the model prefix, starts with `block_prefix`.
fn has_blocks(names: &[String], block_prefix: &str) -> bool {
    names.iter().any(|n| n.strip_prefix(MODEL_PREFIX).unwrap_or(n).starts_with(block_prefix))
}

/// Official facebookresearch/DiT (`models.py`) key layout.
pub mod dit {
    use super::*;

    /// True when the names look like an official DiT state dict.
    pub fn is_official(names: &[String]) -> bool {
        names.iter().any(|n| n == "x_embedder.proj.weight") && names.iter().any(|n| n.starts_with("blocks."))
    }

    pub fn depth<P>(m: &BTreeMap<String, P>) -> usize {
        count_blocks(m, "blocks.")
    }

    fn block_rename(rest: &str) -> Option<&'static str> {
        Some(match rest {
            "attn.proj.weight" => "attn1.to_out.0.weight",
            "attn.proj.bias" => "attn1.to_out.0.bias",
            "mlp.fc1.weight" => "ff.net.0.proj.weight",
            "mlp.fc1.bias" => "ff.net.0.proj.bias",
            "mlp.fc2.weight" => "ff.net.2.weight",
            "mlp.fc2.bias" => "ff.net.2.bias",
            "adaLN_modulation.1.weight" => "norm1.linear.weight",
            "adaLN_modulation.1.bias" => "norm1.linear.bias",
            _ => return None,
        })
    }

    const SHARED: [(&str, &str); 5] = [
        ("t_embedder.mlp.0.weight", "norm1.emb.timestep_embedder.linear_1.weight"),
        ("t_embedder.mlp.0.bias", "norm1.emb.timestep_embedder.linear_1.bias"),
        ("t_embedder.mlp.2.weight", "norm1.emb.timestep_embedder.linear_2.weight"),
        ("t_embedder.mlp.2.bias", "norm1.emb.timestep_embedder.linear_2.bias"),
        ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight"),
    ];

    const TOP: [(&str, &str); 6] = [
        ("x_embedder.proj.weight", "pos_embed.proj.weight"),
        ("x_embedder.proj.bias", "pos_embed.proj.bias"),
        ("final_layer.adaLN_modulation.1.weight", "proj_out_1.weight"),
        ("final_layer.adaLN_modulation.1.bias", "proj_out_1.bias"),
        ("final_layer.linear.weight", "proj_out_2.weight"),
        ("final_layer.linear.bias", "proj_out_2.bias"),
    ];

    /// Official -> diffusers: the shared embedders are copied into every block, `qkv` is split
    /// into q, k, v, and the stored `pos_embed` is kept as `pos_embed.pos_embed`.
    pub fn to_diffusers<P: Piece>(official: BTreeMap<String, P>) -> Result<BTreeMap<String, P>> {
        let depth = depth(&official);
        let mut out = BTreeMap::new();
        for (name, t) in official {
            if let Some((_, d)) = TOP.iter().find(|(o, _)| *o == name) {
                out.insert(d.to_string(), t);
            } else if name == "pos_embed" {
                out.insert("pos_embed.pos_embed".into(), t);
            } else if let Some((_, d)) = SHARED.iter().find(|(o, _)| *o == name) {
                for i in 0..depth {
                    out.insert(format!("transformer_blocks.{i}.{d}"), t.clone());
                }
            } else if let Some(rest) = name.strip_prefix("blocks.") {
                let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
                let prefix = format!("transformer_blocks.{i}.");
                if let Some(kind) = rest.strip_prefix("attn.qkv.") {
                    let parts = t.split_rows(&[t.rows() / 3; 3])?;
                    for (proj, part) in ["to_q", "to_k", "to_v"].into_iter().zip(parts) {
                        out.insert(format!("{prefix}attn1.{proj}.{kind}"), part);
                    }
                } else if let Some(d) = block_rename(rest) {
                    out.insert(format!("{prefix}{d}"), t);
                } else {
                    candle_core::bail!("official DiT checkpoint: unexpected tensor `{name}`");
                }
            } else {
                candle_core::bail!("official DiT checkpoint: unexpected tensor `{name}`");
            }
        }
        Ok(out)
    }

    /// Diffusers -> official: block 0's embedder becomes the shared one, q/k/v are fused.
    /// `pos_embed` (a buffer in diffusers) must be supplied by the caller when wanted.
    pub fn from_diffusers<P: Piece>(diffusers: &BTreeMap<String, P>) -> Result<BTreeMap<String, P>> {
        let mut out = BTreeMap::new();
        let get = |n: &str| {
            diffusers
                .get(n)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("diffusers DiT: missing tensor `{n}`")))
        };
        for (o, d) in TOP {
            out.insert(o.to_string(), get(d)?);
        }
        for (o, d) in SHARED {
            out.insert(o.to_string(), get(&format!("transformer_blocks.0.{d}"))?);
        }
        for i in 0..count_blocks(diffusers, "transformer_blocks.") {
            let p = format!("transformer_blocks.{i}.");
            for kind in ["weight", "bias"] {
                let qkv = [
                    get(&format!("{p}attn1.to_q.{kind}"))?,
                    get(&format!("{p}attn1.to_k.{kind}"))?,
                    get(&format!("{p}attn1.to_v.{kind}"))?,
                ];
                out.insert(format!("blocks.{i}.attn.qkv.{kind}"), P::cat_rows(&[&qkv[0], &qkv[1], &qkv[2]])?);
            }
            for o in [
                "attn.proj.weight",
                "attn.proj.bias",
                "mlp.fc1.weight",
                "mlp.fc1.bias",
                "mlp.fc2.weight",
                "mlp.fc2.bias",
                "adaLN_modulation.1.weight",
                "adaLN_modulation.1.bias",
            ] {
                let d = block_rename(o).expect("table entry");
                out.insert(format!("blocks.{i}.{o}"), get(&format!("{p}{d}"))?);
            }
        }
        Ok(out)
    }
}

/// Stability AI's SD3 / SD3.5 layout (`sd3_impls` MMDiT, shipped as
/// `model.diffusion_model.joint_blocks.N...`), after diffusers' `convert_sd3_to_diffusers.py`.
pub mod sd3 {
    use super::*;

    /// True when the names look like an original SD3 checkpoint (prefixed or not).
    pub fn is_original(names: &[String]) -> bool {
        has_blocks(names, "joint_blocks.")
    }

    /// What the rule table depends on, read off either layout's names.
    struct Layout {
        depth: usize,
        dual: Vec<usize>,
        qk_norm: bool,
        pos_embed: bool,
        hidden: usize,
    }

    fn layout<P: Piece>(m: &BTreeMap<String, P>, original: bool) -> Result<Layout> {
        let (blocks, attn2, ln_q, pos) = if original {
            ("joint_blocks.", "x_block.attn2.qkv.weight", "x_block.attn.ln_q.weight", "pos_embed")
        } else {
            ("transformer_blocks.", "attn2.to_q.weight", "attn.norm_q.weight", "pos_embed.pos_embed")
        };
        let depth = count_blocks(m, blocks);
        let hidden = m
            .get("context_embedder.weight")
            .ok_or_else(|| {
                candle_core::Error::Msg("SD3 checkpoint: missing tensor `context_embedder.weight`".into())
            })?
            .rows();
        Ok(Layout {
            depth,
            dual: (0..depth).filter(|i| m.contains_key(&format!("{blocks}{i}.{attn2}"))).collect(),
            qk_norm: m.contains_key(&format!("{blocks}0.{ln_q}")),
            pos_embed: m.contains_key(pos),
            hidden,
        })
    }

    /// One stream's attention: q, k, v fused in the original, RMSNorms on q and k (SD3.5).
    fn attention(r: &mut Rules, l: &Layout, original: &str, diffusers: &str, names: [&str; 5]) {
        let qkv = [0, 1, 2].map(|i| format!("{diffusers}.{}", names[i]));
        r.fused_linear(&format!("{original}.qkv"), &qkv.each_ref().map(String::as_str), l.hidden);
        if l.qk_norm {
            for (ln, norm) in [("ln_q", names[3]), ("ln_k", names[4])] {
                r.rename(&format!("{original}.{ln}.weight"), &format!("{diffusers}.{norm}.weight"));
            }
        }
    }

    const SAMPLE: [&str; 5] = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
    const CONTEXT: [&str; 5] = ["add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"];

    fn rules(l: &Layout) -> Rules {
        let mut r = Rules::default();
        if l.pos_embed {
            r.rename("pos_embed", "pos_embed.pos_embed");
        }
        r.linear("x_embedder.proj", "pos_embed.proj");
        r.linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1");
        r.linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2");
        r.linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1");
        r.linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2");
        r.linear("context_embedder", "context_embedder");
        r.linear("final_layer.linear", "proj_out");
        r.swapped_linear("final_layer.adaLN_modulation.1", "norm_out.linear");
        for i in 0..l.depth {
            r.scope(&format!("joint_blocks.{i}."), &format!("transformer_blocks.{i}."));
            attention(&mut r, l, "x_block.attn", "attn", SAMPLE);
            r.linear("x_block.attn.proj", "attn.to_out.0");
            r.linear("x_block.adaLN_modulation.1", "norm1.linear");
            r.linear("x_block.mlp.fc1", "ff.net.0.proj");
            r.linear("x_block.mlp.fc2", "ff.net.2");
            if l.dual.contains(&i) {
                attention(&mut r, l, "x_block.attn2", "attn2", SAMPLE);
                r.linear("x_block.attn2.proj", "attn2.to_out.0");
            }
            attention(&mut r, l, "context_block.attn", "attn", CONTEXT);
            if i + 1 == l.depth {
                // context_pre_only: an AdaLayerNormContinuous, and nothing after the attention.
                r.swapped_linear("context_block.adaLN_modulation.1", "norm1_context.linear");
            } else {
                r.linear("context_block.adaLN_modulation.1", "norm1_context.linear");
                r.linear("context_block.attn.proj", "attn.to_add_out");
                r.linear("context_block.mlp.fc1", "ff_context.net.0.proj");
                r.linear("context_block.mlp.fc2", "ff_context.net.2");
            }
        }
        r
    }

    /// Original (with or without `model.diffusion_model.`) -> diffusers.
    pub fn to_diffusers<P: Piece>(original: BTreeMap<String, P>) -> Result<BTreeMap<String, P>> {
        let original = strip_model_prefix(original);
        rules(&layout(&original, true)?).to_diffusers(original, "SD3")
    }

    /// Diffusers -> original, named as Stability ships them (`model.diffusion_model.` prefix).
    pub fn from_diffusers<P: Piece>(diffusers: &BTreeMap<String, P>) -> Result<BTreeMap<String, P>> {
        rules(&layout(diffusers, false)?).to_original(diffusers, "SD3", MODEL_PREFIX)
    }
}

/// Black Forest Labs' Flux layout (`flux/model.py`: `double_blocks.N`, `single_blocks.N` with
/// q, k, v and the MLP input fused), after diffusers' `convert_flux_to_diffusers.py`.
pub mod flux {
    use super::*;

    /// True when the names look like an original Flux checkpoint.
    pub fn is_original(names: &[String]) -> bool {
        has_blocks(names, "double_blocks.")
    }

    struct Layout {
        double: usize,
        single: usize,
        guidance: bool,
        hidden: usize,
    }

    fn layout<P: Piece>(m: &BTreeMap<String, P>, original: bool) -> Result<Layout> {
        let (double, single, guidance, embedder) = if original {
            ("double_blocks.", "single_blocks.", "guidance_in.in_layer.weight", "img_in.weight")
        } else {
            (
                "transformer_blocks.",
                "single_transformer_blocks.",
                "time_text_embed.guidance_embedder.linear_1.weight",
                "x_embedder.weight",
            )
        };
        let hidden = m
            .get(embedder)
            .ok_or_else(|| candle_core::Error::Msg(format!("Flux checkpoint: missing tensor `{embedder}`")))?
            .rows();
        Ok(Layout {
            double: count_blocks(m, double),
            single: count_blocks(m, single),
            guidance: m.contains_key(guidance),
            hidden,
        })
    }

    /// One stream of a double block: BFL's prefix and the diffusers names of its parts.
    struct Stream {
        bfl: &'static str,
        qkv: [&'static str; 3],
        qk_norm: [&'static str; 2],
        out: &'static str,
        ff: &'static str,
        modulation: &'static str,
    }

    const STREAMS: [Stream; 2] = [
        Stream {
            bfl: "img",
            qkv: ["to_q", "to_k", "to_v"],
            qk_norm: ["norm_q", "norm_k"],
            out: "attn.to_out.0",
            ff: "ff",
            modulation: "norm1",
        },
        Stream {
            bfl: "txt",
            qkv: ["add_q_proj", "add_k_proj", "add_v_proj"],
            qk_norm: ["norm_added_q", "norm_added_k"],
            out: "attn.to_add_out",
            ff: "ff_context",
            modulation: "norm1_context",
        },
    ];

    fn rules(l: &Layout) -> Rules {
        let mut r = Rules::default();
        let mut embedders = vec![("time_in", "timestep_embedder"), ("vector_in", "text_embedder")];
        if l.guidance {
            embedders.push(("guidance_in", "guidance_embedder"));
        }
        for (bfl, diffusers) in embedders {
            r.scope(&format!("{bfl}."), &format!("time_text_embed.{diffusers}."));
            r.linear("in_layer", "linear_1");
            r.linear("out_layer", "linear_2");
        }
        r.scope("", "");
        r.linear("txt_in", "context_embedder");
        r.linear("img_in", "x_embedder");
        r.linear("final_layer.linear", "proj_out");
        r.swapped_linear("final_layer.adaLN_modulation.1", "norm_out.linear");
        for i in 0..l.double {
            r.scope(&format!("double_blocks.{i}."), &format!("transformer_blocks.{i}."));
            for Stream { bfl: s, qkv, qk_norm: [nq, nk], out, ff, modulation } in STREAMS {
                r.linear(&format!("{s}_mod.lin"), &format!("{modulation}.linear"));
                let qkv = qkv.map(|p| format!("attn.{p}"));
                r.fused_linear(&format!("{s}_attn.qkv"), &qkv.each_ref().map(String::as_str), l.hidden);
                r.rename(&format!("{s}_attn.norm.query_norm.scale"), &format!("attn.{nq}.weight"));
                r.rename(&format!("{s}_attn.norm.key_norm.scale"), &format!("attn.{nk}.weight"));
                r.linear(&format!("{s}_attn.proj"), out);
                r.linear(&format!("{s}_mlp.0"), &format!("{ff}.net.0.proj"));
                r.linear(&format!("{s}_mlp.2"), &format!("{ff}.net.2"));
            }
        }
        for i in 0..l.single {
            r.scope(&format!("single_blocks.{i}."), &format!("single_transformer_blocks.{i}."));
            r.linear("modulation.lin", "norm.linear");
            r.fused_linear("linear1", &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], l.hidden);
            r.rename("norm.query_norm.scale", "attn.norm_q.weight");
            r.rename("norm.key_norm.scale", "attn.norm_k.weight");
            r.linear("linear2", "proj_out");
        }
        r
    }

    /// Original (BFL, optionally under `model.diffusion_model.`) -> diffusers.
    pub fn to_diffusers<P: Piece>(original: BTreeMap<String, P>) -> Result<BTreeMap<String, P>> {
        let original = strip_model_prefix(original);
        rules(&layout(&original, true)?).to_diffusers(original, "Flux")
    }

    /// Diffusers -> original, named as BFL ships them.
    pub fn from_diffusers<P: Piece>(diffusers: &BTreeMap<String, P>) -> Result<BTreeMap<String, P>> {
        rules(&layout(diffusers, false)?).to_original(diffusers, "Flux", "")
    }
}
