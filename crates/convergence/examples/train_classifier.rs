//! Trains the Fashion-MNIST judge classifier and writes it to `models/fashion-classifier/`:
//!
//!     cargo run --release -p convergence --example train_classifier -- [EPOCHS] [SEED] [OUT_DIR]
//!
//! Defaults: 6 epochs, seed 0, the bundled directory. Needs `dataset-fashion-mnist` installed.
//! With another job on the machine, `CANDLE_NUM_THREADS=1` avoids candle's spinning thread pool
//! fighting it for cores (about 20 s an epoch then, against minutes).

use convergence::eval::classifier::{bundled_dir, train_with};
use convergence::train::data::fashion_mnist;
use std::path::PathBuf;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> Result<T, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| format!("argument {i}: cannot parse `{s}`")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let epochs: usize = arg(&args, 1, 6)?;
    let seed: u64 = arg(&args, 2, 0)?;
    let out: PathBuf = arg(&args, 3, bundled_dir())?;
    let (train_set, test_set) = (fashion_mnist("train")?, fashion_mnist("t10k")?);
    let mut model = train_with(&train_set, epochs, seed, |r| {
        println!(
            "epoch {}: loss {:.4}, train accuracy {:.2}% ({:.0}s)",
            r.epoch,
            r.mean_loss,
            100.0 * r.train_accuracy,
            r.seconds
        );
    })?;
    let accuracy = model.accuracy(&test_set)?;
    println!("test accuracy {:.2}% on {} images", 100.0 * accuracy, test_set.len());
    model.meta.test_accuracy = Some(accuracy);
    model.save(&out)?;
    println!("saved to {}", out.display());
    Ok(())
}
