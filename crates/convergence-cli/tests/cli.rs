//! The binary on bad input: one-line errors naming the culprit and a non-zero exit, never a
//! panic; and `forward` / `inspect` / `schedule` on real fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("conv-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the binary; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_convergence")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Asserts a clean failure: non-zero exit, one `error:` line mentioning every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = run(args);
    assert!(!ok, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let line =
        err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "{args:?}: `{line}` should mention `{n}`");
    }
}

/// A copy of the `dit` fixture model whose weights file `edit` may damage.
fn dit_copy(name: &str, edit: impl Fn(&Path)) -> PathBuf {
    let dir = tmp(name);
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixtures().join("dit").join(f), dir.join(f)).unwrap();
    }
    edit(&dir.join("diffusion_pytorch_model.safetensors"));
    dir
}

fn forward(model: &Path, out: &Path) -> Vec<String> {
    let io = fixtures().join("dit/io.safetensors");
    vec![
        "forward".into(),
        "--model".into(),
        model.display().to_string(),
        "--inputs".into(),
        io.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn forward_writes_the_fixture_output() {
    let out = tmp("fwd").join("out.safetensors");
    let (ok, stdout, err) = run(&strs(&forward(&fixtures().join("dit"), &out)));
    assert!(ok, "{err}");
    assert!(stdout.contains("output.sample"));
    assert!(out.exists());
}

#[test]
fn truncated_safetensors_is_named() {
    let dir = dit_copy("trunc", |w| {
        let bytes = std::fs::read(w).unwrap();
        std::fs::write(w, &bytes[..bytes.len() / 2]).unwrap();
    });
    let out = dir.join("out.safetensors");
    fails_with(&strs(&forward(&dir, &out)), &["diffusion_pytorch_model.safetensors"]);
}

#[test]
fn garbage_safetensors_is_named() {
    let dir = dit_copy("garbage", |w| std::fs::write(w, b"not a safetensors file at all").unwrap());
    fails_with(
        &strs(&forward(&dir, &dir.join("o.safetensors"))),
        &["diffusion_pytorch_model.safetensors", "safetensors"],
    );
}

#[test]
fn wrong_shape_and_missing_tensor_are_named() {
    // A config that disagrees with the weights: every tensor has the wrong shape.
    let dir = dit_copy("shape", |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"attention_head_dim\": 16", "\"attention_head_dim\": 8"),
    )
    .unwrap();
    fails_with(
        &strs(&forward(&dir, &dir.join("o.safetensors"))),
        &["diffusion_pytorch_model.safetensors", "shape", "expected"],
    );
    // One more layer than the file holds: a missing tensor.
    let dir = dit_copy("missing", |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("\"num_layers\": 2", "\"num_layers\": 3")).unwrap();
    fails_with(
        &strs(&forward(&dir, &dir.join("o.safetensors"))),
        &["missing tensor", "transformer_blocks.2"],
    );
}

#[test]
fn unknown_class_and_missing_files_are_named() {
    let dir = dit_copy("class", |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), cfg.replace("DiTTransformer2DModel", "FancyNewModel")).unwrap();
    fails_with(&strs(&forward(&dir, &dir.join("o.safetensors"))), &["FancyNewModel", "config.json"]);
    fails_with(&strs(&forward(Path::new("/no/such/model"), &dir.join("o.safetensors"))), &["/no/such/model"]);
    fails_with(&["inspect", "dit-xxl-3"], &["dit-xxl-3", "preset"]);
    fails_with(&["inspect", "dit-xl-2", "--resolution", "255x256"], &["255x256"]);
}

