//! Seeded Gaussian noise from our own stream (ChaCha8 + Box-Muller): the same seed gives the same
//! numbers on every machine and device, which candle's global RNG does not promise.

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One standard normal draw.
pub fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A tensor of standard normal noise (f32).
pub fn randn(rng: &mut ChaCha8Rng, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| normal(rng) as f32).collect();
    Tensor::from_vec(v, shape, dev)
}

/// Standard normal noise of `shape` from `seed` alone.
pub fn seeded_randn(seed: u64, shape: &[usize], dev: &Device) -> Result<Tensor> {
    use rand::SeedableRng;
    randn(&mut ChaCha8Rng::seed_from_u64(seed), shape, dev)
}
