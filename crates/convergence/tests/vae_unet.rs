//! AutoencoderKL (fixtures `vae4`, `vae16`) and the SDXL UNet (`sdxl_unet`) against diffusers,
//! stage by stage; full-size parameter and FLOP counts against param_counts.json; latent scaling,
//! odd sizes and batching as properties; the inspect summaries.

mod common;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, fixture, io};
use convergence::inspect::summarize;
use convergence::models::any::AnyModel;
use convergence::models::unet::{AttentionLevel, TextTime, UNet2DConditionModel, UNetConfig};
use convergence::models::vae::{AutoencoderKL, VaeConfig};
use convergence::models::FlopCount;
use convergence::nn::Init;
use convergence::weights::{load_model, read_json, read_safetensors, LoadOptions, WeightStore};
use convergence::Result;
use std::collections::{BTreeMap, HashMap};

const VAE_ATOL: f32 = 2e-4;
const UNET_ATOL: f32 = 2e-5;
const RTOL: f32 = 1e-4;

fn vae(case: &str) -> Result<AutoencoderKL> {
    match load_model(&fixture(case), &LoadOptions::default())? {
        AnyModel::Vae(m) => Ok(m),
        other => panic!("{case} loaded as {}", other.class_name()),
    }
}

fn unet() -> Result<UNet2DConditionModel> {
    match load_model(&fixture("sdxl_unet"), &LoadOptions::default())? {
        AnyModel::UNet(m) => Ok(m),
        other => panic!("sdxl_unet loaded as {}", other.class_name()),
    }
}

/// Compares every `tap.*` of the fixture with the stage of the same name; all must be present.
fn assert_taps(case: &str, io: &HashMap<String, Tensor>, stages: &HashMap<String, Tensor>, atol: f32) {
    let mut taps: Vec<_> = io.keys().filter_map(|k| k.strip_prefix("tap.")).collect();
    taps.sort();
    assert!(!taps.is_empty());
    for tap in taps {
        let ours = stages.get(tap).unwrap_or_else(|| panic!("{case}: no stage `{tap}`"));
        assert_close(&format!("{case} {tap}"), ours, &io[&format!("tap.{tap}")], atol, RTOL);
    }
}

fn recorder(stages: &mut HashMap<String, Tensor>) -> impl FnMut(&str, &Tensor) + '_ {
    |name: &str, t: &Tensor| {
        stages.insert(name.to_string(), t.clone());
    }
}

#[test]
fn vae_fixtures_match_diffusers_outputs_and_taps() -> Result<()> {
    for case in ["vae4", "vae16"] {
        let io = io(case);
        let m = vae(case)?;
        let out = AnyModel::Vae(m.clone()).forward_io(&io)?;
        for name in ["output.latent_mean", "output.latent_logvar", "output.decoded"] {
            assert_close(&format!("{case} {name}"), &out[name], &io[name], VAE_ATOL, RTOL);
        }
        let mut stages = HashMap::new();
        let post = m.encode_with(&io["input.sample"], &mut recorder(&mut stages))?;
        m.decode_with(&post.mean, &mut recorder(&mut stages))?;
        assert_taps(case, &io, &stages, VAE_ATOL);
        assert_eq!(stages.contains_key("quant_conv_out"), m.config().use_quant_conv, "{case}");
        // The pipeline's latent: (mean - shift) * scale.
        let scaled = m.to_latent(&post.mean)?;
        assert_close(&format!("{case} latent_scaled"), &scaled, &io["derived.latent_scaled"], VAE_ATOL, RTOL);
    }
    Ok(())
}

