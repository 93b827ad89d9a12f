//! The MMDiT block (Esser et al., "Scaling Rectified Flow Transformers", Fig. 2), which Flux
//! calls a double-stream block: image and text tokens keep their own weights (adaLN-Zero
//! modulation, q/k/v and output projections, MLP) and meet in one joint attention. Key names are
//! diffusers' `JointTransformerBlock` (SD3), which `FluxTransformerBlock` shares.

use super::adaln::{adaln_zero, gated_residual, modulated_norm, AdaLayerNormContinuous};
use super::attention::{Attention, AttentionShape, JointAttention};
use super::capture::{CaptureSite, TokenOrder};
use super::linear::{linear, Init, Linear};
use super::mlp::FeedForward;
use super::rope::Rope;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The LayerNorm eps of every MMDiT block.
const EPS: f64 = 1e-6;

/// What varies between the MMDiT blocks of SD3, SD3.5 and Flux.
#[derive(Clone, Copy, Debug)]
pub struct JointBlockConfig {
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// RMSNorm on q and k (SD3.5, Flux).
    pub qk_norm: bool,
    /// The last SD3 block: the text stream only supplies keys and values.
    pub context_pre_only: bool,
    /// MMDiT-X (SD3.5-medium): a second, image-only attention on the same normalised input.
    pub dual_attention: bool,
    pub order: TokenOrder,
}

/// The text stream's modulation: adaLN-Zero, or a plain continuous adaLN when the stream ends here.
#[derive(Clone, Debug)]
enum ContextNorm {
    Zero(Linear),
    Continuous(AdaLayerNormContinuous),
}

#[derive(Clone, Debug)]
pub struct JointTransformerBlock {
    /// adaLN-Zero of the image stream: 6 chunks, 9 with the second attention.
    norm1: Linear,
    norm1_context: ContextNorm,
    attn: JointAttention,
    attn2: Option<Attention>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
}

impl JointTransformerBlock {
    pub fn new(vb: &VarBuilder, cfg: &JointBlockConfig, init: Init) -> Result<Self> {
        let d = cfg.dim;
        let shape = AttentionShape {
            dim: d,
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            bias: true,
            qk_norm: cfg.qk_norm,
        };
        let image_chunks = if cfg.dual_attention { 9 } else { 6 };
        let (norm1_context, ff_context) = if cfg.context_pre_only {
            let norm = AdaLayerNormContinuous::new(&vb.pp("norm1_context"), d, d, init.zero_when_training())?;
            (ContextNorm::Continuous(norm), None)
        } else {
            let norm = linear(&vb.pp("norm1_context.linear"), d, 6 * d, true, init.zero_when_training())?;
            (ContextNorm::Zero(norm), Some(FeedForward::new(vb.pp("ff_context"), d, 4 * d, d, init)?))
        };
        let attn2 = if cfg.dual_attention {
            Some(Attention::with_shape(vb.pp("attn2"), &shape, init)?)
        } else {
            None
        };
        Ok(JointTransformerBlock {
            norm1: linear(&vb.pp("norm1.linear"), d, image_chunks * d, true, init.zero_when_training())?,
            norm1_context,
            attn: JointAttention::new(&vb.pp("attn"), &shape, cfg.context_pre_only, cfg.order, init)?,
            attn2,
            ff: FeedForward::new(vb.pp("ff"), d, 4 * d, d, init)?,
            ff_context,
        })
    }

    /// Image tokens x [B, N, D], text tokens [B, T, D], conditioning temb [B, D] -> (text, image);
    /// the text is `None` after a `context_pre_only` block.
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        temb: &Tensor,
        rope: Option<&Rope>,
        site: Option<CaptureSite>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let m = adaln_zero(&self.norm1, temb, if self.attn2.is_some() { 9 } else { 6 })?;
        // SD3.5's second attention reads the same normalised x under its own shift and scale.
        let x_hat = |shift: &Tensor, scale: &Tensor| modulated_norm(x, shift, scale, EPS);
        let (ctx_in, ctx_mod) = match &self.norm1_context {
            ContextNorm::Zero(lin) => {
                let c = adaln_zero(lin, temb, 6)?;
                (modulated_norm(context, &c[0], &c[1], EPS)?, Some(c))
            }
            ContextNorm::Continuous(norm) => (norm.forward(context, temb)?, None),
        };
        let (attn_x, attn_ctx) = self.attn.forward(&x_hat(&m[0], &m[1])?, &ctx_in, rope, site)?;
        let mut x = gated_residual(x, &m[2], &attn_x)?;
        if let Some(attn2) = &self.attn2 {
            x = gated_residual(&x, &m[8], &attn2.forward(&x_hat(&m[6], &m[7])?, None)?)?;
        }
        let x = mlp_residual(&self.ff, &x, &m[3..6])?;
        let context = match (ctx_mod, attn_ctx, &self.ff_context) {
            (Some(c), Some(attn_ctx), Some(ff)) => {
                let context = gated_residual(context, &c[2], &attn_ctx)?;
                Some(mlp_residual(ff, &context, &c[3..6])?)
            }
            _ => None,
        };
        Ok((context, x))
    }
}

/// x + gate * MLP(modulate(LayerNorm(x), shift, scale)), `m` = [shift, scale, gate].
fn mlp_residual(ff: &FeedForward, x: &Tensor, m: &[Tensor]) -> Result<Tensor> {
    gated_residual(x, &m[2], &ff.forward(&modulated_norm(x, &m[0], &m[1], EPS)?)?)
}
