//! Training objectives: rectified flow (x_t = (1-t) x0 + t eps, target eps - x0) with the SD3
//! paper's timestep samplers, and DDPM epsilon prediction for comparison.

use crate::models::{Conditioning, Denoiser};
use crate::noise::{normal, randn};
use candle_core::{Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How training timesteps t in (0, 1) are drawn for rectified flow.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TimestepSampling {
    Uniform,
    /// t = sigmoid(n), n ~ N(mean, std): concentrates training on the middle of the path.
    LogitNormal {
        mean: f64,
        std: f64,
    },
    /// SD3's mode sampling: t = 1 - u - s (cos^2(pi u / 2) - 1 + u).
    Mode {
        scale: f64,
    },
}

impl TimestepSampling {
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> f64 {
        match *self {
            TimestepSampling::Uniform => rng.gen::<f64>(),
            TimestepSampling::LogitNormal { mean, std } => 1.0 / (1.0 + (-(mean + std * normal(rng))).exp()),
            TimestepSampling::Mode { scale } => {
                let u: f64 = rng.gen();
                1.0 - u - scale * ((std::f64::consts::FRAC_PI_2 * u).cos().powi(2) - 1.0 + u)
            }
        }
    }

    /// The exact CDF of t where it has a closed form (uniform, logit-normal).
    pub fn cdf(&self, t: f64) -> Option<f64> {
        match *self {
            TimestepSampling::Uniform => Some(t.clamp(0.0, 1.0)),
            TimestepSampling::LogitNormal { mean, std } => {
                let z = ((t / (1.0 - t)).ln() - mean) / std;
                Some(0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2)))
            }
            TimestepSampling::Mode { .. } => None,
        }
    }
}

/// erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7, ample for a KS test).
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let poly =
        t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let y = 1.0 - poly * (-x * x).exp();
    if x >= 0.0 {
        y
    } else {
        -y
    }
}

