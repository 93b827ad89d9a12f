//! Noise schedules computed as diffusers 0.42 computes them, rounding step for rounding step:
//! float64 where diffusers works on numpy float64 arrays, float32 where it works on torch tensors
//! or numpy float32 arrays. A `Scheduler` is a parsed `scheduler_config.json`; `set_timesteps`
//! turns it into a `Schedule`: the timesteps the model sees, the noise levels, and the single
//! steps between them that the samplers in `sampler.rs` chain.

use super::config::{
    BetaConfig, BetaSchedule, DdpmConfig, EulerConfig, FinalSigmas, FlowMatchConfig, PredictionType, Spacing,
    TimeShift, VarianceType,
};
use crate::error::{Error, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// A scheduler config, by diffusers class.
#[derive(Clone, Debug, PartialEq)]
pub enum SchedulerConfig {
    /// `FlowMatchEulerDiscreteScheduler` (SD3, Flux); `FlowMatchHeunDiscreteScheduler` reads the same.
    FlowMatch(FlowMatchConfig),
    /// `EulerDiscreteScheduler` (SDXL).
    Euler(EulerConfig),
    /// `DDIMScheduler`.
    Ddim(DdpmConfig),
    /// `DDPMScheduler` (its defaults are DiT's training schedule).
    Ddpm(DdpmConfig),
}

impl SchedulerConfig {
    pub fn class_name(&self) -> &'static str {
        match self {
            SchedulerConfig::FlowMatch(_) => "FlowMatchEulerDiscreteScheduler",
            SchedulerConfig::Euler(_) => "EulerDiscreteScheduler",
            SchedulerConfig::Ddim(_) => "DDIMScheduler",
            SchedulerConfig::Ddpm(_) => "DDPMScheduler",
        }
    }

    /// Parses the config of diffusers class `class` from the file's text.
    pub fn parse(class: &str, text: &str) -> std::result::Result<Self, String> {
        fn fields<T: serde::de::DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
        match class {
            "FlowMatchEulerDiscreteScheduler" | "FlowMatchHeunDiscreteScheduler" => {
                fields(text).map(Self::FlowMatch)
            }
            "EulerDiscreteScheduler" => fields(text).map(Self::Euler),
            "DDIMScheduler" => fields(text).map(Self::Ddim),
            "DDPMScheduler" => fields(text).map(Self::Ddpm),
            other => Err(format!(
                "unsupported scheduler class `{other}` (supported: FlowMatchEulerDiscreteScheduler, \
                 FlowMatchHeunDiscreteScheduler, EulerDiscreteScheduler, DDIMScheduler, DDPMScheduler)"
            )),
        }
    }

    fn validate(&self) -> std::result::Result<(), String> {
        match self {
            SchedulerConfig::FlowMatch(c) => c.validate(),
            SchedulerConfig::Euler(c) => c.validate(),
            SchedulerConfig::Ddim(c) | SchedulerConfig::Ddpm(c) => c.validate(),
        }
    }
}

/// A validated scheduler config and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduler {
    pub config: SchedulerConfig,
    /// The config file (the class name when built in code), named in every error.
    pub source: PathBuf,
}

