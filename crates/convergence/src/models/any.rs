//! Any supported model behind one enum, so tools (`forward`, `inspect`) dispatch by
//! config.json's `_class_name` and feed fixture-style named inputs.

use crate::error::{Error, Result};
use crate::models::dit::DiT;
use crate::models::flux::FluxTransformer2DModel;
use crate::models::sd3::SD3Transformer2DModel;
use crate::models::text::clip::{CLIP_TEXT_MODEL, CLIP_TEXT_MODEL_WITH_PROJECTION};
use crate::models::text::t5::T5_ENCODER_MODEL;
use crate::models::text::{ClipTextModel, T5EncoderModel};
use crate::models::text_dit::{TextDiTTransformer2DModel, TEXT_DIT_CLASS};
use crate::models::unet::{TextTime, UNet2DConditionModel};
use crate::models::vae::AutoencoderKL;
use crate::nn::AttentionCapture;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

pub enum AnyModel {
    DiT(DiT),
    SD3(SD3Transformer2DModel),
    TextDiT(TextDiTTransformer2DModel),
    Flux(FluxTransformer2DModel),
    ClipText(ClipTextModel),
    T5Encoder(T5EncoderModel),
    Vae(AutoencoderKL),
    UNet(UNet2DConditionModel),
}

impl AnyModel {
    pub fn class_name(&self) -> &'static str {
        match self {
            AnyModel::DiT(_) => "DiTTransformer2DModel",
            AnyModel::SD3(_) => "SD3Transformer2DModel",
            AnyModel::TextDiT(_) => TEXT_DIT_CLASS,
            AnyModel::Flux(_) => "FluxTransformer2DModel",
            AnyModel::ClipText(m) if m.config().with_projection() => CLIP_TEXT_MODEL_WITH_PROJECTION,
            AnyModel::ClipText(_) => CLIP_TEXT_MODEL,
            AnyModel::T5Encoder(_) => T5_ENCODER_MODEL,
            AnyModel::Vae(_) => "AutoencoderKL",
            AnyModel::UNet(_) => "UNet2DConditionModel",
        }
    }

    /// The model as a denoiser, if it is one.
    pub fn denoiser(&self) -> Option<&dyn crate::models::Denoiser> {
        match self {
            AnyModel::DiT(m) => Some(m),
            AnyModel::SD3(m) => Some(m),
            AnyModel::TextDiT(m) => Some(m),
            AnyModel::Flux(m) => Some(m),
            AnyModel::UNet(m) => Some(m),
            AnyModel::ClipText(_) | AnyModel::T5Encoder(_) | AnyModel::Vae(_) => None,
        }
    }

    /// [C, H, W] of a denoiser's input at its configured sample size (pixel- or latent-space).
    pub fn sample_shape(&self) -> Option<[usize; 3]> {
        match self {
            AnyModel::DiT(m) => {
                Some([m.config().in_channels, m.config().sample_size, m.config().sample_size])
            }
            AnyModel::SD3(m) => {
                Some([m.config().in_channels, m.config().sample_size, m.config().sample_size])
            }
            AnyModel::TextDiT(m) => {
                Some([m.config().in_channels, m.config().sample_size, m.config().sample_size])
            }
            _ => None,
        }
    }

    /// Attaches (or with `None` detaches) a joint-attention capture; DiT, the text-conditioned
    /// DiT, the text encoders, the VAE and the UNet have no joint attention.
    pub fn set_attention_capture(&mut self, capture: Option<Arc<AttentionCapture>>) -> Result<()> {
        match self {
            AnyModel::DiT(_)
            | AnyModel::TextDiT(_)
            | AnyModel::ClipText(_)
            | AnyModel::T5Encoder(_)
            | AnyModel::Vae(_)
            | AnyModel::UNet(_) => {
                return Err(Error::msg(format!("{} has no joint attention to capture", self.class_name())))
            }
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
            AnyModel::TextDiT(m) => {
                // The pooled-only variant takes no text tokens.
                let sample = m.forward_text(
                    arg("hidden_states")?,
                    arg("timestep")?,
                    inputs.get("input.encoder_hidden_states"),
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
            AnyModel::ClipText(m) => {
                let o = m.forward(arg("input_ids")?)?;
                out.insert("output.hidden_states_penultimate".to_string(), o.penultimate().clone());
                let pooled = match o.text_embeds {
                    Some(embeds) => ("output.text_embeds", embeds),
                    None => ("output.pooler_output", o.pooler_output),
                };
                out.insert(pooled.0.to_string(), pooled.1);
                out.insert("output.last_hidden_state".to_string(), o.last_hidden_state);
            }
            AnyModel::T5Encoder(m) => {
                let o = m.forward(arg("input_ids")?)?;
                out.insert("output.hidden_states_penultimate".to_string(), o.penultimate().clone());
                out.insert("output.last_hidden_state".to_string(), o.last_hidden_state);
            }
            AnyModel::Vae(m) => {
                // The fixtures' call: encode, then decode the posterior mean.
                let post = m.encode(arg("sample")?)?;
                out.insert("output.decoded".to_string(), m.decode(&post.mean)?);
                out.insert("output.latent_mean".to_string(), post.mean);
                out.insert("output.latent_logvar".to_string(), post.logvar);
            }
            AnyModel::UNet(m) => {
                let added = match (inputs.get("input.text_embeds"), inputs.get("input.time_ids")) {
                    (Some(text_embeds), Some(time_ids)) => {
                        Some(TextTime { text_embeds: text_embeds.clone(), time_ids: time_ids.clone() })
                    }
                    _ => None,
                };
                let sample = m.forward(
                    arg("sample")?,
                    arg("timestep")?,
                    arg("encoder_hidden_states")?,
                    added.as_ref(),
                )?;
                out.insert("output.sample".to_string(), sample);
            }
        }
        Ok(out)
    }
}
