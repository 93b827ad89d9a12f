//! Prompts to token ids: the first stage of conditioning, before the text encoders in
//! `models::text`.

pub mod tokenizer;

pub use tokenizer::{ids_tensor, PromptTokenizer, TokenizedPrompt, Truncation};
