//! SD3 / SD3.5 and Flux against diffusers (fixtures `sd3`, `sd35`, `flux_dev`, `flux_schnell`),
//! the original Stability / BFL layouts, full-size parameter and FLOP counts, and joint-attention
//! capture.

mod common;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, fixture, io};
use convergence::models::any::AnyModel;
use convergence::models::flux::{
    latent_image_ids, pack_latents, unpack_latents, FluxConfig, FluxTransformer2DModel,
};
use convergence::models::sd3::{SD3Config, SD3Transformer2DModel};
use convergence::models::{Conditioning, Denoiser};
use convergence::nn::{AttentionCapture, Init, JointAttentionMap};
use convergence::weights::keymap::{flux, sd3};
use convergence::weights::{load_model, read_json, read_safetensors, write_safetensors};
use convergence::weights::{LoadOptions, WeightStore};
use convergence::Result;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

fn sd3_model(case: &str) -> Result<SD3Transformer2DModel> {
    match load_model(&fixture(case), &LoadOptions::default())? {
        AnyModel::SD3(m) => Ok(m),
        other => panic!("{case} loaded as {}", other.class_name()),
    }
}

fn flux_model(case: &str) -> Result<FluxTransformer2DModel> {
    match load_model(&fixture(case), &LoadOptions::default())? {
        AnyModel::Flux(m) => Ok(m),
        other => panic!("{case} loaded as {}", other.class_name()),
    }
}

