//! `convergence train --config train.toml`: the documented TOML format and the driver loop
//! (progress bar, metrics, checkpoints, the saved model).
//!
//! The format, with every key, is documented in docs/TRAINING.md.

use super::data::{load_class_folders, load_idx_split, Channels, Dataset, FolderOptions, Size, Targets};
use super::objective::Objective;
use super::optim::AdamWConfig;
use super::trainer::{new_dit, new_text_model, EpochCache, LoopConfig, TextDenoiserConfig, Trainee, Trainer};
use crate::error::{Error, Result};
use crate::models::dit::DiTConfig;
use crate::models::sd3::SD3Config;
use crate::models::text::clip::CLIP_TEXT_MODEL_WITH_PROJECTION;
use crate::models::text::ClipTextConfig;
use crate::models::text_dit::{TextDiTConfig, TEXT_DIT_CLASS};
use crate::text::{write_word_tokenizer, WORD_SPECIALS};
use candle_core::Device;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    pub out_dir: PathBuf,
    pub model: toml::Table,
    /// The CLIP-style text encoder trained with a text-conditioned model (`ClipTextConfig`
    /// fields; the vocabulary comes from the captions).
    pub text_encoder: Option<toml::Table>,
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
    /// `count` procedural captioned scenes (crate::shapes) drawn from `seed`, without the
    /// held-out colour-shape pairs.
    Shapes { count: usize, seed: u64 },
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
            DataConfig::Shapes { count, seed } => {
                Ok(crate::shapes::dataset(*count, *seed, crate::shapes::Split::Train))
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
        let cfg: DiTConfig = section(&self.model, path, "model")?;
        cfg.validate().map_err(|m| Error::config(path, format!("[model]: {m}")))?;
        Ok(cfg)
    }

    /// `[model]`'s `_class_name` (DiT by default).
    fn model_class(&self) -> &str {
        self.model.get("_class_name").and_then(|v| v.as_str()).unwrap_or("DiTTransformer2DModel")
    }

    /// Builds the model the file describes, with the paper's initialisation drawn from the seed.
    fn trainee(&self, path: &Path, data: &Dataset, dev: &Device) -> Result<Trainee> {
        let seed = self.train.seed;
        let denoiser = match self.model_class() {
            "DiTTransformer2DModel" => return new_dit(&self.dit_config(path)?, &self.objective, seed, dev),
            "SD3Transformer2DModel" => {
                let cfg: SD3Config = section(&self.model, path, "model")?;
                cfg.validate().map_err(|m| Error::config(path, format!("[model]: {m}")))?;
                TextDenoiserConfig::SD3(cfg)
            }
            TEXT_DIT_CLASS => {
                let cfg: TextDiTConfig = section(&self.model, path, "model")?;
                cfg.validate().map_err(|m| Error::config(path, format!("[model]: {m}")))?;
                TextDenoiserConfig::TextDiT(cfg)
            }
            other => {
                return Err(Error::config(
                    path,
                    format!(
                        "[model]: training `{other}` is not supported (DiTTransformer2DModel, \
                         SD3Transformer2DModel, {TEXT_DIT_CLASS})"
                    ),
                ))
            }
        };
        let Targets::Captions(captions) = &data.targets else {
            return Err(Error::config(
                path,
                format!("[model]: `{}` needs captioned data", self.model_class()),
            ));
        };
        if !matches!(self.objective, Objective::RectifiedFlow { .. }) {
            return Err(Error::config(
                path,
                "[objective]: text-conditioned models train with rectified flow",
            ));
        }
        let table = self.text_encoder.clone().unwrap_or_default();
        let mut encoder: ClipTextConfig = section(&table, path, "text_encoder")?;
        let words = vocabulary(captions);
        let max_length = if table.contains_key("max_position_embeddings") {
            encoder.max_position_embeddings
        } else {
            // <bos> + the longest caption + <eos>.
            2 + captions.iter().map(|c| split_words(c).len()).max().unwrap_or(0)
        };
        let tokenizer_dir = self.out_dir.join("tokenizer");
        write_word_tokenizer(
            &tokenizer_dir,
            &words.iter().map(String::as_str).collect::<Vec<_>>(),
            max_length,
        )?;
        encoder.architectures = vec![CLIP_TEXT_MODEL_WITH_PROJECTION.into()];
        encoder.vocab_size = WORD_SPECIALS.len() + words.len();
        encoder.max_position_embeddings = max_length;
        encoder.eos_token_id = 3;
        encoder.validate().map_err(|m| Error::config(path, format!("[text_encoder]: {m}")))?;
        new_text_model(&denoiser, &encoder, &tokenizer_dir, seed, dev)
    }
}

/// A TOML section as config `T`, refusing keys `T` does not have (`_`-prefixed keys are notes).
fn section<T: serde::de::DeserializeOwned + serde::Serialize + Default>(
    table: &toml::Table,
    path: &Path,
    name: &str,
) -> Result<T> {
    let known = serde_json::to_value(T::default()).map_err(Error::msg)?;
    if let Some(key) = table.keys().find(|k| !k.starts_with('_') && known.get(k.as_str()).is_none()) {
        return Err(Error::config(path, format!("[{name}]: unknown key `{key}`")));
    }
    let mut table = table.clone();
    table.retain(|k, _| !k.starts_with('_'));
    table.try_into().map_err(|e| Error::config(path, format!("[{name}]: {e}")))
}

/// The words of a caption, as the word-level tokenizer splits them (lowercased; letter/digit
/// runs and punctuation runs).
fn split_words(caption: &str) -> Vec<String> {
    let mut words: Vec<String> = vec![];
    let mut prev: Option<bool> = None;
    for ch in caption.to_lowercase().chars() {
        if ch.is_whitespace() {
            prev = None;
            continue;
        }
        let word_char = ch.is_alphanumeric() || ch == '_';
        match words.last_mut() {
            Some(w) if prev == Some(word_char) => w.push(ch),
            _ => words.push(ch.to_string()),
        }
        prev = Some(word_char);
    }
    words
}

/// Every distinct word of the captions, sorted.
fn vocabulary(captions: &[String]) -> Vec<String> {
    let set: std::collections::BTreeSet<String> = captions.iter().flat_map(|c| split_words(c)).collect();
    set.into_iter().collect()
}

/// Builds the trainer of a train.toml, resuming from its checkpoint when asked.
pub fn build(path: &Path, resume: bool, dev: &Device) -> Result<(Trainer, Dataset)> {
    let file = TrainFile::read(path)?;
    let data = file.data.load()?;
    if data.is_empty() {
        return Err(Error::config(path, "[data]: the dataset is empty"));
    }
    let trainee = file.trainee(path, &data, dev)?;
    let [c, h, w] = trainee.sample_shape;
    if (data.channels, data.height, data.width) != (c, h, w) {
        return Err(Error::config(
            path,
            format!(
                "[model] expects {c}x{h}x{w} inputs but the data is {}x{}x{}",
                data.channels, data.height, data.width
            ),
        ));
    }
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
            trainer.sample_grid(&file, data)?;
        }
    }
    bar.finish();
    if trainer.step() == trainer.cfg.steps {
        trainer.save_model(&trainer.out_dir.join("model"), data.classes(), false, candle_core::DType::F32)?;
    }
    Ok(())
}
