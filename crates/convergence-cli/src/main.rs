//! `convergence`: a thin command line over the library. Each subcommand parses its flags, calls
//! the library and prints; errors are one line and a non-zero exit.

mod attention;
mod bench;
mod eval;
mod forward;
mod generate;
mod inspect;
mod schedule;
mod study;
mod train;

use clap::{Parser, Subcommand};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Every tensor op allocates its output. By default glibc maps and unmaps each buffer over
/// 128 KiB, paying page faults and page zeroing on every op; keeping buffers up to 32 MiB in the
/// heap and not trimming it makes a training step ~1.6x faster (measured on the Fashion DiT).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[derive(Parser)]
#[command(
    name = "convergence",
    version,
    about = "Diffusion transformers (DiT, SD3/MMDiT, Flux) and SDXL in Rust: run, train, inspect",
    long_about = "Diffusion transformers (DiT, SD3/MMDiT, Flux) and SDXL in Rust: run, train, inspect.\n\n\
Models are diffusers-layout directories (config.json + safetensors) or the original single-file\n\
checkpoints; everything runs on the CPU by default."
)]
struct Cli {
    /// Worker threads for the CPU kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    // Boxed: its many flags would make every other variant as large.
    Generate(Box<generate::Args>),
    Eval(eval::Args),
    /// Measured studies of the seed's claims (quality against sampling steps).
    #[command(subcommand)]
    Study(study::Study),
    Forward(forward::Args),
    Inspect(inspect::Args),
    Schedule(schedule::Args),
    Train(train::Args),
    Bench(bench::Args),
    /// Joint-attention maps of a text-to-image MMDiT (the shipped shapes model by default) as PNGs
    ///
    /// MMDiT runs one softmax over image and text tokens together, so every layer holds four
    /// kinds of attention: image->image, image->text (which words each patch reads), text->image
    /// and text->text. This generates the image for PROMPT (the image `generate` makes with the
    /// same seed), records the attention of the conditional prompt (not the empty prompt of
    /// classifier-free guidance) and writes into -o DIR:
    ///
    ///   image.png                       the generated image, 8x
    ///   quadrants_layer{L}_step{S}.png  the [image + text] x [image + text] matrix (rows: queries,
    ///                                   columns: keys), its four quadrants and their shares
    ///   token{k}_{word}_layer{L}.png    how much each image patch attends to word k, over the
    ///                                   image: "where does 'red' look?"
    ///   tokens_layer{L}.png             every word's map side by side
    ///
    /// Padding and the start token get no map; the end token does (the pooled vector is read
    /// from it). Maps are of the last sampling step unless --step says otherwise, and the mean
    /// over heads unless --heads names some (then every file is per head, `_head{h}`).
    #[command(verbatim_doc_comment)]
    Attention(attention::Args),
}

fn main() {
    tune_malloc();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Read by gemm's rayon pool (matmuls) and our kernels.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // candle's element-wise ops run on a second, spinning thread pool beside rayon's; on a few
    // cores the two pools fight over them (measured: training step 1.8x slower on 2 cores), and
    // those ops are memory-bound anyway. Our fused kernels use rayon.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // The whole command runs on one of the kernel threads rather than on a third thread that
    // hands every parallel op to them and sleeps until it is done: as many busy threads as
    // cores, and no op waits for the main thread to be woken (DiT-S/2 training step 2-4 %
    // faster, 7 of 8 alternated pairs); the other threads keep awake beside it (`keep_awake`).
    // A large stack: candle walks the backward graph recursively, and a worker's default stack
    // is 2 MiB.
    let pool = match rayon::ThreadPoolBuilder::new().stack_size(64 << 20).build() {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: cannot start the worker threads: {e}");
            std::process::exit(1);
        }
    };
    let done = AtomicBool::new(false);
    let run = || {
        let r = run_command(cli.command);
        done.store(true, Ordering::Release);
        r
    };
    let (result, ()) = pool.install(|| {
        let here = rayon::current_thread_index();
        rayon::join(run, || keep_awake(&done, here))
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs on the second kernel thread while the command runs on the first: takes the command's
/// parallel work as soon as it is there, and spins (for up to `SPIN`) between pieces instead of
/// going to sleep. On this project's 2-vCPU virtual machine a sleeping worker's core is handed
/// back to the host, and waking it again is slow in busy minutes, at every parallel op after a
/// serial stretch (DiT-S/2 training step up to 15 % faster with this in such minutes, 2.5 % on
/// average over 7 alternated pairs); OpenMP runtimes spin the same way (KMP_BLOCKTIME). After `SPIN` without work (loading a model, writing images) it naps
/// in short steps rather than burn the core. A no-op on the command's own thread (a thread
/// waiting inside the command may pick this job up; it must not spin there until the end).
fn keep_awake(done: &AtomicBool, command_thread: Option<usize>) {
    const SPIN: Duration = Duration::from_millis(50);
    if rayon::current_thread_index() == command_thread {
        return;
    }
    let mut last_work = Instant::now();
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            last_work = Instant::now();
        } else if last_work.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Generate(a) => generate::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Study(s) => study::run(s),
        Command::Forward(a) => forward::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Schedule(a) => schedule::run(a),
        Command::Train(a) => train::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Attention(a) => attention::run(a),
    }
}
