//! Pipelines end to end against diffusers (fixture `pipe_dit`: DiTPipeline with a VAE, DDIM,
//! classifier-free guidance 4 and learned sigma).

mod common;
use candle_core::{Device, IndexOp, Tensor};
use common::{assert_close, fixture, io};
use convergence::flow::SamplerKind;
use convergence::pipelines::dit::DiTPipeline;
use convergence::pipelines::sdxl::{DenoiseOptions, MicroConditioning, Portion, SDXLPipeline};

/// An `on_step` that keeps every step's latents.
fn record(steps: &mut Vec<Tensor>) -> impl FnMut(usize, usize, &Tensor) + '_ {
    |_, _, x| steps.push(x.clone())
}

#[test]
fn dit_pipeline_matches_diffusers_latents_and_images() {
    let io = io("pipe_dit");
    let pipe = DiTPipeline::load(&fixture("pipe_dit"), &Device::Cpu).unwrap();
    assert_eq!(pipe.class_id("golden retriever").unwrap(), 207);
    assert_eq!(pipe.class_id("umbrella").unwrap(), 879);
    let labels =
        io["input.class_labels"].to_dtype(candle_core::DType::U32).unwrap().to_vec1::<u32>().unwrap();
    let mut opts = pipe.options(None, Some(4.0), 0).unwrap();
    assert_eq!(opts.sampler, SamplerKind::Ddim);
    opts.guidance = 4.0;
    let mut steps = vec![];
    let latents = pipe.denoise(&io["input.latents"], &labels, &opts, 3, record(&mut steps)).unwrap();
    assert_close("per step", &Tensor::stack(&steps, 0).unwrap(), &io["tap.latents_per_step"], 5e-4, 1e-4);
    assert_close("latents", &latents, &io["output.latents"], 5e-4, 1e-4);
    let images = pipe.decode(&latents).unwrap();
    // diffusers' output_type='np': (x / 2 + 0.5) clamped, NHWC.
    let np =
        ((images / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap().permute((0, 2, 3, 1)).unwrap();
    assert_close("images", &np, &io["output.images"], 5e-4, 1e-4);
    assert_eq!(np.i(0).unwrap().dims(), &[64, 64, 3]);
}

#[test]
fn sd3_pipeline_matches_diffusers_embeddings_latents_and_images() {
    let io = io("pipe_sd3");
    let pipe =
        convergence::pipelines::sd3::SD3Pipeline::load(&fixture("pipe_sd3"), 256, &Device::Cpu).unwrap();
    let prompts = [
        "a red fox sitting in the snow, watercolor painting",
        "A robot holding a sign that says \"Hello\" in a busy street",
    ];
    let negatives = ["blurry, low quality", ""];
    let cond = pipe.encode_prompt(&prompts).unwrap();
    let uncond = pipe.encode_prompt(&negatives).unwrap();
    assert_close("prompt_embeds", &cond.tokens, &io["tap.prompt_embeds"], 1e-4, 1e-4);
    assert_close("pooled", &cond.pooled, &io["tap.pooled_prompt_embeds"], 1e-4, 1e-4);
    assert_close("negative_prompt_embeds", &uncond.tokens, &io["tap.negative_prompt_embeds"], 1e-4, 1e-4);
    let mut steps = vec![];
    let latents = pipe.denoise(&io["input.latents"], &cond, &uncond, 3, 4.0, record(&mut steps)).unwrap();
    assert_close("per step", &Tensor::stack(&steps, 0).unwrap(), &io["tap.latents_per_step"], 1e-4, 1e-4);
    assert_close("latents", &latents, &io["output.latents"], 1e-4, 1e-4);
    let np = ((pipe.decode(&latents).unwrap() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    assert_close("images", &np.permute((0, 2, 3, 1)).unwrap(), &io["output.images"], 1e-4, 1e-4);
}

#[test]
fn flux_pipeline_matches_diffusers_with_distilled_and_true_cfg() {
    use convergence::models::flux::{pack_latents, unpack_latents};
    let io = io("pipe_flux");
    let pipe =
        convergence::pipelines::flux::FluxPipeline::load(&fixture("pipe_flux"), 512, &Device::Cpu).unwrap();
    let prompts = [
        "a red fox sitting in the snow, watercolor painting",
        "A neon sign that says \"OPEN\" above a rainy street at night",
    ];
    let prompt = pipe.encode_prompt(&prompts).unwrap();
    assert_close("prompt_embeds", &prompt.tokens, &io["tap.prompt_embeds"], 1e-4, 1e-4);
    assert_close("pooled", &prompt.pooled, &io["tap.pooled_prompt_embeds"], 1e-4, 1e-4);
    let noise = unpack_latents(&io["input.latents"], 8, 8).unwrap();
    let mut steps = vec![];
    let latents = pipe.denoise(&noise, &prompt, None, 3, 3.5, record(&mut steps)).unwrap();
    let packed = steps.iter().map(|x| pack_latents(x).unwrap()).collect::<Vec<_>>();
    assert_close("per step", &Tensor::stack(&packed, 0).unwrap(), &io["tap.latents_per_step"], 1e-4, 1e-4);
    assert_close("latents", &pack_latents(&latents).unwrap(), &io["output.latents"], 1e-4, 1e-4);
    let np = ((pipe.decode(&latents).unwrap() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    assert_close("images", &np.permute((0, 2, 3, 1)).unwrap(), &io["output.images"], 1e-4, 1e-4);
    let negative = pipe.encode_prompt(&["blurry, low quality", "text"]).unwrap();
    let n_steps = io["tap.truecfg.latents_per_step"].dim(0).unwrap();
    let true_cfg = io_scale("pipe_flux");
    let latents =
        pipe.denoise(&noise, &prompt, Some((&negative, true_cfg)), n_steps, 3.5, |_, _, _| {}).unwrap();
    assert_close("true cfg", &pack_latents(&latents).unwrap(), &io["output.truecfg.latents"], 1e-4, 1e-4);
}

/// The true-CFG scale of the fixture's second run (from case.json).
fn io_scale(case: &str) -> f64 {
    let text = std::fs::read_to_string(fixture(case).join("case.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    fn find(v: &serde_json::Value) -> Option<f64> {
        match v {
            serde_json::Value::Object(m) => {
                m.get("true_cfg_scale").and_then(|x| x.as_f64()).or_else(|| m.values().find_map(find))
            }
            serde_json::Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    find(&v).expect("true_cfg_scale in case.json")
}

const SDXL_PROMPTS: [&str; 2] = [
    "a red fox sitting in the snow, watercolor painting",
    "A futuristic city skyline at night with neon lights, 4k digital art!",
];
const SDXL_NEGATIVES: [&str; 2] = ["blurry, low quality", "ugly, deformed, watermark"];

/// The fixtures' micro-conditioning: original (96, 128), crop (4, 8), target (64, 64).
fn sdxl_micro() -> MicroConditioning {
    let mut m = MicroConditioning::new(64, 64);
    m.original_size = (96, 128);
    m.crops_coords_top_left = (4, 8);
    m
}

/// The fixtures' main run: 3 steps, guidance 5.
fn all3() -> DenoiseOptions {
    DenoiseOptions { steps: 3, guidance: 5.0, portion: Portion::All }
}

/// The fixtures' ensemble: 6 steps, guidance 5, the hand-off at 0.8.
fn expert(portion: Portion) -> DenoiseOptions {
    DenoiseOptions { steps: 6, guidance: 5.0, portion }
}

#[test]
fn sdxl_pipeline_matches_diffusers_embeddings_time_ids_latents_and_images() {
    let io = io("pipe_sdxl");
    let pipe = SDXLPipeline::load(&fixture("pipe_sdxl"), &Device::Cpu).unwrap();
    assert_eq!(pipe.default_size(), 64);
    let cond = pipe.encode_prompt(&SDXL_PROMPTS).unwrap();
    let uncond = pipe.encode_negative(Some(&SDXL_NEGATIVES), &cond).unwrap();
    assert_close("prompt_embeds", &cond.tokens, &io["tap.prompt_embeds"], 1e-4, 1e-4);
    assert_close("pooled", &cond.pooled, &io["tap.pooled_prompt_embeds"], 1e-4, 1e-4);
    assert_close("negative_prompt_embeds", &uncond.tokens, &io["tap.negative_prompt_embeds"], 1e-4, 1e-4);
    assert_close("negative_pooled", &uncond.pooled, &io["tap.negative_pooled_prompt_embeds"], 1e-4, 1e-4);
    let (pos, neg) = pipe.time_ids(&sdxl_micro(), 2).unwrap();
    let ids = candle_core::Tensor::cat(&[neg, pos], 0).unwrap();
    assert_close("time ids", &ids, &io["tap.unet.added_time_ids"], 0.0, 0.0);
    let mut steps = vec![];
    let latents = pipe
        .denoise(&io["input.latents"], &cond, &uncond, &sdxl_micro(), &all3(), record(&mut steps))
        .unwrap();
    assert_close("per step", &Tensor::stack(&steps, 0).unwrap(), &io["tap.latents_per_step"], 2e-4, 1e-4);
    assert_close("latents", &latents, &io["output.latents"], 2e-4, 1e-4);
    let np = ((pipe.decode(&latents).unwrap() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    assert_close("images", &np.permute((0, 2, 3, 1)).unwrap(), &io["output.images"], 2e-4, 1e-4);

    // No negative prompt: force_zeros_for_empty_prompt guides against zero embeddings.
    let zeros = pipe.encode_negative(None, &cond).unwrap();
    assert_eq!(zeros.tokens.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let latents =
        pipe.denoise(&io["input.latents"], &cond, &zeros, &sdxl_micro(), &all3(), |_, _, _| {}).unwrap();
    assert_close("noneg latents", &latents, &io["output.noneg.latents"], 2e-4, 1e-4);
}

#[test]
fn sdxl_base_and_refiner_run_as_an_ensemble_of_experts() {
    let (base_io, refiner_io) = (io("pipe_sdxl"), io("pipe_sdxl_refiner"));
    let base = SDXLPipeline::load(&fixture("pipe_sdxl"), &Device::Cpu).unwrap();
    let cond = base.encode_prompt(&SDXL_PROMPTS).unwrap();
    let uncond = base.encode_negative(Some(&SDXL_NEGATIVES), &cond).unwrap();
    let micro = sdxl_micro();
    let mut steps = vec![];
    let until = expert(Portion::Until(0.8));
    let handoff =
        base.denoise(&base_io["input.latents"], &cond, &uncond, &micro, &until, record(&mut steps)).unwrap();
    let per_step = Tensor::stack(&steps, 0).unwrap();
    assert_close("base per step", &per_step, &base_io["tap.ensemble.latents_per_step"], 2e-4, 1e-4);
    assert_close("base latents", &handoff, &base_io["output.ensemble.base_latents"], 2e-4, 1e-4);

    let refiner = SDXLPipeline::load(&fixture("pipe_sdxl_refiner"), &Device::Cpu).unwrap();
    assert!(refiner.flags.requires_aesthetics_score && !refiner.flags.force_zeros_for_empty_prompt);
    let cond = refiner.encode_prompt(&SDXL_PROMPTS).unwrap();
    let uncond = refiner.encode_negative(Some(&SDXL_NEGATIVES), &cond).unwrap();
    assert_close("refiner prompt_embeds", &cond.tokens, &refiner_io["tap.prompt_embeds"], 1e-4, 1e-4);
    let (pos, neg) = refiner.time_ids(&micro, 2).unwrap();
    let ids = candle_core::Tensor::cat(&[neg, pos], 0).unwrap();
    assert_close("refiner time ids", &ids, &refiner_io["tap.unet.added_time_ids"], 0.0, 0.0);
    // The refiner continues from the fixture's stored hand-off (identical to ours within tolerance).
    let mut steps = vec![];
    let from = expert(Portion::From(0.8));
    let latents = refiner
        .denoise(&refiner_io["input.image"], &cond, &uncond, &micro, &from, record(&mut steps))
        .unwrap();
    let per_step = Tensor::stack(&steps, 0).unwrap();
    assert_close("refiner per step", &per_step, &refiner_io["tap.latents_per_step"], 2e-4, 1e-4);
    assert_close("refiner latents", &latents, &refiner_io["output.latents"], 2e-4, 1e-4);
    let np = ((refiner.decode(&latents).unwrap() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    assert_close(
        "refiner images",
        &np.permute((0, 2, 3, 1)).unwrap(),
        &refiner_io["output.images"],
        2e-4,
        1e-4,
    );
}

#[test]
fn sdxl_pipeline_weights_estimate_counts_every_parameter() {
    let dir = fixture("pipe_sdxl");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let names = ["text_encoder", "text_encoder_2", "unet", "vae"];
    let params: u64 = names.iter().map(|n| case["components"][n]["parameters"].as_u64().unwrap()).sum();
    let bytes = convergence::pipelines::weights_bytes(&dir, &names, candle_core::DType::F32).unwrap();
    assert_eq!(bytes, 4 * params);
}
