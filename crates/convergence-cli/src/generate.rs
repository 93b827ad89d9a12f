//! `convergence generate`: images from a model directory (the shipped Fashion-MNIST DiT by
//! default).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use convergence::pipelines::dit::DiTPipeline;
use convergence::viz::{save_grid, save_image, save_image_with_text};
use std::path::{Path, PathBuf};

/// Generate images with a pipeline directory (model_index.json).
///
/// Class-conditional DiT (the default model): `--class sneaker -o out.png` writes one image;
/// `--grid -o grid.png` writes a grid with one row per class; `--num-images N -o DIR` writes N
/// PNGs named `<class id>_<index>.png` (of `--class`, or spread evenly over all classes).
///
/// Text-to-image (StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline):
/// `--model DIR "a prompt" -o out.png`. SDXL with its refiner as an ensemble of experts:
/// `--model BASE --refiner REFINER --denoising-end 0.8 "a prompt" -o out.png`.
#[derive(clap::Args)]
pub struct Args {
    /// The prompt (text-to-image pipelines).
    prompt: Option<String>,
    /// What to steer away from (the unconditional side of classifier-free guidance).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image width in pixels (text-to-image; default 1024).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (text-to-image; default 1024).
    #[arg(long)]
    height: Option<usize>,
    /// T5 tokens (default: SD3 256, Flux 512).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// Flux: real classifier-free guidance against --negative-prompt (a second model call per
    /// step); --guidance-scale is then still the distilled guidance.
    #[arg(long)]
    true_cfg_scale: Option<f64>,
    /// Start from the `latents` tensor of this safetensors file instead of seeded noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Also write the final latents (`latents`) to this safetensors file.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// SDXL micro-conditioning: the original image size H,W (default: the output size).
    #[arg(long, value_parser = parse_pair, value_name = "H,W")]
    original_size: Option<(usize, usize)>,
    /// SDXL micro-conditioning: the crop's top-left corner T,L (default 0,0).
    #[arg(long, value_parser = parse_pair, value_name = "T,L")]
    crops_coords_top_left: Option<(usize, usize)>,
    /// SDXL micro-conditioning: the target size H,W (default: the output size).
    #[arg(long, value_parser = parse_pair, value_name = "H,W")]
    target_size: Option<(usize, usize)>,
    /// SDXL refiner: the aesthetic score to condition on (default 6).
    #[arg(long)]
    aesthetic_score: Option<f64>,
    /// SDXL refiner: the aesthetic score of the negative branch (default 2.5).
    #[arg(long)]
    negative_aesthetic_score: Option<f64>,
    /// SDXL: a refiner pipeline directory that finishes the image from --denoising-end.
    #[arg(long, value_name = "DIR")]
    refiner: Option<PathBuf>,
    /// SDXL: stop the base at this fraction of the schedule (0..1), e.g. 0.8 with --refiner.
    #[arg(long)]
    denoising_end: Option<f64>,
    /// SDXL img2img: continue from the `latents` tensor of this safetensors file (the output
    /// of a run with --denoising-end and --save-latents) ...
    #[arg(long, value_name = "FILE")]
    image_latents: Option<PathBuf>,
    /// ... starting at this fraction of the schedule (0..1).
    #[arg(long)]
    denoising_start: Option<f64>,
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

/// A shipped model: ./models/<name>, else next to the sources this binary was built from.
pub fn shipped_model(name: &str) -> PathBuf {
    let local = Path::new("models").join(name);
    if local.join("model_index.json").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").join(name)
}

/// The default model: the Fashion-MNIST DiT, or with a prompt the captioned-shapes MMDiT.
pub fn default_model(prompt: bool) -> PathBuf {
    shipped_model(if prompt { "shapes-mmdit" } else { "fashion-dit" })
}

/// The `_class_name` of a pipeline directory's model_index.json.
fn pipeline_class(dir: &Path) -> Result<String> {
    let v: serde_json::Value = convergence::weights::read_json(&dir.join("model_index.json"))?;
    Ok(v.get("_class_name").and_then(|c| c.as_str()).unwrap_or_default().to_string())
}

pub fn run(a: Args) -> Result<()> {
    let dir = a.model.clone().unwrap_or_else(|| default_model(a.prompt.is_some()));
    match pipeline_class(&dir)?.as_str() {
        convergence::pipelines::t2i::CLASS_NAME => return run_t2i(&dir, a),
        "StableDiffusion3Pipeline" => return run_sd3(&dir, a),
        "FluxPipeline" => return run_flux(&dir, a),
        "StableDiffusionXLPipeline" | "StableDiffusionXLImg2ImgPipeline" => return run_sdxl(&dir, a),
        "DiTPipeline" => {}
        other => bail!(
            "{}: pipeline `{other}` is not supported (DiTPipeline, StableDiffusionXLPipeline, \
             StableDiffusionXLImg2ImgPipeline, StableDiffusion3Pipeline, FluxPipeline, {})",
            dir.display(),
            convergence::pipelines::t2i::CLASS_NAME
        ),
    }
    if a.prompt.is_some() {
        bail!("{} is class-conditional: use --class instead of a prompt", dir.display());
    }
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
    if a.latents.is_some() || a.save_latents.is_some() {
        return run_dit_from_latents(&pipe, &dir, &a, labels, &opts, steps);
    }
    let images = pipe.generate(&labels, &opts, steps, a.seed)?;
    if a.grid {
        save_grid(&images, a.num_images.unwrap_or(8), &a.out)?;
        println!("wrote {}", a.out.display());
    } else if a.num_images.is_some() {
        write_numbered(&images, &labels, &a.out)?;
    } else {
        let label = pipe.labels[labels[0] as usize].clone();
        let text = [
            ("class", label.clone()),
            ("seed", a.seed.to_string()),
            ("steps", steps.to_string()),
            ("guidance_scale", opts.guidance.to_string()),
            ("model", dir.display().to_string()),
        ];
        save_image_with_text(&images.get(0)?, &a.out, &text)?;
        println!("wrote {} ({label})", a.out.display());
    }
    Ok(())
}

/// One DiT image from `--latents` (or the seeded noise), saving `--save-latents`.
fn run_dit_from_latents(
    pipe: &DiTPipeline,
    dir: &Path,
    a: &Args,
    labels: Vec<u32>,
    opts: &convergence::flow::SampleOptions,
    steps: usize,
) -> Result<()> {
    if a.grid || labels.len() != 1 {
        bail!("--latents and --save-latents work on one image: drop --grid and --num-images");
    }
    let noise = pipe.noise(a.seed, 0..1)?;
    let noise = match &a.latents {
        Some(f) => read_latents(f, noise.dims())?,
        None => noise,
    };
    let latents = pipe.denoise(&noise, &labels, opts, steps, progress_bar())?;
    let class = pipe.labels[labels[0] as usize].clone();
    finish(a, dir, steps, opts.guidance, &latents, &pipe.decode(&latents)?, Some(&class))
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

/// Checks a text-to-image size (default `default` x `default`) against the latent grid: VAE 8
/// x patch 2 for the transformers, VAE 8 for the UNet.
fn check_size(a: &Args, factor: usize, default: usize, why: &str) -> Result<(usize, usize)> {
    let (w, h) = (a.width.unwrap_or(default), a.height.unwrap_or(default));
    if w % factor != 0 || h % factor != 0 || w == 0 || h == 0 {
        let near = |x: usize| match x % factor {
            0 => x.to_string(),
            _ => format!("{} or {}", (x / factor).max(1) * factor, (x / factor + 1) * factor),
        };
        bail!("{w}x{h} is not a multiple of {factor} ({why}): try width {} and height {}", near(w), near(h));
    }
    Ok((w, h))
}

/// The transformers' latent grid: VAE factor 8 x patch 2.
fn check_transformer_size(a: &Args) -> Result<(usize, usize)> {
    check_size(a, 16, 1024, "VAE factor 8 x patch 2")
}

/// A progress bar over sampling steps, for `denoise`'s `on_step(done, total, latents)`.
fn progress_bar() -> impl FnMut(usize, usize, &Tensor) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {per_sec} ETA {eta}")
            .expect("a valid template"),
    );
    move |done, total, _| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if done == total {
            bar.finish_and_clear();
        }
    }
}

