//! The SD3/SD3.5 pipeline (`StableDiffusion3Pipeline`): three text encoders -> joint-attention
//! transformer under flow matching with classifier-free guidance -> VAE decoder.
//!
//! Prompt encoding: CLIP-L and bigG penultimate states side by side [77, 768 + 1280], zero-padded
//! to T5's width, then T5's 256 (max_sequence_length) tokens appended along the sequence; the
//! pooled vector is both CLIPs' projected EOS features side by side.

use super::{check_memory, component, decode_latents, tokenize, wrong, PromptEmbeds};
use crate::error::{Error, Result};
use crate::flow::{sample, ModelTime, SampleOptions, SamplerKind, Scheduler};
use crate::models::any::AnyModel;
use crate::models::sd3::SD3Transformer2DModel;
use crate::models::text::{ClipTextModel, T5EncoderModel};
use crate::models::vae::AutoencoderKL;
use crate::models::Conditioning;
use crate::text::PromptTokenizer;
use crate::weights::LoadOptions;
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;

pub struct SD3Pipeline {
    tokenizers: [PromptTokenizer; 3],
    clip_l: ClipTextModel,
    clip_g: ClipTextModel,
    t5: T5EncoderModel,
    pub transformer: SD3Transformer2DModel,
    pub vae: AutoencoderKL,
    pub scheduler: Scheduler,
    device: Device,
}

impl SD3Pipeline {
    pub fn load(dir: &Path, max_sequence_length: usize, dev: &Device) -> Result<Self> {
        check_memory(
            dir,
            &["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"],
            DType::F32,
        )?;
        let opts = LoadOptions { device: dev.clone(), ..Default::default() };
        let clip = |name: &str| match component(dir, name, &opts)? {
            AnyModel::ClipText(m) => Ok(m),
            _ => Err(wrong(dir, name, "CLIP text encoder")),
        };
        let (clip_l, clip_g) = (clip("text_encoder")?, clip("text_encoder_2")?);
        let AnyModel::T5Encoder(t5) = component(dir, "text_encoder_3", &opts)? else {
            return Err(wrong(dir, "text_encoder_3", "T5 encoder"));
        };
        let AnyModel::SD3(transformer) = component(dir, "transformer", &opts)? else {
            return Err(wrong(dir, "transformer", "SD3Transformer2DModel"));
        };
        let AnyModel::Vae(vae) = component(dir, "vae", &opts)? else {
            return Err(wrong(dir, "vae", "AutoencoderKL"));
        };
        let tokenizers = [
            PromptTokenizer::from_dir(&dir.join("tokenizer"), None)?,
            PromptTokenizer::from_dir(&dir.join("tokenizer_2"), None)?,
            PromptTokenizer::from_dir(&dir.join("tokenizer_3"), Some(max_sequence_length))?,
        ];
        let scheduler = Scheduler::from_config_file(dir.join("scheduler/scheduler_config.json"))?;
        Ok(SD3Pipeline { tokenizers, clip_l, clip_g, t5, transformer, vae, scheduler, device: dev.clone() })
    }

    /// `encode_prompt` of the diffusers pipeline: tokens [B, 77 + T5 tokens, D], pooled [B, 2048 (real)].
    pub fn encode_prompt(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        let mut warnings = vec![];
        let l = self.clip_l.forward(&tokenize(&self.tokenizers[0], prompts, &self.device, &mut warnings)?)?;
        let g = self.clip_g.forward(&tokenize(&self.tokenizers[1], prompts, &self.device, &mut warnings)?)?;
        let t5 = self
            .t5
            .forward(&tokenize(&self.tokenizers[2], prompts, &self.device, &mut warnings)?)?
            .last_hidden_state;
        let clip = Tensor::cat(&[l.penultimate(), g.penultimate()], D::Minus1)?;
        let pad = t5.dim(D::Minus1)?.saturating_sub(clip.dim(D::Minus1)?);
        let tokens = Tensor::cat(&[&clip.pad_with_zeros(D::Minus1, 0, pad)?, &t5], 1)?;
        let projected = |o: &crate::models::text::ClipTextOutput| {
            o.text_embeds
                .clone()
                .ok_or_else(|| Error::msg("SD3 needs CLIPTextModelWithProjection text encoders"))
        };
        let pooled = Tensor::cat(&[projected(&l)?, projected(&g)?], D::Minus1)?;
        warnings.dedup();
        Ok(PromptEmbeds { tokens, pooled, warnings })
    }

    /// Denoises `latents` (the initial noise) over `steps` flow-matching Euler steps with
    /// guidance against the negative prompts; returns the final latents (not unscaled).
    /// `on_step(done, total, latents)` runs after every step (progress bars, previews).
    pub fn denoise(
        &self,
        latents: &Tensor,
        cond: &PromptEmbeds,
        uncond: &PromptEmbeds,
        steps: usize,
        guidance: f64,
        mut on_step: impl FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        let schedule = self.scheduler.set_timesteps(steps, None, None)?;
        let c = |e: &PromptEmbeds| Conditioning {
            text_tokens: Some(e.tokens.clone()),
            pooled: Some(e.pooled.clone()),
            ..Default::default()
        };
        let opts =
            SampleOptions { sampler: SamplerKind::Euler, guidance, seed: 0, time: ModelTime::Timestep };
        let total = schedule.num_steps();
        sample(&self.transformer, latents, &c(cond), Some(&c(uncond)), &schedule, &opts, |i, x| {
            on_step(i + 1, total, x)
        })
    }

    /// Final latents -> images in [-1, 1] (`latents / scaling_factor + shift_factor`, decode).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        decode_latents(&self.vae, latents)
    }
}