impl Scheduler {
    /// Reads a diffusers `scheduler_config.json`, dispatching on `_class_name`.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        let class = json
            .get("_class_name")
            .and_then(|c| c.as_str())
            .ok_or_else(|| Error::config(path, "no `_class_name` field"))?;
        let config =
            SchedulerConfig::parse(class, &text).map_err(|m| Error::config(path, format!("{class}: {m}")))?;
        Self::with_source(config, path)
    }

    /// A scheduler from a config built in code, e.g. `SchedulerConfig::Ddpm(Default::default())`.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let source = PathBuf::from(config.class_name());
        Self::with_source(config, source)
    }

    fn with_source(config: SchedulerConfig, source: impl Into<PathBuf>) -> Result<Self> {
        let source = source.into();
        config.validate().map_err(|m| Error::config(&source, format!("{}: {m}", config.class_name())))?;
        Ok(Scheduler { config, source })
    }

    fn error(&self, message: impl std::fmt::Display) -> Error {
        Error::config(&self.source, format!("{}: {message}", self.config.class_name()))
    }

    /// The schedule of `n` steps as the diffusers pipelines set it. Flow matching with a static
    /// shift starts from the scheduler's training table (StableDiffusion3Pipeline); with
    /// `use_dynamic_shifting` it shifts `flux_sigmas(n)` by `mu` (FluxPipeline), where `mu` is
    /// given or computed from `image_seq_len` by `calculate_shift`. The other classes ignore both.
    pub fn set_timesteps(&self, n: usize, mu: Option<f64>, image_seq_len: Option<usize>) -> Result<Schedule> {
        if n == 0 {
            return Err(self.error("the number of steps must be at least 1"));
        }
        match &self.config {
            SchedulerConfig::FlowMatch(c) if c.use_dynamic_shifting => {
                self.set_sigmas(&flux_sigmas(n), mu, image_seq_len)
            }
            SchedulerConfig::FlowMatch(c) => {
                Ok(flow_schedule(c, &training_sigmas(c, n), Precision::F64, Shift::Static(c.shift)))
            }
            SchedulerConfig::Euler(c) => {
                self.check_steps(&c.betas, n)?;
                Ok(euler_schedule(c, n))
            }
            SchedulerConfig::Ddim(c) | SchedulerConfig::Ddpm(c) => {
                self.check_steps(&c.betas, n)?;
                alpha_schedule(c, n).map_err(|m| self.error(m))
            }
        }
    }

    /// A flow-matching schedule over explicit unshifted sigmas (`set_timesteps(sigmas=...)`), e.g.
    /// `flux_sigmas(n)` for FLUX.1-schnell, whose config has no dynamic shifting.
    pub fn set_sigmas(
        &self,
        sigmas: &[f64],
        mu: Option<f64>,
        image_seq_len: Option<usize>,
    ) -> Result<Schedule> {
        let SchedulerConfig::FlowMatch(c) = &self.config else {
            return Err(self.error("explicit sigmas need a flow-matching scheduler"));
        };
        if sigmas.is_empty() || sigmas.iter().any(|&s| !(s > 0.0 && s <= 1.0)) {
            return Err(self.error("explicit sigmas must be in (0, 1]"));
        }
        let shift = if c.use_dynamic_shifting {
            let mu = mu
                .or_else(|| image_seq_len.map(|l| c.calculate_shift(l)))
                .ok_or_else(|| self.error("use_dynamic_shifting is set: pass mu or image_seq_len"))?;
            match c.time_shift_type {
                TimeShift::Exponential => Shift::Dynamic(mu.exp()),
                TimeShift::Linear => Shift::Dynamic(mu),
            }
        } else {
            Shift::Static(c.shift)
        };
        // diffusers casts explicit sigmas to a numpy float32 array, so the shift runs in float32.
        Ok(flow_schedule(c, sigmas, Precision::F32, shift))
    }

    /// diffusers' `discrete_timestep_cutoff` for an ensemble of experts: the first expert
    /// (`denoising_end = fraction`) runs the timesteps at or above it, the second
    /// (`denoising_start = fraction`) the ones below.
    pub fn timestep_cutoff(&self, fraction: f64) -> Result<f32> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(
                self.error(format!("denoising_end / denoising_start must be in (0, 1), got {fraction}"))
            );
        }
        let train = match &self.config {
            SchedulerConfig::FlowMatch(c) => c.num_train_timesteps,
            SchedulerConfig::Euler(c) => c.betas.num_train_timesteps,
            SchedulerConfig::Ddim(c) | SchedulerConfig::Ddpm(c) => c.betas.num_train_timesteps,
        } as f64;
        Ok((train - fraction * train).round() as f32)
    }

    /// DDPM-family schedules pick their steps among the training steps.
    fn check_steps(&self, betas: &BetaConfig, n: usize) -> Result<()> {
        if n > betas.num_train_timesteps {
            return Err(
                self.error(format!("{n} steps exceed num_train_timesteps {}", betas.num_train_timesteps))
            );
        }
        Ok(())
    }
}

/// FluxPipeline's unshifted sigmas: `np.linspace(1, 1/n, n)`.
pub fn flux_sigmas(n: usize) -> Vec<f64> {
    np_linspace(1.0, 1.0 / n as f64, n)
}

