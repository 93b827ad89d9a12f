//! The trainer: learning on a toy set, exact resume, and clear errors on bad input.

use candle_core::Device;
use convergence::models::dit::DiTConfig;
use convergence::train::data::{Dataset, Targets};
use convergence::train::objective::{Objective, TimestepSampling};
use convergence::train::optim::AdamWConfig;
use convergence::train::run::TrainFile;
use convergence::train::trainer::{new_dit, EpochCache, LoopConfig, Trainer};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("conv-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// 8x8 grey images of two classes: a bright left half, or a bright top half.
fn toy_set(n: usize) -> Dataset {
    let mut pixels = vec![];
    let mut ids = vec![];
    for i in 0..n {
        let class = (i % 2) as u32;
        for y in 0..8 {
            for x in 0..8 {
                let on = if class == 0 { x < 4 } else { y < 4 };
                pixels.push(if on { 230 } else { 20 } + (i % 7) as u8);
            }
        }
        ids.push(class);
    }
    Dataset {
        pixels,
        channels: 1,
        height: 8,
        width: 8,
        targets: Targets::Labels { ids, classes: vec!["left".into(), "top".into()] },
    }
}

fn tiny_trainer(out: &std::path::Path, steps: usize) -> Trainer {
    let cfg = DiTConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        in_channels: 1,
        out_channels: Some(1),
        num_layers: 2,
        sample_size: 8,
        patch_size: 2,
        num_embeds_ada_norm: Some(2),
        ..Default::default()
    };
    let objective = Objective::RectifiedFlow {
        timesteps: TimestepSampling::LogitNormal { mean: 0.0, std: 1.0 },
        timestep_scale: 1000.0,
    };
    let trainee = new_dit(&cfg, &objective, 5, &Device::Cpu).unwrap();
    let optim = AdamWConfig {
        lr: 3e-3,
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
        warmup_steps: 10,
        cooldown_steps: 0,
        grad_clip: 1.0,
    };
    let lc = LoopConfig {
        steps,
        batch_size: 16,
        ema_decay: 0.99,
        seed: 5,
        checkpoint_every: 10,
        class_dropout: 0.1,
        ema_start: 0,
        sample_every: 0,
    };
    Trainer::new(trainee, objective, optim, lc, out).unwrap()
}

fn losses(t: &mut Trainer, data: &Dataset, n: usize) -> Vec<f64> {
    let mut cache = EpochCache::default();
    (0..n).map(|_| t.train_step(data, &mut cache).unwrap().loss).collect()
}

#[test]
fn a_few_hundred_steps_lower_the_loss_clearly() {
    let data = toy_set(64);
    let mut t = tiny_trainer(&tmp("learn"), 300);
    let l = losses(&mut t, &data, 300);
    let first: f64 = l[..20].iter().sum::<f64>() / 20.0;
    let last: f64 = l[280..].iter().sum::<f64>() / 20.0;
    assert!(last < 0.6 * first, "loss {first:.3} -> {last:.3}");
}

