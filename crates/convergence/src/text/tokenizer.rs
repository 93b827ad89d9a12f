//! Prompt tokenizers built from a pipeline's tokenizer folder, giving the ids transformers'
//! tokenizers feed the text encoders: `tokenizer(prompt, padding="max_length",
//! max_length=L, truncation=True)`.
//!
//! A folder with `tokenizer.json` (T5, some CLIP folders) is loaded as it is. The CLIP folders of
//! the SDXL / SD3 / Flux hub repos ship only `vocab.json` + `merges.txt`; from those we build the
//! tokenizer transformers converts them into (NFC, whitespace runs -> one space, lowercase;
//! CLIP's split regex; byte-level BPE with the `</w>` end-of-word suffix; `<|startoftext|>` ...
//! `<|endoftext|>` around the body). Either way every special token the folder's configs name is
//! registered as a special added token, as transformers does: SDXL's `tokenizer_2` pads with
//! `!`, so every `!` in its prompts becomes id 0 instead of a BPE token.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as Normalizers, NFC};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, Encoding, Model, ModelWrapper, PostProcessor, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection,
};

/// CLIP's pre-tokenizer: the special tokens, English contractions, letter runs, single digits
/// and punctuation runs; everything else (whitespace) is dropped.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A special token as the configs write it: a string, or (older hub files) an object.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Content(String),
    Object { content: String },
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Content(c) | SpecialToken::Object { content: c } => c,
        }
    }
}

/// The fields of `tokenizer_config.json` / `special_tokens_map.json` we need.
#[derive(Clone, Debug, Default, Deserialize)]
struct TokenizerFiles {
    model_max_length: Option<f64>,
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    unk_token: Option<SpecialToken>,
    pad_token: Option<SpecialToken>,
}

impl TokenizerFiles {
    /// `tokenizer_config.json`, with `special_tokens_map.json` overriding the tokens it names.
    fn read(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<TokenizerFiles> {
            let path = dir.join(name);
            if path.exists() {
                crate::weights::read_json(&path)
            } else {
                Ok(TokenizerFiles::default())
            }
        };
        let (config, map) = (read("tokenizer_config.json")?, read("special_tokens_map.json")?);
        Ok(TokenizerFiles {
            model_max_length: config.model_max_length,
            bos_token: map.bos_token.or(config.bos_token),
            eos_token: map.eos_token.or(config.eos_token),
            unk_token: map.unk_token.or(config.unk_token),
            pad_token: map.pad_token.or(config.pad_token),
        })
    }

    fn specials(&self) -> impl Iterator<Item = &str> {
        [&self.bos_token, &self.eos_token, &self.unk_token, &self.pad_token]
            .into_iter()
            .flatten()
            .map(SpecialToken::content)
    }
}

/// Why a prompt did not fit: the text that was cut, decoded as the pipelines decode it for
/// their truncation warning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub removed_text: String,
    pub max_length: usize,
}

impl std::fmt::Display for Truncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "The following part of your input was truncated because the text encoder can only handle \
             sequences up to {} tokens: {:?}",
            self.max_length, self.removed_text
        )
    }
}

/// One prompt's ids at the tokenizer's fixed length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_length` ids: the special tokens around the body (cut so the closing token
    /// stays last), then padding.
    pub input_ids: Vec<u32>,
    /// 1 for the special tokens and body, 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Every id before truncation, special tokens included.
    pub untruncated_ids: Vec<u32>,
    /// Set when the body did not fit.
    pub truncation: Option<Truncation>,
}

impl TokenizedPrompt {
    /// Token count before truncation; above `max_length` the pipelines warn.
    pub fn untruncated_length(&self) -> usize {
        self.untruncated_ids.len()
    }
}

/// A tokenizer that pads and truncates to one length with its own pad token.
#[derive(Clone, Debug)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
    /// BPE end-of-word suffix (CLIP's `</w>`), which decoding turns into a space as
    /// transformers' CLIP tokenizer does.
    word_suffix: Option<String>,
}

fn tokenizer_error(path: &Path, e: tokenizers::Error) -> Error {
    Error::config(path, format!("tokenizer: {e}"))
}

fn run_error(e: tokenizers::Error) -> Error {
    Error::msg(format!("tokenizer: {e}"))
}

/// The folder's tokenizer before the configs' special tokens are registered.
fn folder_tokenizer(dir: &Path, files: &TokenizerFiles) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if json.exists() {
        Tokenizer::from_file(&json).map_err(|e| tokenizer_error(&json, e))
    } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
        clip_from_vocab_merges(dir, files)
    } else {
        Err(Error::config(
            dir,
            "no tokenizer.json, nor vocab.json + merges.txt (spiece.model alone is not supported)",
        ))
    }
}