/// The timesteps a model sees, the noise level of each, and how to step between them.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// diffusers' `scheduler.timesteps`, one per step: sigma * 1000 for flow matching, the
    /// (possibly fractional) training step for Euler, the integer step for DDIM/DDPM.
    pub timesteps: Vec<f32>,
    /// n + 1 noise levels ending at the terminal one (flow: sigma, Euler: sqrt((1 - a) / a));
    /// empty for DDIM/DDPM, which step on `alphas_cumprod` instead.
    pub sigmas: Vec<f32>,
    pub process: Process,
}

/// The forward process a schedule discretises, which decides the step arithmetic.
#[derive(Clone, Debug, PartialEq)]
pub enum Process {
    /// Rectified flow x = (1 - sigma) x0 + sigma eps; the model predicts the velocity eps - x0.
    Flow,
    /// EulerDiscreteScheduler's x = x0 + sigma eps, fed to the model as x / sqrt(sigma^2 + 1).
    VarianceExploding {
        prediction: PredictionType,
        /// The start noise scale: sqrt(sigma_max^2 + 1) for leading spacing, else sigma_max.
        init_noise_sigma: f32,
    },
    /// DDIM/DDPM's x = sqrt(a) x0 + sqrt(1 - a) eps, with a = alphas_cumprod[t].
    Alphas(AlphaSteps),
}

/// Per-step quantities of a DDIM/DDPM schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct AlphaSteps {
    pub timesteps: Vec<i64>,
    /// t - num_train_timesteps / n, as diffusers steps (negative: the final alpha).
    pub prev_timesteps: Vec<i64>,
    pub alpha_prod: Vec<f32>,
    pub alpha_prod_prev: Vec<f32>,
    pub prediction: PredictionType,
    /// Clamp predicted x0 to [-r, r].
    pub clip_sample: Option<f32>,
    pub variance: VarianceType,
}

impl Schedule {
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The steps at timesteps >= `cutoff` (the first expert of an ensemble, `denoising_end`):
    /// its last step ends at the noise level where the second expert begins.
    pub fn until_cutoff(&self, cutoff: f32) -> Result<Schedule> {
        let k = self.sigma_steps()?.iter().take_while(|&&t| t >= cutoff).count();
        Ok(Schedule {
            timesteps: self.timesteps[..k].to_vec(),
            sigmas: self.sigmas[..=k].to_vec(),
            process: self.process.clone(),
        })
    }

    /// The steps at timesteps < `cutoff` (the second expert, `denoising_start`): they continue a
    /// latent that is already at that noise level, so the start noise is not scaled again.
    pub fn from_cutoff(&self, cutoff: f32) -> Result<Schedule> {
        let k = self.sigma_steps()?.iter().take_while(|&&t| t >= cutoff).count();
        let process = match &self.process {
            Process::VarianceExploding { prediction, .. } => {
                Process::VarianceExploding { prediction: *prediction, init_noise_sigma: 1.0 }
            }
            other => other.clone(),
        };
        Ok(Schedule { timesteps: self.timesteps[k..].to_vec(), sigmas: self.sigmas[k..].to_vec(), process })
    }

    /// The timesteps of a sigma-stepped (flow or Euler) schedule, which alone can be split.
    fn sigma_steps(&self) -> Result<&[f32]> {
        match self.process {
            Process::Alphas(_) => {
                Err(Error::msg("only flow-matching and Euler schedules can be split into experts"))
            }
            _ => Ok(&self.timesteps),
        }
    }

    /// The DDIM/DDPM timesteps as the int64 values diffusers stores.
    pub fn integer_timesteps(&self) -> Option<&[i64]> {
        match &self.process {
            Process::Alphas(a) => Some(&a.timesteps),
            _ => None,
        }
    }

    /// What the steps expect from the model; `None` for flow matching (the velocity).
    pub fn prediction(&self) -> Option<PredictionType> {
        match &self.process {
            Process::Flow => None,
            Process::VarianceExploding { prediction, .. } => Some(*prediction),
            Process::Alphas(a) => Some(a.prediction),
        }
    }

