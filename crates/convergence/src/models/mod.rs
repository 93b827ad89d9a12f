//! One file per architecture; each reads like its paper and mirrors its checkpoint's key names.

pub mod any;
pub mod dit;

use candle_core::{Result, Tensor};

/// Everything a denoiser may be conditioned on; each model reads what it needs.
#[derive(Clone, Debug, Default)]
pub struct Conditioning {
    /// [B] class ids (DiT); the null class selects the unconditional branch.
    pub class_labels: Option<Tensor>,
    /// [B, L, D] text tokens (joint attention, cross-attention).
    pub text_tokens: Option<Tensor>,
    /// [B, P] pooled text vector.
    pub pooled: Option<Tensor>,
    /// Flux-dev distilled guidance scale [B].
    pub guidance: Option<Tensor>,
}

/// What a denoiser's output means, which decides how a sampler uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// Rectified flow: v = eps - x0.
    Velocity,
    /// DDPM: the added noise.
    Epsilon,
    /// DDPM with DiT's learned variance: the first half of the channels is eps.
    EpsilonLearnedSigma,
}

/// A network that maps a noisy latent x_t at time t (in the model's own timestep convention)
/// and its conditioning to a prediction.
pub trait Denoiser {
    fn forward(&self, x: &Tensor, t: &Tensor, cond: &Conditioning) -> Result<Tensor>;
    fn prediction(&self) -> Prediction;
}
