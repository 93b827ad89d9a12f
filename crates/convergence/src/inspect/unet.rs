//! The SDXL UNet's inspect summary: from prompt and image size to the noise prediction, the
//! resolution pyramid, and the attention sizes at each level.

use super::{thousands, Summary};
use crate::error::Result;
use crate::models::unet::UNetConfig;

/// The prompt length of SDXL's CLIP tokenizers.
pub const TEXT_TOKENS: usize = 77;
/// Widths of SDXL's text encoders: CLIP-L and OpenCLIP bigG (whose projection is the pooled
/// vector).
const CLIP_L: usize = 768;
const CLIP_G: usize = 1280;

/// Pixels per latent cell: 8 for a VAE latent (4 channels), 1 for a pixel-space model.
fn vae_factor(cfg: &UNetConfig) -> usize {
    if cfg.in_channels == 4 {
        8
    } else {
        1
    }
}

/// The default resolution: the config's native size (diffusers' default latent side is 64).
pub fn native_resolution(cfg: &UNetConfig) -> (usize, usize) {
    let s = cfg.sample_size.unwrap_or(64) * vae_factor(cfg);
    (s, s)
}

/// Where the cross-attention tokens come from.
fn text_line(cfg: &UNetConfig) -> String {
    let (l, d) = (TEXT_TOKENS, cfg.cross_attention_dim);
    if d == CLIP_L + CLIP_G {
        format!(
            "prompt -> CLIP-L hidden_states[-2] [{l},{CLIP_L}] + OpenCLIP-G hidden_states[-2] [{l},{CLIP_G}] -> concat [{l},{d}] (cross-attention context)"
        )
    } else if d == CLIP_G {
        format!("prompt -> OpenCLIP-G hidden_states[-2] [{l},{d}] (cross-attention context)")
    } else {
        format!("prompt -> text tokens [{l},{d}] (cross-attention context)")
    }
}

/// SDXL's added conditioning: (pooled width, number of time ids). SDXL's encoders pool to
/// OpenCLIP-G's 1280; other configs are read as the base model's 6 size/crop ids.
fn added_layout(cfg: &UNetConfig) -> Option<(usize, usize)> {
    let (width, total) = (cfg.addition_time_embed_dim?, cfg.projection_class_embeddings_input_dim?);
    let sdxl_encoders = [CLIP_G, CLIP_L + CLIP_G].contains(&cfg.cross_attention_dim);
    match total.checked_sub(CLIP_G) {
        Some(ids) if sdxl_encoders && ids.is_multiple_of(width) => Some((CLIP_G, ids / width)),
        _ => Some((total.checked_sub(6 * width)?, 6)),
    }
}

fn conditioning_lines(cfg: &UNetConfig) -> Vec<String> {
    let (c0, temb) = (cfg.block_out_channels[0], cfg.time_embed_dim());
    let mut lines = vec![format!("timestep t -> sinusoid [{c0}] -> time_embedding MLP [{temb}]")];
    if let (Some((pooled, n)), Some(width)) = (added_layout(cfg), cfg.addition_time_embed_dim) {
        let ids = if n == 5 {
            "[orig_h, orig_w, crop_top, crop_left, aesthetic_score]"
        } else {
            "[orig_h, orig_w, crop_top, crop_left, target_h, target_w]"
        };
        lines.push(format!(
            "pooled text_embeds [{pooled}] + time_ids [{n}] = {ids} -> {n} x sinusoid [{width}] -> concat [{}] -> add_embedding MLP [{temb}], added to the time embedding",
            pooled + n * width
        ));
    }
    lines.push(format!("temb [{temb}] conditions every resnet (time_emb_proj)"));
    lines
}

/// "d transformer layers (h heads x c)" of level `i`.
fn transformer(cfg: &UNetConfig, i: usize) -> String {
    let heads = cfg.heads(i);
    let depth = cfg.transformer_layers_per_block.get(i);
    format!("{depth} transformer layers ({heads} heads x {})", cfg.block_out_channels[i] / heads)
}

