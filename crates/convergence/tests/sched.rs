//! Schedules and samplers against diffusers 0.42 (fixture `sched`), plus properties the
//! fixtures cannot show: Heun's order, seeded determinism, exact-model recovery, config errors.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::{assert_close, fixture, io};
use convergence::flow::schedule::alphas_cumprod;
use convergence::flow::{
    flux_sigmas, sample, DdpmConfig, FlowMatchConfig, ModelTime, Process, SampleOptions, SamplerKind,
    Schedule, Scheduler, SchedulerConfig,
};
use convergence::models::{Conditioning, Denoiser, Prediction};
use std::cell::Cell;
use std::collections::HashMap;

/// The fixture's schedule tolerance (timesteps are O(1000), so rtol matters there).
const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-6;

fn scheduler(name: &str) -> Scheduler {
    Scheduler::from_config_file(fixture("sched").join(name).join("scheduler_config.json")).unwrap()
}

fn vec1(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn check_flow(what: &str, s: &Schedule, io: &HashMap<String, Tensor>) {
    assert_close(
        &format!("{what}.timesteps"),
        &vec1(&s.timesteps),
        &io[&format!("{what}.timesteps")],
        ATOL,
        RTOL,
    );
    assert_close(&format!("{what}.sigmas"), &vec1(&s.sigmas), &io[&format!("{what}.sigmas")], ATOL, RTOL);
}

#[test]
fn flow_match_sd3_matches_diffusers() {
    let io = io("sched");
    let sd3 = scheduler("scheduler_sd3");
    for n in [1, 4, 20, 28, 50] {
        check_flow(&format!("fm_sd3.n{n}"), &sd3.set_timesteps(n, None, None).unwrap(), &io);
    }
}

#[test]
fn flow_match_flux_matches_diffusers_from_seq_len_mu_and_sigmas() {
    let io = io("sched");
    let flux = scheduler("scheduler_flux");
    let SchedulerConfig::FlowMatch(cfg) = &flux.config else { panic!("flux is flow matching") };
    for seq in [1024, 4096] {
        let mu = io[&format!("fm_flux.seq{seq}.mu")].to_vec1::<f32>().unwrap()[0];
        assert!((cfg.calculate_shift(seq) - mu as f64).abs() < 1e-7, "mu for {seq}");
        for n in [1, 4, 20, 28, 50] {
            let what = format!("fm_flux.seq{seq}.n{n}");
            let sigmas_in = &io[&format!("{what}.sigmas_in")];
            assert_close(&format!("{what}.sigmas_in"), &vec1(&f32s(&flux_sigmas(n))), sigmas_in, 0.0, 0.0);
            check_flow(&what, &flux.set_timesteps(n, None, Some(seq)).unwrap(), &io);
            check_flow(&what, &flux.set_timesteps(n, Some(mu as f64), None).unwrap(), &io);
            let explicit: Vec<f64> = sigmas_in.to_vec1::<f32>().unwrap().iter().map(|&s| s as f64).collect();
            check_flow(&what, &flux.set_sigmas(&explicit, None, Some(seq)).unwrap(), &io);
        }
    }
}

/// A fixed noise-like latent (unit-ish amplitude, no two neighbours alike).
fn wave(shape: (usize, usize, usize, usize)) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|i| 1.5 * (i as f32 * 2.39).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn sdxl_alphas_cumprod_matches_diffusers() {
    let io = io("sched");
    let SchedulerConfig::Euler(cfg) = &scheduler("scheduler_sdxl_euler").config else {
        panic!("euler config")
    };
    // Bit-exact: every operation involved (fused multiply-add, float64 products) is exactly specified.
    assert_close("alphas_cumprod", &vec1(&alphas_cumprod(&cfg.betas)), &io["sdxl.alphas_cumprod"], 0.0, 0.0);
}

#[test]
fn euler_discrete_matches_diffusers() {
    let io = io("sched");
    let euler = scheduler("scheduler_sdxl_euler");
    for n in [20, 50] {
        let s = euler.set_timesteps(n, None, None).unwrap();
        let key = |k: &str| &io[&format!("euler.n{n}.{k}")];
        assert_close("timesteps", &vec1(&s.timesteps), key("timesteps"), ATOL, RTOL);
        assert_eq!(
            s.timesteps[0],
            (n - 1) as f32 * (1000 / n) as f32 + 1.0,
            "leading spacing with steps_offset 1"
        );
        assert_close("sigmas", &vec1(&s.sigmas), key("sigmas"), ATOL, RTOL);
        assert_close("init_noise_sigma", &vec1(&[s.init_noise_sigma()]), key("init_noise_sigma"), ATOL, RTOL);
        let (x, eps) = (key("step1.sample"), key("step1.model_output"));
        let scaled = s.scale_model_input(x, 1).unwrap();
        assert_close("scale_model_input", &scaled, key("step1.scaled_model_input"), ATOL, RTOL);
        assert_close("step", &s.euler_step(1, eps, x).unwrap(), key("step1.prev_sample"), ATOL, RTOL);
    }
}

#[test]
fn ddim_matches_diffusers() {
    let io = io("sched");
    let ddim = scheduler("scheduler_sdxl_ddim");
    for n in [20, 50] {
        let s = ddim.set_timesteps(n, None, None).unwrap();
        let key = |k: &str| &io[&format!("ddim.n{n}.{k}")];
        let Process::Alphas(a) = &s.process else { panic!("DDIM steps on alphas") };
        assert_eq!(s.integer_timesteps().unwrap(), key("timesteps").to_vec1::<i64>().unwrap());
        assert_eq!(a.prev_timesteps, key("prev_timesteps").to_vec1::<i64>().unwrap());
        assert!(s.sigmas.is_empty());
        assert_close("alpha_prod_t", &vec1(&a.alpha_prod), key("alpha_prod_t"), ATOL, RTOL);
        assert_close("alpha_prod_t_prev", &vec1(&a.alpha_prod_prev), key("alpha_prod_t_prev"), ATOL, RTOL);
        let (x, eps) =
            (&io[&format!("euler.n{n}.step1.sample")], &io[&format!("euler.n{n}.step1.model_output")]);
        assert_close("step", &s.ddim_step(1, eps, x).unwrap(), key("step1.prev_sample"), ATOL, RTOL);
    }
}

/// Replays the transformer outputs diffusers recorded, checking that the sampler asks for them
/// with the latents and timesteps the pipeline used.
struct Replay {
    outputs: Tensor,
    inputs: Tensor,
    timesteps: Vec<f32>,
    cfg: bool,
    calls: Cell<usize>,
}

impl Denoiser for Replay {
    fn forward(&self, x: &Tensor, t: &Tensor, _: &Conditioning) -> candle_core::Result<Tensor> {
        let i = self.calls.replace(self.calls.get() + 1);
        let latent = self.inputs.i(i)?;
        let expected = if self.cfg { Tensor::cat(&[&latent, &latent], 0)? } else { latent };
        assert_close(&format!("model input {i}"), x, &expected, 5e-5, 1e-4);
        let t = t.to_vec1::<f32>()?;
        assert_eq!(t, vec![self.timesteps[i]; x.dim(0)?], "timesteps of call {i}");
        self.outputs.i(i)
    }

    fn prediction(&self) -> Prediction {
        Prediction::Velocity
    }
}

fn sd3_loop(case: &str, guidance: f64) {
    let io = io("sched");
    let key = |k: &str| io[&format!("{case}.{k}")].clone();
    let schedule = scheduler("scheduler_sd3").set_timesteps(4, None, None).unwrap();
    check_flow(case, &schedule, &io);
    let (cond, uncond) = loop_conditioning(&io);
    let latents = key("latents");
    let model = Replay {
        outputs: key("model_output"),
        inputs: latents.clone(),
        timesteps: key("timesteps").to_vec1().unwrap(),
        cfg: guidance > 1.0,
        calls: Cell::new(0),
    };
    let opts = SampleOptions { sampler: SamplerKind::Euler, guidance, seed: 0, time: ModelTime::Timestep };
    let mut seen = vec![];
    // guidance 1 must switch guidance off even with an unconditional input, as in diffusers.
    let out = sample(&model, &io["loop.noise"], &cond, Some(&uncond), &schedule, &opts, |i, x| {
        seen.push(i);
        assert_close(&format!("{case} latent after step {i}"), x, &latents.i(i + 1).unwrap(), 5e-5, 1e-4);
    })
    .unwrap();
    assert_eq!(seen, [0, 1, 2, 3]);
    assert_eq!(model.calls.get(), 4);
    assert_close(&format!("{case} final"), &out, &key("final_latents"), 5e-5, 1e-4);
}

/// The prompt and negative-prompt embeddings of the SD3 loops.
fn loop_conditioning(io: &HashMap<String, Tensor>) -> (Conditioning, Conditioning) {
    let c = |tokens: &str, pooled: &str| Conditioning {
        text_tokens: Some(io[tokens].clone()),
        pooled: Some(io[pooled].clone()),
        ..Default::default()
    };
    (
        c("loop.prompt_embeds", "loop.pooled_prompt_embeds"),
        c("loop.negative_prompt_embeds", "loop.negative_pooled_prompt_embeds"),
    )
}

/// The same loops end to end: our SD3 transformer (the fixture's weights) under our sampler.
#[test]
fn sd3_loops_end_to_end_with_our_transformer_match_diffusers() {
    let io = io("sched");
    let opts = convergence::weights::LoadOptions::default();
    let Ok(convergence::models::any::AnyModel::SD3(model)) =
        convergence::weights::load_model(&fixture("sched").join("transformer"), &opts)
    else {
        panic!("sched/transformer is an SD3 transformer");
    };
    let schedule = scheduler("scheduler_sd3").set_timesteps(4, None, None).unwrap();
    let (cond, uncond) = loop_conditioning(&io);
    for (case, guidance) in [("loop_cfg", 4.0), ("loop_nocfg", 1.0)] {
        let opts =
            SampleOptions { sampler: SamplerKind::Euler, guidance, seed: 0, time: ModelTime::Timestep };
        let latents = io[&format!("{case}.latents")].clone();
        let out = sample(&model, &io["loop.noise"], &cond, Some(&uncond), &schedule, &opts, |i, x| {
            assert_close(&format!("{case} step {i}"), x, &latents.i(i + 1).unwrap(), 5e-5, 1e-4);
        })
        .unwrap();
        assert_close(case, &out, &io[&format!("{case}.final_latents")], 5e-5, 1e-4);
    }
}

#[test]
fn sd3_loop_with_cfg_matches_diffusers() {
    sd3_loop("loop_cfg", 4.0);
}

#[test]
fn sd3_loop_without_cfg_matches_diffusers() {
    sd3_loop("loop_nocfg", 1.0);
}

#[test]
fn schedules_run_from_pure_noise_to_clean() {
    let flux = scheduler("scheduler_flux");
    for n in [1, 2, 7, 30] {
        for s in [
            scheduler("scheduler_sd3").set_timesteps(n, None, None).unwrap(),
            flux.set_timesteps(n, None, Some(1024)).unwrap(),
            flux.set_timesteps(n, Some(3.0), None).unwrap(),
        ] {
            assert_eq!((s.timesteps.len(), s.sigmas.len()), (n, n + 1));
            assert!((s.sigmas[0] - 1.0).abs() < 1e-6, "first sigma {}", s.sigmas[0]);
            assert_eq!(s.sigmas[n], 0.0);
            assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]), "decreasing: {:?}", s.sigmas);
            assert!(s.timesteps.iter().zip(&s.sigmas).all(|(t, s)| *t == s * 1000.0));
        }
        let euler = scheduler("scheduler_sdxl_euler").set_timesteps(n, None, None).unwrap();
        assert_eq!(euler.sigmas[n], 0.0);
        assert!(euler.sigmas.windows(2).all(|w| w[0] > w[1]));
        for (name, last) in [("scheduler_sdxl_ddim", 1), ("ddpm", 0)] {
            let s = match name {
                "ddpm" => Scheduler::new(SchedulerConfig::Ddpm(DdpmConfig::default())).unwrap(),
                _ => scheduler(name),
            };
            let s = s.set_timesteps(n, None, None).unwrap();
            let t = s.integer_timesteps().unwrap();
            assert_eq!(t[n - 1], last, "{name}: last timestep is steps_offset");
            assert!(t.windows(2).all(|w| w[0] > w[1]));
        }
    }
}