fn weights(case: &str) -> Result<BTreeMap<String, Tensor>> {
    let path = fixture(case).join("diffusion_pytorch_model.safetensors");
    Ok(read_safetensors(&path, &Device::Cpu)?.into_iter().collect())
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn sd3_and_sd35_match_diffusers_outputs_and_taps() -> Result<()> {
    for case in ["sd3", "sd35"] {
        let io = io(case);
        let m = sd3_model(case)?;
        let out = AnyModel::SD3(m.clone()).forward_io(&io)?;
        let sample = &out["output.sample"];
        assert_close(case, sample, &io["output.sample"], ATOL, RTOL);

        let x = m.embed_image(&io["input.hidden_states"])?;
        assert_close(case, &x, &io["tap.pos_embed_out"], ATOL, RTOL);
        let temb = m.conditioning(&io["input.timestep"], &io["input.pooled_projections"])?;
        assert_close(case, &temb, &io["tap.temb"], ATOL, RTOL);
        let ctx = m.embed_context(&io["input.encoder_hidden_states"])?;
        assert_close(case, &ctx, &io["tap.context_embedder_out"], ATOL, RTOL);
        let (ctx, x) = m.transformer_blocks()[0].forward(&x, &ctx, &temb, None, None)?;
        let tap = |stream: &str| &io[&format!("tap.block0_out.{stream}")];
        assert_close(case, &x, tap("hidden_states"), ATOL, RTOL);
        let ctx = ctx.expect("block 0 keeps the text stream");
        assert_close(case, &ctx, tap("encoder_hidden_states"), ATOL, RTOL);

        // The Denoiser view gives the same numbers.
        let cond = Conditioning {
            text_tokens: Some(io["input.encoder_hidden_states"].clone()),
            pooled: Some(io["input.pooled_projections"].clone()),
            ..Default::default()
        };
        let v = Denoiser::forward(&m, &io["input.hidden_states"], &io["input.timestep"], &cond)?;
        assert_eq!(values(&v)?, values(sample)?);
    }
    Ok(())
}

#[test]
fn sd3_computed_position_window_equals_the_stored_table() -> Result<()> {
    // The stored table is get_2d_sincos_pos_embed(D, max, base_size = sample_size / patch);
    // without it the model computes the same centre window.
    let io = io("sd3");
    let mut w = weights("sd3")?;
    w.remove("pos_embed.pos_embed").expect("stored table");
    let cfg: SD3Config = read_json(&fixture("sd3").join("config.json"))?;
    let vb = WeightStore::from_tensors(w, Path::new("sd3")).var_builder(DType::F32, &Device::Cpu);
    let m = SD3Transformer2DModel::new(vb, &cfg, Init::Default)?;
    let x = m.embed_image(&io["input.hidden_states"])?;
    assert_close("computed window", &x, &io["tap.pos_embed_out"], ATOL, RTOL);

    // Non-square grids crop a non-square window; grids beyond the table are refused.
    let ctx = io["input.encoder_hidden_states"].narrow(0, 0, 1)?;
    let pooled = io["input.pooled_projections"].narrow(0, 0, 1)?;
    let t = Tensor::new(&[500f32], &Device::Cpu)?;
    let wide = Tensor::randn(0f32, 1., (1, 4, 6, 16), &Device::Cpu)?;
    assert_eq!(m.forward_text(&wide, &t, &ctx, &pooled)?.dims(), &[1, 4, 6, 16]);
    let too_big = Tensor::zeros((1, 4, 18, 4), DType::F32, &Device::Cpu)?;
    let err = m.forward_text(&too_big, &t, &ctx, &pooled).unwrap_err().to_string();
    assert!(err.contains("exceeds pos_embed_max_size 8"), "{err}");
    Ok(())
}

#[test]
fn flux_dev_and_schnell_match_diffusers_outputs_and_taps() -> Result<()> {
    for case in ["flux_dev", "flux_schnell"] {
        let io = io(case);
        let m = flux_model(case)?;
        let out = AnyModel::Flux(m.clone()).forward_io(&io)?;
        assert_close(case, &out["output.sample"], &io["output.sample"], ATOL, RTOL);

        let guidance = io.get("input.guidance");
        assert_eq!(guidance.is_some(), m.config().guidance_embeds);
        let mut x = m.embed_image(&io["input.hidden_states"])?;
        assert_close(case, &x, &io["tap.x_embedder_out"], ATOL, RTOL);
        let temb = m.conditioning(&io["input.timestep"], guidance, &io["input.pooled_projections"])?;
        assert_close(case, &temb, &io["tap.temb"], ATOL, RTOL);
        let mut ctx = m.embed_context(&io["input.encoder_hidden_states"])?;
        assert_close(case, &ctx, &io["tap.context_embedder_out"], ATOL, RTOL);
        let rope = m.rope(&io["input.txt_ids"], &io["input.img_ids"])?;
        assert_close(case, &rope.cos, &io["tap.rope_cos"], 1e-7, 0.0);
        assert_close(case, &rope.sin, &io["tap.rope_sin"], 1e-7, 0.0);

        for (i, block) in m.transformer_blocks().iter().enumerate() {
            let (c, y) = block.forward(&x, &ctx, &temb, Some(&rope), None)?;
            (ctx, x) = (c.expect("double-stream blocks keep the text"), y);
            if i == 0 {
                assert_close(case, &x, &io["tap.double0_out.hidden_states"], ATOL, RTOL);
                assert_close(case, &ctx, &io["tap.double0_out.encoder_hidden_states"], ATOL, RTOL);
            }
        }
        let (text, image) = (ctx.dim(1)?, x.dim(1)?);
        let joint = Tensor::cat(&[&ctx, &x], 1)?;
        let joint = m.single_transformer_blocks()[0].forward(&joint, &temb, &rope, None)?;
        let tap = |stream: &str| &io[&format!("tap.single0_out.{stream}")];
        assert_close(case, &joint.narrow(1, 0, text)?, tap("encoder_hidden_states"), ATOL, RTOL);
        assert_close(case, &joint.narrow(1, text, image)?, tap("hidden_states"), ATOL, RTOL);
    }
    Ok(())
}

#[test]
fn flux_packing_ids_and_denoiser_follow_the_pipeline() -> Result<()> {
    let io = io("flux_dev");
    let latents = &io["derived.latents_unpacked"];
    assert_eq!(values(&pack_latents(latents)?)?, values(&io["input.hidden_states"])?);
    assert_eq!(values(&latent_image_ids(8, 8, &Device::Cpu)?)?, values(&io["input.img_ids"])?);
    let unpacked = unpack_latents(&io["output.sample"], 8, 8)?;
    assert_eq!(values(&unpacked)?, values(&io["derived.sample_unpacked"])?);

    let m = flux_model("flux_dev")?;
    let t = &io["input.timestep"];
    let cond = Conditioning {
        text_tokens: Some(io["input.encoder_hidden_states"].clone()),
        pooled: Some(io["input.pooled_projections"].clone()),
        guidance: Some(io["input.guidance"].clone()),
        ..Default::default()
    };
    let v = Denoiser::forward(&m, latents, t, &cond)?;
    assert_close("flux denoiser", &v, &io["derived.sample_unpacked"], ATOL, RTOL);
    let unguided = Conditioning { guidance: None, ..cond };
    let err = Denoiser::forward(&m, latents, t, &unguided).unwrap_err().to_string();
    assert!(err.contains("guidance"), "{err}");
    Ok(())
}

fn shapes(case: &str) -> Result<BTreeMap<String, Vec<usize>>> {
    Ok(weights(case)?.into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect())
}

#[test]
fn fixture_parameter_lists_are_the_files_tensors() -> Result<()> {
    // The construction code asks for exactly the tensors diffusers saved (SD3's pos_embed is a
    // buffer, counted apart).
    for case in ["sd3", "sd35"] {
        let cfg: SD3Config = read_json(&fixture(case).join("config.json"))?;
        let mut file = shapes(case)?;
        let table = file.remove("pos_embed.pos_embed").expect("stored table");
        assert_eq!(table.iter().product::<usize>() as u64, cfg.pos_embed_elements());
        let listed: BTreeMap<_, _> = cfg.param_list()?.0.into_iter().collect();
        assert_eq!(listed, file, "{case}");
    }
    for case in ["flux_dev", "flux_schnell"] {
        let cfg: FluxConfig = read_json(&fixture(case).join("config.json"))?;
        let listed: BTreeMap<_, _> = cfg.param_list()?.0.into_iter().collect();
        assert_eq!(listed, shapes(case)?, "{case}");
    }
    Ok(())
}

#[test]
fn sd3_presets_match_reference_counts_and_flops() -> Result<()> {
    // param_counts.json: parameters, state-dict elements, FLOPs per op (addmm, bmm, convolution).
    let reference = [
        (
            "sd3-medium",
            2_028_328_000u64,
            2_084_951_104u64,
            [6_011_029_291_008u64, 2_892_502_941_696, 805_306_368],
        ),
        ("sd3.5-medium", 2_243_171_520, 2_469_663_936, [7_016_235_663_360, 4_232_532_738_048, 805_306_368]),
        ("sd3.5-large", 8_056_627_520, 8_146_280_768, [23_868_495_659_008, 7_251_344_180_224, 1_275_068_416]),
    ];
    for (name, params, state_dict, per_op) in reference {
        let cfg = SD3Config::preset(name).expect("preset");
        let counted = cfg.param_list()?.total();
        assert_eq!(counted, params, "{name}");
        assert_eq!(counted + cfg.pos_embed_elements(), state_dict, "{name} with pos_embed");
        let f = cfg.flops(128, 128, 333);
        assert_eq!([f.linear, f.attention, f.conv], per_op, "{name} flops");
        assert_eq!(cfg.tokens(128, 128, 333).total(), 4096 + 333);
    }
    let medium = SD3Config::preset("sd3-medium").expect("preset");
    assert_eq!(medium.flops(128, 128, 333).total(), 8_904_337_539_072);
    Ok(())
}

#[test]
fn flux_presets_match_reference_counts_and_flops() -> Result<()> {
    // (name, parameters, [(text tokens, addmm, bmm)]) at a 128x128 latent.
    let reference = [
        (
            "flux-dev",
            11_901_408_320u64,
            [
                (512, 59_512_255_414_272u64, 14_872_398_004_224u64),
                (256, 56_200_835_629_056, 13_265_811_800_064),
            ],
        ),
        (
            "flux-schnell",
            11_891_178_560,
            [(512, 59_512_234_967_040, 14_872_398_004_224), (256, 56_200_815_181_824, 13_265_811_800_064)],
        ),
    ];
    for (name, params, settings) in reference {
        let cfg = FluxConfig::preset(name).expect("preset");
        assert_eq!(cfg.param_list()?.total(), params, "{name}");
        for (text, linear, attention) in settings {
            let f = cfg.flops(128, 128, text);
            assert_eq!([f.linear, f.attention, f.conv], [linear, attention, 0], "{name} {text}");
        }
        assert_eq!(cfg.tokens(128, 128, 512).total(), 4096 + 512);
    }
    let dev = FluxConfig::preset("flux-dev").expect("preset");
    assert_eq!(dev.flops(128, 128, 512).total(), 74_384_653_418_496);
    Ok(())
}

fn elements(m: &BTreeMap<String, Vec<usize>>) -> usize {
    m.values().map(|s| s.iter().product::<usize>()).sum()
}

#[test]
fn full_size_layouts_round_trip_through_original_names() -> Result<()> {
    for name in FluxConfig::preset_names() {
        let diffusers: BTreeMap<_, _> =
            FluxConfig::preset(&name).expect("preset").param_list()?.0.into_iter().collect();
        let original = flux::from_diffusers(&diffusers)?;
        // q, k, v and the MLP input fused: 3 * 3072 + 4 * 3072 rows.
        assert_eq!(original["single_blocks.37.linear1.weight"], vec![21504, 3072]);
        assert_eq!(elements(&original), elements(&diffusers), "{name}");
        assert_eq!(flux::to_diffusers(original)?, diffusers, "{name}");
    }
    for name in SD3Config::preset_names() {
        let diffusers: BTreeMap<_, _> =
            SD3Config::preset(&name).expect("preset").param_list()?.0.into_iter().collect();
        let original = sd3::from_diffusers(&diffusers)?;
        assert_eq!(elements(&original), elements(&diffusers), "{name}");
        assert_eq!(sd3::to_diffusers(original)?, diffusers, "{name}");
    }
    Ok(())
}

fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> Result<()> {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in a {
        assert_eq!(values(t)?, values(&b[name])?, "{name}");
    }
    Ok(())
}

#[test]
fn fixture_weights_round_trip_through_original_names() -> Result<()> {
    for case in ["sd3", "sd35"] {
        let w = weights(case)?;
        let original = sd3::from_diffusers(&w)?;
        let key = |k: &str| &original[&format!("model.diffusion_model.{k}")];
        // Fused q, k, v of the image stream, q first.
        let qkv = key("joint_blocks.0.x_block.attn.qkv.weight");
        assert_eq!(qkv.dims(), &[96, 32]);
        let q = &w["transformer_blocks.0.attn.to_q.weight"];
        assert_eq!(values(&qkv.narrow(0, 0, 32)?)?, values(q)?);
        // The final norm stores [shift, scale], diffusers [scale, shift].
        let shift = key("final_layer.adaLN_modulation.1.bias").narrow(0, 0, 32)?;
        assert_eq!(values(&shift)?, values(&w["norm_out.linear.bias"].narrow(0, 32, 32)?)?);
        // The last block's text stream ends at its keys and values.
        let last = "model.diffusion_model.joint_blocks.1.context_block";
        assert!(!original.contains_key(&format!("{last}.attn.proj.weight")));
        assert_eq!(original[&format!("{last}.adaLN_modulation.1.weight")].dims(), &[64, 32]);
        assert_same(&sd3::to_diffusers(original)?, &w)?;
    }
    for case in ["flux_dev", "flux_schnell"] {
        let w = weights(case)?;
        let original = flux::from_diffusers(&w)?;
        let linear1 = &original["single_blocks.1.linear1.weight"];
        assert_eq!(linear1.dims(), &[3 * 32 + 128, 32]);
        let mlp = &w["single_transformer_blocks.1.proj_mlp.weight"];
        assert_eq!(values(&linear1.narrow(0, 96, 128)?)?, values(mlp)?);
        assert_eq!(original.contains_key("guidance_in.in_layer.weight"), case == "flux_dev");
        assert_same(&flux::to_diffusers(original)?, &w)?;
    }
    Ok(())
}

#[test]
fn original_single_files_load_and_match_diffusers() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("convergence-mmdit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| convergence::Error::io(&dir, e))?;
    let flux_axes = || LoadOptions { axes_dims_rope: Some(vec![4, 6, 6]), ..Default::default() };
    let cases = [
        // Without q/k norm an SD3 file does not reveal its head size.
        ("sd3", LoadOptions { num_heads: Some(4), ..Default::default() }),
        ("sd35", LoadOptions::default()),
        ("flux_dev", flux_axes()),
        ("flux_schnell", flux_axes()),
    ];
    for (case, opts) in cases {
        let w = weights(case)?;
        let original: HashMap<String, Tensor> = if case.starts_with("sd3") {
            sd3::from_diffusers(&w)?.into_iter().collect()
        } else {
            flux::from_diffusers(&w)?.into_iter().collect()
        };
        let file = dir.join(format!("{case}.safetensors"));
        write_safetensors(&original, &file)?;
        let io = io(case);
        let out = load_model(&file, &opts)?.forward_io(&io)?;
        assert_close(case, &out["output.sample"], &io["output.sample"], ATOL, RTOL);
    }
    std::fs::remove_dir_all(&dir).map_err(|e| convergence::Error::io(&dir, e))
}

/// Every query's probabilities over image and text keys together sum to one.
fn assert_rows_sum_to_one(m: &JointAttentionMap) -> Result<()> {
    let rows = |a: &Tensor, b: &Tensor| values(&(a.sum(D::Minus1)? + b.sum(D::Minus1)?)?);
    let image_rows = rows(&m.image_to_image, &m.image_to_text)?;
    for s in image_rows.into_iter().chain(rows(&m.text_to_image, &m.text_to_text)?) {
        assert!((s - 1.0).abs() < 1e-5, "layer {}: a row sums to {s}", m.layer);
    }
    Ok(())
}

#[test]
fn sd3_capture_is_free_when_off_and_splits_the_joint_softmax() -> Result<()> {
    let io = io("sd35");
    let mut m = sd3_model("sd35")?;
    let plain = AnyModel::SD3(m.clone()).forward_io(&io)?;
    let capture = Arc::new(AttentionCapture::new(8));
    m.set_attention_capture(Some(capture.clone()));
    let captured = AnyModel::SD3(m).forward_io(&io)?;
    assert_eq!(values(&captured["output.sample"])?, values(&plain["output.sample"])?);
    let maps = capture.take();
    let seen: Vec<_> = maps.iter().map(|m| (m.layer, m.call)).collect();
    assert_eq!(seen, vec![(0, 0), (1, 0)]);
    // [image, text]: 16 patch tokens, 10 text tokens, mean over heads.
    assert_eq!(maps[0].image_to_text.dims(), &[2, 1, 16, 10]);
    assert_eq!(maps[0].text_to_image.dims(), &[2, 1, 10, 16]);
    maps.iter().try_for_each(assert_rows_sum_to_one)
}

/// LayerNorm without affine (eps 1e-6), then x (1 + scale) + shift, written out by hand.
fn modulated(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let x_hat = centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
    let scaled = x_hat.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?;
    Ok(scaled.broadcast_add(&shift.unsqueeze(1)?)?)
}

/// x W^T + b of the linear at `name`.
fn apply(w: &BTreeMap<String, Tensor>, name: &str, x: &Tensor) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w[&format!("{name}.weight")].t()?)?;
    Ok(y.broadcast_add(&w[&format!("{name}.bias")])?)
}

