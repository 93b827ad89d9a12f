//! A compact CNN for 28x28 grey Fashion-MNIST images: the judge for generated samples (class
//! accuracy) and the feature extractor for the Fréchet classifier distance. It is small enough
//! to train on two CPU cores in minutes and to commit (`models/fashion-classifier/`, < 1 MB).
//!
//! conv3x3/2(1->16) relu -> conv3x3/2(16->32) relu -> linear(1568->128) relu [= features] ->
//! linear(128->classes). Conv weights are stored as PyTorch lays them out ([O, C, 3, 3]); the
//! feature maps are channels-last, so `fc1` reads conv2's 7x7x32 map flattened as (y, x, c).

use crate::error::{Error, Result};
use crate::train::data::Dataset;
use crate::weights::{read_json, write_safetensors, WeightStore};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Linear, Module, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Names this layer layout in `classifier.json`, so a different network is refused on load.
pub const ARCHITECTURE: &str = "fashion-cnn-v1";
/// Input images: 1 channel, 28x28, in [-1, 1].
pub const IMAGE_SHAPE: [usize; 3] = [1, 28, 28];
/// Width of the penultimate layer, i.e. of `features`.
pub const FEATURE_DIM: usize = 128;
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const META_FILE: &str = "classifier.json";

const CONV1: usize = 16;
const CONV2: usize = 32;
const FLAT: usize = CONV2 * 7 * 7;
const BATCH: usize = 128;
const PEAK_LR: f64 = 2e-3;
/// Images per forward pass when evaluating; bounds memory, not results.
const EVAL_CHUNK: usize = 1000;

/// The committed classifier: `models/fashion-classifier/` at the repository root.
pub fn bundled_dir() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // crates/convergence -> the workspace root.
    let root = crate_dir.ancestors().nth(2).unwrap_or(crate_dir);
    root.join("models/fashion-classifier")
}

/// What `classifier.json` records next to the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierMeta {
    pub architecture: String,
    /// [channels, height, width] of the input images.
    pub image_shape: [usize; 3],
    /// Class names in id order.
    pub classes: Vec<String>,
    pub feature_dim: usize,
    pub epochs: usize,
    pub seed: u64,
    /// Accuracy on the Fashion-MNIST test split, once measured.
    pub test_accuracy: Option<f64>,
}

/// One tensor of the network: name, shape and fan-in (for initialisation).
struct Param {
    name: &'static str,
    shape: Vec<usize>,
    fan_in: usize,
}

fn params(classes: usize) -> Vec<Param> {
    let p = |name, shape: &[usize], fan_in| Param { name, shape: shape.to_vec(), fan_in };
    vec![
        p("conv1.weight", &[CONV1, 1, 3, 3], 9),
        p("conv1.bias", &[CONV1], 9),
        p("conv2.weight", &[CONV2, CONV1, 3, 3], CONV1 * 9),
        p("conv2.bias", &[CONV2], CONV1 * 9),
        p("fc1.weight", &[FEATURE_DIM, FLAT], FLAT),
        p("fc1.bias", &[FEATURE_DIM], FLAT),
        p("fc2.weight", &[classes, FEATURE_DIM], FEATURE_DIM),
        p("fc2.bias", &[classes], FEATURE_DIM),
    ]
}

/// A 3x3, stride-2, padding-1 convolution on channels-last maps [B, H*W*C] -> [B, H/2*W/2*O],
/// computed as one gather of every output position's 3x3xC patch and one matmul. Candle's
/// `conv2d` backward runs a direct `conv_transpose2d` that made CPU training several times
/// slower; a gather and a matmul backpropagate as a scatter-add and two matmuls.
struct PatchConv {
    weight: Tensor,
    bias: Tensor,
    /// For each output position and (ky, kx, c): the input element, or the zero padding slot.
    gather: Tensor,
    positions: usize,
}