#[test]
fn shift_terminal_and_invert_sigmas_reach_their_ends() {
    let flow = |cfg: FlowMatchConfig| Scheduler::new(SchedulerConfig::FlowMatch(cfg)).unwrap();
    let base = FlowMatchConfig { shift: 3.0, ..Default::default() };
    let plain = flow(base.clone()).set_timesteps(10, None, None).unwrap();
    let cfg = FlowMatchConfig { shift_terminal: Some(0.1), ..base.clone() };
    let stretched = flow(cfg).set_timesteps(10, None, None).unwrap();
    assert!((stretched.sigmas[9] - 0.1).abs() < 1e-6, "last sigma {}", stretched.sigmas[9]);
    assert!((stretched.sigmas[0] - 1.0).abs() < 1e-6);
    let inverted =
        flow(FlowMatchConfig { invert_sigmas: true, ..base }).set_timesteps(10, None, None).unwrap();
    for i in 0..10 {
        assert_eq!(inverted.sigmas[i], 1.0 - plain.sigmas[i]);
        assert_eq!(inverted.timesteps[i], inverted.sigmas[i] * 1000.0);
    }
    assert_eq!(inverted.sigmas[10], 1.0);
}

/// v(s) = a + b s everywhere: its flow is quadratic in s, which Heun integrates exactly.
struct LinearInTime {
    a: f32,
    b: f32,
}

