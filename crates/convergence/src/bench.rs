//! Benchmark workloads (issue #6): fixed model/shape/batch combinations on random weights, timed
//! per iteration, with the process's peak resident memory. `bench/pytorch_bench.py` runs the
//! same workloads in PyTorch eager with diffusers' classes, so the two can be compared side by
//! side (`bench/compare.py`).
//!
//! Every workload goes through the code the project runs for real: `DiT::forward_labels`, the
//! trainer's model constructor, `Objective::loss` + backward + `AdamW::step`, `flow::sample` with
//! classifier-free guidance, `JointTransformerBlock` and Flux's single-stream block. Forward-only
//! workloads use plain (non-variable) weights, so no backward graph is recorded, as under
//! PyTorch's `no_grad`.

use crate::error::{Error, Result};
use crate::flow::{sample, ModelTime, SampleOptions, SamplerKind, Scheduler, SchedulerConfig};
use crate::models::dit::{DiT, DiTConfig, Numerics};
use crate::models::flux::{latent_image_ids, text_ids, FluxConfig, FluxTransformer2DModel};
use crate::models::{Conditioning, Prediction};
use crate::nn::{Init, JointBlockConfig, JointTransformerBlock, Linear, TokenOrder};
use crate::noise::randn;
use crate::train::objective::{Objective, TimestepSampling};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::trainer::new_dit;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Instant;

/// The shipped Fashion-MNIST model's transformer and scheduler configs (weights are random here:
/// the cost of a step depends only on the shapes).
const FASHION_TRANSFORMER: &str = include_str!("../../../models/fashion-dit/transformer/config.json");
const FASHION_SCHEDULER: &str = include_str!("../../../models/fashion-dit/scheduler/scheduler_config.json");

const SEED: u64 = 0;

/// The workloads `run` knows, in the order `convergence bench --list` shows them.
const WORKLOADS: [&str; 8] = [
    "dit-xl-2-forward",
    "dit-s-2-train-step",
    "fashion-train-step",
    "fashion-sample-32",
    "sd3-joint-block",
    "flux-single-block",
    "linear-256x1152x4608",
    "linear-4096x384x1536",
];

/// The names [`run`] accepts.
pub fn workloads() -> &'static [&'static str] {
    &WORKLOADS
}

/// One workload's timing.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub workload: String,
    /// "f32" or "bf16".
    pub dtype: String,
    /// Threads of the CPU matmuls (`RAYON_NUM_THREADS`, else all cores).
    pub threads: usize,
    /// Timed iterations (after the warm-up ones).
    pub iters: usize,
    /// Median wall-clock seconds of one iteration.
    pub median_s: f64,
    pub min_s: f64,
    /// The process's peak resident set (VmHWM), model construction included; 0 where
    /// /proc/self/status is not available.
    pub peak_rss_bytes: u64,
}

/// Worker threads the CPU matmuls use (what `--threads` / `RAYON_NUM_THREADS` sets).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// The peak resident set of this process in bytes (VmHWM of /proc/self/status), 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Builds workload `name` on random weights in `dtype` (f32 or bf16), runs `warmup` untimed
/// iterations and then `iters` timed ones.
///
/// - `dit-xl-2-forward`: DiT-XL/2 at 256x256 (latent 4x32x32, 256 tokens), batch 1, one
///   class-conditional forward.
/// - `dit-s-2-train-step`: DiT-S/2 at 256x256, batch 16: rectified-flow loss, backward, AdamW
///   (grad-norm clipping at 1) — the trainer's step without data loading and EMA.
/// - `fashion-train-step`: the same step for the shipped Fashion-MNIST DiT (1x28x28, patch 4),
///   batch 64.
/// - `fashion-sample-32`: the shipped model's 32-step Euler sampling of 10 images (one per class)
///   with classifier-free guidance 2 (batched [uncond, cond], as the pipeline does).
/// - `sd3-joint-block`: one SD3-medium MMDiT block (width 1536, 24 heads of 64) over 1024 image
///   and 77 text tokens, batch 1, forward.
/// - `flux-single-block`: one FLUX.1-dev single-stream block (width 3072, 24 heads of 128, RoPE)
///   over 512 text + 1024 image tokens, batch 1, forward.
///
/// The training steps run in f32 only for now (the trainer builds f32 weights and the objective
/// draws f32 noise): asking for bf16 is an error that says so.
pub fn run(name: &str, dtype: DType, warmup: usize, iters: usize) -> Result<BenchResult> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::msg(format!("benchmark dtype must be f32 or bf16, not {}", dtype.as_str())));
    }
    if iters == 0 {
        return Err(Error::msg("a benchmark needs at least 1 timed iteration"));
    }
    let mut step = build(name, dtype)?;
    measure(name, dtype, step.as_mut(), warmup, iters)
}