    /// What unit-variance start noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f32 {
        match &self.process {
            Process::VarianceExploding { init_noise_sigma, .. } => *init_noise_sigma,
            Process::Flow | Process::Alphas(_) => 1.0,
        }
    }

    /// The model input at step `i`: x / sqrt(sigma^2 + 1) for Euler, x itself otherwise.
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        match &self.process {
            Process::VarianceExploding { .. } => {
                let s = self.sigmas[i];
                divide(x, (s * s + 1.0).sqrt())
            }
            Process::Flow | Process::Alphas(_) => Ok(x.clone()),
        }
    }

    /// One Euler step from `sigmas[i]` to `sigmas[i + 1]` (FlowMatchEulerDiscreteScheduler or
    /// EulerDiscreteScheduler `step`, no churn). Panics if `i` is not a step index.
    pub fn euler_step(&self, i: usize, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        match &self.process {
            Process::Flow => Ok((sample + scale(model_output, next - sigma)?)?),
            Process::VarianceExploding { prediction, .. } => {
                let x0 = match prediction {
                    PredictionType::Epsilon => (sample - scale(model_output, sigma)?)?,
                    PredictionType::VPrediction => {
                        let d = sigma * sigma + 1.0;
                        (scale(model_output, -sigma / d.sqrt())? + divide(sample, d)?)?
                    }
                    PredictionType::Sample => model_output.clone(),
                };
                // diffusers goes through the ODE derivative (x - x0) / sigma; so do we, for its rounding.
                let derivative = divide(&(sample - x0)?, sigma)?;
                Ok((sample + scale(&derivative, next - sigma)?)?)
            }
            Process::Alphas(_) => Err(Error::msg("an Euler step needs a flow-matching or Euler schedule")),
        }
    }

    /// One deterministic DDIM step (eta 0) from `timesteps[i]` to its predecessor.
    pub fn ddim_step(&self, i: usize, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let a = self.alphas("DDIM")?;
        let prev = a.alpha_prod_prev[i];
        let (x0, eps) = a.x0_and_eps(i, model_output, sample)?;
        Ok((scale(&x0, prev.sqrt())? + scale(&eps, (1.0 - prev).sqrt())?)?)
    }

    /// One ancestral DDPM step: the posterior mean plus `noise` (standard normal) times the
    /// posterior standard deviation; no noise is added at t = 0.
    pub fn ddpm_step(
        &self,
        i: usize,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let a = self.alphas("DDPM")?;
        let (alpha, prev) = (a.alpha_prod[i], a.alpha_prod_prev[i]);
        let (beta, beta_prev) = (1.0 - alpha, 1.0 - prev);
        let current_alpha = alpha / prev;
        let current_beta = 1.0 - current_alpha;
        let (x0, _) = a.x0_and_eps(i, model_output, sample)?;
        let mean = (scale(&x0, prev.sqrt() * current_beta / beta)?
            + scale(sample, current_alpha.sqrt() * beta_prev / beta)?)?;
        if a.timesteps[i] <= 0 {
            return Ok(mean);
        }
        let variance = (beta_prev / beta * current_beta).max(1e-20);
        let std = match a.variance {
            VarianceType::FixedSmall => variance.sqrt(),
            VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
            VarianceType::FixedLarge => current_beta.sqrt(),
        };
        Ok((mean + scale(noise, std)?)?)
    }

    fn alphas(&self, step: &str) -> Result<&AlphaSteps> {
        match &self.process {
            Process::Alphas(a) => Ok(a),
            _ => Err(Error::msg(format!("a {step} step needs a DDIM or DDPM schedule"))),
        }
    }
}

impl AlphaSteps {
    /// The predicted x0 (clipped if configured) and noise at step `i`, in diffusers' operation order.
    fn x0_and_eps(&self, i: usize, out: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let alpha = self.alpha_prod[i];
        let (sa, sb) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (divide(&(x - scale(out, sb)?)?, sa)?, out.clone()),
            PredictionType::Sample => (out.clone(), divide(&(x - scale(out, sa)?)?, sb)?),
            PredictionType::VPrediction => {
                ((scale(x, sa)? - scale(out, sb)?)?, (scale(out, sa)? + scale(x, sb)?)?)
            }
        };
        let x0 = match self.clip_sample {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        Ok((x0, eps))
    }
}

/// `x * s`, rounded as torch rounds a product with a float32 scalar.
pub(crate) fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.affine(s as f64, 0.0)?)
}

/// `x / s` as a true division: candle's `x / f64` multiplies by the reciprocal, which rounds differently.
pub(crate) fn divide(x: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, x.device())?.to_dtype(x.dtype())?;
    Ok(x.broadcast_div(&s)?)
}

