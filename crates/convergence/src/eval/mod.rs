//! Judging generated Fashion-MNIST images with a small CNN trained here: class accuracy of
//! conditional samples, and the Fréchet classifier distance (FCD) between feature sets. FCD is
//! FID's formula on this classifier's penultimate features; it is not FID and its numbers are
//! not comparable with published FIDs. `prompt` judges `shapes` captions by geometry alone.

pub mod classifier;
pub mod frechet;
mod linalg;
pub mod prompt;
pub mod samples;

pub use classifier::{bundled_dir, train, train_with, Classifier, ClassifierMeta, EpochReport};
pub use frechet::{class_accuracy, fcd, frechet_distance, Gaussian};
pub use samples::{evaluate_dir, read_sample_dir, ClassScore, SampleReport};
