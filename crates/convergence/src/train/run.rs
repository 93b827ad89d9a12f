//! `convergence train --config train.toml`: the documented TOML format and the driver loop
//! (progress bar, metrics, checkpoints, the saved model).
//!
//! ```toml
//! out_dir = "runs/fashion"            # checkpoint, metrics.jsonl, model/ (relative to the TOML)
//!
//! [model]                              # diffusers config.json fields of the denoiser
//! _class_name = "DiTTransformer2DModel"
//! sample_size = 28
//! patch_size = 4
//! in_channels = 1
//! out_channels = 1
//! num_layers = 6
//! num_attention_heads = 4
//! attention_head_dim = 32
//! num_embeds_ada_norm = 10
//!
//! [data]
//! kind = "idx"                         # MNIST-layout IDX files
//! path = "/usr/share/datasets/fashion-mnist"
//! split = "train"
//!
//! [objective]
//! kind = "rectified-flow"              # or "ddpm-epsilon"
//! timesteps = { kind = "logit-normal", mean = 0.0, std = 1.0 }   # or uniform / mode
//!
//! [optim]
//! lr = 3e-4
//! warmup_steps = 200
//! grad_clip = 1.0
//! weight_decay = 0.0
//!
//! [train]
//! steps = 5000
//! batch_size = 128
//! ema_decay = 0.999
//! seed = 0
//! checkpoint_every = 250
//! class_dropout = 0.1
//! ```

use super::data::{load_idx_split, Dataset};
use super::objective::Objective;
use super::optim::AdamWConfig;
use super::trainer::{new_dit, EpochCache, LoopConfig, Trainer};
use crate::error::{Error, Result};
use crate::models::dit::DiTConfig;
use candle_core::Device;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    pub out_dir: PathBuf,
    pub model: toml::Table,
    pub data: DataConfig,
    pub objective: Objective,
    pub optim: AdamWConfig,
    pub train: LoopConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataConfig {
    Idx { path: PathBuf, split: String },
}

impl DataConfig {
    pub fn load(&self) -> Result<Dataset> {
        match self {
            DataConfig::Idx { path, split } => load_idx_split(path, split),
        }
    }
}

impl TrainFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut f: TrainFile =
            toml::from_str(&text).map_err(|e| Error::config(path, e.to_string().trim()))?;
        if f.out_dir.is_relative() {
            f.out_dir = path.parent().unwrap_or(Path::new(".")).join(&f.out_dir);
        }
        Ok(f)
    }

    /// The `[model]` table as a DiT config, refusing keys DiT does not have.
    pub fn dit_config(&self, path: &Path) -> Result<DiTConfig> {
        let known = serde_json::to_value(DiTConfig::default()).map_err(Error::msg)?;
        for key in self.model.keys() {
            if !key.starts_with('_') && known.get(key).is_none() {
                return Err(Error::config(path, format!("[model]: unknown key `{key}`")));
            }
        }
        let class = self.model.get("_class_name").and_then(|v| v.as_str()).unwrap_or("DiTTransformer2DModel");
        if class != "DiTTransformer2DModel" {
            return Err(Error::config(path, format!("[model]: training `{class}` is not supported yet")));
        }
        let cfg: DiTConfig =
            self.model.clone().try_into().map_err(|e| Error::config(path, format!("[model]: {e}")))?;
        cfg.validate().map_err(|m| Error::config(path, format!("[model]: {m}")))?;
        Ok(cfg)
    }
}

/// Builds the trainer of a train.toml, resuming from its checkpoint when asked.
pub fn build(path: &Path, resume: bool, dev: &Device) -> Result<(Trainer, Dataset)> {
    let file = TrainFile::read(path)?;
    let cfg = file.dit_config(path)?;
    let data = file.data.load()?;
    if data.is_empty() {
        return Err(Error::config(path, "[data]: the dataset is empty"));
    }
    if (data.channels, data.height, data.width) != (cfg.in_channels, cfg.sample_size, cfg.sample_size) {
        return Err(Error::config(
            path,
            format!(
                "[model] expects {}x{}x{} inputs but the data is {}x{}x{}",
                cfg.in_channels, cfg.sample_size, cfg.sample_size, data.channels, data.height, data.width
            ),
        ));
    }
    let trainee = new_dit(&cfg, &file.objective, dev)?;
    let mut trainer = Trainer::new(trainee, file.objective, file.optim, file.train, &file.out_dir)?;
    if resume {
        let ckpt = trainer.checkpoint_path();
        if !ckpt.exists() {
            return Err(Error::io(
                &ckpt,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no checkpoint to resume from"),
            ));
        }
        trainer.load_checkpoint(&ckpt)?;
        trainer.truncate_log()?;
    }
    Ok((trainer, data))
}

/// Trains to `[train].steps` (or `until` steps, for tests), with a progress bar, metrics and
/// checkpoints; saves the EMA model to `<out_dir>/model` at the end.
pub fn run(trainer: &mut Trainer, data: &Dataset, until: Option<usize>, quiet: bool) -> Result<()> {
    let total = until.unwrap_or(trainer.cfg.steps).min(trainer.cfg.steps);
    let bar =
        if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total as u64) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} {per_sec} ETA {eta}")
            .map_err(Error::msg)?,
    );
    bar.set_position(trainer.step() as u64);
    let start = Instant::now();
    let mut cache = EpochCache::default();
    std::fs::create_dir_all(&trainer.out_dir).map_err(|e| Error::io(&trainer.out_dir, e))?;
    while trainer.step() < total {
        let mut log = trainer.train_step(data, &mut cache)?;
        log.elapsed_s = start.elapsed().as_secs_f64();
        trainer.log(&log)?;
        bar.set_message(format!("loss {:.4}", log.loss));
        bar.inc(1);
        if log.step % trainer.cfg.checkpoint_every == 0 || log.step == total {
            trainer.save_checkpoint()?;
        }
    }
    bar.finish();
    if trainer.step() == trainer.cfg.steps {
        trainer.save_model(&trainer.out_dir.join("model"))?;
    }
    Ok(())
}