#[test]
fn unet_fixture_matches_diffusers_output_and_taps() -> Result<()> {
    let io = io("sdxl_unet");
    let m = unet()?;
    let out = AnyModel::UNet(m.clone()).forward_io(&io)?;
    assert_close("sdxl_unet output", &out["output.sample"], &io["output.sample"], UNET_ATOL, RTOL);
    let added =
        TextTime { text_embeds: io["input.text_embeds"].clone(), time_ids: io["input.time_ids"].clone() };
    let (x, t, ctx) = (&io["input.sample"], &io["input.timestep"], &io["input.encoder_hidden_states"]);
    let mut stages = HashMap::new();
    let y = m.forward_with(x, t, ctx, Some(&added), &mut recorder(&mut stages))?;
    assert_taps("sdxl_unet", &io, &stages, UNET_ATOL);
    assert_eq!(values(&y)?, values(&out["output.sample"])?);

    // SDXL's added conditioning is required, and its width is checked.
    let err = m.forward(x, t, ctx, None).unwrap_err().to_string();
    assert!(err.contains("text_embeds and time_ids"), "{err}");
    let five = TextTime { time_ids: io["input.time_ids"].narrow(1, 0, 5)?, ..added };
    let err = m.forward(x, t, ctx, Some(&five)).unwrap_err().to_string();
    assert!(
        err.contains("text_embeds (32) + 5 time ids x 8 = 72 values, but add_embedding takes 80"),
        "{err}"
    );
    Ok(())
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn file_shapes(case: &str) -> Result<BTreeMap<String, Vec<usize>>> {
    let path = fixture(case).join("diffusion_pytorch_model.safetensors");
    Ok(read_safetensors(&path, &Device::Cpu)?.into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect())
}

#[test]
fn fixture_parameter_lists_are_the_files_tensors() -> Result<()> {
    for case in ["vae4", "vae16"] {
        let cfg: VaeConfig = read_json(&fixture(case).join("config.json"))?;
        let listed: BTreeMap<_, _> = cfg.param_list()?.0.into_iter().collect();
        assert_eq!(listed, file_shapes(case)?, "{case}");
    }
    let cfg: UNetConfig = read_json(&fixture("sdxl_unet").join("config.json"))?;
    let listed: BTreeMap<_, _> = cfg.param_list()?.0.into_iter().collect();
    assert_eq!(listed, file_shapes("sdxl_unet")?);
    Ok(())
}

/// [linear (addmm + mm), attention (bmm), convolution] as param_counts.json splits them.
fn split(f: FlopCount) -> [u64; 3] {
    [f.linear, f.attention, f.conv]
}

#[test]
fn unet_presets_match_reference_counts_and_flops() -> Result<()> {
    // param_counts.json: parameters and per-op FLOPs at 1024px (latent 128x128), 77 text tokens.
    let reference = [
        (
            "sdxl-base",
            2_567_463_684u64,
            [3_325_294_018_560u64 + 1_028_915_200_000, 783_915_417_600, 1_623_111_761_920],
        ),
        (
            "sdxl-refiner",
            2_259_526_660,
            [2_823_094_272_000 + 862_536_597_504, 1_190_802_751_488, 2_409_577_316_352],
        ),
    ];
    for (name, params, per_op) in reference {
        let cfg = UNetConfig::preset(name).expect("preset");
        assert_eq!(cfg.param_list()?.total(), params, "{name}");
        assert_eq!(split(cfg.flops(128, 128, 77)?), per_op, "{name}");
    }
    let base = UNetConfig::preset("sdxl-base").expect("preset");
    assert_eq!(base.flops(128, 128, 77)?.total(), 6_761_236_398_080);
    let level = |size, heads, layers| AttentionLevel { size, heads, head_dim: 64, layers };
    assert_eq!(base.attention_levels(128, 128)?, vec![level((64, 64), 10, 10), level((32, 32), 20, 60)]);
    let refiner = UNetConfig::preset("sdxl-refiner").expect("preset");
    let levels = refiner.attention_levels(128, 128)?;
    assert_eq!(
        levels.iter().map(|l| (l.tokens(), l.layers)).collect::<Vec<_>>(),
        [(4096, 20), (1024, 20), (256, 4)]
    );
    Ok(())
}

#[test]
fn vae_presets_match_reference_counts_and_flops() -> Result<()> {
    // (name, parameters, encode_1024px, decode_1024px) with linear = addmm + mm.
    let linear = 8_589_934_592u64 + 25_769_803_776;
    let bmm = 549_755_813_888u64;
    let reference = [
        ("sdxl-vae", 83_653_863u64, 4_294_835_175_424u64, 9_886_277_042_176u64),
        ("sd3-vae", 83_819_683, 4_298_456_956_928, 9_888_088_457_216),
        ("flux-vae", 83_819_683, 4_298_456_956_928, 9_888_088_457_216),
    ];
    for (name, params, encode_conv, decode_conv) in reference {
        let cfg = VaeConfig::preset(name).expect("preset");
        assert_eq!(cfg.param_list()?.total(), params, "{name}");
        let (encode, decode) = cfg.flops(1024, 1024)?;
        assert_eq!(split(encode), [linear, bmm, encode_conv], "{name} encode");
        assert_eq!(split(decode), [linear, bmm, decode_conv], "{name} decode");
        assert_eq!(cfg.level_sizes(1024, 1024).last(), Some(&(128, 128)));
    }
    let sdxl = VaeConfig::preset("sdxl-vae").expect("preset");
    let (encode, decode) = sdxl.flops(1024, 1024)?;
    assert_eq!((encode.total(), decode.total()), (4_878_950_727_680, 10_470_392_594_432));
    Ok(())
}

#[test]
fn latent_scaling_round_trips_and_sampling_centres_on_the_mean() -> Result<()> {
    let dev = Device::Cpu;
    let z = Tensor::randn(0f32, 3., (2, 16, 5, 7), &dev)?;
    let tiny: VaeConfig = read_json(&fixture("vae16").join("config.json"))?;
    for name in VaeConfig::preset_names() {
        let preset = VaeConfig::preset(&name).expect("preset");
        let cfg = VaeConfig {
            scaling_factor: preset.scaling_factor,
            shift_factor: preset.shift_factor,
            ..tiny.clone()
        };
        let vm = VarMap::new();
        let m = AutoencoderKL::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg, Init::Default)?;
        // Either way round, the two maps undo each other.
        assert_close(&name, &m.from_latent(&m.to_latent(&z)?)?, &z, 1e-5, 1e-6);
        assert_close(&name, &m.to_latent(&m.from_latent(&z)?)?, &z, 1e-5, 1e-6);
        // The shift is subtracted before scaling: the VAE value `shift` is the pipeline's zero.
        let at_shift = m.to_latent(&Tensor::full(preset.shift_factor.unwrap_or(0.0) as f32, 3, &dev)?)?;
        assert_eq!(values(&at_shift)?, vec![0.0; 3], "{name}");
    }
    let m = vae("vae16")?;
    let post = m.encode(&io("vae16")["input.sample"])?;
    assert_eq!(values(&post.sample(&post.mean.zeros_like()?)?)?, values(&post.mean)?);
    // One standard deviation of noise moves each cell by exp(logvar / 2).
    let moved = (post.sample(&post.mean.ones_like()?)? - &post.mean)?;
    assert_close("std", &moved, &(&post.logvar * 0.5)?.exp()?, 1e-6, 1e-5);
    Ok(())
}