/// Parses "A,B" (sizes and coordinates).
fn parse_pair(s: &str) -> std::result::Result<(usize, usize), String> {
    let err = || format!("expected two whole numbers as A,B (e.g. 1024,1024), got `{s}`");
    let (a, b) = s.split_once(',').ok_or_else(err)?;
    Ok((a.trim().parse().map_err(|_| err())?, b.trim().parse().map_err(|_| err())?))
}

/// The initial noise: `--latents` or seeded.
fn initial_noise(a: &Args, shape: &[usize]) -> Result<Tensor> {
    match &a.latents {
        Some(f) => read_latents(f, shape),
        None => Ok(convergence::noise::seeded_randn(a.seed, shape, &Device::Cpu)?),
    }
}

/// The `latents` tensor of a safetensors file, checked against the expected shape.
fn read_latents(f: &Path, shape: &[usize]) -> Result<Tensor> {
    let t = convergence::weights::read_safetensors(f, &Device::Cpu)?
        .remove("latents")
        .with_context(|| format!("{}: no tensor named `latents`", f.display()))?;
    if t.dims() != shape {
        bail!("{}: `latents` has shape {:?}, this run needs {shape:?}", f.display(), t.dims());
    }
    Ok(t.to_dtype(candle_core::DType::F32)?)
}

