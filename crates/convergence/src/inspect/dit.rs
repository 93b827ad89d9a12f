//! DiT's inspect summary.

use super::Summary;
use crate::error::Result;
use crate::models::dit::{official_param_count, DiTConfig};

/// Pixels per latent cell: 8 for a 4-channel VAE latent (DiT's ImageNet models), 1 for a
/// pixel-space model such as ours.
fn vae_factor(cfg: &DiTConfig) -> usize {
    if cfg.in_channels == 4 {
        8
    } else {
        1
    }
}

/// The default resolution: the config's native size.
pub fn native_resolution(cfg: &DiTConfig) -> (usize, usize) {
    let s = cfg.sample_size * vae_factor(cfg);
    (s, s)
}

pub fn summary(name: &str, cfg: &DiTConfig, resolution: (usize, usize)) -> Result<Summary> {
    let f = vae_factor(cfg);
    let (w, h) = (resolution.0 / f, resolution.1 / f);
    let (p, d, c) = (cfg.patch_size, cfg.hidden(), cfg.in_channels);
    if !resolution.0.is_multiple_of(f * p) || !resolution.1.is_multiple_of(f * p) {
        return Err(crate::Error::msg(format!(
            "resolution {}x{} is not a multiple of {} (VAE factor {f} x patch {p})",
            resolution.0,
            resolution.1,
            f * p
        )));
    }
    let n = (h / p) * (w / p);
    let out = cfg.out_channels();
    let mut pipeline = vec![];
    if f > 1 {
        pipeline.push(format!(
            "image [3,{},{}] -> VAE latent [{c},{h},{w}] (factor {f})",
            resolution.1, resolution.0
        ));
    }
    pipeline.push(format!(
        "latent [{c},{h},{w}] -> {n} patches of dim {} (patch {p}) -> tokens [{n},{d}] (+ 2-D sin-cos positions)",
        c * p * p
    ));
    pipeline.push(format!(
        "timestep t -> sinusoid [256] -> MLP [{d}] + class embedding [{d}] = c; adaLN-Zero: c -> 6 x [{d}] per block"
    ));
    pipeline.push(format!(
        "{} blocks (attention {} heads x {}, MLP {d} -> {} -> {d}) -> [{n},{d}]",
        cfg.num_layers,
        cfg.num_attention_heads,
        cfg.attention_head_dim,
        4 * d
    ));
    pipeline.push(format!(
        "final adaLN + linear -> [{n}, {}] -> un-patchify -> [{out},{h},{w}]{}",
        p * p * out,
        if out == 2 * c { " (eps | learned variance)" } else { "" }
    ));
    let notes = [2usize, 4, 8]
        .iter()
        .filter(|&&q| h % q == 0 && w % q == 0)
        .map(|&q| {
            let t = (h / q) * (w / q);
            format!("  patch {q}: {t} tokens, attention [{t},{t}] per head")
        })
        .collect();
    Ok(Summary {
        model: name.to_string(),
        class_name: "DiTTransformer2DModel".into(),
        resolution: Some(resolution),
        pipeline,
        tokens: vec![("image".into(), n)],
        attention: (n, cfg.num_attention_heads),
        notes,
        params: cfg.param_list()?,
        buffers: 0,
        parameters_original: Some(official_param_count(cfg)?),
        flops: cfg.flops(h, w),
    })
}
