//! CLIP and T5 text encoders against transformers (fixtures `clip_l`, `clip_g`, `t5`), the
//! prompt tokenizers against transformers' (fixture `tokenizers`), and the full-size parameter
//! and FLOP counts of CLIP-L, OpenCLIP bigG and T5-v1.1-XXL.

mod common;
use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, io};
use convergence::inspect::{components, summarize};
use convergence::models::any::AnyModel;
use convergence::models::text::{ClipTextConfig, ClipTextModel, T5Config, T5EncoderModel};
use convergence::nn::Init;
use convergence::text::{ids_tensor, PromptTokenizer, TokenizedPrompt};
use convergence::weights::{load_model, read_json, read_safetensors, LoadOptions, WeightStore};
use convergence::Result;
use std::collections::BTreeMap;
use std::path::Path;

const ATOL: f32 = 5e-5;
const RTOL: f32 = 1e-4;

fn clip(case: &str) -> Result<ClipTextModel> {
    match load_model(&fixture(case), &LoadOptions::default())? {
        AnyModel::ClipText(m) => Ok(m),
        other => panic!("{case} loaded as {}", other.class_name()),
    }
}

fn t5() -> Result<T5EncoderModel> {
    match load_model(&fixture("t5"), &LoadOptions::default())? {
        AnyModel::T5Encoder(m) => Ok(m),
        other => panic!("t5 loaded as {}", other.class_name()),
    }
}