/// DDPM's linear beta schedule (DiT: 1e-4 .. 0.02 over 1000 steps) as cumulative alphas.
pub fn linear_alphas_cumprod(n: usize, beta_start: f64, beta_end: f64) -> Vec<f64> {
    let mut acc = 1.0;
    (0..n)
        .map(|i| {
            let beta = beta_start + (beta_end - beta_start) * i as f64 / (n - 1) as f64;
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Objective {
    /// Rectified flow; the model sees t scaled by `timestep_scale` (1000: DiT/SD3 convention).
    RectifiedFlow {
        timesteps: TimestepSampling,
        #[serde(default = "thousand")]
        timestep_scale: f64,
    },
    /// DDPM epsilon prediction over `num_train_timesteps` with linear betas.
    DdpmEpsilon {
        #[serde(default = "thousand_usize")]
        num_train_timesteps: usize,
    },
}

fn thousand() -> f64 {
    1000.0
}
fn thousand_usize() -> usize {
    1000
}

impl Objective {
    /// The noised input, the model timestep and the regression target for clean x0.
    pub fn corrupt(&self, x0: &Tensor, rng: &mut ChaCha8Rng) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, dev) = (x0.dim(0)?, x0.device());
        let eps = randn(rng, x0.dims(), dev)?;
        let per_sample = |v: Vec<f32>| -> Result<Tensor> {
            let mut shape = vec![b];
            shape.resize(x0.rank(), 1);
            Tensor::from_vec(v, shape, dev)
        };
        match self {
            Objective::RectifiedFlow { timesteps, timestep_scale } => {
                let t: Vec<f32> = (0..b).map(|_| timesteps.sample(rng) as f32).collect();
                let tt = per_sample(t.clone())?;
                let x_t = (x0.broadcast_mul(&(1.0 - &tt)?)? + eps.broadcast_mul(&tt)?)?;
                let model_t = (Tensor::from_vec(t, b, dev)? * *timestep_scale)?;
                Ok((x_t, model_t, (eps - x0)?))
            }
            Objective::DdpmEpsilon { num_train_timesteps } => {
                let acp = linear_alphas_cumprod(*num_train_timesteps, 1e-4, 0.02);
                let t: Vec<usize> = (0..b).map(|_| rng.gen_range(0..*num_train_timesteps)).collect();
                let a = per_sample(t.iter().map(|&i| acp[i].sqrt() as f32).collect())?;
                let s = per_sample(t.iter().map(|&i| (1.0 - acp[i]).sqrt() as f32).collect())?;
                let x_t = (x0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?;
                let model_t = Tensor::from_vec(t.iter().map(|&i| i as f32).collect::<Vec<_>>(), b, dev)?;
                Ok((x_t, model_t, eps))
            }
        }
    }

    /// Mean squared error of the model's prediction (the first `C` channels when the model
    /// also predicts a variance) against the objective's target.
    pub fn loss(
        &self,
        model: &dyn Denoiser,
        x0: &Tensor,
        cond: &Conditioning,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let (x_t, t, target) = self.corrupt(x0, rng)?;
        let pred = model.forward(&x_t, &t, cond)?;
        let pred = pred.narrow(1, 0, x0.dim(1)?)?;
        (pred - target)?.sqr()?.mean_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    #[test]
    fn logit_normal_matches_exact_cdf_ks() {
        let s = TimestepSampling::LogitNormal { mean: 0.3, std: 1.2 };
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let n = 20000;
        let mut v: Vec<f64> = (0..n).map(|_| s.sample(&mut rng)).collect();
        v.sort_by(f64::total_cmp);
        let d = v
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = s.cdf(x).unwrap();
                (f - i as f64 / n as f64).abs().max(((i + 1) as f64 / n as f64 - f).abs())
            })
            .fold(0.0, f64::max);
        // 1% critical value of the KS statistic: 1.63 / sqrt(n).
        assert!(d < 1.63 / (n as f64).sqrt(), "KS statistic {d}");
        // ... and a clearly different distribution is rejected.
        let other = TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 };
        let d2 = v
            .iter()
            .enumerate()
            .map(|(i, &x)| (other.cdf(x).unwrap() - i as f64 / n as f64).abs())
            .fold(0.0, f64::max);
        assert!(d2 > 1.63 / (n as f64).sqrt(), "KS should reject: {d2}");
    }

    #[test]
    fn mode_sampling_stays_in_unit_interval() {
        let s = TimestepSampling::Mode { scale: 1.29 };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!((0..1000).map(|_| s.sample(&mut rng)).all(|t| (0.0..=1.0).contains(&t)));
    }

    struct Oracle {
        x0: Tensor,
    }
    impl Denoiser for Oracle {
        // Knows x0, so it can return eps - x0 exactly from x_t and t: eps = (x_t - (1-t) x0) / t.
        fn forward(&self, x_t: &Tensor, t: &Tensor, _: &Conditioning) -> Result<Tensor> {
            let t = (t / 1000.0)?.reshape(((), 1, 1, 1))?;
            let eps = (x_t - self.x0.broadcast_mul(&(1.0 - &t)?)?)?.broadcast_div(&t)?;
            eps - &self.x0
        }
        fn prediction(&self) -> crate::models::Prediction {
            crate::models::Prediction::Velocity
        }
    }

    #[test]
    fn rf_loss_of_exact_velocity_is_zero() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x0 = randn(&mut rng, &[4, 1, 3, 3], &Device::Cpu).unwrap();
        let obj = Objective::RectifiedFlow { timesteps: TimestepSampling::Uniform, timestep_scale: 1000.0 };
        let loss = obj.loss(&Oracle { x0: x0.clone() }, &x0, &Conditioning::default(), &mut rng).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap() < 1e-8);
        let wrong = Oracle { x0: (x0.clone() * 0.5).unwrap() };
        assert!(
            obj.loss(&wrong, &x0, &Conditioning::default(), &mut rng).unwrap().to_scalar::<f32>().unwrap()
                > 1e-3
        );
    }

    #[test]
    fn ddpm_alphas_match_dit_schedule() {
        let acp = linear_alphas_cumprod(1000, 1e-4, 0.02);
        assert!((acp[0] - 0.9999).abs() < 1e-12);
        // diffusers DDPMScheduler(linear) alphas_cumprod[-1] = 4.0358e-05
        assert!((acp[999] - 4.0358e-5).abs() < 1e-8, "{}", acp[999]);
    }
}