/// The tokenizer transformers builds from a CLIP folder's `vocab.json` + `merges.txt`.
fn clip_from_vocab_merges(dir: &Path, files: &TokenizerFiles) -> Result<Tokenizer> {
    let token = |t: &Option<SpecialToken>, what: &str| {
        t.as_ref()
            .map(|t| t.content().to_string())
            .ok_or_else(|| Error::config(dir, format!("the tokenizer configs name no {what} token")))
    };
    let (bos, eos, unk) =
        (token(&files.bos_token, "bos")?, token(&files.eos_token, "eos")?, token(&files.unk_token, "unk")?);
    let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let bpe = BPE::from_file(&file("vocab.json"), &file("merges.txt"))
        .unk_token(unk)
        .end_of_word_suffix("</w>".into())
        .build()
        .map_err(|e| tokenizer_error(dir, e))?;
    let id =
        |t: &str| bpe.token_to_id(t).ok_or_else(|| Error::config(dir, format!("`{t}` is not in vocab.json")));
    let processor = RobertaProcessing::new((eos.clone(), id(&eos)?), (bos.clone(), id(&bos)?))
        .trim_offsets(false)
        .add_prefix_space(false);
    let mut tokenizer = Tokenizer::new(bpe);
    clip_text_stages(&mut tokenizer).map_err(|e| tokenizer_error(dir, e))?;
    tokenizer.with_post_processor(Some(processor)).with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// CLIP's normaliser (NFC, whitespace runs -> one space, lowercase) and pre-tokenizer (the split
/// regex, then the byte-level alphabet).
fn clip_text_stages(tokenizer: &mut Tokenizer) -> tokenizers::Result<()> {
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")?;
    let split = Split::new(SplitPattern::Regex(CLIP_SPLIT.into()), SplitDelimiterBehavior::Removed, true)?;
    tokenizer.with_normalizer(Some(Normalizers::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])))?;
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![split.into(), byte_level.into()])));
    Ok(())
}

impl PromptTokenizer {
    /// Loads a tokenizer folder (`tokenizer.json`, or a CLIP `vocab.json` + `merges.txt`, with
    /// `tokenizer_config.json` / `special_tokens_map.json`). Prompts are padded and truncated to
    /// `max_length`, by default the config's `model_max_length` (77 for CLIP; SD3 and Flux pass
    /// their `max_sequence_length`, 256 or 512, for T5).
    pub fn from_dir(dir: &Path, max_length: Option<usize>) -> Result<Self> {
        let files = TokenizerFiles::read(dir)?;
        let mut inner = folder_tokenizer(dir, &files)?;
        inner
            .add_special_tokens(files.specials().map(|t| AddedToken::from(t, true)))
            .map_err(|e| tokenizer_error(dir, e))?;
        let pad =
            files.pad_token.as_ref().ok_or_else(|| Error::config(dir, "the configs name no pad token"))?;
        let pad = pad.content();
        let pad_id = inner
            .token_to_id(pad)
            .ok_or_else(|| Error::config(dir, format!("pad token `{pad}` is not in the vocabulary")))?;
        let max_length = max_length
            .or(files.model_max_length.filter(|&n| (1.0..=1e6).contains(&n)).map(|n| n as usize))
            .ok_or_else(|| Error::config(dir, "no usable model_max_length: pass the length"))?;
        let specials = inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if max_length <= specials {
            return Err(Error::config(dir, format!("max_length {max_length} leaves no room for the text")));
        }
        let word_suffix = match inner.get_model() {
            ModelWrapper::BPE(bpe) => bpe.end_of_word_suffix.clone(),
            _ => None,
        };
        Ok(PromptTokenizer { inner, max_length, pad_id, word_suffix })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The body ids with the post-processor's special tokens added.
    fn with_specials(&self, body: Encoding) -> Result<Vec<u32>> {
        let encoding = self.inner.post_process(body, None, true).map_err(run_error)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids, mask and untruncated ids of one prompt. Too long a body is cut at the end, keeping
    /// the special tokens (CLIP's `<|endoftext|>`, T5's `</s>` stay last).
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt> {
        let mut body = self.inner.encode(prompt, false).map_err(run_error)?;
        let untruncated_ids = self.with_specials(body.clone())?;
        let fit = self.max_length - (untruncated_ids.len() - body.len());
        let truncation = match body.get_ids().get(fit..) {
            Some(removed) if !removed.is_empty() => {
                Some(Truncation { removed_text: self.decode(removed)?, max_length: self.max_length })
            }
            _ => None,
        };
        body.truncate(fit, 0, TruncationDirection::Right);
        let mut input_ids = self.with_specials(body)?;
        let mut attention_mask = vec![1; input_ids.len()];
        input_ids.resize(self.max_length, self.pad_id);
        attention_mask.resize(self.max_length, 0);
        Ok(TokenizedPrompt { input_ids, attention_mask, untruncated_ids, truncation })
    }

    /// The words of `prompt` that the vocabulary lacks (mapped to its unknown token, which a
    /// model trained on a compact vocabulary cannot read).
    pub fn unknown_words(&self, prompt: &str) -> Result<Vec<String>> {
        let enc = self.inner.encode(prompt, false).map_err(run_error)?;
        let unk = match self.inner.get_model() {
            ModelWrapper::WordLevel(w) => self.inner.token_to_id(&w.unk_token),
            _ => None,
        };
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .filter(|(&id, _)| Some(id) == unk)
            .map(|(_, &(a, b))| prompt.get(a..b).unwrap_or_default().to_string())
            .collect())
    }

    /// Text of `ids` as transformers decodes it (special tokens kept; CLIP's `</w>` -> space).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.inner.decode(ids, false).map_err(run_error)?;
        Ok(match &self.word_suffix {
            Some(suffix) => text.replace(suffix.as_str(), " ").trim().to_string(),
            None => text,
        })
    }
}

