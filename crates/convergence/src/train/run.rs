//! `convergence train --config train.toml`: the documented TOML format and the driver loop
//! (progress bar, metrics, checkpoints, the saved model).
//!
//! The format, with every key, is documented in docs/TRAINING.md.

use super::data::{load_class_folders, load_idx_split, Channels, Dataset, FolderOptions, Size, Targets};
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
    /// MNIST-layout IDX files (`<split>-images-idx3-ubyte[.gz]` + labels), with optional class
    /// names in label order.
    Idx { path: PathBuf, split: String, classes: Option<Vec<String>> },
    /// Images in class subfolders (`root/<class>/*.png`), resized to `size` x `size`.
    Folders { path: PathBuf, size: usize, rgb: bool },
}

impl DataConfig {
    pub fn load(&self) -> Result<Dataset> {
        match self {
            DataConfig::Idx { path, split, classes } => {
                let mut ds = load_idx_split(path, split)?;
                if let (Some(names), Targets::Labels { classes, .. }) = (classes, &mut ds.targets) {
                    if names.len() < classes.len() {
                        return Err(Error::config(
                            path,
                            format!("[data]: {} class names for {} classes", names.len(), classes.len()),
                        ));
                    }
                    *classes = names.clone();
                }
                Ok(ds)
            }
            DataConfig::Folders { path, size, rgb } => {
                let channels = if *rgb { Channels::Rgb } else { Channels::Grey };
                let size = Size::Resize { height: *size, width: *size };
                load_class_folders(path, FolderOptions { channels, size })
            }
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
    let trainee = new_dit(&cfg, &file.objective, file.train.seed, dev)?;
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
    // A resumed run rewrites the steps its predecessor logged after the checkpoint.
    trainer.truncate_log()?;
    while trainer.step() < total {
        let mut log = trainer.train_step(data, &mut cache)?;
        log.elapsed_s = start.elapsed().as_secs_f64();
        trainer.log(&log)?;
        bar.set_message(format!("loss {:.4}", log.loss));
        bar.inc(1);
        if log.step % trainer.cfg.checkpoint_every == 0 || log.step == total {
            trainer.save_checkpoint()?;
            trainer.plot_loss()?;
        }
        let every = trainer.cfg.sample_every;
        if every > 0 && log.step % every == 0 {
            let file = trainer.out_dir.join(format!("samples/step-{:06}.png", log.step));
            trainer.sample_grid(&file, data.classes().len())?;
        }
    }
    bar.finish();
    if trainer.step() == trainer.cfg.steps {
        trainer.save_model(&trainer.out_dir.join("model"), data.classes(), false)?;
    }
    Ok(())
}