/// What one stage of a block of `kind` at level `i` runs.
fn stage(cfg: &UNetConfig, i: usize, kind: &str) -> String {
    if kind.starts_with("CrossAttn") {
        format!("resnet + {}", transformer(cfg, i))
    } else {
        "resnet".into()
    }
}

/// One line per down block, the mid block and one per up block, with [C,H,W] shapes.
fn block_lines(cfg: &UNetConfig, h: usize, w: usize) -> Vec<String> {
    let n = cfg.block_out_channels.len();
    let sizes = cfg.level_sizes(h, w);
    let shape = |c: usize, level: usize| format!("[{c},{},{}]", sizes[level].0, sizes[level].1);
    let at = |i: usize| shape(cfg.block_out_channels[i], i);
    let mut lines = vec![format!("conv_in -> {}", at(0))];
    for (i, kind) in cfg.down_block_types.iter().enumerate() {
        let layers = cfg.layers_per_block.get(i);
        let mut line = format!("down {i} {kind}: {layers} x ({}) {}", stage(cfg, i, kind), at(i));
        if i + 1 < n {
            line += &format!(" -> downsample {}", shape(cfg.block_out_channels[i], i + 1));
        }
        lines.push(line);
    }
    lines.push(format!("mid: resnet + {} + resnet {}", transformer(cfg, n - 1), at(n - 1)));
    for (i, kind) in cfg.up_block_types.iter().enumerate() {
        let m = n - 1 - i;
        let layers = cfg.layers_per_block.get(m) + 1;
        let mut line = format!("up {i} {kind}: {layers} x (skip concat + {}) {}", stage(cfg, m, kind), at(m));
        if m > 0 {
            line += &format!(" -> upsample {}", shape(cfg.block_out_channels[m], m - 1));
        }
        lines.push(line);
    }
    lines.push(format!("GroupNorm + SiLU + conv_out -> noise prediction [{},{h},{w}]", cfg.out_channels));
    lines
}

pub fn summary(name: &str, cfg: &UNetConfig, resolution: (usize, usize)) -> Result<Summary> {
    cfg.validate().map_err(crate::Error::msg)?;
    let f = vae_factor(cfg);
    if !resolution.0.is_multiple_of(f) || !resolution.1.is_multiple_of(f) {
        return Err(crate::Error::msg(format!(
            "resolution {}x{} is not a multiple of the VAE factor {f}",
            resolution.0, resolution.1
        )));
    }
    let (w, h) = (resolution.0 / f, resolution.1 / f);
    let mut pipeline = vec![text_line(cfg)];
    pipeline.extend(conditioning_lines(cfg));
    if f > 1 {
        pipeline.push(format!(
            "image [3,{},{}] -> VAE latent [{},{h},{w}] (factor {f})",
            resolution.1, resolution.0, cfg.in_channels
        ));
    }
    pipeline.extend(block_lines(cfg, h, w));
    let levels = cfg.attention_levels(h, w)?;
    let mut tokens: Vec<(String, usize)> =
        levels.iter().map(|l| (format!("image at {}x{}", l.size.1, l.size.0), l.tokens())).collect();
    tokens.push(("text".into(), TEXT_TOKENS));
    let notes = levels
        .iter()
        .map(|l| {
            let n = l.tokens();
            format!(
                "  attention at {}x{}: {} tokens, {} heads x {}; self [{n},{n}], cross [{n},{TEXT_TOKENS}]; {} transformer layers",
                l.size.1,
                l.size.0,
                thousands(n as u64),
                l.heads,
                l.head_dim,
                l.layers
            )
        })
        .collect();
    let largest = levels.first().map_or((0, 0), |l| (l.tokens(), l.heads));
    Ok(Summary {
        model: name.to_string(),
        class_name: "UNet2DConditionModel".into(),
        resolution: Some(resolution),
        pipeline,
        tokens,
        attention: largest,
        notes,
        params: cfg.param_list()?,
        buffers: 0,
        parameters_original: None,
        flops: cfg.flops(h, w, TEXT_TOKENS)?.total(),
    })
}
