//! Opening a model from disk: a diffusers/transformers directory (config.json + weights, the
//! class from `_class_name`) or an original-layout single file (layout recognised by its keys).

use super::{keymap, model_dir_files, read_json, WeightStore};
use crate::error::{Error, Result};
use crate::models::any::AnyModel;
use crate::models::dit::{DiT, DiTConfig, Numerics};
use crate::nn::Init;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Head count for original checkpoints of a width no preset knows.
    pub num_heads: Option<usize>,
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            num_heads: None,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// The `_class_name` of a config.json (diffusers) or its `architectures[0]` (transformers).
pub fn class_name(config: &Path) -> Result<String> {
    let v: serde_json::Value = read_json(config)?;
    v.get("_class_name")
        .and_then(|c| c.as_str())
        .or_else(|| v.get("architectures")?.get(0)?.as_str())
        .map(String::from)
        .ok_or_else(|| Error::config(config, "no `_class_name` (diffusers) or `architectures` (transformers) field"))
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
            Ok(AnyModel::DiT(DiT::new(vb, &cfg, Numerics::Diffusers, Init::Default).map_err(Error::from)?))
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
    Err(Error::config(
        file,
        "unrecognised checkpoint layout (expected an official DiT state dict, or a directory with config.json)",
    ))
}

/// Reads an official DiT's configuration off its tensor shapes; only the head count is not in
/// the weights.
fn official_dit_config(file: &Path, t: &BTreeMap<String, Tensor>, num_heads: Option<usize>) -> Result<DiTConfig> {
    let dims = |name: &str| -> Result<Vec<usize>> {
        t.get(name).map(|x| x.dims().to_vec()).ok_or_else(|| Error::MissingTensor {
            path: file.to_path_buf(),
            tensor: name.to_string(),
            expected: vec![],
        })
    };
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