impl PatchConv {
    fn new(weight: Tensor, bias: Tensor, height: usize, width: usize) -> Result<Self> {
        let channels = weight.dim(1)?;
        let pad = (height * width * channels) as u32;
        let mut idx = Vec::with_capacity(height / 2 * width / 2 * 9 * channels);
        for (oy, ox) in (0..height / 2).flat_map(|y| (0..width / 2).map(move |x| (y, x))) {
            for (ky, kx) in (0..3).flat_map(|y| (0..3).map(move |x| (y, x))) {
                let (iy, ix) = ((2 * oy + ky).checked_sub(1), (2 * ox + kx).checked_sub(1));
                let inside = |i: Option<usize>, n: usize| i.filter(|&i| i < n);
                let start = match (inside(iy, height), inside(ix, width)) {
                    (Some(iy), Some(ix)) => Some(((iy * width + ix) * channels) as u32),
                    _ => None,
                };
                idx.extend((0..channels as u32).map(|c| start.map_or(pad, |s| s + c)));
            }
        }
        let n = idx.len();
        let gather = Tensor::from_vec(idx, n, weight.device())?;
        Ok(PatchConv { weight, bias, gather, positions: height / 2 * width / 2 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, c) = (self.weight.dim(0)?, self.weight.dim(1)?);
        let b = x.dim(0)?;
        // [O, C, ky, kx] -> [(ky, kx, c), O], matching the gather order.
        let w = self.weight.permute((2, 3, 1, 0))?.reshape((9 * c, o))?;
        let padded = Tensor::cat(&[x, &Tensor::zeros((b, 1), x.dtype(), x.device())?], 1)?;
        let patches = padded.index_select(&self.gather, 1)?.reshape((b * self.positions, 9 * c))?;
        let y = patches.matmul(&w)?.broadcast_add(&self.bias)?;
        Ok(y.reshape((b, self.positions * o))?)
    }
}

/// The Fashion-MNIST judge network.
pub struct Classifier {
    conv1: PatchConv,
    conv2: PatchConv,
    fc1: Linear,
    fc2: Linear,
    pub meta: ClassifierMeta,
}

impl Classifier {
    /// Assembles the layers from tensors named as in `params` (shapes already checked).
    fn assemble(mut t: HashMap<String, Tensor>, meta: ClassifierMeta) -> Result<Self> {
        let mut take = |name: &str| {
            t.remove(name).ok_or_else(|| Error::msg(format!("classifier: missing tensor `{name}`")))
        };
        Ok(Classifier {
            conv1: PatchConv::new(take("conv1.weight")?, take("conv1.bias")?, 28, 28)?,
            conv2: PatchConv::new(take("conv2.weight")?, take("conv2.bias")?, 14, 14)?,
            fc1: Linear::new(take("fc1.weight")?, Some(take("fc1.bias")?)),
            fc2: Linear::new(take("fc2.weight")?, Some(take("fc2.bias")?)),
            meta,
        })
    }

    /// Loads `classifier.json` + `model.safetensors` from `dir` (see `bundled_dir`).
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        let meta: ClassifierMeta = read_json(&meta_path)?;
        if meta.architecture != ARCHITECTURE || meta.image_shape != IMAGE_SHAPE {
            return Err(Error::config(
                &meta_path,
                format!(
                    "architecture `{}` on {:?} images; this build reads `{ARCHITECTURE}` on {IMAGE_SHAPE:?}",
                    meta.architecture, meta.image_shape
                ),
            ));
        }
        let store = WeightStore::open_safetensors(&[dir.join(WEIGHTS_FILE)])?;
        let mut tensors = HashMap::new();
        for p in params(meta.classes.len()) {
            tensors.insert(p.name.to_string(), store.get_checked(&p.shape, p.name, DType::F32, dev)?);
        }
        Self::assemble(tensors, meta)
    }