#[test]
fn unet_handles_odd_latents_and_batches_independently() -> Result<()> {
    let io = io("sdxl_unet");
    let m = unet()?;
    let dev = Device::Cpu;
    // 7x9: the downsampler rounds up (4x5) and the upsampler returns to the skip's size.
    let x = Tensor::randn(0f32, 1., (2, 4, 7, 9), &dev)?;
    let added =
        TextTime { text_embeds: io["input.text_embeds"].clone(), time_ids: io["input.time_ids"].clone() };
    let ctx = &io["input.encoder_hidden_states"];
    let t = Tensor::new(&[999f32, 3.], &dev)?;
    let y = m.forward(&x, &t, ctx, Some(&added))?;
    assert_eq!(y.dims(), &[2, 4, 7, 9]);
    // Sample 1 alone, with its timestep as a scalar, gives the same numbers.
    let one = |t: &Tensor| t.narrow(0, 1, 1);
    let added1 = TextTime { text_embeds: one(&added.text_embeds)?, time_ids: one(&added.time_ids)? };
    let y1 = m.forward(&one(&x)?, &Tensor::new(3f32, &dev)?, &one(ctx)?, Some(&added1))?;
    assert_close("batch item", &y1, &one(&y)?, 1e-5, 1e-5);
    assert_eq!(m.config().level_sizes(7, 9), vec![(7, 9), (4, 5)]);
    Ok(())
}

