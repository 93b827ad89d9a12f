//! `convergence study steps`: quality against sampling steps, flow vs DDPM.

use anyhow::{Context, Result};
use candle_core::Device;
use convergence::eval::{bundled_dir, Classifier};
use convergence::flow::SamplerKind;
use convergence::pipelines::dit::DiTPipeline;
use convergence::study::{baselines, step_study, Reference, StudyRow};
use convergence::viz::LinePlot;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Study {
    Steps(StepsArgs),
}

/// Class accuracy and FCD at 1, 2, 4, 8, 16, 32, 50 steps for rectified flow with Euler and
/// Heun and for the DDPM twin with DDIM; writes a table (markdown + JSON), a plot and a sample
/// grid per setting.
#[derive(clap::Args)]
pub struct StepsArgs {
    /// The rectified-flow model (default: the shipped Fashion-MNIST DiT).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The DDPM-trained twin (same architecture and training compute).
    #[arg(long)]
    ddpm: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,50")]
    steps: Vec<usize>,
    /// Images per setting (balanced over the classes).
    #[arg(long, default_value_t = 500)]
    num_images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (table, plot, grids).
    #[arg(short = 'o', long = "out", default_value = "docs/step-study")]
    out: PathBuf,
}

pub fn run(s: Study) -> Result<()> {
    let Study::Steps(a) = s;
    let dev = Device::Cpu;
    let classifier = Classifier::load(&bundled_dir(), &dev)?;
    let reference = Reference::fashion_test(&dev)?;
    let rf = DiTPipeline::load(&a.model.clone().unwrap_or_else(crate::generate::default_model), &dev)?;
    let ddpm = DiTPipeline::load(&a.ddpm, &dev)?;
    let methods = [
        ("RF+Euler", &rf, SamplerKind::Euler),
        ("RF+Heun", &rf, SamplerKind::Heun),
        ("DDPM+DDIM", &ddpm, SamplerKind::Ddim),
    ];
    let grids = a.out.join("grids");
    let rows =
        step_study(&methods, &a.steps, a.num_images, a.seed, &classifier, &reference, Some(&grids), |r| {
            eprintln!(
                "{:<10} {:>3} steps (NFE {:>3}): class accuracy {:>6.2}%  FCD {:>8.3}",
                r.method,
                r.steps,
                r.nfe,
                100.0 * r.score.class_accuracy,
                r.score.fcd
            )
        })?;
    let (real, noise) = baselines(&classifier, &reference, a.num_images, &dev)?;
    let mut md = String::from("| method | steps | NFE | class accuracy | FCD |\n|---|---:|---:|---:|---:|\n");
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.2}% | {:.3} |",
            r.method,
            r.steps,
            r.nfe,
            100.0 * r.score.class_accuracy,
            r.score.fcd
        )?;
    }
    writeln!(md, "| real test images | - | - | {:.2}% | {:.3} |", 100.0 * real.class_accuracy, real.fcd)?;
    writeln!(md, "| uniform noise | - | - | {:.2}% | {:.3} |", 100.0 * noise.class_accuracy, noise.fcd)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    std::fs::write(a.out.join("table.md"), &md)?;
    std::fs::write(a.out.join("rows.json"), serde_json::to_string_pretty(&rows)?)?;
    plot(&rows, "FCD", |r| r.score.fcd).save(&a.out.join("fcd.png"))?;
    plot(&rows, "class accuracy", |r| r.score.class_accuracy).save(&a.out.join("class-accuracy.png"))?;
    print!("{md}");
    println!("wrote {}", a.out.display());
    Ok(())
}

fn plot(rows: &[StudyRow], what: &str, y: impl Fn(&StudyRow) -> f64) -> LinePlot {
    let mut p = LinePlot::new(format!("{what} vs sampling steps")).x_label("steps").y_label(what).log_x(true);
    let mut methods: Vec<&str> = rows.iter().map(|r| r.method.as_str()).collect();
    methods.dedup();
    for m in methods {
        let pts: Vec<(f64, f64)> =
            rows.iter().filter(|r| r.method == m).map(|r| (r.steps as f64, y(r))).collect();
        p = p.series(m, pts);
    }
    p
}
