//! SDXL (`StableDiffusionXLPipeline`) and its refiner (`StableDiffusionXLImg2ImgPipeline`):
//! CLIP-L and OpenCLIP bigG -> UNet under the Euler (variance-exploding) scheduler with
//! classifier-free guidance -> VAE decoder.
//!
//! What the Rust ports tend to miss, and diffusers does:
//! - both encoders' *penultimate* states, unnormed, side by side [77, 768 + 1280] (the refiner
//!   has bigG only); the pooled vector is bigG's projected EOS feature (`text_embeds`);
//! - micro-conditioning: `time_ids` = [original size, crop top-left, target size] (the refiner:
//!   an aesthetic score instead of the target size), embedded and added to the timestep;
//! - a missing negative prompt is all-zero embeddings when `force_zeros_for_empty_prompt`;
//! - the ensemble of experts: the base denoises the timesteps at or above the
//!   `denoising_end` cutoff, the refiner continues the same schedule below it from the base's
//!   latents (no noise added, no rescaling).

use super::{check_memory, component, decode_latents, tokenize, wrong, PromptEmbeds};
use crate::error::{Error, Result};
use crate::flow::{sample, ModelTime, SampleOptions, SamplerKind, Scheduler};
use crate::models::any::AnyModel;
use crate::models::text::{ClipTextModel, ClipTextOutput};
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::models::Conditioning;
use crate::text::PromptTokenizer;
use crate::weights::{read_json, LoadOptions};
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use std::path::Path;

/// A tokenizer and the CLIP text encoder it feeds.
struct Encoder {
    tokenizer: PromptTokenizer,
    model: ClipTextModel,
}

pub struct SDXLPipeline {
    /// CLIP-L (`text_encoder`); the refiner has none.
    clip_l: Option<Encoder>,
    /// OpenCLIP bigG with projection (`text_encoder_2`).
    clip_g: Encoder,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: Scheduler,
    pub flags: PipelineFlags,
    device: Device,
}

/// The pipeline-level switches model_index.json carries.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct PipelineFlags {
    /// A missing negative prompt means zero embeddings (base) instead of the encoded "".
    #[serde(default)]
    pub force_zeros_for_empty_prompt: bool,
    /// Time ids end with an aesthetic score instead of the target size (refiner).
    #[serde(default)]
    pub requires_aesthetics_score: bool,
}

/// SDXL's micro-conditioning, with diffusers' argument names; sizes are (height, width).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MicroConditioning {
    pub original_size: (usize, usize),
    pub crops_coords_top_left: (usize, usize),
    pub target_size: (usize, usize),
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

impl MicroConditioning {
    /// diffusers' defaults for an image of `height` x `width`.
    pub fn new(height: usize, width: usize) -> Self {
        MicroConditioning {
            original_size: (height, width),
            crops_coords_top_left: (0, 0),
            target_size: (height, width),
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

/// How one `denoise` call runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenoiseOptions {
    /// Steps of the whole schedule (an expert runs its portion of them).
    pub steps: usize,
    /// Classifier-free guidance scale (1 = off).
    pub guidance: f64,
    pub portion: Portion,
}

/// Which part of the schedule a call denoises.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Portion {
    /// From unit noise to the end.
    All,
    /// From unit noise to the `denoising_end` fraction (the base expert's part).
    Until(f64),
    /// From latents already at the `denoising_start` fraction to the end (the refiner's part).
    From(f64),
}

impl SDXLPipeline {
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let flags: PipelineFlags = read_json(&dir.join("model_index.json"))?;
        let has_clip_l = dir.join("text_encoder").exists();
        let mut components = vec!["text_encoder_2", "unet", "vae"];
        if has_clip_l {
            components.push("text_encoder");
        }
        check_memory(dir, &components, DType::F32)?;
        let opts = LoadOptions { device: dev.clone(), ..Default::default() };
        let encoder = |model: &str, tokenizer: &str| -> Result<Encoder> {
            let AnyModel::ClipText(model) = component(dir, model, &opts)? else {
                return Err(wrong(dir, model, "CLIP text encoder"));
            };
            Ok(Encoder { tokenizer: PromptTokenizer::from_dir(&dir.join(tokenizer), None)?, model })
        };
        let clip_l = has_clip_l.then(|| encoder("text_encoder", "tokenizer")).transpose()?;
        let clip_g = encoder("text_encoder_2", "tokenizer_2")?;
        if !clip_g.model.config().with_projection() {
            return Err(wrong(dir, "text_encoder_2", "CLIPTextModelWithProjection"));
        }
        let AnyModel::UNet(unet) = component(dir, "unet", &opts)? else {
            return Err(wrong(dir, "unet", "UNet2DConditionModel"));
        };
        let AnyModel::Vae(vae) = component(dir, "vae", &opts)? else {
            return Err(wrong(dir, "vae", "AutoencoderKL"));
        };
        let scheduler = Scheduler::from_config_file(dir.join("scheduler/scheduler_config.json"))?;
        Ok(SDXLPipeline { clip_l, clip_g, unet, vae, scheduler, flags, device: dev.clone() })
    }