/// The linear at `name` split into `heads` heads [B, H, L, d].
fn heads(w: &BTreeMap<String, Tensor>, name: &str, x: &Tensor, heads: usize) -> Result<Tensor> {
    let y = apply(w, name, x)?;
    let (b, l, hd) = y.dims3()?;
    Ok(y.reshape((b, l, heads, hd / heads))?.transpose(1, 2)?.contiguous()?)
}

/// The modulated inputs of both streams of joint block 0 (adaLN chunks 0 and 1 are shift, scale).
fn block0_inputs(
    w: &BTreeMap<String, Tensor>,
    x: &Tensor,
    ctx: &Tensor,
    temb: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let c = temb.silu()?;
    let mx = apply(w, "transformer_blocks.0.norm1.linear", &c)?.chunk(6, 1)?;
    let mc = apply(w, "transformer_blocks.0.norm1_context.linear", &c)?.chunk(6, 1)?;
    Ok((modulated(x, &mx[0], &mx[1])?, modulated(ctx, &mc[0], &mc[1])?))
}

/// softmax(Q K^T / sqrt(d)) over [B, H, L, d].
fn softmax_qk(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)? as f64;
    let s = (q.matmul(&k.t()?)? / d.sqrt())?;
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Compares the four captured quadrants with the full probabilities `p` whose image and text
/// tokens sit at the (start, len) spans given.
fn assert_quadrants(
    map: &JointAttentionMap,
    p: &Tensor,
    img: (usize, usize),
    txt: (usize, usize),
) -> Result<()> {
    let q =
        |rows: (usize, usize), cols: (usize, usize)| p.narrow(2, rows.0, rows.1)?.narrow(3, cols.0, cols.1);
    assert_close("image->image", &map.image_to_image, &q(img, img)?, 1e-6, 1e-4);
    assert_close("image->text", &map.image_to_text, &q(img, txt)?, 1e-6, 1e-4);
    assert_close("text->image", &map.text_to_image, &q(txt, img)?, 1e-6, 1e-4);
    assert_close("text->text", &map.text_to_text, &q(txt, txt)?, 1e-6, 1e-4);
    Ok(())
}

