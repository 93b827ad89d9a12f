//! Noise schedules and samplers. `Scheduler` reads a diffusers `scheduler_config.json` and
//! `set_timesteps` yields a `Schedule` that matches diffusers 0.42 number for number; `sample`
//! integrates a `Denoiser` through it (flow Euler/Heun, SDXL Euler, DDIM, DDPM) with optional
//! classifier-free guidance.
//!
//! ```no_run
//! # use convergence::flow::*;
//! # fn demo(model: &dyn convergence::models::Denoiser, noise: &candle_core::Tensor,
//! #         cond: &convergence::models::Conditioning) -> convergence::Result<()> {
//! let scheduler = Scheduler::from_config_file("scheduler/scheduler_config.json")?;
//! let schedule = scheduler.set_timesteps(28, None, Some(4096))?;
//! let opts = SampleOptions { sampler: SamplerKind::Euler, guidance: 1.0, seed: 0, time: ModelTime::Sigma };
//! let latent = sample(model, noise, cond, None, &schedule, &opts, |_, _| {})?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod sampler;
pub mod schedule;

pub use config::{DdpmConfig, EulerConfig, FlowMatchConfig, PredictionType, VarianceType};
pub use sampler::{sample, ModelTime, SampleOptions, SamplerKind};
pub use schedule::{flux_sigmas, AlphaSteps, Process, Schedule, Scheduler, SchedulerConfig};
