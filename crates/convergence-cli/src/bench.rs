//! `convergence bench`: one benchmark workload on random weights, timed per iteration.

use anyhow::{bail, Result};
use candle_core::DType;
use convergence::bench;

/// Time a benchmark workload (random weights): median seconds per iteration and peak memory.
///
/// Workloads: dit-xl-2-forward, dit-s-2-train-step, fashion-train-step, fashion-sample-32,
/// sd3-joint-block, flux-single-block (`--list`). bench/pytorch_bench.py runs the same ones in
/// PyTorch; bench/compare.py puts both side by side. Threads: the global `--threads` (or
/// RAYON_NUM_THREADS).
#[derive(clap::Args)]
pub struct Args {
    /// The workload to run.
    #[arg(required_unless_present = "list")]
    workload: Option<String>,
    /// List the workloads and exit.
    #[arg(long)]
    list: bool,
    /// f32 or bf16 (the training steps are f32 only for now).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print one JSON object: workload, dtype, threads, iters, median_s, min_s, peak_rss_bytes.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.list {
        for w in bench::workloads() {
            println!("{w}");
        }
        return Ok(());
    }
    let Some(workload) = a.workload else { bail!("no workload given (see --list)") };
    if !bench::workloads().contains(&workload.as_str()) {
        bail!("unknown workload `{workload}` (one of: {})", bench::workloads().join(", "));
    }
    let dtype = match a.dtype.to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("--dtype must be f32 or bf16, not `{other}`"),
    };
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let r = bench::run(&workload, dtype, a.warmup, a.iters)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}  {}  {} threads  {:.4} s/iter (median of {}, min {:.4})  peak RSS {:.0} MiB",
            r.workload,
            r.dtype,
            r.threads,
            r.median_s,
            r.iters,
            r.min_s,
            r.peak_rss_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}
