//! Pipelines: a model_index.json directory assembled into conditioning -> sampler -> image.

pub mod dit;
pub mod flux;
pub mod sd3;
pub mod sdxl;
pub mod t2i;

use crate::error::{Error, Result};
use crate::models::any::AnyModel;
use crate::models::vae::AutoencoderKL;
use crate::text::{ids_tensor, PromptTokenizer, TokenizedPrompt};
use crate::weights::{load_model, model_dir_files, LoadOptions, WeightStore};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// A prompt batch as the denoisers take it: text tokens [B, L, D] and pooled vectors [B, P].
pub struct PromptEmbeds {
    pub tokens: Tensor,
    pub pooled: Tensor,
    /// Prompts whose text did not fit, with the warning to show.
    pub warnings: Vec<String>,
}

/// Loads the component subfolder `name` of a pipeline directory, naming it when it is missing.
pub(crate) fn component(dir: &Path, name: &str, opts: &LoadOptions) -> Result<AnyModel> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(Error::config(dir, format!("pipeline component `{name}/` is missing")));
    }
    load_model(&path, opts)
}

pub(crate) fn wrong(dir: &Path, name: &str, expected: &str) -> Error {
    Error::config(dir.join(name), format!("expected a {expected}"))
}

/// Token ids [B, L] of `prompts`, collecting the truncation warnings.
pub(crate) fn tokenize(
    tokenizer: &PromptTokenizer,
    prompts: &[&str],
    dev: &Device,
    warnings: &mut Vec<String>,
) -> Result<Tensor> {
    let toks = prompts.iter().map(|p| tokenizer.encode(p)).collect::<Result<Vec<TokenizedPrompt>>>()?;
    warnings.extend(toks.iter().filter_map(|t| t.truncation.as_ref().map(|w| w.to_string())));
    ids_tensor(&toks, dev)
}

/// Pipeline latents -> images in [-1, 1] (`latents / scaling_factor + shift_factor`, decode).
pub(crate) fn decode_latents(vae: &AutoencoderKL, latents: &Tensor) -> Result<Tensor> {
    Ok(vae.decode(&vae.from_latent(latents)?)?.clamp(-1f32, 1f32)?)
}

/// The memory the weights of `components` (subfolders of `dir`) take once loaded as `dtype`,
/// read from the safetensors headers without loading anything.
pub fn weights_bytes(dir: &Path, components: &[&str], dtype: DType) -> Result<u64> {
    let mut bytes = 0u64;
    for name in components {
        let sub = dir.join(name);
        if !sub.exists() {
            return Err(Error::config(dir, format!("pipeline component `{name}/` is missing")));
        }
        let store = WeightStore::open_safetensors(&model_dir_files(&sub)?)?;
        let numel: usize =
            store.names().iter().filter_map(|n| store.shape(n)).map(|s| s.iter().product::<usize>()).sum();
        bytes += (numel * dtype.size_in_bytes()) as u64;
    }
    Ok(bytes)
}

/// Refuses, before loading, a pipeline whose weights exceed the memory available now
/// (`MemAvailable`; where that is unknown, nothing is refused).
pub(crate) fn check_memory(dir: &Path, components: &[&str], dtype: DType) -> Result<()> {
    let need = weights_bytes(dir, components, dtype)?;
    match available_memory() {
        Some(free) => fits(dir, need, free),
        None => Ok(()),
    }
}

fn fits(dir: &Path, need: u64, free: u64) -> Result<()> {
    if need <= free {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(Error::config(
        dir,
        format!(
            "the model needs {:.1} GiB for its weights alone but only {:.1} GiB of memory is available: not loading it",
            gib(need),
            gib(free)
        ),
    ))
}

/// `MemAvailable` of /proc/meminfo in bytes (Linux).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_refusal_names_the_estimate() {
        let dir = Path::new("models/huge");
        assert!(fits(dir, 1 << 30, 2 << 30).is_ok());
        let e = fits(dir, 24 << 30, 3 << 29).unwrap_err().to_string();
        assert!(e.contains("24.0 GiB") && e.contains("1.5 GiB") && e.contains("models/huge"), "{e}");
    }
}
