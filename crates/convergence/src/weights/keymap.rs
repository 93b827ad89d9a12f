//! Original checkpoint layouts <-> diffusers names, one table per family. Rules are applied to
//! anything that can be split and concatenated (tensors, or shapes when counting parameters).

use candle_core::{Result, Tensor};
use std::collections::BTreeMap;

/// What a key-mapping rule moves around: a real tensor or just its shape.
pub trait Piece: Clone {
    fn chunk3(&self) -> Result<[Self; 3]>;
    fn cat3(parts: [&Self; 3]) -> Result<Self>;
}

impl Piece for Tensor {
    fn chunk3(&self) -> Result<[Self; 3]> {
        let c = self.chunk(3, 0)?;
        Ok([c[0].clone(), c[1].clone(), c[2].clone()])
    }
    fn cat3(parts: [&Self; 3]) -> Result<Self> {
        Tensor::cat(&parts, 0)
    }
}

impl Piece for Vec<usize> {
    fn chunk3(&self) -> Result<[Self; 3]> {
        let mut s = self.clone();
        s[0] /= 3;
        Ok([s.clone(), s.clone(), s])
    }
    fn cat3(parts: [&Self; 3]) -> Result<Self> {
        let mut s = parts[0].clone();
        s[0] = parts.iter().map(|p| p[0]).sum();
        Ok(s)
    }
}

/// Official facebookresearch/DiT (`models.py`) key layout.
pub mod dit {
    use super::*;

    /// True when the names look like an official DiT state dict.
    pub fn is_official(names: &[String]) -> bool {
        names.iter().any(|n| n == "x_embedder.proj.weight") && names.iter().any(|n| n.starts_with("blocks."))
    }

    pub fn depth<P>(m: &BTreeMap<String, P>) -> usize {
        m.keys()
            .filter_map(|k| k.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
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
                    let [q, k, v] = t.chunk3()?;
                    for (proj, part) in [("to_q", q), ("to_k", k), ("to_v", v)] {
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
        let depth = diffusers
            .keys()
            .filter_map(|k| k.strip_prefix("transformer_blocks.")?.split('.').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0);
        for i in 0..depth {
            let p = format!("transformer_blocks.{i}.");
            for kind in ["weight", "bias"] {
                let qkv = [
                    get(&format!("{p}attn1.to_q.{kind}"))?,
                    get(&format!("{p}attn1.to_k.{kind}"))?,
                    get(&format!("{p}attn1.to_v.{kind}"))?,
                ];
                out.insert(format!("blocks.{i}.attn.qkv.{kind}"), P::cat3([&qkv[0], &qkv[1], &qkv[2]])?);
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