#[test]
fn sd3_captured_maps_equal_a_plain_recomputation() -> Result<()> {
    // Block 0 of the sd3 fixture by hand, from its weights and the taps that feed it; every
    // head kept separately.
    let io = io("sd3");
    let w = weights("sd3")?;
    let mut m = sd3_model("sd3")?;
    let capture = Arc::new(AttentionCapture::new(4).layers(&[0]).heads(&[0, 1, 2, 3]));
    m.set_attention_capture(Some(capture.clone()));
    AnyModel::SD3(m).forward_io(&io)?;
    let map = capture.take().remove(0);

    let ctx = &io["tap.context_embedder_out"];
    let (hx, hc) = block0_inputs(&w, &io["tap.pos_embed_out"], ctx, &io["tap.temb"])?;
    let a = "transformer_blocks.0.attn";
    let joint = |img: &str, txt: &str| -> Result<Tensor> {
        let parts = [heads(&w, &format!("{a}.{img}"), &hx, 4)?, heads(&w, &format!("{a}.{txt}"), &hc, 4)?];
        Ok(Tensor::cat(&parts, 2)?)
    };
    let p = softmax_qk(&joint("to_q", "add_q_proj")?, &joint("to_k", "add_k_proj")?)?;
    assert_quadrants(&map, &p, (0, 16), (16, 10))
}

