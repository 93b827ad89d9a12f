//! `scheduler_config.json` as diffusers 0.42 writes it: one struct per scheduler family with
//! diffusers' field names and defaults. Unknown fields are ignored (as diffusers does); options
//! that would change the numbers but are not implemented are refused by `validate`.

use serde::{Deserialize, Serialize};

/// How `use_dynamic_shifting` bends a sigma: exp(mu) / (exp(mu) + 1/s - 1), or mu / (mu + 1/s - 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeShift {
    Exponential,
    Linear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    /// Linear in sqrt(beta) (Stable Diffusion).
    ScaledLinear,
    /// Nichol & Dhariwal's cosine alpha-bar.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCos,
}

/// Where the inference timesteps sit among the training steps (Lin et al. 2023, table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// What a DDPM-family network predicts (diffusers' `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    /// v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho).
    VPrediction,
    #[serde(alias = "original_sample")]
    Sample,
}

/// DDPM's posterior variance (`learned*` and `fixed_large_log` are not supported).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
}

/// The sigma appended after the last Euler step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// `interpolation_type`: only linear interpolation of the sigma table is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Linear,
}

/// `timestep_type`: only discrete (training-step) timesteps are implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    Discrete,
}

/// `FlowMatchEulerDiscreteScheduler` (also read for `FlowMatchHeunDiscreteScheduler`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub time_shift_type: TimeShift,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchConfig {
    fn default() -> Self {
        FlowMatchConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: TimeShift::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchConfig {
    pub fn validate(&self) -> Result<(), String> {
        refuse(&[
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ])?;
        if self.num_train_timesteps == 0 || self.shift <= 0.0 {
            return Err("num_train_timesteps and shift must be positive".into());
        }
        Ok(())
    }

    /// The pipelines' `calculate_shift`: mu grows linearly with the image token count, from
    /// `base_shift` at `base_image_seq_len` to `max_shift` at `max_image_seq_len` (float64).
    pub fn calculate_shift(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }
}

/// The training noise schedule shared by the DDPM family (defaults: DDPM's, which are DiT's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

impl Default for BetaConfig {
    fn default() -> Self {
        BetaConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

impl BetaConfig {
    pub fn validate(&self) -> Result<(), String> {
        refuse(&[("rescale_betas_zero_snr", self.rescale_betas_zero_snr)])?;
        if self.num_train_timesteps < 2 {
            return Err("num_train_timesteps must be at least 2".into());
        }
        match &self.trained_betas {
            Some(b) if b.len() != self.num_train_timesteps => Err(format!(
                "trained_betas has {} values but num_train_timesteps is {}",
                b.len(),
                self.num_train_timesteps
            )),
            _ => Ok(()),
        }
    }
}

/// `EulerDiscreteScheduler` (SDXL's default sampler).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EulerConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    pub prediction_type: PredictionType,
    pub interpolation_type: Interpolation,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub timestep_spacing: Spacing,
    pub timestep_type: TimestepType,
    pub steps_offset: usize,
    pub final_sigmas_type: FinalSigmas,
}

impl Default for EulerConfig {
    fn default() -> Self {
        EulerConfig {
            betas: BetaConfig::default(),
            prediction_type: PredictionType::Epsilon,
            interpolation_type: Interpolation::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            timestep_spacing: Spacing::Linspace,
            timestep_type: TimestepType::Discrete,
            steps_offset: 0,
            final_sigmas_type: FinalSigmas::Zero,
        }
    }
}

impl EulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.betas.validate()?;
        refuse(&[
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
        ])
    }
}

/// `DDIMScheduler` and `DDPMScheduler`: one variance-preserving process, stepped
/// deterministically (DDIM) or ancestrally (DDPM). The two classes share every field here but
/// `set_alpha_to_one` (DDIM only; DDPM always ends at alpha 1, the default) and `variance_type`
/// (DDPM only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdpmConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    pub prediction_type: PredictionType,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub timestep_spacing: Spacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub variance_type: VarianceType,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        DdpmConfig {
            betas: BetaConfig::default(),
            prediction_type: PredictionType::Epsilon,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            timestep_spacing: Spacing::Leading,
            steps_offset: 0,
            set_alpha_to_one: true,
            variance_type: VarianceType::FixedSmall,
        }
    }
}

impl DdpmConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.betas.validate()?;
        refuse(&[("thresholding", self.thresholding)])
    }
}

/// Names the first enabled option that is not implemented.
fn refuse(flags: &[(&str, bool)]) -> Result<(), String> {
    match flags.iter().find(|(_, on)| *on) {
        Some((name, _)) => Err(format!("`{name}: true` is not supported")),
        None => Ok(()),
    }
}
