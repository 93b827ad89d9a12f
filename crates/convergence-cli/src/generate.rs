//! `convergence generate`: images from a model directory (the shipped Fashion-MNIST DiT by
//! default).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use convergence::pipelines::dit::DiTPipeline;
use convergence::viz::{save_grid, save_image};
use std::path::{Path, PathBuf};

/// Generate images with a model directory.
///
/// Class-conditional DiT: `--class sneaker -o out.png` writes one image; `--grid -o grid.png`
/// writes a grid with one row per class; `--num-images N -o DIR` writes N PNGs named
/// `<class id>_<index>.png` (of `--class`, or spread evenly over all classes).
#[derive(clap::Args)]
pub struct Args {
    /// Model directory with model_index.json (default: the shipped Fashion-MNIST DiT).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Class name or id (class-conditional models).
    #[arg(long = "class")]
    class: Option<String>,
    /// One grid image with a row per class (`--num-images` per row, default 8).
    #[arg(long)]
    grid: bool,
    /// Number of images (written to the directory given by -o).
    #[arg(long)]
    num_images: Option<usize>,
    /// Sampling steps (default: the model's recommendation).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (1 = off).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// euler | heun (flow models), ddim | ddpm (DDPM models).
    #[arg(long)]
    sampler: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG, or a directory with --num-images.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

/// The shipped model: ./models/fashion-dit, else next to the sources this binary was built from.
pub fn default_model() -> PathBuf {
    let local = PathBuf::from("models/fashion-dit");
    if local.join("model_index.json").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-dit")
}

pub fn run(a: Args) -> Result<()> {
    let dir = a.model.clone().unwrap_or_else(default_model);
    let pipe = DiTPipeline::load(&dir, &Device::Cpu).with_context(|| format!("loading {}", dir.display()))?;
    let steps = a.steps.unwrap_or(pipe.defaults.steps);
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let opts = pipe.options(a.sampler.as_deref(), a.guidance_scale, a.seed)?;
    let class = a.class.as_deref().map(|c| pipe.class_id(c)).transpose()?;
    let n_classes = pipe.labels.len() as u32;
    let labels: Vec<u32> = if a.grid {
        let per_row = a.num_images.unwrap_or(8) as u32;
        let rows: Vec<u32> = class.map(|c| vec![c]).unwrap_or_else(|| (0..n_classes).collect());
        rows.iter().flat_map(|&c| std::iter::repeat_n(c, per_row as usize)).collect()
    } else {
        let n = a.num_images.unwrap_or(1) as u32;
        (0..n).map(|i| class.unwrap_or(i % n_classes)).collect()
    };
    if labels.is_empty() {
        bail!("nothing to generate (--num-images 0)");
    }
    eprintln!(
        "{}: {} image(s), {steps} {:?} steps, guidance {}, seed {}",
        dir.display(),
        labels.len(),
        opts.sampler,
        opts.guidance,
        a.seed
    );
    let images = pipe.generate(&labels, &opts, steps, a.seed)?;
    if a.grid {
        save_grid(&images, a.num_images.unwrap_or(8), &a.out)?;
        println!("wrote {}", a.out.display());
    } else if a.num_images.is_some() {
        write_numbered(&images, &labels, &a.out)?;
    } else {
        save_image(&images.get(0)?, &a.out)?;
        println!("wrote {} ({})", a.out.display(), pipe.labels[labels[0] as usize]);
    }
    Ok(())
}

/// Writes `<class id>_<index>.png` files (index counted per class) into `dir`.
fn write_numbered(images: &Tensor, labels: &[u32], dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut counts = std::collections::HashMap::new();
    for (k, &c) in labels.iter().enumerate() {
        let i = counts.entry(c).or_insert(0usize);
        save_image(&images.get(k)?, &dir.join(format!("{c}_{i}.png")))?;
        *i += 1;
    }
    println!("wrote {} images to {}", labels.len(), dir.display());
    Ok(())
}