/// One iteration of a workload.
type Step = Box<dyn FnMut() -> Result<()>>;

fn build(name: &str, dtype: DType) -> Result<Step> {
    let preset = |p: &str| DiTConfig::preset(p).ok_or_else(|| Error::msg(format!("no DiT preset `{p}`")));
    match name {
        "dit-xl-2-forward" => dit_forward(&preset("dit-xl-2")?, 1, dtype),
        "dit-s-2-train-step" => train_step(name, &preset("dit-s-2")?, 16, dtype),
        "fashion-train-step" => train_step(name, &fashion_config()?, 64, dtype),
        "fashion-sample-32" => dit_sample(&fashion_config()?, &fashion_scheduler()?, 10, 32, 2.0, dtype),
        "sd3-joint-block" => joint_block(24, 64, 1024, 77, dtype),
        "flux-single-block" => {
            let cfg = FluxConfig {
                num_layers: 0,
                num_single_layers: 1,
                guidance_embeds: true,
                ..Default::default()
            };
            // 1024 packed image tokens = a 64x64 latent (1024x1024 pixels).
            flux_single_block(&cfg, 64, 512, dtype)
        }
        // The MLP up-projections of DiT-XL/2 at batch 1 and of DiT-S/2 at batch 16.
        "linear-256x1152x4608" => linear(256, 1152, 4608, dtype),
        "linear-4096x384x1536" => linear(4096, 384, 1536, dtype),
        other => Err(Error::msg(format!("unknown workload `{other}` (one of: {})", WORKLOADS.join(", ")))),
    }
}

fn measure(
    workload: &str,
    dtype: DType,
    step: &mut dyn FnMut() -> Result<()>,
    warmup: usize,
    iters: usize,
) -> Result<BenchResult> {
    for _ in 0..warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let n = times.len();
    let median_s = if n % 2 == 1 { times[n / 2] } else { 0.5 * (times[n / 2 - 1] + times[n / 2]) };
    Ok(BenchResult {
        workload: workload.to_string(),
        dtype: dtype.as_str().to_string(),
        threads: threads(),
        iters,
        median_s,
        min_s: times[0],
        peak_rss_bytes: peak_rss_bytes(),
    })
}

fn fashion_config() -> Result<DiTConfig> {
    let cfg: DiTConfig = serde_json::from_str(FASHION_TRANSFORMER)
        .map_err(|e| Error::msg(format!("models/fashion-dit/transformer/config.json: {e}")))?;
    cfg.validate().map_err(Error::msg)?;
    Ok(cfg)
}

fn fashion_scheduler() -> Result<Scheduler> {
    let config = SchedulerConfig::parse("FlowMatchEulerDiscreteScheduler", FASHION_SCHEDULER)
        .map_err(|e| Error::msg(format!("models/fashion-dit/scheduler/scheduler_config.json: {e}")))?;
    Scheduler::new(config)
}

