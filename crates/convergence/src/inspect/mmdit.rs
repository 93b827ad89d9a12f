//! The inspect summaries of the joint-attention transformers: SD3/SD3.5 (MMDiT) and Flux.

use super::Summary;
use crate::error::{Error, Result};
use crate::models::flux::FluxConfig;
use crate::models::sd3::SD3Config;

/// Both families denoise a 16-channel latent of the 8x VAE.
const VAE_FACTOR: usize = 8;

/// SD3's prompt: 77 CLIP tokens (L and bigG side by side) + 256 T5 tokens.
pub const SD3_TEXT_TOKENS: usize = 77 + 256;
/// Flux-dev's default max_sequence_length (schnell uses 256).
pub const FLUX_TEXT_TOKENS: usize = 512;

fn latent(resolution: (usize, usize), multiple: usize) -> Result<(usize, usize)> {
    let m = VAE_FACTOR * multiple;
    if !resolution.0.is_multiple_of(m) || !resolution.1.is_multiple_of(m) {
        return Err(Error::msg(format!(
            "resolution {}x{} is not a multiple of {m} (VAE factor {VAE_FACTOR} x patch {multiple})",
            resolution.0, resolution.1
        )));
    }
    Ok((resolution.1 / VAE_FACTOR, resolution.0 / VAE_FACTOR))
}

pub fn sd3_summary(name: &str, cfg: &SD3Config, resolution: (usize, usize)) -> Result<Summary> {
    let (h, w) = latent(resolution, cfg.patch_size)?;
    let (p, d, c) = (cfg.patch_size, cfg.hidden(), cfg.in_channels);
    let tokens = cfg.tokens(h, w, SD3_TEXT_TOKENS);
    let (n, l) = (tokens.image, tokens.total());
    let pipeline = vec![
        format!("image [3,{},{}] -> VAE latent [{c},{h},{w}] (factor {VAE_FACTOR})", resolution.1, resolution.0),
        format!(
            "latent -> {n} patches of dim {} (patch {p}) -> tokens [{n},{d}] + centre crop of the stored {}x{} position table",
            c * p * p,
            cfg.pos_embed_max_size.unwrap_or(0),
            cfg.pos_embed_max_size.unwrap_or(0)
        ),
        format!(
            "text: CLIP-L + bigG penultimate [77,2048] padded to [77,{}] ++ T5 [256,{}] = [{SD3_TEXT_TOKENS},{}] -> context_embedder -> [{SD3_TEXT_TOKENS},{d}]",
            cfg.joint_attention_dim, cfg.joint_attention_dim, cfg.joint_attention_dim
        ),
        format!("t -> sinusoid [256] -> MLP [{d}] + pooled CLIP [{}] -> MLP [{d}] = temb", cfg.pooled_projection_dim),
        format!(
            "{} joint blocks: per-modality adaLN, QKV and MLP; one attention over [{n} image + {} text] = {l} tokens{}{}",
            cfg.num_layers,
            tokens.text,
            if cfg.qk_norm.is_some() { "; RMSNorm on q, k" } else { "" },
            if cfg.dual_attention_layers.is_empty() {
                String::new()
            } else {
                format!("; image-only second attention in {} blocks (MMDiT-X)", cfg.dual_attention_layers.len())
            }
        ),
        format!(
            "adaLN output norm + linear -> [{n},{}] -> un-patchify -> velocity [{},{h},{w}]",
            p * p * cfg.out_channels(),
            cfg.out_channels()
        ),
    ];
    Ok(Summary {
        model: name.to_string(),
        class_name: "SD3Transformer2DModel".into(),
        resolution: Some(resolution),
        pipeline,
        tokens: vec![("text".into(), tokens.text), ("image".into(), n)],
        attention: (l, cfg.num_attention_heads),
        notes: vec![],
        params: cfg.param_list()?,
        buffers: cfg.pos_embed_elements(),
        parameters_original: None,
        flops: cfg.flops(h, w, SD3_TEXT_TOKENS).total(),
    })
}

pub fn flux_summary(name: &str, cfg: &FluxConfig, resolution: (usize, usize)) -> Result<Summary> {
    let (h, w) = latent(resolution, 2)?;
    let (d, c) = (cfg.hidden(), cfg.in_channels / 4);
    let tokens = cfg.tokens(h, w, FLUX_TEXT_TOKENS);
    let (n, l) = (tokens.image, tokens.total());
    let pipeline = vec![
        format!("image [3,{},{}] -> VAE latent [{c},{h},{w}] (factor {VAE_FACTOR})", resolution.1, resolution.0),
        format!("latent -> packed 2x2 -> [{n},{}] -> x_embedder -> [{n},{d}]", cfg.in_channels),
        format!(
            "text: T5 [{FLUX_TEXT_TOKENS},{}] -> context_embedder -> [{FLUX_TEXT_TOKENS},{d}]; CLIP-L pooled [{}]",
            cfg.joint_attention_dim, cfg.pooled_projection_dim
        ),
        format!(
            "t{} -> sinusoids -> MLPs [{d}] + pooled -> MLP [{d}] = temb; RoPE axes {:?} from [0,row,col] ids",
            if cfg.guidance_embeds { " + guidance" } else { "" },
            cfg.axes_dims_rope
        ),
        format!(
            "{} double-stream blocks (separate weights per modality, joint attention over [{} text + {n} image] = {l})",
            cfg.num_layers, tokens.text
        ),
        format!("{} single-stream blocks (one projection feeds attention and MLP in parallel)", cfg.num_single_layers),
        format!("adaLN output norm + linear -> [{n},{}] -> unpack -> velocity [{c},{h},{w}]", cfg.in_channels),
    ];
    Ok(Summary {
        model: name.to_string(),
        class_name: "FluxTransformer2DModel".into(),
        resolution: Some(resolution),
        pipeline,
        tokens: vec![("text".into(), tokens.text), ("image".into(), n)],
        attention: (l, cfg.num_attention_heads),
        notes: vec![],
        params: cfg.param_list()?,
        buffers: 0,
        parameters_original: None,
        flops: cfg.flops(h, w, FLUX_TEXT_TOKENS).total(),
    })
}

/// 1024x1024, the resolution both families were trained for.
pub const NATIVE: (usize, usize) = (1024, 1024);
