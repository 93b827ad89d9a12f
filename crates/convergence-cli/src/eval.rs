//! `convergence eval`: class accuracy and Fréchet classifier distance of generated images.

use anyhow::{bail, Result};
use candle_core::Device;
use convergence::eval::{bundled_dir, read_sample_dir, Classifier};
use convergence::pipelines::dit::DiTPipeline;
use convergence::study::{balanced_labels, baselines, score, Reference, Score};
use std::path::PathBuf;

/// Score a Fashion-MNIST model (or a folder of its PNGs) with the project's classifier, or with
/// `--prompts FILE` a text-to-image model trained here on the captioned shapes.
///
/// Prompts: one image per prompt line, judged without a learned model (colour segmentation,
/// geometric shape tests, centroid relations); prints per-attribute and whole-prompt accuracy.
///
/// Fashion-MNIST: prints class accuracy (is a sample conditioned on "sneaker" classified as sneaker?) and the
/// Fréchet classifier distance (FCD: Fréchet distance between the classifier's penultimate
/// features of the samples and of real test images; not Inception FID), next to the same numbers
/// for real test images and for noise at the same sample size.
#[derive(clap::Args)]
pub struct Args {
    /// Captions to judge a text-to-image model on, one per line (default model: the shipped
    /// shapes MMDiT); e.g. docs/conditioning/prompts-seen.txt or prompts-held-out.txt.
    #[arg(long, conflicts_with = "samples")]
    prompts: Option<PathBuf>,
    /// A model directory to sample from (default: the shipped Fashion-MNIST DiT).
    #[arg(long, conflicts_with = "samples")]
    model: Option<PathBuf>,
    /// A directory of `<class id>_<index>.png` files (28x28 grey) to score instead.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Images to generate (balanced over the classes).
    #[arg(long, default_value_t = 1000)]
    num_images: usize,
    /// Sampling steps (default: the model's own, from its scheduler config).
    #[arg(long)]
    steps: Option<usize>,
    /// Fashion-MNIST sampler: euler, heun, ddim or ddpm (default: the model's own).
    #[arg(long)]
    sampler: Option<String>,
    /// Classifier-free guidance scale (default: the model's own).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The classifier directory (default: models/fashion-classifier).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn line(name: &str, s: &Score) -> String {
    format!(
        "{name:<28} {:>6} images  class accuracy {:>6.2}%  FCD {:>8.3}",
        s.images,
        100.0 * s.class_accuracy,
        s.fcd
    )
}

pub fn run(a: Args) -> Result<()> {
    if let Some(prompts) = &a.prompts {
        return run_prompts(&a, prompts);
    }
    let dev = Device::Cpu;
    let classifier = Classifier::load(&a.classifier.clone().unwrap_or_else(bundled_dir), &dev)?;
    let reference = Reference::fashion_test(&dev)?;
    let (name, generated) = if let Some(dir) = &a.samples {
        let (images, labels) = read_sample_dir(dir, classifier.num_classes(), &dev)?;
        (dir.display().to_string(), score(&classifier, &images, &labels, &reference)?)
    } else {
        let dir = a.model.clone().unwrap_or_else(|| crate::generate::default_model(false));
        let pipe = DiTPipeline::load(&dir, &dev)?;
        if a.num_images < 2 {
            bail!("--num-images must be at least 2 (a covariance needs two samples)");
        }
        let steps = a.steps.unwrap_or(pipe.defaults.steps);
        let opts = pipe.options(a.sampler.as_deref(), a.guidance_scale, a.seed)?;
        let labels = balanced_labels(a.num_images, pipe.labels.len());
        eprintln!(
            "sampling {} images ({steps} {:?} steps, guidance {}) ...",
            labels.len(),
            opts.sampler,
            opts.guidance
        );
        let images = pipe.generate(&labels, &opts, steps, a.seed)?;
        (format!("{} ({steps} steps)", dir.display()), score(&classifier, &images, &labels, &reference)?)
    };
    let (real, noise) = baselines(&classifier, &reference, generated.images, &dev)?;
    if a.json {
        let v = serde_json::json!({"model": name, "generated": generated, "real": real, "noise": noise,
            "classifier_test_accuracy": classifier.meta.test_accuracy});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("reference: the 5000 images of the second half of Fashion-MNIST test");
        println!("{}", line(&name, &generated));
        println!("{}", line("real test images (1st half)", &real));
        println!("{}", line("uniform noise", &noise));
        if let Some(acc) = classifier.meta.test_accuracy {
            println!("classifier test accuracy: {:.2}%", 100.0 * acc);
        }
    }
    Ok(())
}

fn run_prompts(a: &Args, file: &std::path::Path) -> Result<()> {
    use convergence::pipelines::t2i::T2IPipeline;
    let prompts = convergence::study::read_prompts(file)?;
    let dir = a.model.clone().unwrap_or_else(|| crate::generate::default_model(true));
    let pipe = T2IPipeline::load(&dir, &Device::Cpu)?;
    let steps = a.steps.unwrap_or(pipe.defaults.steps);
    let guidance = a.guidance_scale.unwrap_or(pipe.defaults.guidance);
    eprintln!(
        "{}: {} prompts, {steps} steps, guidance {guidance}, seed {} ...",
        dir.display(),
        prompts.len(),
        a.seed
    );
    let (report, _) = convergence::study::prompt_accuracy(&pipe, &prompts, a.seed, steps, guidance)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": dir.display().to_string(), "prompts": file.display().to_string(),
                "steps": steps, "guidance": guidance, "report": report,
            }))?
        );
    } else {
        println!(
            "{} on {} ({} prompts, {steps} steps, guidance {guidance})",
            dir.display(),
            file.display(),
            prompts.len()
        );
        print!("{report}");
    }
    Ok(())
}