fn weights(case: &str) -> Result<BTreeMap<String, Tensor>> {
    Ok(read_safetensors(&fixture(case).join("model.safetensors"), &Device::Cpu)?.into_iter().collect())
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn clip_encoders_match_transformers_outputs_and_taps() -> Result<()> {
    for (case, class, pooled) in [
        ("clip_l", "CLIPTextModel", "output.pooler_output"),
        ("clip_g", "CLIPTextModelWithProjection", "output.text_embeds"),
    ] {
        let io = io(case);
        let m = clip(case)?;
        let any = AnyModel::ClipText(m.clone());
        assert_eq!(any.class_name(), class);
        let out = any.forward_io(&io)?;
        assert_eq!(out.len(), 3, "{case}: last_hidden_state, penultimate, pooled");
        for name in ["output.last_hidden_state", "output.hidden_states_penultimate", pooled] {
            assert_close(&format!("{case} {name}"), &out[name], &io[name], ATOL, RTOL);
        }
        let o = m.forward(&io["input.input_ids"])?;
        assert_eq!(o.hidden_states.len(), 4);
        for (i, tap) in
            ["tap.embeddings", "tap.layer0_out", "tap.layer1_out", "tap.layer2_out"].iter().enumerate()
        {
            assert_close(&format!("{case} {tap}"), &o.hidden_states[i], &io[*tap], ATOL, RTOL);
        }
        assert_close(case, &m.embed(&io["input.input_ids"])?, &io["tap.embeddings"], ATOL, RTOL);
        if let Some(pre) = io.get("tap.pooled_pre_projection") {
            assert_close(&format!("{case} pooled"), &o.pooler_output, pre, ATOL, RTOL);
        }
        // The penultimate entry is layer 1's output, and it is not final-normed.
        assert_eq!(values(o.penultimate())?, values(&o.hidden_states[2])?);
    }
    Ok(())
}

#[test]
fn clip_pools_at_the_first_eos_id_unless_the_config_has_the_legacy_id() -> Result<()> {
    let io = io("clip_g");
    let ids = &io["input.input_ids"];
    let mut cfg: ClipTextConfig = read_json(&fixture("clip_g").join("config.json"))?;
    assert_eq!(cfg.eos_token_id, 2);
    // With a real eos id, pooling reads its first occurrence: here the start token 998 at 0.
    cfg.eos_token_id = 998;
    let store = WeightStore::open_safetensors(&[fixture("clip_g").join("model.safetensors")])?;
    let m = ClipTextModel::new(store.var_builder(DType::F32, &Device::Cpu), &cfg, Init::Default)?;
    let o = m.forward(ids)?;
    let first = o.last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?;
    assert_eq!(values(&o.pooler_output)?, values(&first)?);
    assert_ne!(values(&o.pooler_output)?, values(&io["tap.pooled_pre_projection"])?);
    Ok(())
}

#[test]
fn clip_weights_load_with_and_without_the_text_model_prefix() -> Result<()> {
    let io = io("clip_l");
    let cfg: ClipTextConfig = read_json(&fixture("clip_l").join("config.json"))?;
    let stripped = weights("clip_l")?
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").expect("hub layout").to_string(), v));
    let vb = WeightStore::from_tensors(stripped, Path::new("stripped")).var_builder(DType::F32, &Device::Cpu);
    let o = ClipTextModel::new(vb, &cfg, Init::Default)?.forward(&io["input.input_ids"])?;
    assert_close("unprefixed", &o.pooler_output, &io["output.pooler_output"], ATOL, RTOL);
    Ok(())
}

#[test]
fn t5_encoder_matches_transformers_outputs_taps_and_position_bias() -> Result<()> {
    let io = io("t5");
    let m = t5()?;
    let out = AnyModel::T5Encoder(m.clone()).forward_io(&io)?;
    assert_eq!(out.len(), 2);
    for name in ["output.last_hidden_state", "output.hidden_states_penultimate"] {
        assert_close(name, &out[name], &io[name], ATOL, RTOL);
    }
    let o = m.forward(&io["input.input_ids"])?;
    assert_close("block 0", &o.hidden_states[1], &io["tap.block0_out"], ATOL, RTOL);
    assert_close("block 1", &o.hidden_states[2], &io["tap.block1_out"], ATOL, RTOL);
    // Unlike CLIP's, the last hidden state in the list is the final-normed one.
    assert_eq!(values(&o.hidden_states[3])?, values(&o.last_hidden_state)?);
    let bias = &io["tap.relative_position_bias"];
    assert_eq!(values(&m.position_bias(32)?)?, values(bias)?, "bucket table lookup is exact");
    Ok(())
}

#[test]
fn t5_reads_encoder_embed_tokens_when_the_checkpoint_has_it() -> Result<()> {
    let io = io("t5");
    let cfg: T5Config = read_json(&fixture("t5").join("config.json"))?;
    let mut w = weights("t5")?;
    let shared = w["shared.weight"].clone();
    w.insert("encoder.embed_tokens.weight".into(), shared.clone());
    w.insert("shared.weight".into(), shared.zeros_like()?);
    let vb = WeightStore::from_tensors(w, Path::new("untied")).var_builder(DType::F32, &Device::Cpu);
    let o = T5EncoderModel::new(vb, &cfg, Init::Default)?.forward(&io["input.input_ids"])?;
    assert_close("embed_tokens", &o.last_hidden_state, &io["output.last_hidden_state"], ATOL, RTOL);
    Ok(())
}

#[test]
fn construction_lists_exactly_the_checkpoint_tensors() -> Result<()> {
    let shapes = |case: &str| -> Result<BTreeMap<String, Vec<usize>>> {
        Ok(weights(case)?.into_iter().map(|(k, v)| (k, v.dims().to_vec())).collect())
    };
    for case in ["clip_l", "clip_g"] {
        let cfg: ClipTextConfig = read_json(&fixture(case).join("config.json"))?;
        let listed: BTreeMap<_, _> = cfg.param_list()?.0.into_iter().collect();
        assert_eq!(listed, shapes(case)?, "{case}");
    }
    let cfg: T5Config = read_json(&fixture("t5").join("config.json"))?;
    let listed: BTreeMap<_, _> = cfg.param_list()?.0.into_iter().collect();
    assert_eq!(listed, shapes("t5")?);
    Ok(())
}

#[test]
fn presets_match_reference_counts_and_flops() -> Result<()> {
    // param_counts.json: parameters and, at 77 tokens, FLOPs per op (addmm + mm, bmm).
    for (name, params, linear, attention) in [
        ("clip-l", 123_060_480u64, 13_079_937_024u64, 218_566_656u64),
        ("clip-g", 694_659_840, 96_888_422_400 + 3_276_800, 971_407_360),
    ] {
        let cfg = ClipTextConfig::preset(name).expect("preset");
        assert_eq!(cfg.param_list()?.total(), params, "{name}");
        let f = cfg.flops(77);
        assert_eq!([f.linear, f.attention, f.conv], [linear, attention, 0], "{name} flops");
    }
    assert_eq!(ClipTextConfig::preset("clip-l").expect("preset").flops(77).total(), 13_298_503_680);
    let xxl = T5Config::preset("t5-xxl").expect("preset");
    assert_eq!(xxl.param_list()?.total(), 4_762_310_656);
    for (tokens, mm, bmm, total) in [
        (256, 2_370_821_947_392u64, 25_769_803_776u64, 2_396_591_751_168u64),
        (512, 4_741_643_894_784, 103_079_215_104, 4_844_723_109_888),
    ] {
        let f = xxl.flops(tokens);
        assert_eq!([f.linear, f.attention, f.total()], [mm, bmm, total], "t5-xxl at {tokens}");
    }
    Ok(())
}

#[test]
fn inspect_summarises_text_encoders_over_tokens() -> Result<()> {
    let g = summarize("clip-g", None)?;
    assert_eq!(
        (g.class_name.as_str(), g.params.total(), g.flops),
        ("CLIPTextModelWithProjection", 694_659_840, 97_863_106_560)
    );
    assert_eq!((g.resolution, g.attention), (None, (77, 20)));
    let text = g.text();
    assert!(text.starts_with("clip-g (CLIPTextModelWithProjection) over 77 tokens"), "{text}");
    let parts: BTreeMap<String, u64> = components(&g.params).into_iter().collect();
    assert_eq!(parts["text_projection"], 1280 * 1280);
    assert_eq!(parts["text_model.encoder.layers.*.self_attn"], 32 * 4 * (1280 * 1280 + 1280));
    assert_eq!(summarize("t5-xxl", None)?.flops, 4_844_723_109_888);
    let from_dir = summarize(fixture("t5").to_str().expect("utf-8 path"), None)?;
    assert_eq!(from_dir.params.total(), 1000 * 32 + 3 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32 * 4 + 32);
    assert!(summarize("clip-l", Some((512, 512))).is_err(), "a text encoder takes no resolution");
    Ok(())
}

/// The fixture prompts in row order.
fn prompts() -> Result<Vec<serde_json::Value>> {
    let case: serde_json::Value = read_json(&fixture("tokenizers").join("case.json"))?;
    Ok(case["prompts"].as_array().expect("prompts").clone())
}

fn rows(t: &Tensor) -> Result<Vec<Vec<u32>>> {
    Ok(t.to_dtype(DType::U32)?.to_vec2::<u32>()?)
}

/// Encodes every fixture prompt with the tokenizer in `dir` and checks ids, masks and lengths
/// exactly against `output.<key>.*`.
fn check_tokenizer(
    dir: &Path,
    max_length: Option<usize>,
    key: &str,
    lengths: &str,
) -> Result<Vec<TokenizedPrompt>> {
    let io = io("tokenizers");
    let tok = PromptTokenizer::from_dir(dir, max_length)?;
    let prompts = prompts()?;
    let encoded = prompts
        .iter()
        .map(|p| tok.encode(p["prompt"].as_str().expect("prompt")))
        .collect::<Result<Vec<_>>>()?;
    let (ids, masks) =
        (rows(&io[&format!("output.{key}.input_ids")])?, rows(&io[&format!("output.{key}.attention_mask")])?);
    let untruncated =
        io[&format!("output.{lengths}.untruncated_length")].to_dtype(DType::U32)?.to_vec1::<u32>()?;
    for (i, e) in encoded.iter().enumerate() {
        let name = &prompts[i]["name"];
        assert_eq!(e.input_ids, ids[i], "{key} {name} ids");
        assert_eq!(e.attention_mask, masks[i], "{key} {name} mask");
        assert_eq!(e.untruncated_length(), untruncated[i] as usize, "{key} {name} untruncated length");
        assert_eq!(e.truncation.is_some(), e.untruncated_length() > tok.max_length(), "{key} {name}");
    }
    assert_eq!(rows(&ids_tensor(&encoded, &Device::Cpu)?)?, ids);
    Ok(encoded)
}

#[test]
fn clip_tokenizers_match_transformers_and_quote_the_truncated_text() -> Result<()> {
    let dir = fixture("tokenizers");
    let prompts = prompts()?;
    for (folder, key) in [("tokenizer", "clip_l"), ("tokenizer_2", "clip_g")] {
        let encoded = check_tokenizer(&dir.join(folder), None, key, key)?;
        for (e, p) in encoded.iter().zip(&prompts) {
            let expected = &p[key];
            assert_eq!(e.truncation.is_some(), expected["truncated"].as_bool().expect("flag"), "{key}");
            if let Some(t) = &e.truncation {
                assert_eq!(
                    t.removed_text,
                    expected["removed_text_as_logged"].as_str().expect("text"),
                    "{key}"
                );
                assert_eq!(t.max_length, 77);
                assert!(t.to_string().ends_with(&format!("up to 77 tokens: {:?}", t.removed_text)));
            }
        }
    }
    // tokenizer_2 pads with '!' (id 0) and, as transformers does, splits every '!' off as that
    // special token: "Hello! Hi!! Hey!!!" has 6 of them where tokenizer/ has 3 BPE tokens.
    let g = PromptTokenizer::from_dir(&dir.join("tokenizer_2"), None)?;
    let l = PromptTokenizer::from_dir(&dir.join("tokenizer"), None)?;
    assert_eq!((g.pad_id(), l.pad_id()), (0, 49407));
    let bang = |t: &PromptTokenizer| -> Result<usize> {
        Ok(t.encode("Hello! Hi!! Hey!!!")?.untruncated_ids.iter().filter(|&&id| id == 0).count())
    };
    assert_eq!((bang(&g)?, bang(&l)?), (6, 0));
    Ok(())
}

#[test]
fn clip_tokenizer_built_from_vocab_and_merges_equals_tokenizer_json() -> Result<()> {
    let src = fixture("tokenizers").join("tokenizer");
    let dir = std::env::temp_dir().join(format!("convergence-clip-bpe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for f in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).expect("copy");
    }
    let result = check_tokenizer(&dir, None, "clip_l", "clip_l");
    std::fs::remove_dir_all(&dir).expect("clean up");
    result.map(|_| ())
}

#[test]
fn t5_tokenizer_matches_transformers_at_256_and_512() -> Result<()> {
    let dir = fixture("tokenizers").join("tokenizer_3");
    let prompts = prompts()?;
    for (len, key) in [(256, "t5_256"), (512, "t5_512")] {
        let encoded = check_tokenizer(&dir, Some(len), key, "t5")?;
        let tok = PromptTokenizer::from_dir(&dir, Some(len))?;
        for (e, p) in encoded.iter().zip(&prompts) {
            let expected = &p[key];
            assert_eq!(e.truncation.is_some(), expected["truncated"].as_bool().expect("flag"), "{key}");
            let Some(t) = &e.truncation else { continue };
            assert_eq!(t.removed_text, expected["removed_text_actual"].as_str().expect("text"), "{key}");
            // SD3 and Flux log from CLIP's length (token 76), not from max_sequence_length.
            let logged = tok.decode(&e.untruncated_ids[76..e.untruncated_length() - 1])?;
            assert_eq!(logged, expected["removed_text_as_logged"].as_str().expect("text"), "{key}");
            assert_eq!(*e.input_ids.last().expect("ids"), 1, "</s> stays last");
        }
    }
    let tok = PromptTokenizer::from_dir(&dir, None)?;
    assert_eq!((tok.max_length(), tok.pad_id()), (512, 0), "model_max_length and <pad> from the configs");
    Ok(())
}
