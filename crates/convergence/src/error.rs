//! One error type for the library. Every variant carries what a user needs to act on it:
//! the file, the tensor, what was expected and what was found.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The io error is part of the message, not a `source`: error reports that print the
    /// chain would otherwise say it twice.
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error("{path}: not a valid {format} file: {reason}")]
    Corrupt { path: PathBuf, format: &'static str, reason: String },
    #[error("{path}: missing tensor `{tensor}` (expected shape {expected:?})")]
    MissingTensor { path: PathBuf, tensor: String, expected: Vec<usize> },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor `{tensor}` has dtype {found}, expected a float dtype (f32/f16/bf16/f64)")]
    DType { path: PathBuf, tensor: String, found: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(m: impl std::fmt::Display) -> Self {
        Error::Msg(m.to_string())
    }

    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause }
    }

    pub fn config(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), message: message.to_string() }
    }
}

/// Load errors surface through candle's `VarBuilder`, which only carries `candle_core::Error`;
/// ours travel inside it as their message (`Error::Msg` keeps it verbatim on the way out).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// A candle error becomes ours with the backtrace wrapper dropped, so the text stays one line.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::Msg(m) => Error::Msg(m),
            candle_core::Error::WithBacktrace { inner, .. } => Error::from(*inner),
            other => Error::Candle(other),
        }
    }
}
