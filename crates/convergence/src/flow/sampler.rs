//! Sampling loops over any `Denoiser`: flow-matching Euler and Heun, SDXL's Euler, DDIM (eta 0)
//! and ancestral DDPM, with classifier-free guidance computed as the diffusers pipelines do
//! (one batched call on [uncond, cond], v = v_u + g (v_c - v_u)). The step arithmetic is
//! `Schedule`'s; this file owns the loop, the guidance and the seeded noise.

use super::config::PredictionType;
use super::schedule::{divide, scale, Process, Schedule};
use crate::error::{Error, Result};
use crate::models::{Conditioning, Denoiser, Prediction};
use crate::noise::randn;
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The integrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// First order: flow matching (SD3, Flux) or EulerDiscreteScheduler (SDXL).
    Euler,
    /// FlowMatchHeunDiscreteScheduler: second order on every interval but the last (an Euler
    /// step to sigma 0), 2n - 1 model calls.
    Heun,
    /// DDIM with eta 0 (deterministic).
    Ddim,
    /// Ancestral DDPM: posterior mean plus seeded noise.
    Ddpm,
}

/// The timestep convention of the model, relative to the schedule's `timesteps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelTime {
    /// The scheduler timestep as is: sigma * 1000 for SD3 and flow-matching DiT, the training
    /// step for SDXL and DDPM DiT.
    Timestep,
    /// The scheduler timestep / 1000, i.e. sigma (Flux; the model multiplies by 1000 itself).
    Sigma,
}

impl ModelTime {
    fn of(self, timestep: f32) -> f32 {
        match self {
            ModelTime::Timestep => timestep,
            // The Flux pipeline divides in float32; dividing keeps its rounding.
            ModelTime::Sigma => timestep / 1000.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    pub sampler: SamplerKind,
    /// Classifier-free guidance scale; guidance runs only with an unconditional conditioning
    /// and a scale above 1, as in diffusers.
    pub guidance: f64,
    /// Seeds the DDPM noise (the only randomness inside the loop).
    pub seed: u64,
    pub time: ModelTime,
}

/// Integrates `noise` (unit variance; multiplied by the schedule's `init_noise_sigma`) through
/// `schedule` with `denoiser` and returns the final latent. `callback(i, latent)` sees the latent
/// after each of the `schedule.num_steps()` steps. The latent keeps `noise`'s dtype between steps
/// (what the model sees); each step is computed in float32 as diffusers' schedulers do.
pub fn sample<D: Denoiser + ?Sized>(
    denoiser: &D,
    noise: &Tensor,
    cond: &Conditioning,
    uncond: Option<&Conditioning>,
    schedule: &Schedule,
    opts: &SampleOptions,
    mut callback: impl FnMut(usize, &Tensor),
) -> Result<Tensor> {
    check_compatible(opts.sampler, schedule, denoiser.prediction())?;
    let mut run = Run {
        model: Guided::new(denoiser, cond, uncond, opts, noise.dim(1)?)?,
        schedule,
        kind: opts.sampler,
        dtype: noise.dtype(),
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
    };
    let mut x = scale(&noise.to_dtype(DType::F32)?, schedule.init_noise_sigma())?.to_dtype(run.dtype)?;
    for i in 0..schedule.num_steps() {
        x = run.step(i, &x)?;
        callback(i, &x);
    }
    Ok(x)
}

/// Refuses sampler / schedule / model combinations whose arithmetic would be meaningless.
fn check_compatible(kind: SamplerKind, schedule: &Schedule, model: Prediction) -> Result<()> {
    let epsilon_model = matches!(model, Prediction::Epsilon | Prediction::EpsilonLearnedSigma);
    let fits = match (&schedule.process, kind) {
        (Process::Flow, SamplerKind::Euler | SamplerKind::Heun) => model == Prediction::Velocity,
        (Process::VarianceExploding { .. }, SamplerKind::Euler)
        | (Process::Alphas(_), SamplerKind::Ddim | SamplerKind::Ddpm) => {
            epsilon_model && schedule.prediction() == Some(PredictionType::Epsilon)
        }
        _ => false,
    };
    if fits {
        return Ok(());
    }
    let process = match &schedule.process {
        Process::Flow => "flow-matching",
        Process::VarianceExploding { .. } => "Euler (variance-exploding)",
        Process::Alphas(_) => "DDIM/DDPM",
    };
    Err(Error::msg(format!(
        "the {kind:?} sampler cannot run a {process} schedule (prediction {:?}) with a model predicting {model:?}",
        schedule.prediction()
    )))
}

/// The state of one sampling run.
struct Run<'a, D: ?Sized> {
    model: Guided<'a, D>,
    schedule: &'a Schedule,
    kind: SamplerKind,
    dtype: DType,
    rng: ChaCha8Rng,
}

impl<D: Denoiser + ?Sized> Run<'_, D> {
    fn step(&mut self, i: usize, x: &Tensor) -> Result<Tensor> {
        let s = self.schedule;
        let x = x.to_dtype(DType::F32)?;
        let input = s.scale_model_input(&x, i)?.to_dtype(self.dtype)?;
        let out = self.model.predict(&input, s.timesteps[i])?;
        let next = match self.kind {
            SamplerKind::Euler => s.euler_step(i, &out, &x)?,
            SamplerKind::Heun => self.heun(i, &out, &x)?,
            SamplerKind::Ddim => s.ddim_step(i, &out, &x)?,
            SamplerKind::Ddpm => s.ddpm_step(i, &out, &x, &randn(&mut self.rng, x.dims(), x.device())?)?,
        };
        Ok(next.to_dtype(self.dtype)?)
    }

