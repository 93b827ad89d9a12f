//! The training loop: any of our denoisers under an objective, AdamW with warm-up and clipping,
//! EMA, atomic checkpoints and exact resume. Randomness is derived from (seed, step), so a
//! resumed run draws exactly the batches, noise and timesteps the uninterrupted run would have.

use super::data::Dataset;
use super::objective::Objective;
use super::optim::{AdamW, AdamWConfig, Ema};
use crate::error::{Error, Result};
use crate::models::dit::{DiT, DiTConfig, Numerics};
use crate::models::sd3::{SD3Config, SD3Transformer2DModel};
use crate::models::text::{ClipTextConfig, ClipTextModel};
use crate::models::text_dit::{TextDiTConfig, TextDiTTransformer2DModel};
use crate::models::{Conditioning, Denoiser, Prediction};
use crate::nn::Init;
use crate::pipelines::t2i::TextEncoder;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `[train]` in train.toml.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    pub steps: usize,
    pub batch_size: usize,
    #[serde(default = "default_ema")]
    pub ema_decay: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_every")]
    pub checkpoint_every: usize,
    /// Probability of replacing a label by the null class (trains the unconditional branch for CFG).
    #[serde(default)]
    pub class_dropout: f64,
    /// The step at which EMA averaging starts (its warm-up counts from here; before it the EMA
    /// follows the weights). Lets a run extended past its plan average only its last steps.
    #[serde(default)]
    pub ema_start: usize,
    /// Write a sample grid (20 steps, raw weights) to <out_dir>/samples every N steps (0 = off).
    #[serde(default)]
    pub sample_every: usize,
}

fn default_ema() -> f64 {
    0.999
}
fn default_every() -> usize {
    500
}

/// A model being trained: its variables and how to run it.
pub struct Trainee {
    pub model: Box<dyn Denoiser>,
    pub varmap: VarMap,
    pub condition: Condition,
    /// config.json of the saved model.
    pub config_json: serde_json::Value,
    /// [C, H, W] of one training sample.
    pub sample_shape: [usize; 3],
}

/// What a trainee is conditioned on, and what `class_dropout` drops it to.
pub enum Condition {
    /// Class ids; dropped to the null class.
    Class { null_class: u32 },
    /// Captions through a text encoder trained with the model (its variables are
    /// `text_encoder.*`, the denoiser's `transformer.*`); dropped to the empty caption.
    Text {
        encoder: Box<TextEncoder>,
        /// config.json of the encoder and the tokenizer folder, saved with the model.
        config_json: serde_json::Value,
        tokenizer_dir: PathBuf,
    },
}

/// The denoisers a text-conditioned trainee can have.
#[derive(Clone, Debug)]
pub enum TextDenoiserConfig {
    /// MMDiT joint attention.
    SD3(SD3Config),
    /// DiT blocks with cross-attention or pooled-only conditioning (the ablation's baselines).
    TextDiT(TextDiTConfig),
}

/// A fresh text-conditioned model: the denoiser and a CLIP-style encoder over the tokenizer in
/// `tokenizer_dir`, drawn from `seed`.
pub fn new_text_model(
    denoiser: &TextDenoiserConfig,
    encoder: &ClipTextConfig,
    tokenizer_dir: &Path,
    seed: u64,
    dev: &Device,
) -> Result<Trainee> {
    let varmap = VarMap::new();
    let vb = crate::weights::init::seeded_var_builder(&varmap, seed, DType::F32, dev);
    let text = ClipTextModel::new(vb.pp("text_encoder"), encoder, Init::XavierUniform)?;
    let (model, config_json, sample_shape): (Box<dyn Denoiser>, _, _) = match denoiser {
        TextDenoiserConfig::SD3(c) => (
            Box::new(SD3Transformer2DModel::new(vb.pp("transformer"), c, Init::XavierUniform)?),
            c.to_diffusers_json(),
            [c.in_channels, c.sample_size, c.sample_size],
        ),
        TextDenoiserConfig::TextDiT(c) => (
            Box::new(TextDiTTransformer2DModel::new(vb.pp("transformer"), c, Init::XavierUniform)?),
            c.to_diffusers_json(),
            [c.in_channels, c.sample_size, c.sample_size],
        ),
    };
    let tokenizer = crate::text::PromptTokenizer::from_dir(tokenizer_dir, None)?;
    let mut encoder_json = serde_json::to_value(encoder).map_err(Error::msg)?;
    encoder_json["model_type"] = "clip_text_model".into();
    Ok(Trainee {
        model,
        varmap,
        condition: Condition::Text {
            encoder: Box::new(TextEncoder { tokenizer, model: text }),
            config_json: encoder_json,
            tokenizer_dir: tokenizer_dir.to_path_buf(),
        },
        config_json,
        sample_shape,
    })
}