/// Float32 or float64 arithmetic on f64 values: rounding each +, -, *, / result to float32 gives
/// exactly the float32 operation (float64 has more than twice the precision).
#[derive(Clone, Copy)]
enum Precision {
    F32,
    F64,
}

impl Precision {
    fn round(self, x: f64) -> f64 {
        match self {
            Precision::F32 => x as f32 as f64,
            Precision::F64 => x,
        }
    }
}

/// How a flow sigma is bent towards noise: shift s / (1 + (shift - 1) s), or (dynamic, with
/// m = exp(mu) or mu) m / (m + 1/s - 1).
#[derive(Clone, Copy)]
enum Shift {
    Static(f64),
    Dynamic(f64),
}

impl Shift {
    fn apply(self, s: f64, p: Precision) -> f64 {
        let r = |x: f64| p.round(x);
        match self {
            Shift::Static(shift) => r(r(r(shift) * s) / r(1.0 + r(r(shift - 1.0) * s))),
            Shift::Dynamic(m) => {
                let m = r(m);
                r(m / r(m + r(r(1.0 / s) - 1.0)))
            }
        }
    }
}

/// StableDiffusion3Pipeline's unshifted sigmas: float64 `linspace(sigma_max, sigma_min, n)` over
/// the scheduler's float32 training table, which is already shifted, so sigma_min is shifted twice.
fn training_sigmas(c: &FlowMatchConfig, n: usize) -> Vec<f64> {
    let steps = c.num_train_timesteps as f64;
    let table = |t: f64| Shift::Static(c.shift).apply(Precision::F32.round(t / steps), Precision::F32);
    let (max, min) = (table(steps), table(1.0));
    np_linspace(max * steps, min * steps, n).into_iter().map(|t| t / steps).collect()
}

/// Shifts `base` (rounded to `p` first, as diffusers' array is), stretches it to `shift_terminal`
/// if set, and appends the terminal sigma (0, or 1 when `invert_sigmas`).
fn flow_schedule(c: &FlowMatchConfig, base: &[f64], p: Precision, shift: Shift) -> Schedule {
    let mut sigmas: Vec<f64> = base.iter().map(|&s| shift.apply(p.round(s), p)).collect();
    if let Some(terminal) = c.shift_terminal.filter(|&t| t != 0.0) {
        stretch_to_terminal(&mut sigmas, terminal, p);
    }
    let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
    if c.invert_sigmas {
        sigmas.iter_mut().for_each(|s| *s = 1.0 - *s);
    }
    let steps = c.num_train_timesteps as f32;
    let timesteps = sigmas.iter().map(|s| s * steps).collect();
    sigmas.push(if c.invert_sigmas { 1.0 } else { 0.0 });
    Schedule { timesteps, sigmas, process: Process::Flow }
}

/// LTX-Video's stretch: rescale 1 - sigma so the last sigma lands on `terminal`.
fn stretch_to_terminal(sigmas: &mut [f64], terminal: f64, p: Precision) {
    let r = |x: f64| p.round(x);
    let Some(&last) = sigmas.last() else { return };
    let factor = r(r(1.0 - last) / r(1.0 - terminal));
    sigmas.iter_mut().for_each(|s| *s = r(1.0 - r(r(1.0 - *s) / factor)));
}

fn euler_schedule(c: &EulerConfig, n: usize) -> Schedule {
    let acp = alphas_cumprod(&c.betas);
    // The sigma table is torch float32; numpy interpolates it in float64. torch evaluates
    // `** 0.5` with a pow that misses the correct rounding near rounding midpoints; we take the
    // correctly rounded sqrt, so a sigma (like DDIM/DDPM's square roots) may differ by one ulp.
    let table: Vec<f64> = acp.iter().map(|&a| ((1.0 - a) / a).sqrt() as f64).collect();
    let timesteps: Vec<f32> =
        spaced_timesteps(c.timestep_spacing, n, c.betas.num_train_timesteps, c.steps_offset)
            .into_iter()
            .map(|t| t as f32)
            .collect();
    let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| np_interp(t as f64, &table) as f32).collect();
    sigmas.push(match c.final_sigmas_type {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => table[0] as f32,
    });
    let max = sigmas.iter().copied().fold(0f32, f32::max);
    let init_noise_sigma = match c.timestep_spacing {
        Spacing::Leading => (max * max + 1.0).sqrt(),
        Spacing::Linspace | Spacing::Trailing => max,
    };
    let process = Process::VarianceExploding { prediction: c.prediction_type, init_noise_sigma };
    Schedule { timesteps, sigmas, process }
}

