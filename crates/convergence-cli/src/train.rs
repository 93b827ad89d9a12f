//! `convergence train`: train a denoiser from a train.toml.

use anyhow::Result;
use candle_core::Device;
use std::path::PathBuf;

/// Train a denoiser (rectified flow or DDPM) as a train.toml describes.
///
/// Writes <out_dir>/checkpoint.safetensors every `checkpoint_every` steps (atomically),
/// <out_dir>/metrics.jsonl every step, and the EMA model as a diffusers directory in
/// <out_dir>/model at the end. The TOML format is documented in docs/TRAINING.md.
#[derive(clap::Args)]
pub struct Args {
    /// The training description (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Continue from <out_dir>/checkpoint.safetensors exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Stop after this many total steps (the run can be resumed later).
    #[arg(long)]
    until: Option<usize>,
    /// Write the checkpoint's EMA model as a pipeline directory to DIR and exit (no training;
    /// snapshots a run that is still going).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["resume", "until"])]
    export: Option<PathBuf>,
    /// With --export: the raw last-iterate weights instead of the EMA.
    #[arg(long, requires = "export")]
    raw: bool,
    /// With --export: store the weights as f32, f16 or bf16 (f16 halves a model to ship).
    #[arg(long, requires = "export", default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(dir) = a.export {
        let (trainer, data) = convergence::train::run::build(&a.config, true, &Device::Cpu)?;
        let dtype = match a.dtype.as_str() {
            "f16" => candle_core::DType::F16,
            "bf16" => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        };
        trainer.save_model(&dir, data.classes(), a.raw, dtype)?;
        trainer.plot_loss()?;
        println!(
            "exported the {} weights of step {} to {}",
            if a.raw { "raw" } else { "EMA" },
            trainer.step(),
            dir.display()
        );
        return Ok(());
    }
    let (mut trainer, data) = convergence::train::run::build(&a.config, a.resume, &Device::Cpu)?;
    convergence::train::run::run(&mut trainer, &data, a.until, false)?;
    println!("step {} of {}; outputs in {}", trainer.step(), trainer.cfg.steps, trainer.out_dir.display());
    Ok(())
}
