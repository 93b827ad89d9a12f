//! Prompts to token ids: the first stage of conditioning, before the text encoders in
//! `models::text`.

pub mod tokenizer;

pub use tokenizer::{
    ids_tensor, write_word_tokenizer, PromptTokenizer, TokenizedPrompt, Truncation, WORD_SPECIALS,
};
