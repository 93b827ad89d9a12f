//! The Fashion-MNIST evaluator with the committed classifier (`models/fashion-classifier/`).
//! Needs Debian's `dataset-fashion-mnist` (CI installs it); without it these tests fail with
//! the loader's install hint.

use candle_core::{Device, Tensor};
use convergence::eval::{bundled_dir, class_accuracy, evaluate_dir, fcd, Classifier};
use convergence::train::data::{fashion_mnist, Dataset};
use rand::{Rng, SeedableRng};

fn setup() -> (Classifier, Dataset) {
    let classifier = Classifier::load(&bundled_dir(), &Device::Cpu).expect("bundled classifier");
    (classifier, fashion_mnist("t10k").expect("Fashion-MNIST test split"))
}

fn images(set: &Dataset, range: std::ops::Range<usize>) -> Tensor {
    set.images(&range.collect::<Vec<_>>(), &Device::Cpu).unwrap()
}

/// `x` plus Gaussian noise of standard deviation `sigma`, clamped to [-1, 1] (seeded).
fn noisy(x: &Tensor, sigma: f32, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand::distributions::Standard;
    let noise: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            let (u, v): (f32, f32) = (rng.sample(normal), rng.sample(normal));
            sigma * (-2.0 * (1.0 - u).ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect();
    let noise = Tensor::from_vec(noise, x.shape(), &Device::Cpu).unwrap();
    (x + noise).unwrap().clamp(-1f32, 1f32).unwrap()
}

#[test]
fn bundled_classifier_reaches_its_recorded_accuracy() {
    let (classifier, test) = setup();
    let accuracy = classifier.accuracy(&test).unwrap();
    let recorded = classifier.meta.test_accuracy.expect("recorded accuracy");
    assert!(accuracy >= 0.89, "test accuracy {accuracy}");
    // Thread count can change summation order, flipping a borderline image or two.
    assert!((accuracy - recorded).abs() <= 0.0005, "measured {accuracy}, recorded {recorded}");
}

#[test]
fn fcd_is_zero_for_a_set_small_between_halves_and_grows_with_noise() {
    let (classifier, test) = setup();
    let (a, b) = (images(&test, 0..5000), images(&test, 5000..10000));
    let same = fcd(&classifier, &a, &a).unwrap();
    assert!(same < 1e-6, "FCD of a set with itself: {same}");
    let halves = fcd(&classifier, &a, &b).unwrap();
    let noisy_fcd: Vec<f64> =
        [0.1, 0.3, 0.6].iter().map(|&s| fcd(&classifier, &noisy(&a, s, 1), &b).unwrap()).collect();
    println!("FCD halves {halves:.3}, with noise 0.1/0.3/0.6: {noisy_fcd:?}");
    assert!(halves < 1.5, "two halves of the test set: {halves}");
    assert!(noisy_fcd[0] > 2.0 * halves, "{noisy_fcd:?} vs {halves}");
    assert!(noisy_fcd[0] < noisy_fcd[1] && noisy_fcd[1] < noisy_fcd[2], "{noisy_fcd:?}");
}

#[test]
fn real_images_score_like_the_classifier_and_noise_scores_badly() {
    let (classifier, test) = setup();
    let labels = &test.label_ids().unwrap()[..2000];
    let real = class_accuracy(&classifier, &images(&test, 0..2000), labels).unwrap();
    let overall = classifier.meta.test_accuracy.unwrap();
    assert!((real - overall).abs() < 0.02, "first 2000: {real}, all: {overall}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let uniform: Vec<f32> = (0..2000 * 784).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let noise = Tensor::from_vec(uniform, (2000, 1, 28, 28), &Device::Cpu).unwrap();
    let chance = class_accuracy(&classifier, &noise, labels).unwrap();
    assert!(chance < 0.2, "uniform noise classified as intended: {chance}");
    let halves = fcd(&classifier, &images(&test, 0..2000), &images(&test, 2000..4000)).unwrap();
    let noise_fcd = fcd(&classifier, &noise, &images(&test, 2000..4000)).unwrap();
    println!("FCD noise {noise_fcd:.2} vs halves {halves:.3}");
    assert!(noise_fcd > 50.0 * halves, "noise {noise_fcd} vs halves {halves}");
}

#[test]
fn evaluate_dir_reads_samples_and_names_bad_files() {
    let (classifier, test) = setup();
    let dir = std::env::temp_dir().join(format!("conv-eval-dir-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    let x = images(&test, 0..300);
    let labels = &test.label_ids().unwrap()[..300];
    for (i, &label) in labels.iter().enumerate() {
        convergence::viz::save_image(&x.get(i).unwrap(), &dir.join(format!("{label}_{i}.png"))).unwrap();
    }
    std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
    let report = evaluate_dir(&classifier, &dir, &test).unwrap();
    println!("{report}");
    assert_eq!((report.images, report.reference_images), (300, 10000));
    // PNG round trip is lossless, so the scores equal those of the tensors themselves.
    assert_eq!(report.class_accuracy, class_accuracy(&classifier, &x, labels).unwrap());
    let direct = fcd(&classifier, &x, &images(&test, 0..10000)).unwrap();
    assert!((report.fcd - direct).abs() < 1e-9 * direct.max(1.0), "{} vs {direct}", report.fcd);
    assert_eq!(report.per_class.iter().map(|c| c.images).sum::<usize>(), 300);
    convergence::viz::save_image(&x.get(0).unwrap(), &dir.join("grid.png")).unwrap();
    let err = evaluate_dir(&classifier, &dir, &test).unwrap_err().to_string();
    assert!(err.contains("grid.png") && err.contains("<class id>_<index>.png"), "{err}");
    std::fs::remove_file(dir.join("grid.png")).unwrap();
    convergence::viz::save_grid(&images(&test, 0..2), 2, &dir.join("3_9999.png")).unwrap();
    let err = evaluate_dir(&classifier, &dir, &test).unwrap_err().to_string();
    assert!(err.contains("3_9999.png") && err.contains("expected 28x28"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
