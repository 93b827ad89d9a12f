//! Multi-head attention: softmax(Q K^T / sqrt(d)) V, written once for self, joint and cross
//! attention. The probabilities are only materialised for a caller that asks for them.

use super::linear::{linear, Init};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

/// [B, L, H*d] -> [B, H, L, d]
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, hd) = x.dims3()?;
    x.reshape((b, l, heads, hd / heads))?.transpose(1, 2)?.contiguous()
}

/// [B, H, L, d] -> [B, L, H*d]
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))
}

/// The attention probabilities softmax(Q K^T / sqrt(d)) [B, H, Lq, Lk], in f32.
pub fn attention_probs(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)
}

/// Scaled dot-product attention over [B, H, L, d] heads.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    attention_probs(q, k)?.matmul(v)
}

/// [`sdpa`] that also returns the probabilities it used (attention-map capture).
pub fn sdpa_with_probs(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = attention_probs(q, k)?;
    Ok((p.matmul(v)?, p))
}

/// diffusers' `Attention` as self-attention: `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    pub fn new(vb: VarBuilder, dim: usize, heads: usize, head_dim: usize, bias: bool, init: Init) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: linear(&vb.pp("to_q"), dim, inner, bias, init)?,
            to_k: linear(&vb.pp("to_k"), dim, inner, bias, init)?,
            to_v: linear(&vb.pp("to_v"), dim, inner, bias, init)?,
            to_out: linear(&vb.pp("to_out.0"), inner, dim, true, init)?,
            heads,
        })
    }

    /// Self-attention over x [B, L, D]; `probs` receives the attention probabilities when given.
    pub fn forward(&self, x: &Tensor, probs: Option<&mut Option<Tensor>>) -> Result<Tensor> {
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(x)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(x)?, self.heads)?;
        let out = match probs {
            None => sdpa(&q, &k, &v)?,
            Some(slot) => {
                let (out, p) = sdpa_with_probs(&q, &k, &v)?;
                *slot = Some(p);
                out
            }
        };
        self.to_out.forward(&merge_heads(&out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sdpa_matches_hand_computation_and_rows_sum_to_one() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::new(&[[[[1f32, 0.], [0., 2.]]]], &dev)?;
        let k = Tensor::new(&[[[[1f32, 1.], [2., 0.]]]], &dev)?;
        let v = Tensor::new(&[[[[1f32, 2.], [3., 4.]]]], &dev)?;
        let (out, p) = sdpa_with_probs(&q, &k, &v)?;
        let s = 1.0 / 2f32.sqrt();
        // row 0: scores (1*s, 2*s)
        let (a, b) = ((1.0 * s).exp(), (2.0 * s).exp());
        let p00 = a / (a + b);
        let pv = p.flatten_all()?.to_vec1::<f32>()?;
        assert!((pv[0] - p00).abs() < 1e-6 && (pv[0] + pv[1] - 1.0).abs() < 1e-6);
        let o = out.flatten_all()?.to_vec1::<f32>()?;
        assert!((o[0] - (p00 * 1.0 + (1.0 - p00) * 3.0)).abs() < 1e-5);
        assert_eq!(sdpa(&q, &k, &v)?.flatten_all()?.to_vec1::<f32>()?, o);
        Ok(())
    }

    #[test]
    fn heads_round_trip() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 5, 12), &Device::Cpu)?;
        let back = merge_heads(&split_heads(&x, 3)?)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
