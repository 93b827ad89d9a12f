//! `convergence schedule`: a scheduler's timesteps and sigmas, as diffusers computes them.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use convergence::flow::Scheduler;
use std::collections::HashMap;
use std::path::PathBuf;

/// Print (and optionally save) the timesteps and sigmas of a scheduler_config.json for N steps.
///
/// Flux-style configs (use_dynamic_shifting) need the image token count (--image-seq-len, e.g.
/// 4096 for 1024x1024) or the shift exponent directly (--mu).
#[derive(clap::Args)]
pub struct Args {
    /// A diffusers scheduler_config.json.
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    steps: usize,
    #[arg(long, conflicts_with = "mu")]
    image_seq_len: Option<usize>,
    #[arg(long)]
    mu: Option<f64>,
    /// Write `timesteps` and `sigmas` (float32) to this safetensors file.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let scheduler = Scheduler::from_config_file(&a.config)?;
    let s = scheduler.set_timesteps(a.steps, a.mu, a.image_seq_len)?;
    println!("{} ({} steps)", scheduler.config.class_name(), a.steps);
    println!("timesteps: {:?}", s.timesteps);
    if !s.sigmas.is_empty() {
        println!("sigmas:    {:?}", s.sigmas);
    }
    if let Some(out) = a.out {
        let mut t = HashMap::new();
        t.insert("timesteps".to_string(), Tensor::new(s.timesteps.as_slice(), &Device::Cpu)?);
        if !s.sigmas.is_empty() {
            t.insert("sigmas".to_string(), Tensor::new(s.sigmas.as_slice(), &Device::Cpu)?);
        }
        convergence::weights::write_safetensors(&t, &out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