/// Saves `--save-latents` and the decoded PNG with the prompt (or the class) and settings as
/// tEXt metadata.
fn finish(
    a: &Args,
    dir: &Path,
    steps: usize,
    guidance: f64,
    latents: &Tensor,
    image: &Tensor,
    class: Option<&str>,
) -> Result<()> {
    if let Some(f) = &a.save_latents {
        let t = std::collections::HashMap::from([("latents".to_string(), latents.clone())]);
        convergence::weights::write_safetensors(&t, f)?;
    }
    let mut text = match class {
        Some(c) => vec![("class", c.to_string())],
        None => vec![
            ("prompt", a.prompt.clone().unwrap_or_default()),
            ("negative_prompt", a.negative_prompt.clone().unwrap_or_default()),
        ],
    };
    text.extend([
        ("seed", a.seed.to_string()),
        ("steps", steps.to_string()),
        ("guidance_scale", guidance.to_string()),
        ("model", dir.display().to_string()),
    ]);
    if let Some(s) = a.true_cfg_scale {
        text.push(("true_cfg_scale", s.to_string()));
    }
    save_image_with_text(&image.get(0)?, &a.out, &text)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn warn(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn run_sd3(dir: &Path, a: Args) -> Result<()> {
    use convergence::pipelines::sd3::SD3Pipeline;
    let Some(prompt) = a.prompt.as_deref() else { bail!("text-to-image needs a prompt") };
    let (w, h) = check_transformer_size(&a)?;
    let pipe = SD3Pipeline::load(dir, a.max_sequence_length.unwrap_or(256), &Device::Cpu)?;
    let cond = pipe.encode_prompt(&[prompt])?;
    let uncond = pipe.encode_prompt(&[a.negative_prompt.as_deref().unwrap_or("")])?;
    warn(&cond.warnings);
    warn(&uncond.warnings);
    let noise = initial_noise(&a, &[1, pipe.vae.config().latent_channels, h / 8, w / 8])?;
    let (steps, guidance) = (a.steps.unwrap_or(28), a.guidance_scale.unwrap_or(7.0));
    eprintln!("{}: {steps} steps, guidance {guidance}, seed {}", dir.display(), a.seed);
    let latents = pipe.denoise(&noise, &cond, &uncond, steps, guidance, progress_bar())?;
    finish(&a, dir, steps, guidance, &latents, &pipe.decode(&latents)?, None)
}

fn run_flux(dir: &Path, a: Args) -> Result<()> {
    use convergence::models::flux::{pack_latents, unpack_latents};
    use convergence::pipelines::flux::FluxPipeline;
    let Some(prompt) = a.prompt.as_deref() else { bail!("text-to-image needs a prompt") };
    let (w, h) = check_transformer_size(&a)?;
    let pipe = FluxPipeline::load(dir, a.max_sequence_length.unwrap_or(512), &Device::Cpu)?;
    let cond = pipe.encode_prompt(&[prompt])?;
    warn(&cond.warnings);
    let negative = match (a.true_cfg_scale, a.negative_prompt.as_deref()) {
        (Some(s), Some(n)) if s > 1.0 => Some((pipe.encode_prompt(&[n])?, s)),
        (Some(s), None) if s > 1.0 => bail!("--true-cfg-scale needs --negative-prompt"),
        _ => None,
    };
    let (c, lh, lw) = (pipe.vae.config().latent_channels, h / 8, w / 8);
    // Flux pipelines exchange packed latents [1, (h/2)(w/2), 4C], as diffusers' `latents=` does.
    let noise = unpack_latents(&initial_noise(&a, &[1, (lh / 2) * (lw / 2), 4 * c])?, lh, lw)?;
    let (steps, guidance) = (a.steps.unwrap_or(28), a.guidance_scale.unwrap_or(3.5));
    eprintln!("{}: {steps} steps, guidance {guidance}, seed {}", dir.display(), a.seed);
    let negative = negative.as_ref().map(|(n, s)| (n, *s));
    let latents = pipe.denoise(&noise, &cond, negative, steps, guidance, progress_bar())?;
    finish(&a, dir, steps, guidance, &pack_latents(&latents)?, &pipe.decode(&latents)?, None)
}

fn run_sdxl(dir: &Path, a: Args) -> Result<()> {
    use convergence::pipelines::sdxl::{DenoiseOptions, Portion, SDXLPipeline};
    let Some(prompt) = a.prompt.as_deref() else { bail!("text-to-image needs a prompt") };
    let portion = match (a.denoising_end, a.denoising_start, &a.image_latents) {
        (Some(_), Some(_), _) => bail!("give --denoising-end or --denoising-start, not both"),
        (_, Some(_), None) => bail!("--denoising-start needs --image-latents FILE to start from"),
        (_, None, Some(_)) => bail!("--image-latents needs --denoising-start (the fraction they stopped at)"),
        (None, None, None) if a.refiner.is_some() => bail!("--refiner needs --denoising-end (e.g. 0.8)"),
        (Some(end), None, _) => Portion::Until(end),
        (None, Some(start), _) => Portion::From(start),
        (None, None, None) => Portion::All,
    };
    let unet: serde_json::Value = convergence::weights::read_json(&dir.join("unet/config.json"))?;
    let default = unet.get("sample_size").and_then(|s| s.as_u64()).unwrap_or(128) as usize * 8;
    let (w, h) = check_size(&a, 8, default, "the VAE factor")?;
    let micro = micro_conditioning(&a, h, w);
    let opts =
        DenoiseOptions { steps: a.steps.unwrap_or(50), guidance: a.guidance_scale.unwrap_or(5.0), portion };
    let negative = a.negative_prompt.as_deref().map(|n| vec![n]);
    // Each expert is loaded, run and dropped in turn, so only one is in memory.
    let run = |dir: &Path, start: &Tensor, opts: &DenoiseOptions| -> Result<(Tensor, Tensor)> {
        let pipe = SDXLPipeline::load(dir, &Device::Cpu)?;
        let cond = pipe.encode_prompt(&[prompt])?;
        let uncond = pipe.encode_negative(negative.as_deref(), &cond)?;
        warn(&cond.warnings);
        warn(&uncond.warnings);
        eprintln!(
            "{}: {:?} of {} steps, guidance {}, seed {}",
            dir.display(),
            opts.portion,
            opts.steps,
            opts.guidance,
            a.seed
        );
        let latents = pipe.denoise(start, &cond, &uncond, &micro, opts, progress_bar())?;
        Ok((pipe.decode(&latents)?, latents))
    };
    let shape = [1, 4, h / 8, w / 8];
    let start = match &a.image_latents {
        Some(f) => read_latents(f, &shape)?,
        None => initial_noise(&a, &shape)?,
    };
    let (mut image, mut latents) = run(dir, &start, &opts)?;
    if let (Some(refiner), Portion::Until(end)) = (&a.refiner, portion) {
        (image, latents) = run(refiner, &latents, &DenoiseOptions { portion: Portion::From(end), ..opts })?;
    }
    finish(&a, dir, opts.steps, opts.guidance, &latents, &image, None)
}

/// SDXL's micro-conditioning from the flags, with diffusers' defaults for an H x W image.
fn micro_conditioning(a: &Args, h: usize, w: usize) -> convergence::pipelines::sdxl::MicroConditioning {
    let mut m = convergence::pipelines::sdxl::MicroConditioning::new(h, w);
    m.original_size = a.original_size.unwrap_or(m.original_size);
    m.crops_coords_top_left = a.crops_coords_top_left.unwrap_or(m.crops_coords_top_left);
    m.target_size = a.target_size.unwrap_or(m.target_size);
    m.aesthetic_score = a.aesthetic_score.unwrap_or(m.aesthetic_score);
    m.negative_aesthetic_score = a.negative_aesthetic_score.unwrap_or(m.negative_aesthetic_score);
    m
}

/// The text-to-image models trained here: one image, `--num-images N` files `<index>.png` in
/// the directory -o names, or `--grid` (N samples, default 8, in a row).
fn run_t2i(dir: &Path, a: Args) -> Result<()> {
    use convergence::pipelines::t2i::T2IPipeline;
    let Some(prompt) = a.prompt.as_deref() else {
        bail!("{} is text-to-image: give a prompt", dir.display())
    };
    let pipe = T2IPipeline::load(dir, &Device::Cpu)?;
    let steps = a.steps.unwrap_or(pipe.defaults.steps);
    let guidance = a.guidance_scale.unwrap_or(pipe.defaults.guidance);
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let n = if a.grid { a.num_images.unwrap_or(8) } else { a.num_images.unwrap_or(1) };
    if n == 0 {
        bail!("nothing to generate (--num-images 0)");
    }
    let embeds = pipe.encode_prompt(&vec![prompt; n])?;
    warn(&embeds.warnings[..embeds.warnings.len().min(1)]);
    let noise = pipe.noise(a.seed, 0..n)?;
    let noise = match &a.latents {
        Some(f) => read_latents(f, noise.dims())?,
        None => noise,
    };
    eprintln!("{}: {n} image(s), {steps} steps, guidance {guidance}, seed {}", dir.display(), a.seed);
    let images = pipe.denoise(&noise, &embeds, steps, guidance, progress_bar())?;
    if a.grid {
        save_grid(&images, n, &a.out)?;
        println!("wrote {}", a.out.display());
    } else if a.num_images.is_some() {
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        for i in 0..n {
            save_image(&images.get(i)?, &a.out.join(format!("{i}.png")))?;
        }
        println!("wrote {n} images to {}", a.out.display());
    } else {
        finish(&a, dir, steps, guidance, &images, &images, None)?;
    }
    Ok(())
}