/// A fresh class-conditional DiT with the paper's initialisation, drawn from `seed`.
pub fn new_dit(cfg: &DiTConfig, objective: &Objective, seed: u64, dev: &Device) -> Result<Trainee> {
    let varmap = VarMap::new();
    let vb = crate::weights::init::seeded_var_builder(&varmap, seed, DType::F32, dev);
    let prediction = match objective {
        Objective::RectifiedFlow { .. } => Prediction::Velocity,
        Objective::DdpmEpsilon { .. } if cfg.out_channels() == 2 * cfg.in_channels => {
            Prediction::EpsilonLearnedSigma
        }
        Objective::DdpmEpsilon { .. } => Prediction::Epsilon,
    };
    let model = DiT::new(vb, cfg, Numerics::Diffusers, Init::XavierUniform)?.with_prediction(prediction);
    Ok(Trainee {
        model: Box::new(model),
        varmap,
        condition: Condition::Class { null_class: cfg.null_class() as u32 },
        config_json: cfg.to_diffusers_json(),
        sample_shape: [cfg.in_channels, cfg.sample_size, cfg.sample_size],
    })
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub elapsed_s: f64,
}

pub struct Trainer {
    pub trainee: Trainee,
    pub objective: Objective,
    pub optim: AdamW,
    pub ema: Ema,
    pub cfg: LoopConfig,
    pub out_dir: PathBuf,
    vars: Vec<(String, Var)>,
}

fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let mut v: Vec<(String, Var)> =
        vm.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

impl Trainer {
    pub fn new(
        trainee: Trainee,
        objective: Objective,
        optim: AdamWConfig,
        cfg: LoopConfig,
        out_dir: &Path,
    ) -> Result<Self> {
        let vars = sorted_vars(&trainee.varmap);
        Ok(Trainer {
            optim: AdamW::new(optim, vars.clone(), cfg.steps)?,
            ema: Ema::new(cfg.ema_decay, &vars)?,
            trainee,
            objective,
            cfg,
            out_dir: out_dir.to_path_buf(),
            vars,
        })
    }

    pub fn step(&self) -> usize {
        self.optim.step
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.out_dir.join("checkpoint.safetensors")
    }

