//! One file per architecture; each reads like its paper and mirrors its checkpoint's key names.

pub mod any;
pub mod dit;
pub mod flux;
pub mod sd3;
pub mod text;
pub mod text_dit;
pub mod unet;
pub mod vae;

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
    /// SDXL micro-conditioning [B, 6] (refiner [B, 5]): original size, crop, target size or
    /// aesthetic score.
    pub time_ids: Option<Tensor>,
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

/// Sequence lengths of a joint-attention model at one resolution and prompt length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenCounts {
    pub text: usize,
    pub image: usize,
}

impl TokenCounts {
    /// The joint sequence every attention layer sees.
    pub fn total(&self) -> usize {
        self.text + self.image
    }
}

/// Forward FLOPs split as torch's FlopCounterMode reports them (a multiply-add is 2; norms,
/// activations and softmax are not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlopCount {
    /// Linear layers (`aten.addmm`, and `aten.mm` for those without bias or on strided input).
    pub linear: u64,
    /// QK^T and PV (`aten.bmm`).
    pub attention: u64,
    /// Convolutions (`aten.convolution`): patch embeddings, the VAE and the UNet.
    pub conv: u64,
}

impl FlopCount {
    pub fn total(&self) -> u64 {
        self.linear + self.attention + self.conv
    }
}

impl std::ops::Add for FlopCount {
    type Output = FlopCount;

    fn add(self, o: FlopCount) -> FlopCount {
        FlopCount {
            linear: self.linear + o.linear,
            attention: self.attention + o.attention,
            conv: self.conv + o.conv,
        }
    }
}

impl std::ops::AddAssign for FlopCount {
    fn add_assign(&mut self, o: FlopCount) {
        *self = *self + o;
    }
}

impl std::iter::Sum for FlopCount {
    fn sum<I: Iterator<Item = FlopCount>>(iter: I) -> FlopCount {
        iter.fold(FlopCount::default(), |a, b| a + b)
    }
}

/// A network that maps a noisy latent x_t at time t (in the model's own timestep convention)
/// and its conditioning to a prediction.
pub trait Denoiser {
    fn forward(&self, x: &Tensor, t: &Tensor, cond: &Conditioning) -> Result<Tensor>;
    fn prediction(&self) -> Prediction;
}
