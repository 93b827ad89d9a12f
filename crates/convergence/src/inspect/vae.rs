//! The VAE's inspect summary: encoder and decoder stage by stage, the mid-block attention, the
//! latent scaling, and encode / decode FLOPs (their sum is the forward of one round trip).

use super::{thousands, Summary};
use crate::error::Result;
use crate::models::vae::VaeConfig;

/// The default resolution: the config's native image size.
pub fn native_resolution(cfg: &VaeConfig) -> (usize, usize) {
    (cfg.sample_size, cfg.sample_size)
}

fn encoder_lines(cfg: &VaeConfig, sizes: &[(usize, usize)]) -> Vec<String> {
    let boc = &cfg.block_out_channels;
    let shape = |c: usize, (h, w): (usize, usize)| format!("[{c},{h},{w}]");
    let mut lines = vec![format!("encoder conv_in -> {}", shape(boc[0], sizes[0]))];
    for (i, &c) in boc.iter().enumerate() {
        let mut line = format!("encoder down {i}: {} resnets {}", cfg.layers_per_block, shape(c, sizes[i]));
        if let Some(&next) = sizes.get(i + 1) {
            line += &format!(" -> pad + stride-2 conv {}", shape(c, next));
        }
        lines.push(line);
    }
    let (top, latent) = (*boc.last().expect("validated"), *sizes.last().expect("non-empty"));
    let z = cfg.latent_channels;
    lines.push(format!("encoder mid: resnet + attention + resnet {}", shape(top, latent)));
    let quant = if cfg.use_quant_conv { " -> quant_conv" } else { "" };
    lines.push(format!(
        "GroupNorm + SiLU + conv_out -> moments {}{quant} -> mean, logvar {} (logvar clamped to [-30, 20])",
        shape(2 * z, latent),
        shape(z, latent)
    ));
    lines
}

fn decoder_lines(cfg: &VaeConfig, sizes: &[(usize, usize)]) -> Vec<String> {
    let boc = &cfg.block_out_channels;
    let shape = |c: usize, (h, w): (usize, usize)| format!("[{c},{h},{w}]");
    let (top, latent) = (*boc.last().expect("validated"), *sizes.last().expect("non-empty"));
    let post = if cfg.use_post_quant_conv { "post_quant_conv, " } else { "" };
    let mut lines =
        vec![format!("decoder: {post}conv_in -> {}; mid: resnet + attention + resnet", shape(top, latent))];
    for (i, &c) in boc.iter().rev().enumerate() {
        let level = boc.len() - 1 - i;
        let mut line =
            format!("decoder up {i}: {} resnets {}", cfg.layers_per_block + 1, shape(c, sizes[level]));
        if level > 0 {
            line += &format!(" -> nearest 2x + conv {}", shape(c, sizes[level - 1]));
        }
        lines.push(line);
    }
    let (h, w) = sizes[0];
    lines.push(format!("GroupNorm + SiLU + conv_out -> image [{},{h},{w}]", cfg.out_channels));
    lines
}

pub fn summary(name: &str, cfg: &VaeConfig, resolution: (usize, usize)) -> Result<Summary> {
    cfg.validate().map_err(crate::Error::msg)?;
    let (w, h) = resolution;
    let sizes = cfg.level_sizes(h, w);
    let (lh, lw) = *sizes.last().expect("non-empty");
    let mut pipeline = vec![format!("image [{},{h},{w}] in [-1, 1]", cfg.in_channels)];
    pipeline.extend(encoder_lines(cfg, &sizes));
    let (scale, z) = (cfg.scaling_factor, cfg.latent_channels);
    pipeline.push(match cfg.shift_factor {
        Some(shift) => format!(
            "pipeline latent = (mean - {shift}) * {scale} [{z},{lh},{lw}]; decode takes latent / {scale} + {shift}"
        ),
        None => format!("pipeline latent = mean * {scale} [{z},{lh},{lw}]; decode takes latent / {scale}"),
    });
    pipeline.extend(decoder_lines(cfg, &sizes));
    let (encode, decode) = cfg.flops(h, w)?;
    let n = lh * lw;
    let top = *cfg.block_out_channels.last().expect("validated");
    let gflops = |f: u64| f as f64 / 1e9;
    let mut notes = vec![format!(
        "  encode {:.1} GFLOPs, decode {:.1} GFLOPs (forward = encode + decode)",
        gflops(encode.total()),
        gflops(decode.total())
    )];
    if cfg.mid_block_add_attention {
        notes.push(format!(
            "  mid-block attention (encoder and decoder): {} positions, 1 head x {top}",
            thousands(n as u64)
        ));
    }
    Ok(Summary {
        model: name.to_string(),
        class_name: "AutoencoderKL".into(),
        resolution: Some(resolution),
        pipeline,
        tokens: vec![("latent positions".into(), n)],
        attention: if cfg.mid_block_add_attention { (n, 1) } else { (0, 0) },
        notes,
        params: cfg.param_list()?,
        buffers: 0,
        parameters_original: None,
        flops: (encode + decode).total(),
    })
}
