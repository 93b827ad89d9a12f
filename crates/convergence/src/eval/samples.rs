//! Scoring a directory of generated Fashion-MNIST samples: PNGs named `<class id>_<index>.png`
//! (28x28 grey), judged for class accuracy and for FCD against a reference set (the test split).

use super::classifier::Classifier;
use super::frechet::{frechet_distance, Gaussian};
use crate::error::{Error, Result};
use crate::train::data::{read_image, Channels, Dataset, Size};
use candle_core::{Device, Tensor};
use std::fmt;
use std::path::{Path, PathBuf};

/// Accuracy on the samples meant to be one class.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassScore {
    pub class: u32,
    pub images: usize,
    pub accuracy: f64,
}

/// What `evaluate_dir` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleReport {
    pub images: usize,
    /// Fraction classified as the class in their file name.
    pub class_accuracy: f64,
    /// Per intended class, only classes that have samples.
    pub per_class: Vec<ClassScore>,
    /// Fréchet classifier distance to the reference set (not FID; see `eval::frechet`).
    pub fcd: f64,
    pub reference_images: usize,
}

impl fmt::Display for SampleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} images: class accuracy {:.2}%, FCD {:.3} (vs {} reference images)",
            self.images,
            100.0 * self.class_accuracy,
            self.fcd,
            self.reference_images
        )?;
        for c in &self.per_class {
            writeln!(f, "  class {}: {:.2}% of {}", c.class, 100.0 * c.accuracy, c.images)?;
        }
        Ok(())
    }
}

/// Parses `<class id>_<index>.png` into (class, index).
fn parse_name(path: &Path) -> Option<(u32, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".png")?;
    let (class, index) = name.split_once('_')?;
    Some((class.parse().ok()?, index.parse().ok()?))
}

/// Reads every `<class id>_<index>.png` in `dir` (other files are ignored; a PNG with another
/// name is an error) as images [N, 1, 28, 28] in [-1, 1] with their class ids, sorted by
/// (class, index). `classes` bounds the ids.
pub fn read_sample_dir(dir: &Path, classes: usize, dev: &Device) -> Result<(Tensor, Vec<u32>)> {
    let mut files: Vec<(u32, u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("png") {
            continue;
        }
        let (class, index) = parse_name(&path)
            .ok_or_else(|| Error::config(&path, "expected a sample named `<class id>_<index>.png`"))?;
        if class as usize >= classes {
            return Err(Error::config(
                &path,
                format!("class id {class} out of range (the classifier has {classes})"),
            ));
        }
        files.push((class, index, path));
    }
    if files.is_empty() {
        return Err(Error::config(dir, "no samples named `<class id>_<index>.png`"));
    }
    files.sort();
    let mut pixels = Vec::with_capacity(files.len() * 784);
    for (_, _, path) in &files {
        let img = read_image(path, Channels::Grey, Size::Check { height: 28, width: 28 })?;
        pixels.extend(img.pixels.iter().map(|&p| p as f32 / 127.5 - 1.0));
    }
    let images = Tensor::from_vec(pixels, (files.len(), 1, 28, 28), dev)?;
    Ok((images, files.into_iter().map(|(c, _, _)| c).collect()))
}

/// Class accuracy and FCD of the samples in `dir` against `reference` (e.g. the test split).
pub fn evaluate_dir(classifier: &Classifier, dir: &Path, reference: &Dataset) -> Result<SampleReport> {
    let dev = Device::Cpu;
    let (images, labels) = read_sample_dir(dir, classifier.num_classes(), &dev)?;
    let predicted = classifier.predict(&images)?;
    let per_class: Vec<ClassScore> = (0..classifier.num_classes() as u32)
        .filter_map(|class| {
            let mine: Vec<bool> =
                labels.iter().zip(&predicted).filter(|(l, _)| **l == class).map(|(l, p)| l == p).collect();
            (!mine.is_empty()).then(|| ClassScore {
                class,
                images: mine.len(),
                accuracy: mine.iter().filter(|&&hit| hit).count() as f64 / mine.len() as f64,
            })
        })
        .collect();
    let hits = labels.iter().zip(&predicted).filter(|(l, p)| l == p).count();
    let all: Vec<usize> = (0..reference.len()).collect();
    let reference_stats = Gaussian::fit(&classifier.features(&reference.images(&all, &dev)?)?)?;
    let sample_stats = Gaussian::fit(&classifier.features(&images)?)?;
    Ok(SampleReport {
        images: labels.len(),
        class_accuracy: hits as f64 / labels.len() as f64,
        per_class,
        fcd: frechet_distance(&sample_stats, &reference_stats)?,
        reference_images: reference.len(),
    })
}
