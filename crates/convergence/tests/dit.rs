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