    /// Heun as FlowMatchHeunDiscreteScheduler: an Euler predictor to sigma_{i+1}, then the
    /// average of both slopes over the interval; the last interval stays an Euler step.
    fn heun(&self, i: usize, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let s = self.schedule;
        let (sigma, next) = (s.sigmas[i], s.sigmas[i + 1]);
        let slope = heun_slope(x, v, sigma)?;
        let predicted = (x + scale(&slope, next - sigma)?)?.to_dtype(self.dtype)?;
        if i + 1 == s.num_steps() {
            return Ok(predicted);
        }
        let v2 = self.model.predict(&predicted, s.timesteps[i + 1])?;
        let slope2 = heun_slope(&predicted.to_dtype(DType::F32)?, &v2, next)?;
        let mean = scale(&(slope + slope2)?, 0.5)?;
        Ok((x + scale(&mean, next - sigma)?)?)
    }
}

/// The velocity as diffusers' Heun derives it, through x0 = x - v sigma and back, for its rounding.
fn heun_slope(x: &Tensor, v: &Tensor, sigma: f32) -> Result<Tensor> {
    divide(&(x - (x - scale(v, sigma)?)?)?, sigma)
}

/// The denoiser with guidance and learned-sigma handling folded in: one prediction per latent.
struct Guided<'a, D: ?Sized> {
    denoiser: &'a D,
    /// [uncond, cond] batched when guiding, else cond.
    cond: Conditioning,
    guidance: Option<f32>,
    /// Latent channels, which learned-sigma outputs carry twice (eps, then variance).
    channels: usize,
    time: ModelTime,
}

impl<'a, D: Denoiser + ?Sized> Guided<'a, D> {
    fn new(
        denoiser: &'a D,
        cond: &Conditioning,
        uncond: Option<&Conditioning>,
        opts: &SampleOptions,
        channels: usize,
    ) -> Result<Self> {
        let uncond = uncond.filter(|_| opts.guidance > 1.0);
        Ok(Guided {
            denoiser,
            cond: match uncond {
                Some(u) => batch_for_guidance(u, cond)?,
                None => cond.clone(),
            },
            guidance: uncond.map(|_| opts.guidance as f32),
            channels,
            time: opts.time,
        })
    }

    /// The (guided) prediction for latent `x` at scheduler timestep `t`, in float32.
    fn predict(&self, x: &Tensor, t: f32) -> Result<Tensor> {
        let input = match self.guidance {
            Some(_) => Tensor::cat(&[x, x], 0)?,
            None => x.clone(),
        };
        let t = Tensor::full(self.time.of(t), input.dim(0)?, x.device())?;
        let mut out = self.denoiser.forward(&input, &t, &self.cond)?;
        if self.denoiser.prediction() == Prediction::EpsilonLearnedSigma {
            out = out.narrow(1, 0, self.channels)?;
        }
        if out.dims() != input.dims() {
            return Err(Error::msg(format!(
                "the denoiser returned shape {:?} for a latent batch of shape {:?}",
                out.dims(),
                input.dims()
            )));
        }
        let out = out.to_dtype(DType::F32)?;
        let Some(g) = self.guidance else {
            return Ok(out);
        };
        let b = x.dim(0)?;
        let (u, c) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
        Ok((&u + scale(&(c - &u)?, g)?)?)
    }
}

/// One conditioning for the batch [uncond, cond]: every field concatenated along the batch.
fn batch_for_guidance(uncond: &Conditioning, cond: &Conditioning) -> Result<Conditioning> {
    let pair = |name: &str, u: &Option<Tensor>, c: &Option<Tensor>| {
        match (u, c) {
        (Some(u), Some(c)) => Ok(Some(Tensor::cat(&[u, c], 0)?)),
        (None, None) => Ok(None),
        _ => Err(Error::msg(format!(
            "classifier-free guidance: `{name}` is set in only one of the conditional and unconditional inputs"
        ))),
    }
    };
    Ok(Conditioning {
        class_labels: pair("class_labels", &uncond.class_labels, &cond.class_labels)?,
        text_tokens: pair("text_tokens", &uncond.text_tokens, &cond.text_tokens)?,
        pooled: pair("pooled", &uncond.pooled, &cond.pooled)?,
        guidance: pair("guidance", &uncond.guidance, &cond.guidance)?,
        time_ids: pair("time_ids", &uncond.time_ids, &cond.time_ids)?,
    })
}