impl Denoiser for LinearInTime {
    fn forward(&self, x: &Tensor, t: &Tensor, _: &Conditioning) -> candle_core::Result<Tensor> {
        let s = t.to_vec1::<f32>()?[0] / 1000.0;
        Tensor::full(self.a + self.b * s, x.shape(), x.device())
    }

    fn prediction(&self) -> Prediction {
        Prediction::Velocity
    }
}

fn trajectory(kind: SamplerKind, schedule: &Schedule, model: &LinearInTime) -> Vec<f32> {
    let noise = Tensor::full(0.25f32, (1, 1, 2, 2), &Device::Cpu).unwrap();
    let opts = SampleOptions { sampler: kind, guidance: 1.0, seed: 0, time: ModelTime::Timestep };
    let mut xs = vec![];
    let cond = Conditioning::default();
    sample(model, &noise, &cond, None, schedule, &opts, |_, x| {
        xs.push(x.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0])
    })
    .unwrap();
    xs
}

#[test]
fn heun_is_exact_for_a_velocity_linear_in_time() {
    let model = LinearInTime { a: 0.5, b: 3.0 };
    let schedule = scheduler("scheduler_sd3").set_timesteps(4, None, None).unwrap();
    let s = &schedule.sigmas;
    let exact = |t: f32| 0.25 + model.a * (t - s[0]) + model.b * (t * t - s[0] * s[0]) / 2.0;
    let heun = trajectory(SamplerKind::Heun, &schedule, &model);
    let euler = trajectory(SamplerKind::Euler, &schedule, &model);
    for i in 0..3 {
        assert!(
            (heun[i] - exact(s[i + 1])).abs() < 1e-5,
            "Heun step {i}: {} vs {}",
            heun[i],
            exact(s[i + 1])
        );
    }
    // The last interval is an Euler step in diffusers' Heun as well.
    let last = exact(s[3]) - s[3] * (model.a + model.b * s[3]);
    assert!((heun[3] - last).abs() < 1e-5, "Heun last step: {} vs {last}", heun[3]);
    assert!((euler[0] - exact(s[1])).abs() > 1e-3, "the field must be curved enough to tell Euler from Heun");
}