/// A model on seeded random weights (PyTorch's default `nn.Linear` initialisation) held as plain
/// tensors: `build` runs once on a seeded `VarMap` to draw every parameter, then again on the
/// drawn tensors detached from their variables, so forward passes record no backward graph.
fn random_model<T>(dtype: DType, build: impl Fn(VarBuilder<'static>) -> Result<T>) -> Result<T> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    build(crate::weights::init::seeded_var_builder(&varmap, SEED, dtype, &dev))?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("varmap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    build(VarBuilder::from_tensors(tensors, dtype, &dev))
}

fn random_dit(cfg: &DiTConfig, dtype: DType) -> Result<DiT> {
    random_model(dtype, |vb| DiT::new(vb, cfg, Numerics::Diffusers, Init::Default))
}

fn randn_as(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Ok(randn(rng, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Class ids 0, 1, ... cycling through the model's classes.
fn class_labels(cfg: &DiTConfig, batch: usize) -> Result<Tensor> {
    let ids: Vec<u32> = (0..batch).map(|i| (i % cfg.num_classes()) as u32).collect();
    Ok(Tensor::from_vec(ids, batch, &Device::Cpu)?)
}

/// One class-conditional forward of a DiT at its native resolution.
fn dit_forward(cfg: &DiTConfig, batch: usize, dtype: DType) -> Result<Step> {
    let model = random_dit(cfg, dtype)?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let x = randn_as(&mut rng, &[batch, cfg.in_channels, cfg.sample_size, cfg.sample_size], dtype)?;
    let t = Tensor::full(500f32, batch, &Device::Cpu)?;
    let labels = class_labels(cfg, batch)?;
    Ok(Box::new(move || {
        model.forward_labels(&x, &t, &labels)?;
        Ok(())
    }))
}

/// One training step as `train::Trainer::train_step` composes it: rectified-flow loss
/// (logit-normal timesteps, as the shipped model was trained) on a fixed batch, the loss read
/// back, backward, AdamW with global-norm clipping. Data loading, label dropout and the EMA
/// update are left out (PyTorch's side does the same work).
fn train_step(name: &str, cfg: &DiTConfig, batch: usize, dtype: DType) -> Result<Step> {
    if dtype != DType::F32 {
        return Err(Error::msg(format!(
            "`{name}` runs in f32 only for now (the trainer builds f32 weights and the objective draws \
             f32 noise), not {}",
            dtype.as_str()
        )));
    }
    let dev = Device::Cpu;
    let objective = Objective::RectifiedFlow {
        timesteps: TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 },
        timestep_scale: 1000.0,
    };
    let trainee = new_dit(cfg, &objective, SEED, &dev)?;
    let mut vars: Vec<(String, Var)> = trainee
        .varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("varmap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let optim = AdamWConfig {
        lr: 1e-4,
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
        warmup_steps: 0,
        cooldown_steps: 0,
        grad_clip: 1.0,
    };
    let mut optim = AdamW::new(optim, vars, usize::MAX)?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let [c, h, w] = trainee.sample_shape;
    // Data-like: unit noise clipped to the [-1, 1] range of real images.
    let x0 = randn(&mut rng, &[batch, c, h, w], &dev)?.clamp(-1f32, 1f32)?;
    let cond = Conditioning { class_labels: Some(class_labels(cfg, batch)?), ..Default::default() };
    Ok(Box::new(move || {
        let loss = objective.loss(trainee.model.as_ref(), &x0, &cond, &mut rng)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(Error::msg(format!("benchmark training step: loss is {value}")));
        }
        optim.step(&loss.backward()?)?;
        Ok(())
    }))
}

/// `steps`-step Euler sampling of `batch` images (classes 0, 1, ...) with classifier-free
/// guidance against the null class, as `pipelines::dit::DiTPipeline::denoise` runs it.
fn dit_sample(
    cfg: &DiTConfig,
    scheduler: &Scheduler,
    batch: usize,
    steps: usize,
    guidance: f64,
    dtype: DType,
) -> Result<Step> {
    let dev = Device::Cpu;
    let model = random_dit(cfg, dtype)?.with_prediction(Prediction::Velocity);
    let schedule = scheduler.set_timesteps(steps, None, None)?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let noise = randn_as(&mut rng, &[batch, cfg.in_channels, cfg.sample_size, cfg.sample_size], dtype)?;
    let cond = Conditioning { class_labels: Some(class_labels(cfg, batch)?), ..Default::default() };
    let null = Tensor::full(cfg.null_class() as u32, batch, &dev)?;
    let uncond = Conditioning { class_labels: Some(null), ..Default::default() };
    let opts = SampleOptions { sampler: SamplerKind::Euler, guidance, seed: SEED, time: ModelTime::Timestep };
    Ok(Box::new(move || {
        sample(&model, &noise, &cond, Some(&uncond), &schedule, &opts, |_, _| {})?;
        Ok(())
    }))
}

/// One SD3-style MMDiT block (no qk-norm, as SD3-medium) over `image` + `text` tokens, batch 1.
fn joint_block(heads: usize, head_dim: usize, image: usize, text: usize, dtype: DType) -> Result<Step> {
    let dim = heads * head_dim;
    let cfg = JointBlockConfig {
        dim,
        heads,
        head_dim,
        qk_norm: false,
        context_pre_only: false,
        dual_attention: false,
        order: TokenOrder::ImageFirst,
    };
    let block = random_model(dtype, |vb| Ok(JointTransformerBlock::new(&vb, &cfg, Init::Default)?))?;
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let x = randn_as(&mut rng, &[1, image, dim], dtype)?;
    let context = randn_as(&mut rng, &[1, text, dim], dtype)?;
    let temb = randn_as(&mut rng, &[1, dim], dtype)?;
    Ok(Box::new(move || {
        block.forward(&x, &context, &temb, None, None)?;
        Ok(())
    }))
}

/// The first single-stream block of a Flux model (built whole, so the block comes from the real
/// constructor; the rest is dropped) over `text` tokens and a `side` x `side` latent's packed
/// image tokens, with the model's RoPE, batch 1.
fn flux_single_block(cfg: &FluxConfig, side: usize, text: usize, dtype: DType) -> Result<Step> {
    let dev = Device::Cpu;
    let model = random_model(dtype, |vb| FluxTransformer2DModel::new(vb, cfg, Init::Default))?;
    let block = model
        .single_transformer_blocks()
        .first()
        .cloned()
        .ok_or_else(|| Error::msg("the Flux config has no single-stream block"))?;
    let rope = model.rope(&text_ids(text, &dev)?, &latent_image_ids(side, side, &dev)?)?;
    drop(model);
    let tokens = text + (side / 2) * (side / 2);
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let x = randn_as(&mut rng, &[1, tokens, cfg.hidden()], dtype)?;
    let temb = randn_as(&mut rng, &[1, cfg.hidden()], dtype)?;
    Ok(Box::new(move || {
        block.forward(&x, &temb, &rope, None)?;
        Ok(())
    }))
}

/// One linear layer with bias, x [rows, inp] -> [rows, out]: the matrix product alone, to
/// compare the two sides' matmuls on the shapes the DiT workloads spend their time in.
fn linear(rows: usize, inp: usize, out: usize, dtype: DType) -> Result<Step> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let layer =
        Linear::new(randn_as(&mut rng, &[out, inp], dtype)?, Some(randn_as(&mut rng, &[out], dtype)?));
    let x = randn_as(&mut rng, &[rows, inp], dtype)?;
    Ok(Box::new(move || {
        layer.forward(&x)?;
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_dit() -> DiTConfig {
        DiTConfig {
            num_attention_heads: 2,
            attention_head_dim: 8,
            in_channels: 1,
            out_channels: Some(1),
            num_layers: 2,
            sample_size: 8,
            patch_size: 4,
            num_embeds_ada_norm: Some(3),
            ..Default::default()
        }
    }

    fn check(mut step: Step, dtype: DType) {
        let r = measure("tiny", dtype, step.as_mut(), 1, 1).unwrap();
        assert_eq!((r.iters, r.dtype.as_str()), (1, dtype.as_str()));
        assert!(r.median_s > 0.0 && r.min_s > 0.0, "{r:?}");
        assert!(r.peak_rss_bytes > 0, "{r:?}");
        assert!(r.threads >= 1);
    }

    #[test]
    fn tiny_workloads_run_through_the_real_code_paths() {
        let cfg = tiny_dit();
        check(dit_forward(&cfg, 2, DType::F32).unwrap(), DType::F32);
        check(dit_forward(&cfg, 2, DType::BF16).unwrap(), DType::BF16);
        check(train_step("tiny", &cfg, 4, DType::F32).unwrap(), DType::F32);
        check(dit_sample(&cfg, &fashion_scheduler().unwrap(), 3, 2, 2.0, DType::F32).unwrap(), DType::F32);
        check(joint_block(2, 8, 16, 5, DType::F32).unwrap(), DType::F32);
        let flux = FluxConfig {
            num_layers: 0,
            num_single_layers: 1,
            attention_head_dim: 16,
            num_attention_heads: 2,
            joint_attention_dim: 8,
            pooled_projection_dim: 8,
            in_channels: 4,
            axes_dims_rope: vec![4, 6, 6],
            ..Default::default()
        };
        check(flux_single_block(&flux, 4, 3, DType::F32).unwrap(), DType::F32);
        check(linear(5, 4, 3, DType::F32).unwrap(), DType::F32);
        check(linear(5, 4, 3, DType::BF16).unwrap(), DType::BF16);
    }

    #[test]
    fn fashion_configs_parse() {
        let cfg = fashion_config().unwrap();
        assert_eq!((cfg.in_channels, cfg.sample_size, cfg.patch_size), (1, 28, 4));
        fashion_scheduler().unwrap();
    }

    #[test]
    fn errors_are_clear() {
        let e = run("nope", DType::F32, 0, 1).unwrap_err().to_string();
        assert!(e.contains("unknown workload `nope`") && e.contains("dit-xl-2-forward"), "{e}");
        let e = run("fashion-train-step", DType::BF16, 0, 1).unwrap_err().to_string();
        assert!(e.contains("f32 only"), "{e}");
        assert!(run("fashion-sample-32", DType::F16, 0, 1).is_err());
        assert!(run("fashion-sample-32", DType::F32, 0, 0).is_err());
    }
}
