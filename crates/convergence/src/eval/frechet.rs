//! The Fréchet distance between Gaussians fitted to classifier features, and class accuracy of
//! conditional samples. On our Fashion-MNIST classifier's features this is the "Fréchet
//! classifier distance" (FCD): FID's formula, but not FID's Inception features, so its values
//! are comparable only with other FCDs from the same classifier and similar sample counts.

use super::classifier::Classifier;
use super::linalg::{matmul, psd_sqrt, sym_eigen, symmetrize};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};

/// Mean and covariance of a set of feature vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Gaussian {
    pub dim: usize,
    /// How many vectors the statistics came from.
    pub count: usize,
    pub mean: Vec<f64>,
    /// Unbiased (divided by count - 1, as numpy's `cov`), `dim` x `dim` row-major.
    pub cov: Vec<f64>,
}

impl Gaussian {
    /// Fits features [N, D] (N >= 2).
    pub fn fit(features: &Tensor) -> Result<Gaussian> {
        let (count, dim) = features
            .dims2()
            .map_err(|_| Error::msg(format!("features: expected [N, D], got shape {:?}", features.dims())))?;
        if count < 2 {
            return Err(Error::msg(format!("a covariance needs at least 2 feature vectors, got {count}")));
        }
        let x = features.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let mean: Vec<f64> = (0..dim).map(|j| x.iter().map(|r| r[j]).sum::<f64>() / count as f64).collect();
        let mut cov = vec![0.0; dim * dim];
        for row in &x {
            let d: Vec<f64> = row.iter().zip(&mean).map(|(v, m)| v - m).collect();
            for i in 0..dim {
                for j in i..dim {
                    cov[i * dim + j] += d[i] * d[j];
                }
            }
        }
        for i in 0..dim {
            for j in i..dim {
                cov[i * dim + j] /= (count - 1) as f64;
                cov[j * dim + i] = cov[i * dim + j];
            }
        }
        Ok(Gaussian { dim, count, mean, cov })
    }
}

/// |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the Fréchet (2-Wasserstein)
/// distance between two Gaussians. The symmetric form of the cross term keeps every matrix
/// symmetric, so a symmetric eigendecomposition is all it needs.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64> {
    if a.dim != b.dim {
        return Err(Error::msg(format!("Fréchet distance: feature dims differ ({} vs {})", a.dim, b.dim)));
    }
    let n = a.dim;
    let mean_term: f64 = a.mean.iter().zip(&b.mean).map(|(x, y)| (x - y).powi(2)).sum();
    let trace = |m: &[f64]| (0..n).map(|i| m[i * n + i]).sum::<f64>();
    let root_a = psd_sqrt(&a.cov, n);
    let middle = symmetrize(&matmul(&matmul(&root_a, &b.cov, n), &root_a, n), n);
    let cross: f64 = sym_eigen(&middle, n).0.iter().map(|l| l.max(0.0).sqrt()).sum();
    // Exactly non-negative in theory; rounding can leave a tiny negative for identical inputs.
    Ok((mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * cross).max(0.0))
}

/// The Fréchet classifier distance (FCD) between two image sets [N, 1, 28, 28] in [-1, 1].
pub fn fcd(classifier: &Classifier, a: &Tensor, b: &Tensor) -> Result<f64> {
    let fa = Gaussian::fit(&classifier.features(a)?)?;
    let fb = Gaussian::fit(&classifier.features(b)?)?;
    frechet_distance(&fa, &fb)
}

/// The fraction of `images` the classifier assigns to their intended `labels`.
pub fn class_accuracy(classifier: &Classifier, images: &Tensor, labels: &[u32]) -> Result<f64> {
    let predicted = classifier.predict(images)?;
    if predicted.len() != labels.len() {
        return Err(Error::msg(format!("{} images but {} labels", predicted.len(), labels.len())));
    }
    if labels.is_empty() {
        return Err(Error::msg("class accuracy of an empty image set"));
    }
    let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    Ok(hits as f64 / labels.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn gaussian(mean: Vec<f64>, cov: Vec<f64>) -> Gaussian {
        Gaussian { dim: mean.len(), count: 10, mean, cov }
    }

    #[test]
    fn known_distances() {
        // 1-D: (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2.
        let d = frechet_distance(&gaussian(vec![0.0], vec![1.0]), &gaussian(vec![1.0], vec![4.0])).unwrap();
        assert!((d - 2.0).abs() < 1e-12, "{d}");
        // Commuting diagonal covariances: sum of (sqrt(a) - sqrt(b))^2 = (1-2)^2 + (3-1)^2 = 5.
        let a = gaussian(vec![0.0, 0.0], vec![1.0, 0.0, 0.0, 9.0]);
        let b = gaussian(vec![0.0, 0.0], vec![4.0, 0.0, 0.0, 1.0]);
        assert!((frechet_distance(&a, &b).unwrap() - 5.0).abs() < 1e-12);
        assert_eq!(frechet_distance(&a, &a).unwrap(), 0.0);
    }

    #[test]
    fn fit_matches_numpy_cov() {
        let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 6.0, 5.0, 10.0], (3, 2), &Device::Cpu).unwrap();
        let g = Gaussian::fit(&x).unwrap();
        assert_eq!(g.mean, [3.0, 6.0]);
        // numpy.cov([[1, 3, 5], [2, 6, 10]]) = [[4, 8], [8, 16]].
        assert_eq!(g.cov, [4.0, 8.0, 8.0, 16.0]);
        assert!(Gaussian::fit(&x.narrow(0, 0, 1).unwrap()).is_err());
    }
}
