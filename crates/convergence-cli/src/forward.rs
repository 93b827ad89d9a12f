//! `convergence forward`: run a model on fixture-style inputs and write its outputs.

use anyhow::{Context, Result};
use candle_core::Device;
use convergence::weights::{load_model, read_safetensors, write_safetensors, LoadOptions};
use std::path::PathBuf;

/// Run any supported model on the `input.*` tensors of a safetensors file and write `output.*`.
///
/// The reference-check tool: feed it a fixture's io.safetensors (or your own inputs named by the
/// model's forward arguments, e.g. input.hidden_states, input.timestep, input.class_labels) and
/// compare its output with what diffusers computes.
#[derive(clap::Args)]
pub struct Args {
    /// A model directory (config.json + weights; class from `_class_name`) or an original-layout
    /// checkpoint file (.safetensors / .pt).
    #[arg(long)]
    model: PathBuf,
    /// Safetensors file holding `input.<argument>` tensors.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the `output.*` tensors (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Attention heads, for original checkpoints whose width matches no preset.
    #[arg(long)]
    num_heads: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    let opts = LoadOptions { num_heads: a.num_heads, ..Default::default() };
    let model = load_model(&a.model, &opts)?;
    let inputs = read_safetensors(&a.inputs, &Device::Cpu)?;
    let outputs = model.forward_io(&inputs)?;
    write_safetensors(&outputs, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let mut names: Vec<_> = outputs.iter().map(|(n, t)| format!("{n} {:?}", t.dims())).collect();
    names.sort();
    println!("{} -> {}: {}", model.class_name(), a.out.display(), names.join(", "));
    Ok(())
}