fn alpha_schedule(c: &DdpmConfig, n: usize) -> std::result::Result<Schedule, String> {
    let acp = alphas_cumprod(&c.betas);
    let train = c.betas.num_train_timesteps;
    let timesteps: Vec<i64> = spaced_timesteps(c.timestep_spacing, n, train, c.steps_offset)
        .into_iter()
        .map(|t| t.round_ties_even() as i64)
        .collect();
    let prev_timesteps: Vec<i64> = timesteps.iter().map(|t| t - (train / n) as i64).collect();
    let final_alpha = if c.set_alpha_to_one { 1.0 } else { acp[0] };
    let at = |t: i64| {
        usize::try_from(t)
            .ok()
            .and_then(|i| acp.get(i).copied())
            .ok_or_else(|| format!("timestep {t} is outside the {train} training steps (check steps_offset)"))
    };
    let alpha_prod = timesteps.iter().map(|&t| at(t)).collect::<std::result::Result<_, _>>()?;
    let alpha_prod_prev = prev_timesteps
        .iter()
        .map(|&t| if t < 0 { Ok(final_alpha) } else { at(t) })
        .collect::<std::result::Result<_, _>>()?;
    let steps = AlphaSteps {
        timesteps: timesteps.clone(),
        prev_timesteps,
        alpha_prod,
        alpha_prod_prev,
        prediction: c.prediction_type,
        clip_sample: c.clip_sample.then_some(c.clip_sample_range as f32),
        variance: c.variance_type,
    };
    Ok(Schedule {
        timesteps: timesteps.iter().map(|&t| t as f32).collect(),
        sigmas: vec![],
        process: Process::Alphas(steps),
    })
}

/// diffusers' inference timesteps, descending, as numpy float64 before the integer cast.
fn spaced_timesteps(spacing: Spacing, n: usize, train: usize, offset: usize) -> Vec<f64> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, n).into_iter().rev().collect(),
        Spacing::Leading => (0..n).rev().map(|i| (i * (train / n) + offset) as f64).collect(),
        Spacing::Trailing => np_arange(train as f64, 0.0, -(train as f64 / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() - 1.0)
            .collect(),
    }
}

/// The training `alphas_cumprod` in float32 (torch's CPU cumprod accumulates float32 in float64).
pub fn alphas_cumprod(c: &BetaConfig) -> Vec<f32> {
    let mut acc = 1f64;
    betas(c)
        .into_iter()
        .map(|b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect()
}

fn betas(c: &BetaConfig) -> Vec<f32> {
    let n = c.num_train_timesteps;
    match (&c.trained_betas, c.beta_schedule) {
        (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
        (None, BetaSchedule::Linear) => torch_linspace_f32(c.beta_start, c.beta_end, n),
        (None, BetaSchedule::ScaledLinear) => {
            torch_linspace_f32(c.beta_start.sqrt(), c.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
        }
        (None, BetaSchedule::SquaredCos) => cosine_betas(n),
    }
}

/// `betas_for_alpha_bar` with the cosine alpha-bar of improved DDPM, computed in float64, capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)` on CPU: a float32 step, counted from the start
/// for the first half and back from the end for the second, each value one fused multiply-add
/// (the compiler contracts torch's `start + step * i`; bit-exact against the SDXL table).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(
            |i| {
                if i < n / 2 {
                    step.mul_add(i as f32, start)
                } else {
                    (-step).mul_add((n - 1 - i) as f32, end)
                }
            },
        )
        .collect()
}

/// `numpy.linspace(start, stop, n)` (float64, endpoint included).
fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `numpy.arange(start, stop, step)` for floats: numpy fills start + i * (fl(start + step) - start).
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// `numpy.interp(x, arange(len(table)), table)`.
fn np_interp(x: f64, table: &[f64]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0];
    }
    if x >= last as f64 {
        return table[last];
    }
    let j = x.floor() as usize;
    (table[j + 1] - table[j]) * (x - j as f64) + table[j]
}
