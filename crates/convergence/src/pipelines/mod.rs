//! Pipelines: a model_index.json directory assembled into conditioning -> sampler -> image.

pub mod dit;
pub mod flux;
pub mod sd3;

use crate::error::{Error, Result};
use crate::models::any::AnyModel;
use crate::models::vae::AutoencoderKL;
use crate::text::{ids_tensor, PromptTokenizer, TokenizedPrompt};
use crate::weights::{load_model, LoadOptions};
use candle_core::{Device, Tensor};
use std::path::Path;

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
