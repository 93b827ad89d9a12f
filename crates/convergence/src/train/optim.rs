//! AdamW with linear warm-up, an optional linear cool-down, global-norm gradient clipping and an EMA of the weights. The state
//! is plain named tensors so a checkpoint can hold it and resume bit for bit.

use crate::kernels::{self, AdamStep};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Decay the learning rate linearly towards zero over the last this-many steps of the run
    /// (warm-up, constant, cool-down): the annealing buys most of what a cosine schedule would,
    /// while the run can still be extended before the cool-down starts (0 = constant to the end).
    #[serde(default)]
    pub cooldown_steps: usize,
    /// Clip the global gradient norm to this value (0 = off).
    #[serde(default)]
    pub grad_clip: f64,
}

fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}

/// One parameter with its moments (each its own storage: the CPU kernels update them in place).
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
}

impl Slot {
    /// A parameter with zero moments, each in its own storage.
    fn new(name: String, var: Var) -> Result<Slot> {
        Ok(Slot { name, m: var.zeros_like()?, v: var.zeros_like()?, var })
    }

    /// One AdamW update: in place by `kernels::adamw_in_place` (contiguous f32 on the CPU), else
    /// composed from tensor ops (the reference it is tested against).
    fn update(&mut self, g: &Tensor, s: &AdamStep) -> Result<()> {
        if !kernels::adamw_in_place(self.var.as_tensor(), g, &self.m, &self.v, s)? {
            self.composed_update(g, s)?;
        }
        Ok(())
    }

    fn composed_update(&mut self, g: &Tensor, s: &AdamStep) -> Result<()> {
        let ((b1, b2), g) = (s.betas, (g * s.clip)?);
        self.m = ((&self.m * b1)? + (&g * (1.0 - b1))?)?;
        self.v = ((&self.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let update = ((&self.m / s.c1)? / ((&self.v / s.c2)?.sqrt()? + s.eps)?)?;
        let decayed = (self.var.as_tensor() * (1.0 - s.lr * s.weight_decay))?;
        self.var.set(&(decayed - (update * s.lr)?)?)
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub slots: Vec<Slot>,
    /// Updates applied so far (bias correction uses step + 1).
    pub step: usize,
    /// The run's length, where the cool-down ends.
    pub total_steps: usize,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: Vec<(String, Var)>, total_steps: usize) -> Result<Self> {
        let slots = vars.into_iter().map(|(name, var)| Slot::new(name, var)).collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, slots, step: 0, total_steps })
    }

