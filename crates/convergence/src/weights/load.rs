//! Opening a model from disk: a diffusers/transformers directory (config.json + weights, the
//! class from `_class_name`) or an original-layout single file (layout recognised by its keys).

use super::{keymap, model_dir_files, read_json, WeightStore};
use crate::error::{Error, Result};
use crate::models::any::AnyModel;
use crate::models::dit::{DiT, DiTConfig, Numerics};
use crate::models::flux::{FluxConfig, FluxTransformer2DModel};
use crate::models::sd3::{SD3Config, SD3Transformer2DModel};
use crate::models::text::clip::{CLIP_TEXT_MODEL, CLIP_TEXT_MODEL_WITH_PROJECTION};
use crate::models::text::t5::T5_ENCODER_MODEL;
use crate::models::text::{ClipTextConfig, ClipTextModel, T5Config, T5EncoderModel};
use crate::models::text_dit::{TextDiTConfig, TextDiTTransformer2DModel, TEXT_DIT_CLASS};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::nn::Init;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Head count for original checkpoints of a width no preset knows (DiT; SD3 without q/k norm
    /// otherwise assumes 64-channel heads).
    pub num_heads: Option<usize>,
    /// RoPE axes of an original Flux checkpoint whose head size is not FLUX.1's 128.
    pub axes_dims_rope: Option<Vec<usize>>,
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { num_heads: None, axes_dims_rope: None, dtype: DType::F32, device: Device::Cpu }
    }
}

/// The `_class_name` of a config.json (diffusers) or its `architectures[0]` (transformers).
pub fn class_name(config: &Path) -> Result<String> {
    let v: serde_json::Value = read_json(config)?;
    v.get("_class_name")
        .and_then(|c| c.as_str())
        .or_else(|| v.get("architectures")?.get(0)?.as_str())
        .map(String::from)
        .ok_or_else(|| {
            Error::config(config, "no `_class_name` (diffusers) or `architectures` (transformers) field")
        })
}

/// Loads a model directory or an original-layout checkpoint file.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<AnyModel> {
    if path.is_dir() {
        load_dir(path, opts)
    } else if path.exists() {
        load_original(path, opts)
    } else {
        Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)))
    }
}

fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<AnyModel> {
    let config = dir.join("config.json");
    let class = class_name(&config)?;
    let store = WeightStore::open_safetensors(&model_dir_files(dir)?)?;
    match class.as_str() {
        "DiTTransformer2DModel" => {
            let cfg: DiTConfig = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::DiT(DiT::new(vb, &cfg, Numerics::Diffusers, Init::Default)?))
        }
        "SD3Transformer2DModel" => {
            let cfg: SD3Config = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::SD3(SD3Transformer2DModel::new(vb, &cfg, Init::Default)?))
        }
        TEXT_DIT_CLASS => {
            let cfg: TextDiTConfig = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::TextDiT(TextDiTTransformer2DModel::new(vb, &cfg, Init::Default)?))
        }
        "FluxTransformer2DModel" => {
            let cfg: FluxConfig = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::Flux(FluxTransformer2DModel::new(vb, &cfg, Init::Default)?))
        }
        CLIP_TEXT_MODEL | CLIP_TEXT_MODEL_WITH_PROJECTION => {
            let cfg: ClipTextConfig = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::ClipText(ClipTextModel::new(vb, &cfg, Init::Default)?))
        }
        T5_ENCODER_MODEL => {
            let cfg: T5Config = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::T5Encoder(T5EncoderModel::new(vb, &cfg, Init::Default)?))
        }
        "AutoencoderKL" => {
            let cfg: VaeConfig = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::Vae(AutoencoderKL::new(vb, &cfg, Init::Default)?))
        }
        "UNet2DConditionModel" => {
            let cfg: UNetConfig = read_json(&config)?;
            cfg.validate().map_err(|m| Error::config(&config, m))?;
            let vb = store.var_builder(opts.dtype, &opts.device);
            Ok(AnyModel::UNet(UNet2DConditionModel::new(vb, &cfg, Init::Default)?))
        }
        other => Err(Error::config(&config, format!("unsupported model class `{other}`"))),
    }
}

fn load_original(file: &Path, opts: &LoadOptions) -> Result<AnyModel> {
    let store = WeightStore::open_file(file)?;
    let names = store.names();
    if keymap::dit::is_official(&names) {
        let tensors: BTreeMap<String, Tensor> = store.load_all(&opts.device)?.into_iter().collect();
        let cfg = official_dit_config(file, &tensors, opts.num_heads)?;
        let mapped = keymap::dit::to_diffusers(tensors)?;
        let vb = WeightStore::from_tensors(mapped, file).var_builder(opts.dtype, &opts.device);
        return Ok(AnyModel::DiT(DiT::new(vb, &cfg, Numerics::Official, Init::Default)?));
    }
    if keymap::sd3::is_original(&names) {
        let tensors = store.load_all(&opts.device)?.into_iter().collect();
        let mapped = keymap::sd3::to_diffusers(tensors)?;
        let cfg = original_sd3_config(file, &mapped, opts.num_heads)?;
        let vb = WeightStore::from_tensors(mapped, file).var_builder(opts.dtype, &opts.device);
        return Ok(AnyModel::SD3(SD3Transformer2DModel::new(vb, &cfg, Init::Default)?));
    }
    if keymap::flux::is_original(&names) {
        let tensors = store.load_all(&opts.device)?.into_iter().collect();
        let mapped = keymap::flux::to_diffusers(tensors)?;
        let cfg = original_flux_config(file, &mapped, opts.axes_dims_rope.clone())?;
        let vb = WeightStore::from_tensors(mapped, file).var_builder(opts.dtype, &opts.device);
        return Ok(AnyModel::Flux(FluxTransformer2DModel::new(vb, &cfg, Init::Default)?));
    }
    Err(Error::config(
        file,
        "unrecognised checkpoint layout (expected an official DiT, Stability SD3 or BFL Flux state dict, \
         or a directory with config.json)",
    ))
}