    /// Pixels per latent cell (8 for SDXL's VAE).
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config().block_out_channels.len() - 1)
    }

    /// The size the UNet was trained at (`sample_size` x the VAE factor; 1024 for SDXL).
    pub fn default_size(&self) -> usize {
        self.unet.config().sample_size.unwrap_or(128) * self.vae_scale_factor()
    }

    /// `encode_prompt`: penultimate states of every encoder side by side [B, 77, D], and bigG's
    /// `text_embeds` [B, 1280 (real)].
    pub fn encode_prompt(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        let mut warnings = vec![];
        let mut encode = |enc: &Encoder| -> Result<ClipTextOutput> {
            enc.model.forward(&tokenize(&enc.tokenizer, prompts, &self.device, &mut warnings)?)
        };
        let mut states = vec![];
        if let Some(l) = &self.clip_l {
            states.push(encode(l)?.penultimate().clone());
        }
        let g = encode(&self.clip_g)?;
        states.push(g.penultimate().clone());
        let pooled = g.text_embeds.ok_or_else(|| Error::msg("text_encoder_2 has no projection"))?;
        warnings.dedup();
        Ok(PromptEmbeds { tokens: Tensor::cat(&states, D::Minus1)?, pooled, warnings })
    }

    /// The negative embeddings for `like`'s batch: `negative` encoded, or, when there is none,
    /// zeros (`force_zeros_for_empty_prompt`) or the encoded empty prompt.
    pub fn encode_negative(&self, negative: Option<&[&str]>, like: &PromptEmbeds) -> Result<PromptEmbeds> {
        match negative {
            Some(n) => self.encode_prompt(n),
            None if self.flags.force_zeros_for_empty_prompt => Ok(PromptEmbeds {
                tokens: like.tokens.zeros_like()?,
                pooled: like.pooled.zeros_like()?,
                warnings: vec![],
            }),
            None => self.encode_prompt(&vec![""; like.tokens.dim(0)?]),
        }
    }

    /// `time_ids` [B, 6] (refiner [B, 5]) for the prompts and for the negative prompts. The
    /// refiner's negative row uses a (0, 0) crop and the negative aesthetic score.
    pub fn time_ids(&self, m: &MicroConditioning, batch: usize) -> Result<(Tensor, Tensor)> {
        let (oh, ow) = (m.original_size.0 as f32, m.original_size.1 as f32);
        let (ct, cl) = (m.crops_coords_top_left.0 as f32, m.crops_coords_top_left.1 as f32);
        let (pos, neg) = if self.flags.requires_aesthetics_score {
            (
                vec![oh, ow, ct, cl, m.aesthetic_score as f32],
                vec![oh, ow, 0.0, 0.0, m.negative_aesthetic_score as f32],
            )
        } else {
            let ids = vec![oh, ow, ct, cl, m.target_size.0 as f32, m.target_size.1 as f32];
            (ids.clone(), ids)
        };
        let rows = |ids: Vec<f32>| -> Result<Tensor> {
            let n = ids.len();
            Ok(Tensor::from_vec(ids, (1, n), &self.device)?.repeat((batch, 1))?)
        };
        Ok((rows(pos)?, rows(neg)?))
    }

    /// Denoises `latents` over `opts.portion` of an `opts.steps`-step Euler schedule with guidance against
    /// `negative` (one batched UNet call per step). With `Portion::From`, `latents` are the
    /// previous expert's output; otherwise unit noise. Returns latents (not unscaled).
    /// `on_step(done, total, latents)` runs after every step (progress bars, previews).
    pub fn denoise(
        &self,
        latents: &Tensor,
        prompt: &PromptEmbeds,
        negative: &PromptEmbeds,
        micro: &MicroConditioning,
        opts: &DenoiseOptions,
        mut on_step: impl FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        let full = self.scheduler.set_timesteps(opts.steps, None, None)?;
        let schedule = match opts.portion {
            Portion::All => full,
            Portion::Until(f) => full.until_cutoff(self.scheduler.timestep_cutoff(f)?)?,
            Portion::From(f) => full.from_cutoff(self.scheduler.timestep_cutoff(f)?)?,
        };
        let (pos_ids, neg_ids) = self.time_ids(micro, latents.dim(0)?)?;
        let cond = |e: &PromptEmbeds, ids: Tensor| Conditioning {
            text_tokens: Some(e.tokens.clone()),
            pooled: Some(e.pooled.clone()),
            time_ids: Some(ids),
            ..Default::default()
        };
        let sampling = SampleOptions {
            sampler: SamplerKind::Euler,
            guidance: opts.guidance,
            seed: 0,
            time: ModelTime::Timestep,
        };
        let (c, u) = (cond(prompt, pos_ids), cond(negative, neg_ids));
        let total = schedule.num_steps();
        sample(&self.unet, latents, &c, Some(&u), &schedule, &sampling, |i, x| on_step(i + 1, total, x))
    }

    /// Final latents -> images in [-1, 1] (`latents / scaling_factor`, decode).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        decode_latents(&self.vae, latents)
    }
}
