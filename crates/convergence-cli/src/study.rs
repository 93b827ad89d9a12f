//! `convergence study steps`: quality against sampling steps, flow vs DDPM.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use convergence::eval::prompt::PromptReport;
use convergence::eval::{bundled_dir, Classifier};
use convergence::flow::SamplerKind;
use convergence::models::any::AnyModel;
use convergence::pipelines::dit::DiTPipeline;
use convergence::pipelines::t2i::T2IPipeline;
use convergence::pipelines::weights_bytes;
use convergence::study::prompt_accuracy;
use convergence::study::{baselines, step_study, Reference, StudyRow};
use convergence::viz::{save_grid, LinePlot};
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Study {
    Steps(StepsArgs),
    Conditioning(ConditioningArgs),
}

/// The architecture ablation of text conditioning: for each training run (the same captioned
/// shapes, parameter budget and steps; see configs/shapes-*.toml), prompt accuracy on seen and
/// on held-out colour-shape combinations, loss curves and sample grids. Writes table.md,
/// rows.json, accuracy.png, loss.png, grids/ and the prompt files it used.
#[derive(clap::Args)]
pub struct ConditioningArgs {
    /// A training run's out_dir (with model/ and metrics.jsonl), once per variant.
    #[arg(long = "run", required = true)]
    runs: Vec<PathBuf>,
    /// Prompts per split (seen combinations, held-out colour-shape pairs).
    #[arg(long, default_value_t = 200)]
    num_prompts: usize,
    /// Seeds the prompts (the training scenes use their config's seed) and the noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance_scale: Option<f64>,
    #[arg(short = 'o', long = "out", default_value = "docs/conditioning")]
    out: PathBuf,
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
    let a = match s {
        Study::Steps(a) => a,
        Study::Conditioning(a) => return conditioning(a),
    };
    let dev = Device::Cpu;
    let classifier = Classifier::load(&bundled_dir(), &dev)?;
    let reference = Reference::fashion_test(&dev)?;
    let rf =
        DiTPipeline::load(&a.model.clone().unwrap_or_else(|| crate::generate::default_model(false)), &dev)?;
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

/// One variant's numbers in the conditioning study.
#[derive(serde::Serialize)]
struct VariantRow {
    variant: String,
    run: String,
    transformer_parameters: u64,
    text_encoder_parameters: u64,
    steps: usize,
    train_seconds: f64,
    final_loss: f64,
    seen: PromptReport,
    held_out: PromptReport,
}

fn conditioning(a: ConditioningArgs) -> Result<()> {
    use convergence::shapes::{eval_prompts, Split};
    let dev = Device::Cpu;
    std::fs::create_dir_all(a.out.join("grids")).with_context(|| format!("creating {}", a.out.display()))?;
    let splits = [("seen", Split::Train), ("held-out", Split::HeldOut)];
    let prompts: Vec<Vec<String>> =
        splits.iter().map(|(_, s)| eval_prompts(a.num_prompts, a.seed, *s)).collect();
    for ((name, _), p) in splits.iter().zip(&prompts) {
        std::fs::write(a.out.join(format!("prompts-{name}.txt")), p.join("\n") + "\n")?;
    }
    let mut rows = vec![];
    let mut losses = LinePlot::new("training loss (100-step mean)").x_label("step").y_label("loss");
    for run in &a.runs {
        let model = run.join("model");
        let pipe = T2IPipeline::load(&model, &dev).with_context(|| format!("loading {}", model.display()))?;
        let variant = variant_name(&pipe.transformer);
        let (steps, guidance) =
            (a.steps.unwrap_or(pipe.defaults.steps), a.guidance_scale.unwrap_or(pipe.defaults.guidance));
        let log = read_log(&run.join("metrics.jsonl"))?;
        let mut reports = vec![];
        for ((split, _), p) in splits.iter().zip(&prompts) {
            let (report, images) = prompt_accuracy(&pipe, p, a.seed, steps, guidance)?;
            let slug: String = variant
                .chars()
                .map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
                .collect();
            let n = images.dim(0)?.min(32);
            save_grid(&images.narrow(0, 0, n)?, 8, &a.out.join(format!("grids/{slug}-{split}.png")))?;
            eprintln!(
                "{variant} / {split}: whole prompt {:.1}%",
                100.0 * report.whole.accuracy().unwrap_or(0.0)
            );
            reports.push(report);
        }
        let smooth: Vec<(f64, f64)> = log
            .windows(100)
            .step_by(10)
            .map(|w| (w[w.len() - 1].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64))
            .collect();
        losses = losses.series(variant.clone(), smooth);
        let params = |c: &str| -> Result<u64> { Ok(weights_bytes(&model, &[c], DType::F32)? / 4) };
        let held_out = reports.pop().expect("two splits");
        rows.push(VariantRow {
            variant,
            run: run.display().to_string(),
            transformer_parameters: params("transformer")?,
            text_encoder_parameters: params("text_encoder")?,
            steps: log.last().map_or(0, |p| p.0 as usize),
            train_seconds: log.last().map_or(0.0, |p| p.2),
            final_loss: log.iter().rev().take(100).map(|p| p.1).sum::<f64>() / log.len().clamp(1, 100) as f64,
            seen: reports.pop().expect("two splits"),
            held_out,
        });
    }
    let md = conditioning_table(&rows)?;
    std::fs::write(a.out.join("table.md"), &md)?;
    std::fs::write(a.out.join("rows.json"), serde_json::to_string_pretty(&rows)?)?;
    losses.save(&a.out.join("loss.png"))?;
    accuracy_plot(&rows).save(&a.out.join("accuracy.png"))?;
    print!("{md}");
    println!("wrote {}", a.out.display());
    Ok(())
}

/// (step, loss, training seconds so far) of every line of a run's metrics.jsonl. `elapsed_s`
/// restarts with each resumed segment; the segments are added up.
fn read_log(path: &std::path::Path) -> Result<Vec<(f64, f64, f64)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut done, mut last) = (0.0, 0.0);
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v["loss"].as_f64()?, v["elapsed_s"].as_f64()?)))
        .map(|(step, loss, elapsed)| {
            if elapsed < last {
                done += last;
            }
            last = elapsed;
            (step, loss, done + elapsed)
        })
        .collect())
}