    /// Writes `classifier.json` and `model.safetensors` into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = HashMap::new();
        for (name, layer) in [("conv1", &self.conv1), ("conv2", &self.conv2)] {
            tensors.insert(format!("{name}.weight"), layer.weight.detach());
            tensors.insert(format!("{name}.bias"), layer.bias.detach());
        }
        for (name, layer) in [("fc1", &self.fc1), ("fc2", &self.fc2)] {
            tensors.insert(format!("{name}.weight"), layer.weight().detach());
            tensors.extend(layer.bias().map(|b| (format!("{name}.bias"), b.detach())));
        }
        write_safetensors(&tensors, &dir.join(WEIGHTS_FILE))?;
        let meta_path = dir.join(META_FILE);
        let json = serde_json::to_string_pretty(&self.meta).map_err(|e| Error::config(&meta_path, e))?;
        std::fs::write(&meta_path, json + "\n").map_err(|e| Error::io(&meta_path, e))
    }

    pub fn num_classes(&self) -> usize {
        self.meta.classes.len()
    }

    fn check_input(images: &Tensor) -> Result<()> {
        match images.dims() {
            [_, c, h, w] if [*c, *h, *w] == IMAGE_SHAPE => Ok(()),
            dims => Err(Error::msg(format!(
                "the classifier takes images [N, 1, 28, 28] in [-1, 1], got shape {dims:?}"
            ))),
        }
    }

    /// Penultimate activations of one batch [B, 1, 28, 28] (keeps the autograd graph).
    fn trunk(&self, x: &Tensor) -> Result<Tensor> {
        // One channel: CHW and channels-last flatten identically.
        let x = self.conv1.forward(&x.flatten_from(1)?)?.relu()?;
        let x = self.conv2.forward(&x)?.relu()?;
        Ok(self.fc1.forward(&x)?.relu()?)
    }

    fn logits_of(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.trunk(x)?)?)
    }

    /// Applies `f` to `images` in chunks and concatenates the (detached) results.
    fn chunked(&self, images: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        Self::check_input(images)?;
        let n = images.dim(0)?;
        let dev = self.fc2.weight().device();
        let mut parts = Vec::new();
        for start in (0..n).step_by(EVAL_CHUNK) {
            let x =
                images.narrow(0, start, EVAL_CHUNK.min(n - start))?.to_device(dev)?.to_dtype(DType::F32)?;
            parts.push(f(&x)?.detach());
        }
        if parts.is_empty() {
            return Err(Error::msg("the classifier was given no images"));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Penultimate-layer features [N, FEATURE_DIM] of images [N, 1, 28, 28] in [-1, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        self.chunked(images, |x| self.trunk(x))
    }

    /// Class logits [N, classes].
    pub fn logits(&self, images: &Tensor) -> Result<Tensor> {
        self.chunked(images, |x| self.logits_of(x))
    }

    /// The most likely class of each image.
    pub fn predict(&self, images: &Tensor) -> Result<Vec<u32>> {
        Ok(self.logits(images)?.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }

    /// Accuracy on a labelled dataset of 28x28 grey images.
    pub fn accuracy(&self, set: &Dataset) -> Result<f64> {
        let labels = set
            .label_ids()
            .ok_or_else(|| Error::msg("accuracy needs a labelled dataset, this one has captions"))?;
        if set.is_empty() {
            return Err(Error::msg("accuracy of an empty dataset"));
        }
        let all: Vec<usize> = (0..set.len()).collect();
        let mut hits = 0;
        for idx in all.chunks(EVAL_CHUNK) {
            let predicted = self.predict(&set.images(idx, self.fc2.weight().device())?)?;
            hits += idx.iter().zip(&predicted).filter(|(&i, &p)| labels[i] == p).count();
        }
        Ok(hits as f64 / set.len() as f64)
    }
}

/// What one training epoch did.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    pub mean_loss: f64,
    /// Accuracy on the training batches as they were seen (while weights moved).
    pub train_accuracy: f64,
    pub seconds: f64,
}

/// Trains a classifier on CPU (see `train_with`).
pub fn train(train_set: &Dataset, epochs: usize, seed: u64) -> Result<Classifier> {
    train_with(train_set, epochs, seed, |_| {})
}

/// Kaiming-uniform initial values as PyTorch's defaults draw them (bound 1/sqrt(fan_in)), from
/// our own seeded RNG so a seed reproduces the same network.
fn initial_vars(rng: &mut StdRng, classes: usize, dev: &Device) -> Result<Vec<(String, Var)>> {
    params(classes)
        .into_iter()
        .map(|p| {
            let bound = 1.0 / (p.fan_in as f32).sqrt();
            let n = p.shape.iter().product();
            let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-bound..bound)).collect();
            Ok((p.name.to_string(), Var::from_tensor(&Tensor::from_vec(values, p.shape, dev)?)?))
        })
        .collect()
}

fn check_training_set(set: &Dataset) -> Result<usize> {
    if [set.channels, set.height, set.width] != IMAGE_SHAPE {
        return Err(Error::msg(format!(
            "the classifier trains on 1x28x28 images, this dataset has {}x{}x{}",
            set.channels, set.height, set.width
        )));
    }
    let classes = set.classes().len();
    if set.label_ids().is_none() || classes < 2 || set.is_empty() {
        return Err(Error::msg("the classifier needs a non-empty labelled dataset with at least 2 classes"));
    }
    Ok(classes)
}

