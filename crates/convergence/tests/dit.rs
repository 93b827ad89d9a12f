//! DiT against diffusers and the official facebookresearch code (fixtures `dit`, `dit_official`,
//! `dit_zero_init`).

mod common;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, fixture, io};
use convergence::models::any::AnyModel;
use convergence::models::dit::{official_param_count, DiT, DiTConfig, Numerics};
use convergence::nn::Init;
use convergence::weights::{load_model, LoadOptions};

fn dit(path: &std::path::Path) -> AnyModel {
    load_model(path, &LoadOptions { num_heads: Some(2), ..Default::default() }).expect("load")
}

#[test]
fn diffusers_dit_matches_fixture() {
    let io = io("dit");
    let out = dit(&fixture("dit")).forward_io(&io).unwrap();
    assert_close("dit output.sample", &out["output.sample"], &io["output.sample"], 1e-5, 1e-4);
}

#[test]
fn official_layout_matches_official_forward_from_safetensors_and_pickle() {
    let io = io("dit_official");
    for file in ["model.safetensors", "model.pt"] {
        let out = dit(&fixture("dit_official").join(file)).forward_io(&io).unwrap();
        assert_close(file, &out["output.sample"], &io["output.sample_official"], 1e-5, 1e-4);
    }
    let out = dit(&fixture("dit_official").join("diffusers")).forward_io(&io).unwrap();
    assert_close("diffusers copy", &out["output.sample"], &io["output.sample"], 1e-5, 1e-4);
}

#[test]
fn zero_init_dit_outputs_exactly_zero() {
    let io = io("dit_zero_init");
    let out = dit(&fixture("dit_zero_init")).forward_io(&io).unwrap();
    let max = out["output.sample"].abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert_eq!(max.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn fresh_adaln_zero_model_is_identity_blocks_and_zero_output() {
    // Our own initialisation (Init::XavierUniform = the paper's recipe) has the same property.
    let cfg = DiTConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        num_layers: 2,
        sample_size: 8,
        ..Default::default()
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = DiT::new(vb, &cfg, Numerics::Diffusers, Init::XavierUniform).unwrap();
    let x = Tensor::randn(0f32, 1., (2, 4, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[10u32, 500], &Device::Cpu).unwrap();
    let y = Tensor::new(&[3u32, 1000], &Device::Cpu).unwrap();
    let out = m.forward_labels(&x, &t, &y).unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
    assert!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0));
}

#[test]
fn non_square_latents_run() {
    let AnyModel::DiT(m) = dit(&fixture("dit")) else { panic!("not a DiT") };
    let x = Tensor::randn(0f32, 1., (1, 4, 8, 12), &Device::Cpu).unwrap();
    let t = Tensor::new(&[5i64], &Device::Cpu).unwrap();
    let y = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    assert_eq!(m.forward_labels(&x, &t, &y).unwrap().dims(), &[1, 8, 8, 12]);
}

#[test]
fn preset_parameter_counts_match_diffusers_and_official() {
    let expect = [
        ("dit-s-2", 39_805_088u64, 32_963_360u64, 12_117_245_952u64),
        ("dit-b-2", 147_439_904, 130_512_416, 0),
        ("dit-l-2", 511_609_888, 458_102_816, 0),
        ("dit-xl-2", 749_826_464, 675_129_632, 0),
        ("dit-xl-4", 749_992_448, 675_074_432, 0),
        ("dit-xl-8", 750_656_384, 675_683_072, 0),
    ];
    for (name, diffusers, official, flops) in expect {
        let cfg = DiTConfig::preset(name).unwrap();
        assert_eq!(cfg.param_list().unwrap().total(), diffusers, "{name}");
        assert_eq!(official_param_count(&cfg).unwrap(), official, "{name} official");
        if flops > 0 {
            assert_eq!(cfg.flops(32, 32), flops, "{name} flops");
        }
    }
    // the fixture model: official 15,968, diffusers 20,368
    let cfg: DiTConfig =
        convergence::weights::read_json(&fixture("dit_official/diffusers/config.json")).unwrap();
    assert_eq!(cfg.param_list().unwrap().total(), 20_368);
    assert_eq!(official_param_count(&cfg).unwrap(), 15_968);
}

/// Copies the `dit` fixture to a temp dir with its weights rewritten by `write`.
fn rewritten(name: &str, write: impl Fn(&std::path::Path, Vec<(String, Tensor)>)) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("conv-dit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("dit/config.json"), dir.join("config.json")).unwrap();
    let store = convergence::weights::WeightStore::open_safetensors(&[fixture(
        "dit/diffusion_pytorch_model.safetensors",
    )])
    .unwrap();
    write(&dir, store.load_all(&Device::Cpu).unwrap());
    dir
}

#[test]
fn half_precision_weights_load_converted_to_f32() {
    let io = io("dit");
    for (name, dtype, atol) in [("f16", DType::F16, 5e-3), ("bf16", DType::BF16, 5e-2)] {
        let dir = rewritten(name, |dir, tensors| {
            let t: std::collections::HashMap<String, Tensor> =
                tensors.into_iter().map(|(n, t)| (n, t.to_dtype(dtype).unwrap())).collect();
            candle_core::safetensors::save(&t, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        });
        let out = dit(&dir).forward_io(&io).unwrap();
        assert_eq!(out["output.sample"].dtype(), DType::F32);
        assert_close(name, &out["output.sample"], &io["output.sample"], atol, 1e-2);
    }
}

#[test]
fn sharded_weights_with_an_index_load_exactly() {
    let io = io("dit");
    let dir = rewritten("sharded", |dir, tensors| {
        let mut weight_map = serde_json::Map::new();
        let (a, b): (Vec<_>, Vec<_>) = tensors.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
        for (k, part) in [a, b].into_iter().enumerate() {
            let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", k + 1);
            let t: std::collections::HashMap<String, Tensor> = part.into_iter().map(|(_, nt)| nt).collect();
            for n in t.keys() {
                weight_map.insert(n.clone(), file.clone().into());
            }
            candle_core::safetensors::save(&t, dir.join(&file)).unwrap();
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string())
            .unwrap();
    });
    let out = dit(&dir).forward_io(&io).unwrap();
    assert_close("sharded", &out["output.sample"], &io["output.sample"], 1e-5, 1e-4);
}
