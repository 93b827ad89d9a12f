//! Any supported model behind one enum, so tools (`forward`, `inspect`) dispatch by
//! config.json's `_class_name` and feed fixture-style named inputs.

use crate::error::{Error, Result};
use crate::models::dit::DiT;
use crate::models::flux::FluxTransformer2DModel;
use crate::models::sd3::SD3Transformer2DModel;
use crate::nn::AttentionCapture;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

pub enum AnyModel {
    DiT(DiT),
    SD3(SD3Transformer2DModel),
    Flux(FluxTransformer2DModel),
}

impl AnyModel {
    pub fn class_name(&self) -> &'static str {
        match self {
            AnyModel::DiT(_) => "DiTTransformer2DModel",
            AnyModel::SD3(_) => "SD3Transformer2DModel",
            AnyModel::Flux(_) => "FluxTransformer2DModel",
        }
    }

    /// Attaches (or with `None` detaches) a joint-attention capture; DiT has no joint attention.
    pub fn set_attention_capture(&mut self, capture: Option<Arc<AttentionCapture>>) -> Result<()> {
        match self {
            AnyModel::DiT(_) => return Err(Error::msg("DiT has no joint attention to capture")),
            AnyModel::SD3(m) => m.set_attention_capture(capture),
            AnyModel::Flux(m) => m.set_attention_capture(capture),
        }
        Ok(())
    }

    /// Runs the model on `input.<forward arg>` tensors and returns `output.*` tensors, named as
    /// the reference fixtures name them.
    pub fn forward_io(&self, inputs: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        let arg = |name: &str| {
            inputs.get(&format!("input.{name}")).ok_or_else(|| {
                Error::msg(format!("inputs: missing tensor `input.{name}` ({})", self.class_name()))
            })
        };
        let mut out = HashMap::new();
        match self {
            AnyModel::DiT(m) => {
                let labels = arg("class_labels")?.to_dtype(candle_core::DType::U32)?;
                let sample = m.forward_labels(arg("hidden_states")?, arg("timestep")?, &labels)?;
                out.insert("output.sample".to_string(), sample);
            }
            AnyModel::SD3(m) => {
                let sample = m.forward_text(
                    arg("hidden_states")?,
                    arg("timestep")?,
                    arg("encoder_hidden_states")?,
                    arg("pooled_projections")?,
                )?;
                out.insert("output.sample".to_string(), sample);
            }
            AnyModel::Flux(m) => {
                let sample = m.forward_packed(
                    arg("hidden_states")?,
                    arg("encoder_hidden_states")?,
                    arg("pooled_projections")?,
                    arg("timestep")?,
                    arg("img_ids")?,
                    arg("txt_ids")?,
                    inputs.get("input.guidance"),
                )?;
                out.insert("output.sample".to_string(), sample);
            }
        }
        Ok(out)
    }
}
