//! `convergence attention`: the joint-attention maps of a text-to-image MMDiT as PNGs.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use convergence::models::any::AnyModel;
use convergence::nn::AttentionCapture;
use convergence::pipelines::t2i::{T2IPipeline, CLASS_NAME};
use convergence::viz::attention::{word_positions, write_attention_maps, AttentionFigures, StepChoice};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The flags of `convergence attention` (its help text is the subcommand's doc in main.rs).
#[derive(clap::Args)]
pub struct Args {
    /// The prompt, e.g. "a red circle left of a blue square".
    prompt: String,
    /// Model directory (a ConvergenceT2IPipeline with an SD3Transformer2DModel; default: the
    /// shipped models/shapes-mmdit).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output directory (created).
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
    /// Layers (joint blocks, counted from 0), comma-separated, e.g. 0,3 (default: all).
    #[arg(long, value_delimiter = ',', value_name = "L,..")]
    layers: Vec<usize>,
    /// Heads to draw one by one, comma-separated (default: the mean over heads).
    #[arg(long, value_delimiter = ',', value_name = "H,..")]
    heads: Vec<usize>,
    /// Sampling step to draw, 1 (noisiest) to --steps (default: the last, where the image is
    /// formed), or `all` for the mean over steps.
    #[arg(long, value_name = "N|all")]
    step: Option<String>,
    /// Sampling steps (default: the model's recommendation).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (1 = off; default: the model's recommendation).
    #[arg(long)]
    guidance_scale: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The layer and head counts and the patch grid of an MMDiT transformer.
fn mmdit_shape(dir: &Path, model: &AnyModel) -> Result<(usize, usize, (usize, usize))> {
    match model {
        AnyModel::SD3(m) => {
            let c = m.config();
            let g = c.sample_size / c.patch_size;
            Ok((c.num_layers, c.num_attention_heads, (g, g)))
        }
        other => bail!(
            "{}: the transformer is a {}, which has no joint attention (attention maps need an MMDiT, \
             SD3Transformer2DModel)",
            dir.display(),
            other.class_name()
        ),
    }
}

/// Sorted, de-duplicated indices, each below `count`.
fn checked(what: &str, mut v: Vec<usize>, count: usize, dir: &Path) -> Result<Vec<usize>> {
    v.sort_unstable();
    v.dedup();
    if let Some(&bad) = v.iter().find(|&&i| i >= count) {
        bail!("{what} {bad} does not exist: {} has {what}s 0-{}", dir.display(), count - 1);
    }
    Ok(v)
}

fn parse_step(step: Option<&str>, steps: usize) -> Result<StepChoice> {
    match step {
        None => Ok(StepChoice::Call(steps - 1)),
        Some("all") => Ok(StepChoice::Mean),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=steps).contains(&n) => Ok(StepChoice::Call(n - 1)),
            _ => bail!("--step {s}: give a step from 1 to {steps} (the sampling steps), or `all`"),
        },
    }
}

pub fn run(a: Args) -> Result<()> {
    let dir = a.model.clone().unwrap_or_else(|| crate::generate::default_model(true));
    if !dir.join("model_index.json").exists() {
        bail!(
            "{}: no model_index.json (train the shipped model with `convergence train --config \
             configs/shapes-mmdit.toml --export {}`, or give --model DIR)",
            dir.display(),
            dir.display()
        );
    }
    let index: serde_json::Value = convergence::weights::read_json(&dir.join("model_index.json"))?;
    let class = index.get("_class_name").and_then(|c| c.as_str()).unwrap_or_default();
    if class != CLASS_NAME {
        bail!("{}: pipeline `{class}`: attention maps are drawn for {CLASS_NAME} models", dir.display());
    }
    let mut pipe =
        T2IPipeline::load(&dir, &Device::Cpu).with_context(|| format!("loading {}", dir.display()))?;
    let (n_layers, n_heads, grid) = mmdit_shape(&dir, &pipe.transformer)?;
    let layers = checked("layer", a.layers.clone(), n_layers, &dir)?;
    let heads = checked("head", a.heads.clone(), n_heads, &dir)?;
    let steps = a.steps.unwrap_or(pipe.defaults.steps);
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let guidance = a.guidance_scale.unwrap_or(pipe.defaults.guidance);
    let step = parse_step(a.step.as_deref(), steps)?;

    let drawn = if layers.is_empty() { (0..n_layers).collect() } else { layers.clone() };
    let mut capture = AttentionCapture::new(drawn.len() * steps).layers(&drawn);
    if !heads.is_empty() {
        capture = capture.heads(&heads);
    }
    let capture = Arc::new(capture);
    pipe.transformer.set_attention_capture(Some(capture.clone()))?;

    let tokenizer = &pipe.text_encoder.tokenizer;
    let tokenized = tokenizer.encode(&a.prompt)?;
    let texts = tokenized
        .input_ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]))
        .collect::<convergence::Result<Vec<_>>>()?;
    let words = word_positions(&texts, &tokenized.attention_mask);
    let embeds = pipe.encode_prompt(&[a.prompt.as_str()])?;
    for w in embeds.warnings.iter().take(1) {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "{}: {steps} steps, guidance {guidance}, seed {}; layers {}, {}",
        dir.display(),
        a.seed,
        drawn.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
        if heads.is_empty() {
            "mean over heads".to_string()
        } else {
            format!("heads {}", heads.iter().map(|h| h.to_string()).collect::<Vec<_>>().join(","))
        }
    );
    let noise = pipe.noise(a.seed, 0..1)?;
    let images = pipe.denoise(&noise, &embeds, steps, guidance, |_, _, _| {})?;
    let maps = capture.take();
    if capture.dropped() > 0 {
        bail!("attention capture: {} maps were dropped (capacity too small)", capture.dropped());
    }
    // Under guidance the model saw [uncond, cond]: the conditional image is the last.
    let batch = maps.first().map_or(Ok(1), |m| m.image_to_text.dim(0))?.saturating_sub(1);
    let image = images.get(0)?;
    let figures =
        AttentionFigures { image: &image, grid, tokens: &texts, words: &words, scale: 8, alpha: 0.6 };
    let written = write_attention_maps(&maps, &figures, &drawn, batch, step, &a.out)?;
    println!("wrote {} files to {}:", written.len(), a.out.display());
    for p in &written {
        println!(
            "  {}",
            p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
        );
    }
    Ok(())
}