#[test]
fn resume_gives_the_same_losses_as_an_uninterrupted_run() {
    let data = toy_set(40); // not a multiple of the batch: epochs straddle steps
    let straight = losses(&mut tiny_trainer(&tmp("straight"), 12), &data, 12);
    let dir = tmp("resumed");
    let mut first = tiny_trainer(&dir, 12);
    let mut l = losses(&mut first, &data, 7);
    first.save_checkpoint().unwrap();
    drop(first); // "killed"
    let mut second = tiny_trainer(&dir, 12);
    second.load_checkpoint(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(second.step(), 7);
    l.extend(losses(&mut second, &data, 5));
    assert_eq!(l, straight);
}

#[test]
fn missing_and_corrupt_checkpoints_are_named() {
    let dir = tmp("corrupt");
    let mut t = tiny_trainer(&dir, 4);
    let err = t.load_checkpoint(&dir.join("nope.safetensors")).unwrap_err().to_string();
    assert!(err.contains("nope.safetensors"), "{err}");
    std::fs::write(dir.join("bad.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let err = t.load_checkpoint(&dir.join("bad.safetensors")).unwrap_err().to_string();
    assert!(err.contains("bad.safetensors") && err.contains("safetensors"), "{err}");
}

#[test]
fn nan_loss_stops_training_and_keeps_the_last_checkpoint() {
    let dir = tmp("nan");
    let mut t = tiny_trainer(&dir, 10);
    let data = toy_set(32);
    losses(&mut t, &data, 2);
    t.save_checkpoint().unwrap();
    let saved = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let mut bad = toy_set(32);
    bad.pixels.iter_mut().for_each(|p| *p = 0);
    // A NaN weight makes the next loss NaN.
    let (_, var) =
        t.trainee.varmap.data().lock().unwrap().iter().next().map(|(k, v)| (k.clone(), v.clone())).unwrap();
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let err = t.train_step(&bad, &mut EpochCache::default()).unwrap_err().to_string();
    assert!(err.contains("NaN") && err.contains("checkpoint.safetensors"), "{err}");
    assert_eq!(std::fs::read(dir.join("checkpoint.safetensors")).unwrap(), saved);
}

#[test]
fn train_toml_with_unknown_keys_is_refused() {
    let dir = tmp("toml");
    let good = r#"
out_dir = "out"
[model]
sample_size = 8
[data]
kind = "idx"
path = "/nonexistent"
split = "train"
[objective]
kind = "rectified-flow"
timesteps = { kind = "uniform" }
[optim]
lr = 1e-3
[train]
steps = 10
batch_size = 4
"#;
    let path = dir.join("train.toml");
    std::fs::write(&path, good).unwrap();
    let f = TrainFile::read(&path).unwrap();
    assert_eq!(f.dit_config(&path).unwrap().sample_size, 8);
    std::fs::write(&path, good.replace("steps = 10", "steps = 10\nbatchsize = 3")).unwrap();
    let err = TrainFile::read(&path).unwrap_err().to_string();
    assert!(err.contains("train.toml") && err.contains("batchsize"), "{err}");
    std::fs::write(&path, good.replace("sample_size = 8", "sample_size = 8\nhidden = 3")).unwrap();
    let err = TrainFile::read(&path).unwrap().dit_config(&path).unwrap_err().to_string();
    assert!(err.contains("unknown key `hidden`"), "{err}");
    // The data folder is missing: the error names it.
    std::fs::write(&path, good).unwrap();
    let err = convergence::train::run::build(&path, false, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("/nonexistent"), "{err}");
}

#[test]
fn an_image_folder_without_images_is_named() {
    let dir = tmp("empty-folder");
    std::fs::create_dir_all(dir.join("cats")).unwrap();
    let cfg = convergence::train::run::DataConfig::Folders { path: dir.clone(), size: 8, rgb: false };
    let err = cfg.load().unwrap_err().to_string();
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
}

/// A tiny text-to-image run from a train.toml: the text encoder learns with the denoiser
/// (gradients reach it through the conditioning, and the attention's queries and keys learn),
/// resume is exact, and the saved directory loads as a `ConvergenceT2IPipeline` and generates.
#[test]
fn text_conditioned_training_resumes_exactly_and_saves_a_working_pipeline() {
    use convergence::pipelines::t2i::T2IPipeline;
    use convergence::train::run::{build, run};
    let mmdit =
        "_class_name = \"SD3Transformer2DModel\"\ncaption_projection_dim = 32\npos_embed_max_size = 8";
    let cross = "_class_name = \"TextDiTTransformer2DModel\"\ntext_conditioning = \"cross-attention\"";
    for (name, model) in [("mmdit", mmdit), ("cross", cross)] {
        let toml = format!(
            "out_dir = \"run\"\n[model]\n{model}\nsample_size = 32\npatch_size = 4\nin_channels = 3\n\
             out_channels = 3\nnum_layers = 2\nnum_attention_heads = 2\nattention_head_dim = 16\n\
             joint_attention_dim = 16\npooled_projection_dim = 8\n[text_encoder]\nhidden_size = 16\n\
             intermediate_size = 32\nprojection_dim = 8\nnum_hidden_layers = 1\nnum_attention_heads = 2\n\
             hidden_act = \"gelu\"\n[data]\nkind = \"shapes\"\ncount = 64\nseed = 3\n[objective]\n\
             kind = \"rectified-flow\"\ntimesteps = {{ kind = \"uniform\" }}\n[optim]\nlr = 1e-3\n[train]\n\
             steps = 4\nbatch_size = 8\ncheckpoint_every = 2\nclass_dropout = 0.5\n"
        );
        let config = |tag: &str| {
            let path = tmp(&format!("t2i-{name}-{tag}")).join("train.toml");
            std::fs::write(&path, &toml).unwrap();
            path
        };
        let losses = |path: &std::path::Path| -> Vec<String> {
            let log = std::fs::read_to_string(path.with_file_name("run/metrics.jsonl")).unwrap();
            log.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string())
                .collect()
        };
        // Uninterrupted.
        let whole = config("whole");
        let (mut trainer, data) = build(&whole, false, &Device::Cpu).unwrap();
        // Copies: the raw weights share storage with the variables the optimiser updates in place.
        let before: std::collections::HashMap<String, candle_core::Tensor> =
            trainer.weights(true).into_iter().map(|(k, t)| (k, t.copy().unwrap())).collect();
        run(&mut trainer, &data, None, true).unwrap();
        let after = trainer.weights(true);
        let moved = |key: &str| {
            let d = (&before[key] - &after[key]).unwrap().abs().unwrap().sum_all().unwrap();
            d.to_scalar::<f32>().unwrap() > 0.0
        };
        assert!(moved("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight"), "{name}");
        assert!(moved("text_encoder.text_model.embeddings.token_embedding.weight"), "{name}");
        assert!(moved("transformer.transformer_blocks.0.attn.to_k.weight"), "{name}: keys never learn");
        // Interrupted after 2 steps and resumed: the same losses, bit for bit.
        let split = config("split");
        let (mut first, data) = build(&split, false, &Device::Cpu).unwrap();
        run(&mut first, &data, Some(2), true).unwrap();
        let (mut resumed, data) = build(&split, true, &Device::Cpu).unwrap();
        assert_eq!(resumed.step(), 2);
        run(&mut resumed, &data, None, true).unwrap();
        assert_eq!(losses(&whole), losses(&split), "{name}");
        // The saved model is a pipeline that generates and names words it cannot read.
        let pipe = T2IPipeline::load(&whole.with_file_name("run/model"), &Device::Cpu).unwrap();
        let images =
            pipe.generate(&["a red circle", "a small blue star above a white square"], 0, 2, 2.0).unwrap();
        assert_eq!(images.dims(), &[2, 3, 32, 32]);
        let warned = pipe.encode_prompt(&["a pink circle"]).unwrap().warnings;
        assert!(warned.iter().any(|w| w.contains("pink")), "{warned:?}");
    }
}
