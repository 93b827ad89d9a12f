//! Pipelines: a model_index.json directory assembled into conditioning -> sampler -> image.

pub mod dit;
pub mod flux;
pub mod sd3;

use crate::error::{Error, Result};
use crate::models::any::AnyModel;
use crate::weights::{load_model, LoadOptions};
use std::path::Path;

/// Loads the component subfolder `name` of a pipeline directory, naming it when it is missing.
pub(crate) fn component(dir: &Path, name: &str, opts: &LoadOptions) -> Result<AnyModel> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(Error::config(dir, format!("pipeline component `{name}/` is missing")));
    }
    load_model(&path, opts)
}

pub(crate) fn wrong(dir: &Path, name: &str, expected: &str) -> Error {
    Error::config(dir.join(name), format!("expected a {expected}"))
}
