//! The hidden activations transformers configs name (`hidden_act`, T5's `dense_act_fn`), read
//! from config.json by those names.

use candle_core::{Module, Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// x * sigmoid(1.702 x): OpenAI CLIP (ViT-L/14).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// The exact (erf) GELU: OpenCLIP bigG.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation: T5 v1.1's gated GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    /// T5 v1.0.
    #[serde(rename = "relu")]
    Relu,
}

impl Module for Activation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => crate::kernels::gelu_tanh(x),
            Activation::Relu => x.relu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn activations_match_their_formulas_and_config_names() -> Result<()> {
        let x = Tensor::new(&[-1.5f32, 0.25, 2.0], &Device::Cpu)?;
        let at = |a: Activation| a.forward(&x).and_then(|y| y.to_vec1::<f32>());
        let quick: Vec<f32> = [-1.5f32, 0.25, 2.0].iter().map(|v| v / (1.0 + (-1.702 * v).exp())).collect();
        for (a, b) in at(Activation::QuickGelu)?.iter().zip(&quick) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // erf GELU(2) = 2 * Phi(2) = 1.9544997; the tanh form gives 1.9545977.
        assert!((at(Activation::Gelu)?[2] - 1.954_499_7).abs() < 1e-6);
        assert!((at(Activation::GeluTanh)?[2] - 1.954_597_7).abs() < 1e-6);
        assert_eq!(at(Activation::Relu)?, vec![0.0, 0.25, 2.0]);
        let names: Vec<Activation> =
            serde_json::from_str(r#"["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]"#)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        use Activation::*;
        assert_eq!(names, vec![QuickGelu, Gelu, GeluTanh, GeluTanh, Relu]);
        Ok(())
    }
}