fn variant_name(m: &AnyModel) -> String {
    use convergence::models::text_dit::TextConditioning;
    match m {
        AnyModel::SD3(_) => "MMDiT joint attention".into(),
        AnyModel::TextDiT(d) => match d.config().text_conditioning {
            TextConditioning::CrossAttention => "DiT + cross-attention".into(),
            TextConditioning::Pooled => "DiT, pooled text only".into(),
        },
        other => other.class_name().into(),
    }
}

fn pct(t: convergence::eval::prompt::Tally) -> String {
    t.accuracy().map_or("-".into(), |a| format!("{:.1}%", 100.0 * a))
}

fn conditioning_table(rows: &[VariantRow]) -> Result<String> {
    let mut md = String::from(
        "| variant | parameters (transformer + text encoder) | steps | wall-clock (shared 2 cores) | final loss | seen: colour | shape | size | relation | **whole** | held-out: colour | shape | size | relation | **whole** |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let cells = |p: &PromptReport| {
            format!(
                "{} | {} | {} | {} | **{}**",
                pct(p.colour),
                pct(p.shape),
                pct(p.size),
                pct(p.relation),
                pct(p.whole)
            )
        };
        writeln!(
            md,
            "| {} | {} + {} | {} | {:.0} min | {:.4} | {} | {} |",
            r.variant,
            r.transformer_parameters,
            r.text_encoder_parameters,
            r.steps,
            r.train_seconds / 60.0,
            r.final_loss,
            cells(&r.seen),
            cells(&r.held_out)
        )?;
    }
    Ok(md)
}

/// Accuracy per attribute (x: 1 colour, 2 shape, 3 size, 4 relation, 5 whole prompt), one line
/// per variant and split.
fn accuracy_plot(rows: &[VariantRow]) -> LinePlot {
    let mut p = LinePlot::new("prompt accuracy by attribute")
        .x_label("1 colour  2 shape  3 size  4 relation  5 whole prompt")
        .y_label("accuracy");
    for r in rows {
        for (split, rep) in [("seen", &r.seen), ("held-out", &r.held_out)] {
            let attrs = [rep.colour, rep.shape, rep.size, rep.relation, rep.whole];
            let pts: Vec<(f64, f64)> = attrs
                .iter()
                .enumerate()
                .map(|(i, t)| ((i + 1) as f64, t.accuracy().unwrap_or(f64::NAN)))
                .collect();
            p = p.series(format!("{}, {split}", r.variant), pts);
        }
    }
    p
}