    /// The learning rate of update `step` (0-based): warm-up from lr / warmup_steps, then lr,
    /// then the cool-down down to lr / cooldown_steps at the last update.
    pub fn lr_at(&self, step: usize) -> f64 {
        let ramp = |done: usize, len: usize| if len == 0 { 1.0 } else { (done as f64 / len as f64).min(1.0) };
        let warm = ramp(step + 1, self.cfg.warmup_steps);
        let cool = ramp(self.total_steps.saturating_sub(step), self.cfg.cooldown_steps);
        self.cfg.lr * warm * cool
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                sq += match kernels::sum_squares(g)? {
                    Some(sum) => sum,
                    None => g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
                };
            }
        }
        Ok(sq.sqrt())
    }

    /// Applies one update; returns the (pre-clip) gradient norm.
    pub fn step(&mut self, grads: &GradStore) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        let clip = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            self.cfg.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        let (b1, b2) = self.cfg.betas;
        let t = (self.step + 1) as i32;
        let hyper = AdamStep {
            lr: self.lr_at(self.step),
            betas: self.cfg.betas,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            clip,
            c1: 1.0 - b1.powi(t),
            c2: 1.0 - b2.powi(t),
        };
        for s in &mut self.slots {
            // Detached: a gradient can carry the op graph it was computed through, which the
            // moments would otherwise keep alive step after step.
            if let Some(g) = grads.get(s.var.as_tensor()) {
                s.update(&g.detach().contiguous()?, &hyper)?;
            }
        }
        self.step += 1;
        Ok(norm)
    }

    /// Moments as named tensors (`adam_m.<name>`, `adam_v.<name>`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("adam_m.{}", s.name), s.m.clone());
            out.insert(format!("adam_v.{}", s.name), s.v.clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for s in &mut self.slots {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint: missing `{k}`")))
            };
            // Copies: the moments are updated in place, and must not write into the caller's map.
            s.m = get(format!("adam_m.{}", s.name))?.copy()?;
            s.v = get(format!("adam_v.{}", s.name))?.copy()?;
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of the weights (what we ship: smoother than the raw weights).
pub struct Ema {
    pub decay: f64,
    pub shadow: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(decay: f64, vars: &[(String, Var)]) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?.detach())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Ema { decay, shadow })
    }

    /// Sets the average to the current weights.
    pub fn reset(&mut self, vars: &[(String, Var)]) -> Result<()> {
        for ((_, e), (_, v)) in self.shadow.iter_mut().zip(vars) {
            *e = v.as_tensor().copy()?.detach();
        }
        Ok(())
    }

    /// The decay used after `step` updates: warmed up as (1 + step) / (10 + step) (diffusers'
    /// EMAModel), so a short run's average is not dominated by the random initialisation
    /// (a fixed 0.999 still weighs the init by 0.999^2000 = 13% after 2000 steps).
    pub fn decay_at(&self, step: usize) -> f64 {
        self.decay.min((1 + step) as f64 / (10 + step) as f64)
    }

    pub fn update(&mut self, vars: &[(String, Var)], step: usize) -> Result<()> {
        let d = self.decay_at(step);
        // Every tensor here is detached: an average that recorded its ops would keep each
        // step's predecessor alive (a leak of one model copy per step).
        for ((_, e), (_, v)) in self.shadow.iter_mut().zip(vars) {
            if !kernels::moving_average_in_place(e, v.as_tensor(), d)? {
                *e = ((&*e * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn adamw_first_step_moves_by_lr_and_minimises_quadratic() -> Result<()> {
        let var = Var::new(&[3f32, -2.0], &Device::Cpu)?;
        let cfg = AdamWConfig {
            lr: 0.1,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            cooldown_steps: 0,
            grad_clip: 0.0,
        };
        let mut opt = AdamW::new(cfg, vec![("w".into(), var.clone())], 1000)?;
        let loss = var.as_tensor().sqr()?.sum_all()?;
        opt.step(&loss.backward()?)?;
        // Adam's first step is lr * sign(g).
        let w = var.as_tensor().to_vec1::<f32>()?;
        assert!((w[0] - 2.9).abs() < 1e-5 && (w[1] + 1.9).abs() < 1e-5, "{w:?}");
        for _ in 0..300 {
            let loss = var.as_tensor().sqr()?.sum_all()?;
            opt.step(&loss.backward()?)?;
        }
        let w = var.as_tensor().to_vec1::<f32>()?;
        assert!(w.iter().all(|x| x.abs() < 0.05), "{w:?}");
        Ok(())
    }

    #[test]
    fn clipping_bounds_the_update_and_warmup_and_cooldown_scale_lr() -> Result<()> {
        let var = Var::new(&[1f32], &Device::Cpu)?;
        let cfg = AdamWConfig {
            lr: 1.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 4,
            cooldown_steps: 8,
            grad_clip: 1.0,
        };
        let mut opt = AdamW::new(cfg, vec![("w".into(), var.clone())], 100)?;
        assert_eq!(opt.lr_at(0), 0.25);
        assert_eq!(opt.lr_at(3), 1.0);
        assert_eq!(opt.lr_at(92), 1.0);
        // Cool-down over the last 8 of 100 updates: 7/8 at update 93, 1/8 at the last (99).
        assert_eq!(opt.lr_at(93), 0.875);
        assert_eq!(opt.lr_at(99), 0.125);
        let loss = (var.as_tensor() * 100.0)?.sum_all()?;
        let norm = opt.step(&loss.backward()?)?;
        assert!((norm - 100.0).abs() < 1e-3);
        Ok(())
    }

    #[test]
    fn in_place_adamw_matches_the_composed_update() -> Result<()> {
        // Clipping, weight decay and bias correction all active, over a few steps, on a tensor
        // big enough for several parallel chunks.
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., (3, 70_001), &dev)?;
        let slot = || Slot::new("w".into(), Var::from_tensor(&init.copy()?)?);
        let (fast, mut composed) = (slot()?, slot()?);
        for t in 1..=3 {
            let g = Tensor::randn(0f32, 1., (3, 70_001), &dev)?;
            let s = AdamStep {
                lr: 0.01,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.1,
                clip: 0.5,
                c1: 1.0 - 0.9f64.powi(t),
                c2: 1.0 - 0.999f64.powi(t),
            };
            assert!(kernels::adamw_in_place(fast.var.as_tensor(), &g, &fast.m, &fast.v, &s)?);
            composed.composed_update(&g, &s)?;
        }
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(diff(fast.var.as_tensor(), composed.var.as_tensor())? < 1e-6);
        assert!(diff(&fast.m, &composed.m)? < 1e-6 && diff(&fast.v, &composed.v)? < 1e-6);
        // The composed update changed the weights (the comparison is not between two no-ops).
        assert!(diff(composed.var.as_tensor(), &init)? > 1e-3);
        Ok(())
    }

    #[test]
    fn ema_tracks_weights() -> Result<()> {
        let var = Var::new(&[0f32], &Device::Cpu)?;
        let vars = vec![("w".to_string(), var.clone())];
        let mut ema = Ema::new(0.5, &vars)?;
        var.set(&Tensor::new(&[4f32], &Device::Cpu)?)?;
        // Warm-up: the first update uses decay min(0.5, 1/10) = 0.1.
        ema.update(&vars, 0)?;
        assert!((ema.shadow[0].1.to_vec1::<f32>()?[0] - 3.6).abs() < 1e-6);
        ema.update(&vars, 100)?;
        assert!((ema.shadow[0].1.to_vec1::<f32>()?[0] - 3.8).abs() < 1e-6);
        assert_eq!(ema.decay_at(1_000_000), 0.5);
        Ok(())
    }
}