/// Trains with AdamW (peak lr 2e-3, cosine decay to 0, batch 128) for `epochs` passes over
/// `train_set` (28x28 grey, labelled), calling `on_epoch` after each. Deterministic per `seed`
/// up to floating-point summation order.
pub fn train_with(
    train_set: &Dataset,
    epochs: usize,
    seed: u64,
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<Classifier> {
    let classes = check_training_set(train_set)?;
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let vars = initial_vars(&mut rng, classes, &dev)?;
    let meta = ClassifierMeta {
        architecture: ARCHITECTURE.into(),
        image_shape: IMAGE_SHAPE,
        classes: train_set.classes().to_vec(),
        feature_dim: FEATURE_DIM,
        epochs,
        seed,
        test_accuracy: None,
    };
    let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let model = Classifier::assemble(tensors, meta)?;
    let adam = ParamsAdamW { lr: PEAK_LR, weight_decay: 1e-4, ..Default::default() };
    let mut opt = AdamW::new(vars.into_iter().map(|(_, v)| v).collect(), adam)?;
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    let total_steps = (epochs * order.len().div_ceil(BATCH)).max(1);
    let mut step = 0;
    for epoch in 1..=epochs {
        let started = Instant::now();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut hits) = (0.0, 0);
        for idx in order.chunks(BATCH) {
            let progress = step as f64 / total_steps as f64;
            opt.set_learning_rate(PEAK_LR * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
            let (x, y) = train_set.batch(idx, &dev)?;
            let logits = model.logits_of(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
            let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            hits += predicted.iter().zip(y.to_vec1::<u32>()?).filter(|(p, l)| **p == *l).count();
            step += 1;
        }
        on_epoch(&EpochReport {
            epoch,
            mean_loss: loss_sum / order.len() as f64,
            train_accuracy: hits as f64 / order.len() as f64,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::Targets;

    /// 40 tiny images of two easy classes: dark (0) and bright (1).
    fn toy_set() -> Dataset {
        let ids: Vec<u32> = (0..40).map(|i| i % 2).collect();
        let pixels = ids.iter().flat_map(|&c| vec![if c == 0 { 20u8 } else { 230 }; 784]).collect();
        Dataset {
            pixels,
            channels: 1,
            height: 28,
            width: 28,
            targets: Targets::Labels { ids, classes: vec!["dark".into(), "bright".into()] },
        }
    }

    #[test]
    fn patch_conv_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 4), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 3, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let reference =
            x.conv2d(&w, 1, 2, 1, 1).unwrap().broadcast_add(&b.reshape((1, 5, 1, 1)).unwrap()).unwrap();
        let channels_last = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().flatten_from(1).unwrap();
        let ours = PatchConv::new(w, b, 6, 4).unwrap().forward(&channels_last(&x)).unwrap();
        let diff = (ours - channels_last(&reference)).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{diff}");
    }

    #[test]
    fn trains_saves_and_loads_the_same_network() {
        let set = toy_set();
        let mut losses = Vec::new();
        let model = train_with(&set, 10, 1, |r| losses.push(r.mean_loss)).unwrap();
        assert!(losses[9] < losses[0], "{losses:?}");
        assert_eq!(model.accuracy(&set).unwrap(), 1.0);
        let dir = std::env::temp_dir().join(format!("conv-classifier-{}", std::process::id()));
        model.save(&dir).unwrap();
        let back = Classifier::load(&dir, &Device::Cpu).unwrap();
        let x = set.images(&[0, 1, 2], &Device::Cpu).unwrap();
        let (a, b) = (model.features(&x).unwrap(), back.features(&x).unwrap());
        assert_eq!(a.dims(), [3, FEATURE_DIM]);
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        assert_eq!(back.meta.classes, ["dark", "bright"]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn wrong_inputs_are_errors() {
        let model = train(&toy_set(), 0, 0).unwrap();
        let bad = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let err = model.features(&bad).unwrap_err().to_string();
        assert!(err.contains("[N, 1, 28, 28]") && err.contains("[2, 3, 28, 28]"), "{err}");
        let mut small = toy_set();
        small.height = 14;
        assert!(train(&small, 1, 0).is_err());
        let dir = std::env::temp_dir().join(format!("conv-classifier-bad-{}", std::process::id()));
        model.save(&dir).unwrap();
        let json = std::fs::read_to_string(dir.join(META_FILE)).unwrap();
        std::fs::write(dir.join(META_FILE), json.replace(ARCHITECTURE, "resnet")).unwrap();
        let err = Classifier::load(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("classifier.json") && err.contains("`resnet`"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