/// The shape of tensor `name` of a checkpoint being configured, or an error naming the file.
fn dims(file: &Path, t: &BTreeMap<String, Tensor>, name: &str) -> Result<Vec<usize>> {
    t.get(name).map(|x| x.dims().to_vec()).ok_or_else(|| Error::MissingTensor {
        path: file.to_path_buf(),
        tensor: name.to_string(),
        expected: vec![],
    })
}

/// Reads an SD3 / SD3.5 configuration off the (mapped) tensor shapes. The head size is the q/k
/// norm's length when there is one; otherwise `num_heads` or SD3's 64 channels per head.
fn original_sd3_config(
    file: &Path,
    t: &BTreeMap<String, Tensor>,
    num_heads: Option<usize>,
) -> Result<SD3Config> {
    let context = dims(file, t, "context_embedder.weight")?;
    let conv = dims(file, t, "pos_embed.proj.weight")?;
    let (hidden, in_channels, patch) = (context[0], conv[1], conv[2]);
    let depth = keymap::count_blocks(t, "transformer_blocks.");
    let norm_q = t.get("transformer_blocks.0.attn.norm_q.weight").map(|w| w.dims()[0]);
    let head_dim = match num_heads {
        Some(h) if h > 0 && hidden.is_multiple_of(h) => hidden / h,
        Some(h) => {
            return Err(Error::config(file, format!("hidden size {hidden} is not divisible by {h} heads")))
        }
        None => norm_q.unwrap_or(64),
    };
    let max = t.get("pos_embed.pos_embed").map(|p| (p.dims()[1] as f64).sqrt().round() as usize);
    Ok(SD3Config {
        patch_size: patch,
        in_channels,
        num_layers: depth,
        attention_head_dim: head_dim,
        num_attention_heads: hidden / head_dim,
        joint_attention_dim: context[1],
        caption_projection_dim: hidden,
        pooled_projection_dim: dims(file, t, "time_text_embed.text_embedder.linear_1.weight")?[1],
        out_channels: Some(dims(file, t, "proj_out.weight")?[0] / (patch * patch)),
        pos_embed_max_size: max,
        dual_attention_layers: (0..depth)
            .filter(|i| t.contains_key(&format!("transformer_blocks.{i}.attn2.to_q.weight")))
            .collect(),
        qk_norm: norm_q.map(|_| "rms_norm".into()),
        ..Default::default()
    })
}

/// Reads a Flux configuration off the (mapped) tensor shapes; the head size is the q/k norm's.
fn original_flux_config(
    file: &Path,
    t: &BTreeMap<String, Tensor>,
    axes: Option<Vec<usize>>,
) -> Result<FluxConfig> {
    let x = dims(file, t, "x_embedder.weight")?;
    let head_dim = dims(file, t, "transformer_blocks.0.attn.norm_q.weight")?[0];
    let defaults = FluxConfig::default();
    let axes_dims_rope = match axes {
        Some(a) => a,
        None if head_dim == defaults.attention_head_dim => defaults.axes_dims_rope,
        None => {
            return Err(Error::config(
                file,
                format!("head size {head_dim} is not FLUX.1's: pass the RoPE axes"),
            ))
        }
    };
    Ok(FluxConfig {
        in_channels: x[1],
        out_channels: Some(dims(file, t, "proj_out.weight")?[0]),
        num_layers: keymap::count_blocks(t, "transformer_blocks."),
        num_single_layers: keymap::count_blocks(t, "single_transformer_blocks."),
        attention_head_dim: head_dim,
        num_attention_heads: x[0] / head_dim,
        joint_attention_dim: dims(file, t, "context_embedder.weight")?[1],
        pooled_projection_dim: dims(file, t, "time_text_embed.text_embedder.linear_1.weight")?[1],
        guidance_embeds: t.contains_key("time_text_embed.guidance_embedder.linear_1.weight"),
        axes_dims_rope,
        ..defaults
    })
}

/// Reads an official DiT's configuration off its tensor shapes; only the head count is not in
/// the weights.
fn official_dit_config(
    file: &Path,
    t: &BTreeMap<String, Tensor>,
    num_heads: Option<usize>,
) -> Result<DiTConfig> {
    let dims = |name: &str| dims(file, t, name);
    let conv = dims("x_embedder.proj.weight")?;
    let (hidden, in_channels, patch) = (conv[0], conv[1], conv[2]);
    let out = dims("final_layer.linear.weight")?[0] / (patch * patch);
    let classes = dims("y_embedder.embedding_table.weight")?[0] - 1;
    let tokens = dims("pos_embed")?[1];
    let grid = (tokens as f64).sqrt().round() as usize;
    let heads = num_heads.or_else(|| DiTConfig::heads_for_width(hidden)).ok_or_else(|| {
        Error::config(file, format!("hidden size {hidden} matches no DiT preset: pass --num-heads N"))
    })?;
    if hidden % heads != 0 {
        return Err(Error::config(file, format!("hidden size {hidden} is not divisible by {heads} heads")));
    }
    Ok(DiTConfig {
        num_attention_heads: heads,
        attention_head_dim: hidden / heads,
        in_channels,
        out_channels: Some(out),
        num_layers: keymap::dit::depth(t),
        sample_size: grid * patch,
        patch_size: patch,
        num_embeds_ada_norm: Some(classes),
        ..Default::default()
    })
}