#[test]
fn conv_projections_load_as_the_same_per_position_map() -> Result<()> {
    // SD 1.x stores Transformer2DModel's proj_in/proj_out as 1x1 convs [C, C, 1, 1] applied before
    // flattening: the same map as SDXL's linears after it.
    let io = io("sdxl_unet");
    let path = fixture("sdxl_unet").join("diffusion_pytorch_model.safetensors");
    let mut weights = read_safetensors(&path, &Device::Cpu)?;
    for (name, t) in weights.iter_mut() {
        if name.contains(".proj_in.weight") || name.contains(".proj_out.weight") {
            *t = t.unsqueeze(2)?.unsqueeze(3)?;
        }
    }
    let linear: UNetConfig = read_json(&fixture("sdxl_unet").join("config.json"))?;
    let cfg = UNetConfig { use_linear_projection: false, ..linear };
    let listed: BTreeMap<_, _> = cfg.param_list()?.0.into_iter().collect();
    assert_eq!(listed["mid_block.attentions.0.proj_in.weight"], vec![32, 32, 1, 1]);
    let vb = WeightStore::from_tensors(weights, &path).var_builder(DType::F32, &Device::Cpu);
    let out = AnyModel::UNet(UNet2DConditionModel::new(vb, &cfg, Init::Default)?).forward_io(&io)?;
    assert_close("conv projections", &out["output.sample"], &io["output.sample"], UNET_ATOL, RTOL);
    Ok(())
}

#[test]
fn unsupported_unet_options_are_refused_by_name() -> Result<()> {
    let base: UNetConfig = read_json(&fixture("sdxl_unet").join("config.json"))?;
    let bad = UNetConfig { class_embed_type: Some("timestep".into()), ..base.clone() };
    assert!(bad.validate().unwrap_err().contains("class_embed_type"));
    let bad =
        UNetConfig { down_block_types: vec!["DownBlock2D".into(), "AttnDownBlock2D".into()], ..base.clone() };
    assert!(bad.validate().unwrap_err().contains("AttnDownBlock2D"));
    let bad = UNetConfig { addition_time_embed_dim: None, ..base };
    assert!(bad.validate().unwrap_err().contains("addition_time_embed_dim"));
    Ok(())
}

#[test]
fn inspect_traces_the_sdxl_pipeline() -> Result<()> {
    let s = summarize("sdxl-base", None)?;
    assert_eq!(s.resolution, Some((1024, 1024)));
    assert_eq!(s.params.total(), 2_567_463_684);
    assert_eq!(s.flops, 6_761_236_398_080);
    let tokens: Vec<(&str, usize)> = s.tokens.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    assert_eq!(tokens, [("image at 64x64", 4096), ("image at 32x32", 1024), ("text", 77)]);
    assert_eq!(s.attention, (4096, 10));
    let text = s.text();
    for needle in [
        "[77,768]",
        "[77,1280]",
        "[77,2048]",
        "text_embeds [1280]",
        "time_ids [6]",
        "[4,128,128]",
        "2,567,463,684",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in\n{text}");
    }
    assert!(text.contains("tokens: 4,096 image at 64x64, 1,024 image at 32x32, 77 text\n"), "{text}");

    let refiner = summarize("sdxl-refiner", Some((768, 1024)))?.text();
    assert!(refiner.contains("aesthetic_score") && refiner.contains("[4,128,96]"), "{refiner}");

    let v = summarize("sdxl-vae", None)?;
    assert_eq!(v.params.total(), 83_653_863);
    assert_eq!(v.flops, 4_878_950_727_680 + 10_470_392_594_432);
    assert_eq!(v.tokens, vec![("latent positions".to_string(), 128 * 128)]);
    let flux = summarize("flux-vae", None)?.text();
    assert!(flux.contains("(mean - 0.1159) * 0.3611 [16,128,128]"), "{flux}");
    // The fixtures' configs summarise at their native sizes.
    let tiny = summarize(fixture("sdxl_unet").to_str().expect("utf-8 path"), None)?;
    assert_eq!(tiny.resolution, Some((64, 64)));
    assert_eq!(
        tiny.params.total(),
        file_shapes("sdxl_unet")?.values().map(|s| s.iter().product::<usize>() as u64).sum::<u64>()
    );
    Ok(())
}