#[test]
fn flux_captured_maps_equal_a_plain_recomputation_with_rope_and_qk_norm() -> Result<()> {
    // Double-stream block 0 by hand: RMSNorm on q/k per head, RoPE from the fixture's tables,
    // tokens [text, image]. Single-stream layers are captured and row-stochastic too.
    let io = io("flux_schnell");
    let w = weights("flux_schnell")?;
    let mut m = flux_model("flux_schnell")?;
    let plain = AnyModel::Flux(m.clone()).forward_io(&io)?;
    let capture = Arc::new(AttentionCapture::new(8).layers(&[0, 2, 3]).heads(&[1]));
    m.set_attention_capture(Some(capture.clone()));
    let captured = AnyModel::Flux(m).forward_io(&io)?;
    assert_eq!(values(&captured["output.sample"])?, values(&plain["output.sample"])?);
    let maps = capture.take();
    assert_eq!(maps.iter().map(|m| m.layer).collect::<Vec<_>>(), vec![0, 2, 3]);
    maps.iter().try_for_each(assert_rows_sum_to_one)?;

    let ctx = &io["tap.context_embedder_out"];
    let (hx, hc) = block0_inputs(&w, &io["tap.x_embedder_out"], ctx, &io["tap.temb"])?;
    let a = "transformer_blocks.0.attn";
    let rms_normed = |t: Tensor, norm: &str| -> Result<Tensor> {
        let ms = t.sqr()?.mean_keepdim(D::Minus1)?;
        let y = t.broadcast_div(&(ms + 1e-6)?.sqrt()?)?;
        Ok(y.broadcast_mul(&w[&format!("{a}.{norm}.weight")])?)
    };
    let rotated = |t: Tensor| -> Result<Tensor> {
        // (x0, x1) -> x cos + (-x1, x0) sin, per consecutive pair
        let (b, h, l, d) = t.dims4()?;
        let pairs = t.reshape((b, h, l, d / 2, 2))?;
        let turned = Tensor::cat(&[pairs.narrow(4, 1, 1)?.neg()?, pairs.narrow(4, 0, 1)?], 4)?;
        let turned = turned.reshape((b, h, l, d))?.broadcast_mul(&io["tap.rope_sin"])?;
        Ok((t.broadcast_mul(&io["tap.rope_cos"])? + turned)?)
    };
    let joint = |txt: &str, img: &str, txt_norm: &str, img_norm: &str| -> Result<Tensor> {
        let t = rms_normed(heads(&w, &format!("{a}.{txt}"), &hc, 2)?, txt_norm)?;
        let i = rms_normed(heads(&w, &format!("{a}.{img}"), &hx, 2)?, img_norm)?;
        rotated(Tensor::cat(&[t, i], 2)?)
    };
    let q = joint("add_q_proj", "to_q", "norm_added_q", "norm_q")?;
    let k = joint("add_k_proj", "to_k", "norm_added_k", "norm_k")?;
    let head1 = softmax_qk(&q, &k)?.narrow(1, 1, 1)?;
    assert_quadrants(&maps[0], &head1, (8, 16), (0, 8))
}

