//! Any supported model behind one enum, so tools (`forward`, `inspect`) dispatch by
//! config.json's `_class_name` and feed fixture-style named inputs.

use crate::error::{Error, Result};
use crate::models::dit::DiT;
use candle_core::Tensor;
use std::collections::HashMap;

pub enum AnyModel {
    DiT(DiT),
}

impl AnyModel {
    pub fn class_name(&self) -> &'static str {
        match self {
            AnyModel::DiT(_) => "DiTTransformer2DModel",
        }
    }

    /// Runs the model on `input.<forward arg>` tensors and returns `output.*` tensors, named as
    /// the reference fixtures name them.
    pub fn forward_io(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let arg = |name: &str| {
            inputs
                .get(&format!("input.{name}"))
                .ok_or_else(|| Error::msg(format!("inputs: missing tensor `input.{name}` ({})", self.class_name())))
        };
        let mut out = HashMap::new();
        match self {
            AnyModel::DiT(m) => {
                let labels = arg("class_labels")?.to_dtype(candle_core::DType::U32)?;
                let sample = m.forward_labels(arg("hidden_states")?, arg("timestep")?, &labels)?;
                out.insert("output.sample".to_string(), sample);
            }
        }
        Ok(out)
    }
}
