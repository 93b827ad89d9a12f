//! The class-conditional DiT pipeline: class ids -> DiT under a sampler -> (VAE decoder) ->
//! image. Reads a diffusers `DiTPipeline` directory (model_index.json, transformer/, scheduler/,
//! vae/). Pixel-space models (ours) have no VAE: the sample is the image in [-1, 1].

use crate::error::{Error, Result};
use crate::flow::{sample, ModelTime, SampleOptions, SamplerKind, Scheduler};
use crate::models::dit::{DiT, DiTConfig, Numerics};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::models::{Conditioning, Prediction};
use crate::nn::Init;
use crate::weights::{model_dir_files, read_json, WeightStore};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Sampling defaults a model directory recommends (`convergence` in model_index.json).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub steps: usize,
    pub guidance: f64,
    pub sampler: String,
}

#[derive(Deserialize)]
struct ModelIndex {
    #[serde(default)]
    id2label: BTreeMap<String, String>,
    convergence: Option<Defaults>,
    vae: Option<serde_json::Value>,
}

pub struct DiTPipeline {
    pub dir: PathBuf,
    pub transformer: DiT,
    pub scheduler: Scheduler,
    /// Class names by id (synonyms separated by ", " as in DiT's ImageNet labels).
    pub labels: Vec<String>,
    pub defaults: Defaults,
    /// The latent decoder (latent DiTs); None for pixel-space models.
    pub vae: Option<AutoencoderKL>,
    device: Device,
}

fn load_vae(dir: &Path, dev: &Device) -> Result<AutoencoderKL> {
    let cfg_path = dir.join("config.json");
    let cfg: VaeConfig = read_json(&cfg_path)?;
    cfg.validate().map_err(|m| Error::config(&cfg_path, m))?;
    let vb = WeightStore::open_safetensors(&model_dir_files(dir)?)?.var_builder(DType::F32, dev);
    AutoencoderKL::new(vb, &cfg, Init::Default)
}

/// "euler" | "heun" | "ddim" | "ddpm"
pub fn parse_sampler(s: &str) -> Result<SamplerKind> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "euler" => SamplerKind::Euler,
        "heun" => SamplerKind::Heun,
        "ddim" => SamplerKind::Ddim,
        "ddpm" => SamplerKind::Ddpm,
        other => return Err(Error::msg(format!("unknown sampler `{other}` (euler, heun, ddim, ddpm)"))),
    })
}