/// A model that knows the clean latent: it returns the exact velocity / noise of its input.
struct Oracle {
    x0: Tensor,
    /// None: flow velocity (x - x0) / sigma. Some: epsilon under these alphas_cumprod, for a
    /// DDPM input (`scaled` false) or an Euler input x / sqrt(sigma^2 + 1) (`scaled` true).
    alphas: Option<Vec<f32>>,
    scaled: bool,
}

impl Denoiser for Oracle {
    fn forward(&self, x: &Tensor, t: &Tensor, _: &Conditioning) -> candle_core::Result<Tensor> {
        let t = t.to_vec1::<f32>()?[0];
        let Some(acp) = &self.alphas else {
            return (x - &self.x0)? / (t as f64 / 1000.0);
        };
        let a = acp[t as usize] as f64;
        if self.scaled {
            let sigma = ((1.0 - a) / a).sqrt();
            return ((x * (sigma * sigma + 1.0).sqrt())? - &self.x0)? / sigma;
        }
        (x - (&self.x0 * a.sqrt())?)? / (1.0 - a).sqrt()
    }

    fn prediction(&self) -> Prediction {
        match self.alphas {
            Some(_) => Prediction::Epsilon,
            None => Prediction::Velocity,
        }
    }
}

#[test]
fn every_sampler_recovers_the_clean_latent_from_an_exact_model() {
    let dev = Device::Cpu;
    let x0 = Tensor::arange(0f32, 32., &dev)
        .unwrap()
        .reshape((2, 1, 4, 4))
        .unwrap()
        .affine(1.0 / 40.0, -0.4)
        .unwrap();
    let noise = wave((2, 1, 4, 4));
    let ddpm = Scheduler::new(SchedulerConfig::Ddpm(DdpmConfig::default())).unwrap();
    let euler = scheduler("scheduler_sdxl_euler");
    let SchedulerConfig::Euler(euler_cfg) = &euler.config else { panic!("euler config") };
    let eps = Some(alphas_cumprod(&DdpmConfig::default().betas));
    let cases = [
        (SamplerKind::Euler, scheduler("scheduler_sd3").set_timesteps(5, None, None), None, false),
        (SamplerKind::Heun, scheduler("scheduler_sd3").set_timesteps(5, None, None), None, false),
        (
            SamplerKind::Euler,
            euler.set_timesteps(10, None, None),
            Some(alphas_cumprod(&euler_cfg.betas)),
            true,
        ),
        (SamplerKind::Ddim, ddpm.set_timesteps(10, None, None), eps.clone(), false),
        (SamplerKind::Ddpm, ddpm.set_timesteps(10, None, None), eps, false),
    ];
    for (kind, schedule, alphas, scaled) in cases {
        let model = Oracle { x0: x0.clone(), alphas, scaled };
        let opts = SampleOptions { sampler: kind, guidance: 1.0, seed: 3, time: ModelTime::Timestep };
        let out =
            sample(&model, &noise, &Conditioning::default(), None, &schedule.unwrap(), &opts, |_, _| {});
        assert_close(&format!("{kind:?}"), &out.unwrap(), &x0, 2e-4, 1e-4);
    }
}

