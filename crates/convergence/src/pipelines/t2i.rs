//! The text-to-image models trained here (`ConvergenceT2IPipeline`): a word-level tokenizer, a
//! small CLIP-style text encoder trained with the denoiser, and a denoiser in pixel space (an
//! MMDiT `SD3Transformer2DModel`, or a `TextDiTTransformer2DModel` for the ablation) under
//! flow matching with classifier-free guidance against the empty prompt.
//!
//! The denoiser sees what the real models see: the token sequence (every token's final,
//! normed state) and a pooled vector (the projected end-of-text state).

use super::{component, wrong, PromptEmbeds};
use crate::error::{Error, Result};
use crate::flow::{sample, ModelTime, SampleOptions, SamplerKind, Scheduler};
use crate::models::any::AnyModel;
use crate::models::text::ClipTextModel;
use crate::models::{Conditioning, Denoiser};
use crate::text::{ids_tensor, PromptTokenizer};
use crate::weights::{read_json, LoadOptions};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use std::path::Path;

/// The pipeline's `_class_name` in model_index.json.
pub const CLASS_NAME: &str = "ConvergenceT2IPipeline";

/// A tokenizer and the text encoder it feeds.
pub struct TextEncoder {
    pub tokenizer: PromptTokenizer,
    pub model: ClipTextModel,
}

impl TextEncoder {
    /// Token states [B, L, D] and pooled vectors [B, P] of `prompts`.
    pub fn encode(&self, prompts: &[&str], dev: &Device) -> Result<PromptEmbeds> {
        let toks = prompts.iter().map(|p| self.tokenizer.encode(p)).collect::<Result<Vec<_>>>()?;
        let mut warnings: Vec<String> =
            toks.iter().filter_map(|t| t.truncation.as_ref().map(|w| w.to_string())).collect();
        warnings.dedup();
        let out = self.model.forward(&ids_tensor(&toks, dev)?)?;
        let pooled = out.text_embeds.ok_or_else(|| Error::msg("the text encoder has no projection"))?;
        Ok(PromptEmbeds { tokens: out.last_hidden_state, pooled, warnings })
    }
}

/// The conditioning a denoiser gets from prompt embeddings.
pub fn conditioning(e: &PromptEmbeds) -> Conditioning {
    Conditioning { text_tokens: Some(e.tokens.clone()), pooled: Some(e.pooled.clone()), ..Default::default() }
}

/// Our sampling defaults, stored in model_index.json under `convergence`.
#[derive(Clone, Debug, Deserialize)]
pub struct Defaults {
    pub steps: usize,
    pub guidance: f64,
}

#[derive(Deserialize)]
struct ModelIndex {
    convergence: Option<Defaults>,
}

pub struct T2IPipeline {
    pub text_encoder: TextEncoder,
    pub transformer: AnyModel,
    pub scheduler: Scheduler,
    pub defaults: Defaults,
    device: Device,
}

impl T2IPipeline {
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        super::check_memory(dir, &["text_encoder", "transformer"], candle_core::DType::F32)?;
        let opts = LoadOptions { device: dev.clone(), ..Default::default() };
        let AnyModel::ClipText(model) = component(dir, "text_encoder", &opts)? else {
            return Err(wrong(dir, "text_encoder", "CLIP text encoder"));
        };
        let tokenizer = PromptTokenizer::from_dir(&dir.join("tokenizer"), None)?;
        let transformer = component(dir, "transformer", &opts)?;
        if transformer.denoiser().is_none() {
            return Err(wrong(dir, "transformer", "denoiser"));
        }
        let scheduler = Scheduler::from_config_file(dir.join("scheduler/scheduler_config.json"))?;
        Ok(T2IPipeline {
            text_encoder: TextEncoder { tokenizer, model },
            transformer,
            scheduler,
            defaults: index.convergence.unwrap_or(Defaults { steps: 20, guidance: 4.0 }),
            device: dev.clone(),
        })
    }

    fn denoiser(&self) -> &dyn Denoiser {
        self.transformer.denoiser().expect("checked at load")
    }

    /// [C, H, W] of one image.
    pub fn image_shape(&self) -> Result<[usize; 3]> {
        self.transformer.sample_shape().ok_or_else(|| Error::msg("the transformer has no fixed sample size"))
    }

    /// The prompts' embeddings; words the vocabulary lacks are named in the warnings (the
    /// trainer, whose captions define the vocabulary, skips that second tokenisation).
    pub fn encode_prompt(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        let mut embeds = self.text_encoder.encode(prompts, &self.device)?;
        for p in prompts {
            let unknown = self.text_encoder.tokenizer.unknown_words(p)?;
            if !unknown.is_empty() {
                embeds
                    .warnings
                    .push(format!("not in the model's vocabulary (ignored): {}", unknown.join(", ")));
            }
        }
        embeds.warnings.dedup();
        Ok(embeds)
    }

    /// The initial noise of images `range` of a `generate` call with `seed`: image k's from the
    /// ChaCha8 stream k, so a batch size never changes an image.
    pub fn noise(&self, seed: u64, range: std::ops::Range<usize>) -> Result<Tensor> {
        let [c, h, w] = self.image_shape()?;
        let noise = range
            .map(|k| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(k as u64);
                crate::noise::randn(&mut rng, &[1, c, h, w], &self.device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&noise, 0)?)
    }

    /// Denoises `noise` over `steps` Euler steps with guidance `guidance` against the empty
    /// prompt; returns images in [-1, 1]. `on_step(done, total, x)` runs after every step.
    pub fn denoise(
        &self,
        noise: &Tensor,
        prompt: &PromptEmbeds,
        steps: usize,
        guidance: f64,
        mut on_step: impl FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        let schedule = self.scheduler.set_timesteps(steps, None, None)?;
        let empty = vec![""; noise.dim(0)?];
        let uncond = conditioning(&self.encode_prompt(&empty)?);
        let opts =
            SampleOptions { sampler: SamplerKind::Euler, guidance, seed: 0, time: ModelTime::Timestep };
        let total = schedule.num_steps();
        let x = sample(
            self.denoiser(),
            noise,
            &conditioning(prompt),
            Some(&uncond),
            &schedule,
            &opts,
            |i, x| on_step(i + 1, total, x),
        )?;
        Ok(x.clamp(-1f32, 1f32)?)
    }

    /// One image per prompt ([N, C, H, W] in [-1, 1]); image k from noise stream k of `seed`.
    pub fn generate(&self, prompts: &[&str], seed: u64, steps: usize, guidance: f64) -> Result<Tensor> {
        let mut out = vec![];
        for (c, chunk) in prompts.chunks(64).enumerate() {
            let noise = self.noise(seed, c * 64..c * 64 + chunk.len())?;
            let embeds = self.encode_prompt(chunk)?;
            out.push(self.denoise(&noise, &embeds, steps, guidance, |_, _, _| {})?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}
