//! Measuring a class-conditional image model: class accuracy and Fréchet classifier distance
//! (FCD) of generated samples, and the quality-vs-steps study of the seed (rectified flow with
//! Euler and Heun against a DDPM twin with DDIM); and the prompt faithfulness of the
//! text-to-image models trained here.

use crate::error::{Error, Result};
use crate::eval::{class_accuracy, fcd, Classifier};
use crate::flow::SamplerKind;
use crate::pipelines::dit::DiTPipeline;
use crate::train::data::Dataset;
use candle_core::{Device, Tensor};
use std::path::Path;

/// The reference split of Fashion-MNIST test: the first half supplies real samples for the
/// real-vs-real baseline, the second half is what every set is compared against.
pub struct Reference {
    pub real: Dataset,
    pub against: Tensor,
}

impl Reference {
    pub fn fashion_test(dev: &Device) -> Result<Self> {
        let test = crate::train::data::fashion_mnist("t10k")?;
        let half = test.len() / 2;
        let first: Vec<usize> = (0..half).collect();
        let second: Vec<usize> = (half..test.len()).collect();
        Ok(Reference { real: test.subset(&first)?, against: test.images(&second, dev)? })
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Score {
    pub images: usize,
    pub class_accuracy: f64,
    pub fcd: f64,
}

pub fn score(c: &Classifier, images: &Tensor, labels: &[u32], reference: &Reference) -> Result<Score> {
    Ok(Score {
        images: labels.len(),
        class_accuracy: class_accuracy(c, images, labels)?,
        fcd: fcd(c, images, &reference.against)?,
    })
}

/// Labels 0, 1, ..., k-1, 0, 1, ... for `n` images.
pub fn balanced_labels(n: usize, classes: usize) -> Vec<u32> {
    (0..n).map(|i| (i % classes) as u32).collect()
}

/// The honesty baselines at sample size `n`: `n` real test images (first half) and `n` images
/// of uniform noise, both against the second half.
pub fn baselines(c: &Classifier, reference: &Reference, n: usize, dev: &Device) -> Result<(Score, Score)> {
    let idx: Vec<usize> = (0..n.min(reference.real.len())).collect();
    let real = reference.real.images(&idx, dev)?;
    let labels = reference.real.labels(&idx, dev)?.to_vec1::<u32>()?;
    let noise = Tensor::rand(-1f32, 1f32, real.dims(), dev)?;
    Ok((score(c, &real, &labels, reference)?, score(c, &noise, &labels, reference)?))
}

/// One row of the step study.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StudyRow {
    pub method: String,
    pub steps: usize,
    /// Model evaluations per image (Heun: 2 n - 1).
    pub nfe: usize,
    pub score: Score,
}

/// Generates `n` balanced samples per (method, steps) setting, scores them, and writes a grid
/// per setting into `grids` (when given).
#[allow(clippy::too_many_arguments)]
pub fn step_study(
    methods: &[(&str, &DiTPipeline, SamplerKind)],
    steps: &[usize],
    n: usize,
    seed: u64,
    c: &Classifier,
    reference: &Reference,
    grids: Option<&Path>,
    mut progress: impl FnMut(&StudyRow),
) -> Result<Vec<StudyRow>> {
    let mut rows = vec![];
    for &(name, pipe, sampler) in methods {
        let labels = balanced_labels(n, pipe.labels.len());
        for &s in steps {
            let mut opts = pipe.options(None, Some(1.0), seed)?;
            opts.sampler = sampler;
            let images = pipe.generate(&labels, &opts, s, seed)?;
            if let Some(dir) = grids {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                let grid_idx: Vec<u32> = (0..(pipe.labels.len() * 8).min(n) as u32).collect();
                let grid = images.index_select(&Tensor::new(grid_idx.as_slice(), images.device())?, 0)?;
                let file = dir.join(format!("{}-{s:02}.png", name.replace(['+', ' '], "-")));
                crate::viz::save_grid(&grid, pipe.labels.len(), &file)?;
            }
            let nfe = if sampler == SamplerKind::Heun { (2 * s).saturating_sub(1) } else { s };
            let row = StudyRow {
                method: name.to_string(),
                steps: s,
                nfe,
                score: score(c, &images, &labels, reference)?,
            };
            progress(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Prompt faithfulness of a text-to-image pipeline trained here: one image per prompt (image k
/// from noise stream k of `seed`), judged by colour segmentation (`eval::prompt`). Returns the
/// report and the images [N, 3, H, W] in [-1, 1].
pub fn prompt_accuracy(
    pipe: &crate::pipelines::t2i::T2IPipeline,
    prompts: &[String],
    seed: u64,
    steps: usize,
    guidance: f64,
) -> Result<(crate::eval::prompt::PromptReport, Tensor)> {
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let images = pipe.generate(&refs, seed, steps, guidance)?;
    let (_, _, h, w) = images.dims4()?;
    let hwc = crate::viz::tensor_to_u8(&images.permute((0, 2, 3, 1))?)?;
    let report = crate::eval::prompt::evaluate(hwc.chunks(h * w * 3).zip(refs), w, h)?;
    Ok((report, images))
}

/// Prompts from a file: one per line, blank lines and `#` comments skipped.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        return Err(Error::config(path, "no prompts (one per line)"));
    }
    Ok(prompts)
}