/// A fixed, deliberately imperfect epsilon model.
struct Shrink;

impl Denoiser for Shrink {
    fn forward(&self, x: &Tensor, _: &Tensor, _: &Conditioning) -> candle_core::Result<Tensor> {
        x * 0.5
    }

    fn prediction(&self) -> Prediction {
        Prediction::Epsilon
    }
}

#[test]
fn ddpm_sampling_is_determined_by_its_seed() {
    let schedule =
        Scheduler::new(SchedulerConfig::Ddpm(DdpmConfig { clip_sample: false, ..Default::default() }))
            .unwrap()
            .set_timesteps(20, None, None)
            .unwrap();
    let noise = wave((1, 4, 8, 8));
    let run = |kind, seed| {
        let opts = SampleOptions { sampler: kind, guidance: 1.0, seed, time: ModelTime::Timestep };
        let out =
            sample(&Shrink, &noise, &Conditioning::default(), None, &schedule, &opts, |_, _| {}).unwrap();
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let a = run(SamplerKind::Ddpm, 7);
    assert_eq!(a, run(SamplerKind::Ddpm, 7), "same seed, same latent");
    assert!(max_diff(&a, &run(SamplerKind::Ddpm, 8)) > 1e-2, "another seed draws other noise");
    assert_eq!(run(SamplerKind::Ddim, 7), run(SamplerKind::Ddim, 8), "DDIM (eta 0) uses no noise");
}

#[test]
fn ddpm_step_adds_the_posterior_standard_deviation() {
    let schedule = Scheduler::new(SchedulerConfig::Ddpm(DdpmConfig::default()))
        .unwrap()
        .set_timesteps(10, None, None)
        .unwrap();
    let Process::Alphas(a) = &schedule.process else { panic!("DDPM steps on alphas") };
    let zeros = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let ones = zeros.ones_like().unwrap();
    for i in [0, 5, 9] {
        let (at, prev) = (a.alpha_prod[i] as f64, a.alpha_prod_prev[i] as f64);
        let expected =
            if a.timesteps[i] == 0 { 0.0 } else { ((1.0 - prev) / (1.0 - at) * (1.0 - at / prev)).sqrt() };
        let out = schedule.ddpm_step(i, &zeros, &zeros, &ones).unwrap();
        let expected = Tensor::full(expected as f32, (1, 1, 2, 2), &Device::Cpu).unwrap();
        assert_close(&format!("posterior std at step {i}"), &out, &expected, 1e-6, 1e-5);
    }
}

/// A learned-sigma model whose variance channels are garbage: only the first half may be used.
struct LearnedSigma;

impl Denoiser for LearnedSigma {
    fn forward(&self, x: &Tensor, _: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        // eps depends on the class label so that guidance has something to amplify.
        let labels = cond.class_labels.as_ref().unwrap().to_dtype(DType::F32)?;
        let eps = x.broadcast_mul(&labels.reshape(((), 1, 1, 1))?)?;
        Tensor::cat(&[&eps, &(eps.ones_like()? * 1e6)?], 1)
    }

    fn prediction(&self) -> Prediction {
        Prediction::EpsilonLearnedSigma
    }
}

#[test]
fn guidance_extrapolates_epsilon_and_drops_learned_variance() {
    let schedule = Scheduler::new(SchedulerConfig::Ddpm(DdpmConfig::default()))
        .unwrap()
        .set_timesteps(1, None, None)
        .unwrap();
    let dev = Device::Cpu;
    let noise = Tensor::full(1f32, (1, 2, 2, 2), &dev).unwrap();
    let labels =
        |l: f32| Conditioning { class_labels: Some(Tensor::new(&[l], &dev).unwrap()), ..Default::default() };
    let opts =
        SampleOptions { sampler: SamplerKind::Ddim, guidance: 4.0, seed: 0, time: ModelTime::Timestep };
    let out = sample(&LearnedSigma, &noise, &labels(0.75), Some(&labels(0.5)), &schedule, &opts, |_, _| {})
        .unwrap();
    // One DDIM step at t = 0 to alpha 1: x0 = (x - sqrt(1 - a) eps) / sqrt(a), eps = 0.5 + 4 (0.75 - 0.5).
    let a = alphas_cumprod(&DdpmConfig::default().betas)[0];
    let x0 = (1.0 - (1.0 - a).sqrt() * 1.5) / a.sqrt();
    assert_close("guided DDIM", &out, &Tensor::full(x0, (1, 2, 2, 2), &dev).unwrap(), 1e-6, 1e-6);
    let one_sided = sample(&LearnedSigma, &noise, &labels(0.75), None, &schedule, &opts, |_, _| {});
    assert!(one_sided.is_ok());
    let err = sample(
        &LearnedSigma,
        &noise,
        &labels(0.75),
        Some(&Conditioning::default()),
        &schedule,
        &opts,
        |_, _| {},
    );
    assert!(err.unwrap_err().to_string().contains("class_labels"));
}

#[test]
fn samplers_refuse_mismatched_schedules_and_models() {
    let flow = scheduler("scheduler_sd3").set_timesteps(4, None, None).unwrap();
    let ddim = scheduler("scheduler_sdxl_ddim").set_timesteps(4, None, None).unwrap();
    let noise = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let run = |kind, schedule: &Schedule, model: &dyn Denoiser| {
        let opts = SampleOptions { sampler: kind, guidance: 1.0, seed: 0, time: ModelTime::Timestep };
        sample(model, &noise, &Conditioning::default(), None, schedule, &opts, |_, _| {})
    };
    let velocity = LinearInTime { a: 0.0, b: 0.0 };
    assert!(run(SamplerKind::Ddim, &flow, &velocity).unwrap_err().to_string().contains("Ddim sampler"));
    assert!(run(SamplerKind::Heun, &ddim, &Shrink).is_err());
    assert!(run(SamplerKind::Euler, &flow, &Shrink).unwrap_err().to_string().contains("Epsilon"));
    assert!(run(SamplerKind::Ddim, &ddim, &Shrink).is_ok());
}

fn write_config(name: &str, json: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("convergence-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, json).unwrap();
    path
}

#[test]
fn config_errors_name_the_file_and_the_problem() {
    let err = |name: &str, json: &str| {
        let path = write_config(name, json);
        let e = Scheduler::from_config_file(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        e
    };
    let karras =
        err("karras.json", r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true}"#);
    assert!(karras.contains("use_karras_sigmas"), "{karras}");
    let variance =
        err("variance.json", r#"{"_class_name": "DDPMScheduler", "variance_type": "learned_range"}"#);
    assert!(variance.contains("learned_range"), "{variance}");
    assert!(err("class.json", r#"{"_class_name": "LMSDiscreteScheduler"}"#).contains("LMSDiscreteScheduler"));
    assert!(err("none.json", r#"{"shift": 3.0}"#).contains("_class_name"));

    let flux = scheduler("scheduler_flux");
    let e = flux.set_timesteps(4, None, None).unwrap_err().to_string();
    assert!(e.contains("scheduler_flux") && e.contains("mu"), "{e}");
    assert!(scheduler("scheduler_sdxl_ddim").set_timesteps(1001, None, None).is_err());
    assert!(scheduler("scheduler_sdxl_ddim").set_sigmas(&[1.0], None, None).is_err());

    let heun =
        write_config("heun.json", r#"{"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 3.0}"#);
    let heun = Scheduler::from_config_file(heun).unwrap().set_timesteps(4, None, None).unwrap();
    assert_eq!(heun, scheduler("scheduler_sd3").set_timesteps(4, None, None).unwrap());
}