impl DiTPipeline {
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        let has_vae = index.vae.as_ref().is_some_and(|v| v.get(0).is_some_and(|c| !c.is_null()));
        let components: &[&str] = if has_vae { &["transformer", "vae"] } else { &["transformer"] };
        super::check_memory(dir, components, DType::F32)?;
        let vae = if has_vae { Some(load_vae(&dir.join("vae"), dev)?) } else { None };
        let scheduler = Scheduler::from_config_file(dir.join("scheduler/scheduler_config.json"))?;
        let tdir = dir.join("transformer");
        let cfg_path = tdir.join("config.json");
        let cfg: DiTConfig = read_json(&cfg_path)?;
        cfg.validate().map_err(|m| Error::config(&cfg_path, m))?;
        let vb = WeightStore::open_safetensors(&model_dir_files(&tdir)?)?.var_builder(DType::F32, dev);
        let prediction = if matches!(scheduler.config, crate::flow::SchedulerConfig::FlowMatch(_)) {
            Prediction::Velocity
        } else if cfg.out_channels() == 2 * cfg.in_channels {
            Prediction::EpsilonLearnedSigma
        } else {
            Prediction::Epsilon
        };
        let transformer = DiT::new(vb, &cfg, Numerics::Diffusers, Init::Default)?.with_prediction(prediction);
        let labels = (0..cfg.num_classes())
            .map(|i| index.id2label.get(&i.to_string()).cloned().unwrap_or_else(|| i.to_string()))
            .collect();
        let defaults = index.convergence.unwrap_or(Defaults {
            steps: 50,
            guidance: 4.0,
            sampler: if prediction == Prediction::Velocity { "euler" } else { "ddim" }.into(),
        });
        Ok(DiTPipeline {
            dir: dir.to_path_buf(),
            transformer,
            scheduler,
            labels,
            defaults,
            vae,
            device: dev.clone(),
        })
    }

    /// A class id from a name (any synonym, case-insensitive) or a number.
    pub fn class_id(&self, name: &str) -> Result<u32> {
        let wanted = name.trim().to_ascii_lowercase();
        if let Ok(id) = wanted.parse::<usize>() {
            if id < self.labels.len() {
                return Ok(id as u32);
            }
        }
        let found = self.labels.iter().position(|l| l.split(", ").any(|s| s.to_ascii_lowercase() == wanted));
        found.map(|i| i as u32).ok_or_else(|| {
            let shown: Vec<&str> = self.labels.iter().take(20).map(String::as_str).collect();
            Error::msg(format!(
                "unknown class `{name}`: expected an id below {} or a name ({}{})",
                self.labels.len(),
                shown.join(", "),
                if self.labels.len() > 20 { ", ..." } else { "" }
            ))
        })
    }

    /// Generates one image per label: [N, 3 or C, H, W] in [-1, 1]. Noise for image k comes
    /// from (seed, k), so a batch size or subset never changes an image.
    pub fn generate(&self, labels: &[u32], opts: &SampleOptions, steps: usize, seed: u64) -> Result<Tensor> {
        let mut out = vec![];
        for (c, chunk) in labels.chunks(256).enumerate() {
            let noise = self.noise(seed, c * 256..c * 256 + chunk.len())?;
            let latents = self.denoise(&noise, chunk, opts, steps, |_, _, _| {})?;
            out.push(self.decode(&latents)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The initial noise of images `range` of a `generate` call with `seed`: image k's from the
    /// ChaCha8 stream k.
    pub fn noise(&self, seed: u64, range: std::ops::Range<usize>) -> Result<Tensor> {
        let cfg = self.transformer.config();
        let shape = [1, cfg.in_channels, cfg.sample_size, cfg.sample_size];
        let noise = range
            .map(|k| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(k as u64);
                crate::noise::randn(&mut rng, &shape, &self.device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&noise, 0)?)
    }

    /// Runs the sampler from `noise` with classifier-free guidance against the null class, as
    /// diffusers' DiTPipeline does; returns the final latents. `on_step(done, total, latents)`
    /// runs after every step.
    pub fn denoise(
        &self,
        noise: &Tensor,
        labels: &[u32],
        opts: &SampleOptions,
        steps: usize,
        mut on_step: impl FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        let schedule = self.scheduler.set_timesteps(steps, None, None)?;
        let cond =
            Conditioning { class_labels: Some(Tensor::new(labels, &self.device)?), ..Default::default() };
        let null = Tensor::full(self.transformer.config().null_class() as u32, labels.len(), &self.device)?;
        let uncond = Conditioning { class_labels: Some(null), ..Default::default() };
        let total = schedule.num_steps();
        sample(&self.transformer, noise, &cond, Some(&uncond), &schedule, opts, |i, x| {
            on_step(i + 1, total, x)
        })
    }

    /// Latents -> images in [-1, 1] (through the VAE's `z / scaling_factor` for latent models).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(vae) => super::decode_latents(vae, latents),
            None => Ok(latents.clamp(-1f32, 1f32)?),
        }
    }

    /// Sampling options from the defaults, overridden where given.
    pub fn options(&self, sampler: Option<&str>, guidance: Option<f64>, seed: u64) -> Result<SampleOptions> {
        Ok(SampleOptions {
            sampler: parse_sampler(sampler.unwrap_or(&self.defaults.sampler))?,
            guidance: guidance.unwrap_or(self.defaults.guidance),
            seed,
            time: ModelTime::Timestep,
        })
    }
}