#[test]
fn inspect_prints_the_real_counts() {
    let (ok, out, err) = run(&["inspect", "dit-xl-2", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["parameters"], 749_826_464u64);
    assert_eq!(v["parameters_original"], 675_129_632u64);
    let (ok, out, _) = run(&["inspect", "sd3-medium", "--resolution", "1024x1024"]);
    assert!(
        ok && out.contains("4,429") && out.contains("2,028,328,000") && out.contains("2,084,951,104"),
        "{out}"
    );
}

#[test]
fn schedule_writes_diffusers_numbers() {
    let out = tmp("sched").join("s.safetensors");
    let cfg = fixtures().join("sched/scheduler_flux/scheduler_config.json");
    let (ok, stdout, err) = run(&[
        "schedule",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "4",
        "--image-seq-len",
        "1024",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(stdout.contains("timesteps") && out.exists());
    fails_with(&["schedule", "--config", "/nope.json", "--steps", "4"], &["/nope.json"]);
}

/// Runs `generate` on a pipeline fixture from its first initial latent and compares the saved
/// final latents and the PNG with diffusers' (`output.latents[0]`, `output.images[0]` of
/// `expected`, the fixture that holds the run's end: the refiner's for an ensemble).
fn generate_reproduces(case: &str, expected: &str, prompt: &str, extra: &[&str]) {
    use candle_core::{Device, IndexOp};
    let dev = Device::Cpu;
    let load =
        |c: &str| candle_core::safetensors::load(fixtures().join(c).join("io.safetensors"), &dev).unwrap();
    let (io, reference) = (load(case), load(expected));
    let dir = tmp(&format!("{case}-{}", extra.len()));
    let noise_file = dir.join("noise.safetensors");
    let noise = io["input.latents"].i(0..1).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents", noise)]), &noise_file)
        .unwrap();
    let saved = dir.join("final.safetensors");
    let model = fixtures().join(case);
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    if !prompt.is_empty() {
        args.extend_from_slice(&[prompt, "--width", "64", "--height", "64"]);
    }
    args.extend_from_slice(extra);
    let (noise_s, saved_s, out_s) = (
        noise_file.to_str().unwrap().to_string(),
        saved.to_str().unwrap().to_string(),
        dir.join("out.png").to_str().unwrap().to_string(),
    );
    args.extend_from_slice(&["--latents", &noise_s, "--save-latents", &saved_s, "-o", &out_s]);
    if !extra.contains(&"--steps") {
        args.extend_from_slice(&["--steps", "3"]);
    }
    let (ok, _, err) = run(&args);
    assert!(ok, "{err}");
    let ours = candle_core::safetensors::load(&saved, &dev).unwrap()["latents"].clone();
    let diff = (ours - reference["output.latents"].i(0..1).unwrap()).unwrap().abs().unwrap();
    let diff = diff.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 2e-4, "{case}: latents max diff {diff}");
    // The PNG within one 8-bit level of diffusers' image (float in [0, 1], HWC).
    let png = image::open(&out_s).unwrap().to_rgb8();
    let want = reference["output.images"].i(0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst =
        png.as_raw().iter().zip(&want).map(|(&p, &w)| (p as f32 - w * 255.0).abs()).fold(0f32, f32::max);
    assert!(worst <= 1.0, "{case}: PNG differs by {worst} levels");
}

#[test]
fn generate_reproduces_diffusers_final_latents_from_given_noise() {
    let fox = "a red fox sitting in the snow, watercolor painting";
    let sd3 = ["--negative-prompt", "blurry, low quality", "--guidance-scale", "4"];
    generate_reproduces("pipe_sd3", "pipe_sd3", fox, &sd3);
    generate_reproduces("pipe_flux", "pipe_flux", fox, &["--guidance-scale", "3.5"]);
    let dit = ["--class", "207", "--guidance-scale", "4"];
    generate_reproduces("pipe_dit", "pipe_dit", "", &dit);
    let model = fixtures().join("pipe_sd3");
    fails_with(
        &["generate", "--model", model.to_str().unwrap(), "x", "--width", "70", "-o", "x.png"],
        &["70x1024", "64 or 80"],
    );
}

#[test]
fn generate_reproduces_sdxl_and_the_ensemble_of_experts() {
    let fox = "a red fox sitting in the snow, watercolor painting";
    let micro = ["--original-size", "96,128", "--crops-coords-top-left", "4,8", "--target-size", "64,64"];
    let mut sdxl = vec!["--negative-prompt", "blurry, low quality", "--guidance-scale", "5"];
    sdxl.extend_from_slice(&micro);
    generate_reproduces("pipe_sdxl", "pipe_sdxl", fox, &sdxl);
    let refiner = fixtures().join("pipe_sdxl_refiner");
    let refiner = refiner.to_str().unwrap();
    sdxl.extend_from_slice(&["--steps", "6", "--refiner", refiner, "--denoising-end", "0.8"]);
    generate_reproduces("pipe_sdxl", "pipe_sdxl_refiner", fox, &sdxl);
    let base = fixtures().join("pipe_sdxl");
    let base = base.to_str().unwrap();
    fails_with(&["generate", "--model", base, "x", "--width", "60", "-o", "x.png"], &["60x64", "56 or 64"]);
    fails_with(
        &["generate", "--model", base, "x", "--refiner", refiner, "-o", "x.png"],
        &["--denoising-end"],
    );
    fails_with(&["generate", "--model", base, "x", "--original-size", "96", "-o", "x.png"], &["A,B"]);

    // A prompt past CLIP's 77 tokens warns and quotes what was dropped.
    let out = tmp("sdxl-long").join("long.png");
    let long = format!("a red fox {}", "in the snow ".repeat(40));
    let (ok, _, err) =
        run(&["generate", "--model", base, &long, "--steps", "1", "-o", out.to_str().unwrap()]);
    assert!(ok && err.contains("warning:") && err.contains("truncated") && err.contains("snow"), "{err}");

    // A pipeline directory without its VAE names the missing component.
    let broken = tmp("sdxl-novae");
    copy_dir(&fixtures().join("pipe_sdxl"), &broken);
    std::fs::remove_dir_all(broken.join("vae")).unwrap();
    fails_with(&["generate", "--model", broken.to_str().unwrap(), "x", "-o", "x.png"], &["vae/", "missing"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}
