//! Pipelines end to end against diffusers (fixture `pipe_dit`: DiTPipeline with a VAE, DDIM,
//! classifier-free guidance 4 and learned sigma).

mod common;
use candle_core::{Device, IndexOp};
use common::{assert_close, fixture, io};
use convergence::flow::SamplerKind;
use convergence::pipelines::dit::DiTPipeline;

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
    let latents = pipe.denoise(&io["input.latents"], &labels, &opts, 3).unwrap();
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
    let latents = pipe.denoise(&io["input.latents"], &cond, &uncond, 3, 4.0).unwrap();
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
    let latents = pipe.denoise(&noise, &prompt, None, 3, 3.5).unwrap();
    assert_close("latents", &pack_latents(&latents).unwrap(), &io["output.latents"], 1e-4, 1e-4);
    let np = ((pipe.decode(&latents).unwrap() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    assert_close("images", &np.permute((0, 2, 3, 1)).unwrap(), &io["output.images"], 1e-4, 1e-4);
    let negative = pipe.encode_prompt(&["blurry, low quality", "text"]).unwrap();
    let n_steps = io["tap.truecfg.latents_per_step"].dim(0).unwrap();
    let true_cfg = io_scale("pipe_flux");
    let latents = pipe.denoise(&noise, &prompt, Some((&negative, true_cfg)), n_steps, 3.5).unwrap();
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