#[test]
fn fresh_models_run_on_non_square_latents() -> Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = SD3Config {
        num_layers: 2,
        num_attention_heads: 2,
        attention_head_dim: 8,
        caption_projection_dim: 16,
        in_channels: 4,
        out_channels: Some(4),
        joint_attention_dim: 12,
        pooled_projection_dim: 6,
        pos_embed_max_size: Some(16),
        sample_size: 16,
        dual_attention_layers: vec![0],
        qk_norm: Some("rms_norm".into()),
        ..Default::default()
    };
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let m = SD3Transformer2DModel::new(vb, &cfg, Init::Default)?;
    let cond = Conditioning {
        text_tokens: Some(Tensor::randn(0f32, 1., (2, 5, 12), &dev)?),
        pooled: Some(Tensor::randn(0f32, 1., (2, 6), &dev)?),
        ..Default::default()
    };
    let x = Tensor::randn(0f32, 1., (2, 4, 8, 12), &dev)?;
    let t = Tensor::new(700f32, &dev)?;
    assert_eq!(Denoiser::forward(&m, &x, &t, &cond)?.dims(), &[2, 4, 8, 12]);

    let vm = VarMap::new();
    let cfg = FluxConfig {
        num_layers: 1,
        num_single_layers: 1,
        num_attention_heads: 2,
        attention_head_dim: 16,
        axes_dims_rope: vec![4, 6, 6],
        in_channels: 16,
        joint_attention_dim: 12,
        pooled_projection_dim: 6,
        guidance_embeds: true,
        ..Default::default()
    };
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let m = FluxTransformer2DModel::new(vb, &cfg, Init::Default)?;
    let cond = Conditioning { guidance: Some(Tensor::new(3.5f32, &dev)?), ..cond };
    let t = Tensor::new(0.7f32, &dev)?;
    assert_eq!(Denoiser::forward(&m, &x, &t, &cond)?.dims(), &[2, 4, 8, 12]);
    Ok(())
}