/// The special tokens of a word-level tokenizer, at ids 0..4. The end token is not id 2, which
/// CLIP configs reserve for the legacy "pool at the largest id" rule.
pub const WORD_SPECIALS: [&str; 4] = ["<pad>", "<bos>", "<unk>", "<eos>"];

/// Writes a word-level tokenizer over `words` (lowercased, split on whitespace and punctuation,
/// `<bos> words <eos>` padded with `<pad>` to `max_length`) as `tokenizer.json` +
/// `tokenizer_config.json` in `dir`: the compact vocabulary of a text encoder trained here,
/// loadable by [`PromptTokenizer::from_dir`] and by transformers.
pub fn write_word_tokenizer(dir: &Path, words: &[&str], max_length: usize) -> Result<()> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    let vocab: std::collections::HashMap<String, u32> =
        WORD_SPECIALS.iter().chain(words).enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
    if vocab.len() != WORD_SPECIALS.len() + words.len() {
        return Err(Error::msg("the word list has duplicates"));
    }
    let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("<unk>".into()).build();
    let model = model.map_err(|e| tokenizer_error(dir, e))?;
    let template = TemplateProcessing::builder()
        .try_single("<bos> $A <eos>")
        .map_err(|e| Error::msg(format!("tokenizer template: {e}")))?
        .special_tokens(vec![("<bos>", 1), ("<eos>", 3)])
        .build()
        .map_err(|e| Error::msg(format!("tokenizer template: {e}")))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(Lowercase)).map_err(|e| tokenizer_error(dir, e))?;
    tokenizer.with_pre_tokenizer(Some(Whitespace {})).with_post_processor(Some(template));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tokenizer.save(dir.join("tokenizer.json"), true).map_err(|e| tokenizer_error(dir, e))?;
    let config = serde_json::json!({
        "model_max_length": max_length,
        "pad_token": "<pad>", "bos_token": "<bos>", "unk_token": "<unk>", "eos_token": "<eos>",
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).map_err(Error::msg)? + "\n")
        .map_err(|e| Error::io(&path, e))
}

/// The prompts' `input_ids` as one [B, max_length] u32 tensor, what the text encoders take.
pub fn ids_tensor(prompts: &[TokenizedPrompt], dev: &Device) -> Result<Tensor> {
    let len = prompts.first().map_or(0, |p| p.input_ids.len());
    let ids: Vec<u32> = prompts.iter().flat_map(|p| p.input_ids.iter().copied()).collect();
    Ok(Tensor::from_vec(ids, (prompts.len(), len), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_tokenizer_round_trips_through_its_files() {
        let dir = std::env::temp_dir().join(format!("conv-words-{}", std::process::id()));
        write_word_tokenizer(&dir, &["a", "red", "circle", "left", "of"], 8).unwrap();
        let tok = PromptTokenizer::from_dir(&dir, None).unwrap();
        let e = tok.encode("A red  circle, left").unwrap();
        // <bos>=1, words from 4 on, "," is unknown (2), <eos>=3, then <pad>=0.
        assert_eq!(e.input_ids, vec![1, 4, 5, 6, 2, 7, 3, 0]);
        let long = tok.encode("a red circle left of a red circle").unwrap();
        assert_eq!(long.input_ids.len(), 8);
        assert_eq!(long.input_ids[7], 3);
        assert_eq!(long.truncation.unwrap().removed_text, "red circle");
        assert_eq!(tok.unknown_words("a pink circle, left").unwrap(), vec!["pink", ","]);
        assert!(write_word_tokenizer(&dir, &["a", "a"], 8).is_err());
    }
}
