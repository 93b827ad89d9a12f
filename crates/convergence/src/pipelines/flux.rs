//! The Flux pipeline (`FluxPipeline`): CLIP-L pooled + T5 tokens -> double/single-stream
//! transformer under flow matching with a resolution-dependent shift -> VAE decoder. Guidance is
//! distilled (an input of the model, FLUX.1-dev); `true_cfg_scale` > 1 with a negative prompt
//! adds real classifier-free guidance.

use super::{check_memory, component, decode_latents, tokenize, wrong, PromptEmbeds};
use crate::error::Result;
use crate::flow::{sample, ModelTime, SampleOptions, SamplerKind, Scheduler};
use crate::models::any::AnyModel;
use crate::models::flux::FluxTransformer2DModel;
use crate::models::text::{ClipTextModel, T5EncoderModel};
use crate::models::vae::AutoencoderKL;
use crate::models::Conditioning;
use crate::text::PromptTokenizer;
use crate::weights::LoadOptions;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

pub struct FluxPipeline {
    tokenizers: [PromptTokenizer; 2],
    clip: ClipTextModel,
    t5: T5EncoderModel,
    pub transformer: FluxTransformer2DModel,
    pub vae: AutoencoderKL,
    pub scheduler: Scheduler,
    device: Device,
}

impl FluxPipeline {
    pub fn load(dir: &Path, max_sequence_length: usize, dev: &Device) -> Result<Self> {
        check_memory(dir, &["text_encoder", "text_encoder_2", "transformer", "vae"], DType::F32)?;
        let opts = LoadOptions { device: dev.clone(), ..Default::default() };
        let AnyModel::ClipText(clip) = component(dir, "text_encoder", &opts)? else {
            return Err(wrong(dir, "text_encoder", "CLIP text encoder"));
        };
        let AnyModel::T5Encoder(t5) = component(dir, "text_encoder_2", &opts)? else {
            return Err(wrong(dir, "text_encoder_2", "T5 encoder"));
        };
        let AnyModel::Flux(transformer) = component(dir, "transformer", &opts)? else {
            return Err(wrong(dir, "transformer", "FluxTransformer2DModel"));
        };
        let AnyModel::Vae(vae) = component(dir, "vae", &opts)? else {
            return Err(wrong(dir, "vae", "AutoencoderKL"));
        };
        let tokenizers = [
            PromptTokenizer::from_dir(&dir.join("tokenizer"), None)?,
            PromptTokenizer::from_dir(&dir.join("tokenizer_2"), Some(max_sequence_length))?,
        ];
        let scheduler = Scheduler::from_config_file(dir.join("scheduler/scheduler_config.json"))?;
        Ok(FluxPipeline { tokenizers, clip, t5, transformer, vae, scheduler, device: dev.clone() })
    }

    /// T5 tokens [B, max_sequence_length, D] and CLIP-L pooled vectors [B, 768 (real)].
    pub fn encode_prompt(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        let mut warnings = vec![];
        let pooled = self
            .clip
            .forward(&tokenize(&self.tokenizers[0], prompts, &self.device, &mut warnings)?)?
            .pooler_output;
        let tokens = self
            .t5
            .forward(&tokenize(&self.tokenizers[1], prompts, &self.device, &mut warnings)?)?
            .last_hidden_state;
        Ok(PromptEmbeds { tokens, pooled, warnings })
    }

    /// Denoises unpacked latents [B, 16, h, w] over `steps` Euler steps; `guidance` is the
    /// distilled guidance (ignored by models without a guidance embedder), `true_cfg` the real
    /// CFG against `negative` when given. Returns the final unpacked latents.
    /// `on_step(done, total, latents)` runs after every step (progress bars, previews).
    pub fn denoise(
        &self,
        latents: &Tensor,
        prompt: &PromptEmbeds,
        negative: Option<(&PromptEmbeds, f64)>,
        steps: usize,
        guidance: f64,
        mut on_step: impl FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        let (b, _, h, w) = latents.dims4()?;
        let schedule = self.scheduler.set_timesteps(steps, None, Some((h / 2) * (w / 2)))?;
        let g = Tensor::full(guidance as f32, b, &self.device)?;
        let cond = |p: &PromptEmbeds| Conditioning {
            text_tokens: Some(p.tokens.clone()),
            pooled: Some(p.pooled.clone()),
            guidance: Some(g.clone()),
            ..Default::default()
        };
        let uncond = negative.map(|(n, _)| cond(n));
        let scale = negative.map_or(1.0, |(_, s)| s);
        let opts =
            SampleOptions { sampler: SamplerKind::Euler, guidance: scale, seed: 0, time: ModelTime::Sigma };
        let total = schedule.num_steps();
        sample(&self.transformer, latents, &cond(prompt), uncond.as_ref(), &schedule, &opts, |i, x| {
            on_step(i + 1, total, x)
        })
    }

    /// Final unpacked latents -> images in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        decode_latents(&self.vae, latents)
    }
}