    fn step_rng(&self, step: usize) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
        rng.set_stream(step as u64 + 1);
        rng
    }

    /// One optimisation step on `data`; returns its metrics.
    pub fn train_step(&mut self, data: &Dataset, epoch_cache: &mut EpochCache) -> Result<StepLog> {
        let step = self.optim.step;
        let dev = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
        let idx = epoch_cache.indices(self, data.len(), step);
        let x0 = data.images(&idx, &dev)?;
        let mut rng = self.step_rng(step);
        let cond = self.conditioning(data, &idx, &mut rng, &dev)?;
        let loss = self.objective.loss(self.trainee.model.as_ref(), &x0, &cond, &mut rng)?;
        let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_v.is_finite() {
            return Err(Error::msg(format!(
                "loss is {loss_v} at step {step}: training stopped; the last good checkpoint is kept at {}",
                self.checkpoint_path().display()
            )));
        }
        let lr = self.optim.lr_at(step);
        let grad_norm = self.optim.step(&loss.backward()?)?;
        if step < self.cfg.ema_start {
            self.ema.reset(&self.vars)?;
        } else {
            self.ema.update(&self.vars, step - self.cfg.ema_start)?;
        }
        Ok(StepLog { step: step + 1, loss: loss_v, grad_norm, lr, elapsed_s: 0.0 })
    }

    /// The batch's conditioning, each item dropped (to the null class or the empty caption) with
    /// probability `class_dropout`, which trains the unconditional branch for guidance.
    fn conditioning(
        &self,
        data: &Dataset,
        idx: &[usize],
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Conditioning> {
        use rand::Rng;
        let p = self.cfg.class_dropout;
        let mut dropped = || p > 0.0 && rng.gen::<f64>() < p;
        match &self.trainee.condition {
            Condition::Class { null_class } => {
                let ids = data.labels(idx, dev)?.to_vec1::<u32>()?;
                let ids: Vec<u32> =
                    ids.into_iter().map(|l| if dropped() { *null_class } else { l }).collect();
                Ok(Conditioning { class_labels: Some(Tensor::new(ids, dev)?), ..Default::default() })
            }
            Condition::Text { encoder, .. } => {
                let captions: Vec<&str> =
                    data.captions(idx)?.into_iter().map(|c| if dropped() { "" } else { c }).collect();
                Ok(crate::pipelines::t2i::conditioning(&encoder.encode(&captions, dev)?))
            }
        }
    }

    /// Writes model, EMA, optimiser moments, step and seed to one file, atomically.
    pub fn save_checkpoint(&self) -> Result<()> {
        let mut t: HashMap<String, Tensor> = self.optim.state();
        for (n, v) in &self.vars {
            t.insert(format!("model.{n}"), v.as_tensor().clone());
        }
        for (n, e) in &self.ema.shadow {
            t.insert(format!("ema.{n}"), e.clone());
        }
        let dev = Device::Cpu;
        t.insert("meta.step".into(), Tensor::new(&[self.optim.step as i64], &dev)?);
        t.insert("meta.seed".into(), Tensor::new(&[self.cfg.seed as i64], &dev)?);
        std::fs::create_dir_all(&self.out_dir).map_err(|e| Error::io(&self.out_dir, e))?;
        crate::weights::write_safetensors(&t, &self.checkpoint_path())
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] for the same model.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let dev = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
        let t = crate::weights::read_safetensors(path, &dev)?;
        let get = |k: &str| {
            t.get(k).cloned().ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: k.to_string(),
                expected: vec![],
            })
        };
        let seed = get("meta.seed")?.to_vec1::<i64>()?[0] as u64;
        if seed != self.cfg.seed {
            return Err(Error::config(
                path,
                format!("checkpoint has seed {seed}, config says {}", self.cfg.seed),
            ));
        }
        for (n, v) in &self.vars {
            let saved = get(&format!("model.{n}"))?;
            if saved.dims() != v.dims() {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    tensor: format!("model.{n}"),
                    expected: v.dims().to_vec(),
                    found: saved.dims().to_vec(),
                });
            }
            v.set(&saved)?;
        }
        for (n, e) in &mut self.ema.shadow {
            *e = get(&format!("ema.{n}"))?;
        }
        let step = get("meta.step")?.to_vec1::<i64>()?[0] as usize;
        self.optim.load_state(&t, step)?;
        Ok(())
    }

    /// The weights a saved model holds: the EMA (default) or the raw last iterate.
    pub fn weights(&self, raw: bool) -> HashMap<String, Tensor> {
        if raw {
            self.vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
        } else {
            self.ema.shadow.iter().cloned().collect()
        }
    }

    /// The scheduler config a saved model gets (flow matching for rectified flow, DDIM for
    /// DDPM) and our sampling defaults for it.
    fn scheduler_config(&self) -> (serde_json::Value, serde_json::Value) {
        match &self.objective {
            Objective::RectifiedFlow { .. } => (
                serde_json::json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}),
                serde_json::json!({"steps": 20, "guidance": 1.0, "sampler": "euler"}),
            ),
            Objective::DdpmEpsilon { num_train_timesteps } => (
                serde_json::json!({"_class_name": "DDIMScheduler", "num_train_timesteps": num_train_timesteps,
                    "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": false,
                    "set_alpha_to_one": true, "steps_offset": 0, "timestep_spacing": "trailing",
                    "prediction_type": "epsilon"}),
                serde_json::json!({"steps": 50, "guidance": 1.0, "sampler": "ddim"}),
            ),
        }
    }

    /// A grid from the current (raw) weights, 20 steps, no guidance: 8 samples per class, or
    /// per caption of the dataset's first 8 images.
    pub fn sample_grid(&self, path: &Path, data: &Dataset) -> Result<()> {
        use crate::flow::{sample, ModelTime, SampleOptions, SamplerKind, Scheduler, SchedulerConfig};
        let (json, _) = self.scheduler_config();
        let class = json["_class_name"].as_str().unwrap_or_default();
        let config = SchedulerConfig::parse(class, &json.to_string()).map_err(Error::msg)?;
        let schedule = Scheduler::new(config)?.set_timesteps(20, None, None)?;
        let sampler = match self.objective {
            Objective::RectifiedFlow { .. } => SamplerKind::Euler,
            Objective::DdpmEpsilon { .. } => SamplerKind::Ddim,
        };
        let dev = self.vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
        let rows: Vec<usize> = match self.trainee.condition {
            Condition::Class { .. } => (0..data.classes().len()).collect(),
            Condition::Text { .. } => (0..data.len().min(8)).collect(),
        };
        let cond = match &self.trainee.condition {
            Condition::Class { .. } => {
                let labels: Vec<u32> = rows.iter().flat_map(|&c| std::iter::repeat_n(c as u32, 8)).collect();
                Conditioning {
                    class_labels: Some(Tensor::new(labels.as_slice(), &dev)?),
                    ..Default::default()
                }
            }
            Condition::Text { encoder, .. } => {
                let captions = data.captions(&rows)?;
                let repeated: Vec<&str> = captions.iter().flat_map(|&c| std::iter::repeat_n(c, 8)).collect();
                crate::pipelines::t2i::conditioning(&encoder.encode(&repeated, &dev)?)
            }
        };
        let [c, h, w] = self.trainee.sample_shape;
        let noise = crate::noise::randn(
            &mut ChaCha8Rng::seed_from_u64(self.cfg.seed),
            &[rows.len() * 8, c, h, w],
            &dev,
        )?;
        let opts = SampleOptions { sampler, guidance: 1.0, seed: self.cfg.seed, time: ModelTime::Timestep };
        let x = sample(self.trainee.model.as_ref(), &noise, &cond, None, &schedule, &opts, |_, _| {})?;
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(|e| Error::io(path, e))?;
        crate::viz::save_grid(&x.clamp(-1f32, 1f32)?, 8, path)
    }

    /// Plots metrics.jsonl's loss (and its 50-step moving average) to <out_dir>/loss.png.
    pub fn plot_loss(&self) -> Result<()> {
        let path = self.out_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let log: Vec<StepLog> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let raw: Vec<(f64, f64)> = log.iter().map(|e| (e.step as f64, e.loss)).collect();
        let smooth: Vec<(f64, f64)> = raw
            .windows(50)
            .map(|w| (w[w.len() - 1].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64))
            .collect();
        crate::viz::LinePlot::new("training loss")
            .x_label("step")
            .y_label("loss")
            .series("loss", raw)
            .series("50-step mean", smooth)
            .save(&self.out_dir.join("loss.png"))
    }

    /// Saves the EMA model as a pipeline directory in diffusers' layout: model_index.json (with
    /// our sampling defaults), transformer/ (config.json + weights), scheduler/ (flow matching
    /// for rectified flow, DDIM for DDPM), and for class-conditional models `id2label`, for
    /// text-conditioned ones text_encoder/ and tokenizer/. Weights are stored as `dtype` (f16
    /// halves a shipped model; loading converts back to the compute dtype).
    pub fn save_model(&self, dir: &Path, class_names: &[String], raw: bool, dtype: DType) -> Result<()> {
        let write = |path: PathBuf, v: &serde_json::Value| -> Result<()> {
            std::fs::create_dir_all(path.parent().unwrap_or(dir)).map_err(|e| Error::io(dir, e))?;
            let text = serde_json::to_string_pretty(v).map_err(Error::msg)? + "\n";
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
        };
        let mut weights = self
            .weights(raw)
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let transformer_class = self.trainee.config_json["_class_name"].clone();
        let (scheduler, defaults) = self.scheduler_config();
        write(dir.join("scheduler/scheduler_config.json"), &scheduler)?;
        write(dir.join("transformer/config.json"), &self.trainee.config_json)?;
        let transformer_file = dir.join("transformer/diffusion_pytorch_model.safetensors");
        let index = match &self.trainee.condition {
            Condition::Class { .. } => {
                crate::weights::write_safetensors(&weights, &transformer_file)?;
                let id2label: serde_json::Map<String, serde_json::Value> =
                    class_names.iter().enumerate().map(|(i, n)| (i.to_string(), n.clone().into())).collect();
                serde_json::json!({
                    "_class_name": "DiTPipeline",
                    "_diffusers_version": "0.42.1",
                    "transformer": ["diffusers", transformer_class],
                    "scheduler": ["diffusers", scheduler["_class_name"]],
                    "vae": [null, null],
                    "id2label": id2label,
                    "convergence": defaults,
                })
            }
            Condition::Text { config_json, tokenizer_dir, .. } => {
                let mut take = |prefix: &str| -> HashMap<String, Tensor> {
                    let keys: Vec<String> =
                        weights.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
                    keys.into_iter()
                        .filter_map(|k| weights.remove(&k).map(|t| (k[prefix.len()..].to_string(), t)))
                        .collect()
                };
                crate::weights::write_safetensors(&take("transformer."), &transformer_file)?;
                crate::weights::write_safetensors(
                    &take("text_encoder."),
                    &dir.join("text_encoder/model.safetensors"),
                )?;
                write(dir.join("text_encoder/config.json"), config_json)?;
                copy_files(tokenizer_dir, &dir.join("tokenizer"))?;
                serde_json::json!({
                    "_class_name": crate::pipelines::t2i::CLASS_NAME,
                    "transformer": ["diffusers", transformer_class],
                    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                    "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
                    "scheduler": ["diffusers", scheduler["_class_name"]],
                    "convergence": {"steps": 20, "guidance": 4.0},
                })
            }
        };
        write(dir.join("model_index.json"), &index)
    }

    /// Drops metrics.jsonl lines after the current step (written by a run that was killed
    /// after its last checkpoint), so a resumed run's log has each step once.
    pub fn truncate_log(&self) -> Result<()> {
        let path = self.out_dir.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let kept: String = text
            .lines()
            .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|e| e.step <= self.optim.step))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, kept).map_err(|e| Error::io(&path, e))
    }

    /// Appends one metrics line to metrics.jsonl.
    pub fn log(&self, entry: &StepLog) -> Result<()> {
        let path = self.out_dir.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{}", serde_json::to_string(entry).map_err(Error::msg)?).map_err(|e| Error::io(&path, e))
    }
}

/// Copies the files of `from` (not its subfolders) into `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        if path.is_file() {
            let dest = to.join(path.file_name().unwrap_or_default());
            std::fs::copy(&path, &dest).map_err(|e| Error::io(&dest, e))?;
        }
    }
    Ok(())
}

/// Caches the current epoch's permutation so a step costs one shuffle per epoch, not per sample.
#[derive(Default)]
pub struct EpochCache {
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl EpochCache {
    fn indices(&mut self, t: &Trainer, n: usize, step: usize) -> Vec<usize> {
        let b = t.cfg.batch_size;
        (step * b..(step + 1) * b)
            .map(|k| {
                let epoch = (k / n) as u64;
                if self.epoch != Some(epoch) {
                    self.perm = t.epoch_permutation(n, epoch);
                    self.epoch = Some(epoch);
                }
                self.perm[k % n]
            })
            .collect()
    }
}

impl Trainer {
    /// Epochs are fixed permutations of the data drawn from (seed, epoch).
    fn epoch_permutation(&self, n: usize, epoch: u64) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch));
        perm.shuffle(&mut rng);
        perm
    }
}
