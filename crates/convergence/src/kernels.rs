//! CPU kernels as candle custom ops, each with its own backward: fewer graph nodes, no
//! temporaries, vectorisable loops. Half-precision (bf16/f16) activations are widened to f32 for
//! the kernel and narrowed after, so their arithmetic is f32 as the bf16 mode promises. Every op
//! falls back to the plain composition off the CPU, and is tested against that composition
//! (values and gradients).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Rows below this many elements are processed on one thread (spawning costs more).
const PAR_MIN: usize = 1 << 15;

/// exp(x) for f32 by range reduction x = k ln2 + r and a degree-6 polynomial; written so the
/// compiler vectorises it (libm's expf is a scalar call). Relative error < 2e-7 on [-87, 88].
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5 * 2^23 trick: `round()` is a libm call without SSE4.1.
    const MAGIC: f32 = 12_582_912.0;
    let k = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    p * f32::from_bits(((k as i32 + 127) << 23) as u32)
}

/// tanh via exp: tanh(u) = 1 - 2 / (exp(2u) + 1), odd-symmetric for accuracy near 0.
#[inline(always)]
pub fn fast_tanh(u: f32) -> f32 {
    let a = u.abs();
    let t = if a < 0.004 { a - a * a * a / 3.0 } else { 1.0 - 2.0 / (fast_exp(2.0 * a) + 1.0) };
    t.copysign(u)
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_A: f32 = 0.044_715;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expected f32"),
    }
}

/// Applies `f` to chunks of `out` (with the matching chunks of the inputs) in parallel.
fn par_rows<F>(out: &mut [f32], row: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(row).enumerate().for_each(|(i, o)| f(i, o));
    } else {
        out.chunks_mut(row).enumerate().for_each(|(i, o)| f(i, o));
    }
}

/// `op` applied on the CPU in f32 (half-precision inputs widened and the result narrowed back);
/// `None` where the kernels do not apply (another device, an integer dtype).
fn cpu_kernel(x: &Tensor, op: impl CustomOp1 + Send + Sync + 'static) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() {
        return Ok(None);
    }
    match x.dtype() {
        DType::F32 => Ok(Some(x.contiguous()?.apply_op1(op)?)),
        dt @ (DType::BF16 | DType::F16) => Ok(Some(x.to_dtype(DType::F32)?.apply_op1(op)?.to_dtype(dt)?)),
        _ => Ok(None),
    }
}

struct GeluTanh;
struct GeluTanhGrad;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, 4096, |i, o| {
            for (o, &v) in o.iter_mut().zip(&x[i * 4096..]) {
                *o = 0.5 * v * (1.0 + fast_tanh(GELU_C * (v + GELU_A * v * v * v)));
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluTanhGrad)?))
    }
}

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        par_rows(&mut dx, 4096, |i, o| {
            let base = i * 4096;
            for (j, o) in o.iter_mut().enumerate() {
                let v = x[base + j];
                let t = fast_tanh(GELU_C * (v + GELU_A * v * v * v));
                let d = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * v * v);
                *o = g[base + j] * d;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU with the tanh approximation (diffusers' `gelu-approximate`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    match cpu_kernel(x, GeluTanh)? {
        Some(y) => Ok(y),
        None => x.gelu(),
    }
}

struct Softmax;
struct SoftmaxGrad;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let d = l.shape().dims().last().copied().unwrap_or(1);
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |i, o| {
            let r = &x[i * d..(i + 1) * d];
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in o.iter_mut().zip(r) {
                // Exactly 0 below exp's f32 range, so masked (-inf) keys get no weight at all.
                let z = v - max;
                *o = if z < -87.0 { 0.0 } else { fast_exp(z) };
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// The backward needs only the output: dx = y * (g - sum(g * y)).
    fn bwd(&self, _: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; y.len()];
        par_rows(&mut dx, d, |i, o| {
            let (yr, gr) = (&y[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            let dot = yr.iter().zip(gr).map(|(y, g)| y * g).sum::<f32>();
            for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last axis, with a backward (candle-nn's fused `softmax_last_dim` has none,
/// so gradients would silently stop at every attention's queries and keys).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    match cpu_kernel(x, Softmax)? {
        Some(y) => Ok(y),
        None => candle_nn::ops::softmax(x, D::Minus1),
    }
}

struct LayerNorm {
    eps: f32,
}
struct LayerNormGrad {
    eps: f32,
}

/// mean and 1/sqrt(var + eps) of one row (two passes, f64 accumulation for the mean).
#[inline]
fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let n = r.len() as f32;
    let mean = r.iter().sum::<f32>() / n;
    let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let d = l.shape().dims().last().copied().unwrap_or(1);
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, d, |i, o| {
            let r = &x[i * d..(i + 1) * d];
            let (mean, rstd) = row_stats(r, self.eps);
            for (o, v) in o.iter_mut().zip(r) {
                *o = (v - mean) * rstd;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &LayerNormGrad { eps: self.eps })?))
    }
}

impl CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    /// dx = rstd * (g - mean(g) - y * mean(g * y)), y the normalised row.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; x.len()];
        par_rows(&mut dx, d, |i, o| {
            let (r, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            let (mean, rstd) = row_stats(r, self.eps);
            let n = d as f32;
            let mean_g = gr.iter().sum::<f32>() / n;
            let mean_gy = r.iter().zip(gr).map(|(v, g)| (v - mean) * rstd * g).sum::<f32>() / n;
            for ((o, v), g) in o.iter_mut().zip(r).zip(gr) {
                *o = rstd * (g - mean_g - (v - mean) * rstd * mean_gy);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// LayerNorm over the last axis without affine parameters.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    match cpu_kernel(x, LayerNorm { eps: eps as f32 })? {
        Some(y) => Ok(y),
        None => composed_layer_norm(x, eps),
    }
}

/// The reference composition (any device and dtype; computed in f32).
pub fn composed_layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fast_exp_and_tanh_are_accurate() {
        for i in -2000..2000 {
            let x = i as f32 * 0.04;
            let rel = (fast_exp(x) - x.exp()).abs() / x.exp();
            assert!(rel < 3e-7, "exp({x}) rel err {rel}");
            assert!((fast_tanh(x) - x.tanh()).abs() < 3e-7, "tanh({x})");
        }
    }

    #[test]
    fn gelu_matches_candle_forward_and_gradient() -> Result<()> {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (3, 5000), &Device::Cpu)?))?;
        let w = Tensor::randn(0f32, 1., (3, 5000), &Device::Cpu)?;
        let ours = gelu_tanh(x.as_tensor())?;
        let reference = x.as_tensor().gelu()?;
        assert!(max_diff(&ours, &reference) < 1e-6);
        let g1 = ours.mul(&w)?.sum_all()?.backward()?;
        let g2 = reference.mul(&w)?.sum_all()?.backward()?;
        assert!(max_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-5);
        Ok(())
    }

    #[test]
    fn softmax_matches_composition_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (2, 3, 5, 33), &dev)?))?;
        let w = Tensor::randn(0f32, 1.0, (2, 3, 5, 33), &dev)?;
        let fast = softmax_last_dim(x.as_tensor())?;
        let plain = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
        assert!(max_diff(&fast, &plain) < 1e-6);
        let g_fast = (fast * &w)?.sum_all()?.backward()?;
        let g_plain = (plain * &w)?.sum_all()?.backward()?;
        let (a, b) = (g_fast.get(x.as_tensor()).unwrap(), g_plain.get(x.as_tensor()).unwrap());
        assert!(max_diff(a, b) < 1e-6, "gradient differs by {}", max_diff(a, b));
        // And a finite difference on one logit.
        let f = |t: &Tensor| -> Result<f32> { (softmax_last_dim(t)? * &w)?.sum_all()?.to_scalar::<f32>() };
        let h = 1e-2f32;
        let mut bump = vec![0f32; 2 * 3 * 5 * 33];
        bump[7] = h;
        let bump = Tensor::from_vec(bump, (2, 3, 5, 33), &dev)?;
        let fd = (f(&(x.as_tensor() + &bump)?)? - f(&(x.as_tensor() - &bump)?)?) / (2.0 * h);
        let auto = a.flatten_all()?.to_vec1::<f32>()?[7];
        assert!((fd - auto).abs() < 1e-3, "finite difference {fd} vs autograd {auto}");
        Ok(())
    }

    #[test]
    fn layer_norm_matches_composition_and_finite_differences() -> Result<()> {
        let x = Var::from_tensor(&(Tensor::randn(0.5f32, 2., (4, 3, 64), &Device::Cpu)?))?;
        let w = Tensor::randn(0f32, 1., (4, 3, 64), &Device::Cpu)?;
        let ours = layer_norm(x.as_tensor(), 1e-6)?;
        assert!(max_diff(&ours, &composed_layer_norm(x.as_tensor(), 1e-6)?) < 1e-5);
        let g1 = ours.mul(&w)?.sum_all()?.backward()?;
        let g2 = composed_layer_norm(x.as_tensor(), 1e-6)?.mul(&w)?.sum_all()?.backward()?;
        let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(max_diff(g1, g2) < 1e-4);
        // Central finite difference on one element, in f64 arithmetic on the f32 function.
        let xv = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let loss = |v: &[f32]| -> f64 {
            let t = Tensor::from_slice(v, (4, 3, 64), &Device::Cpu).unwrap();
            let y = layer_norm(&t, 1e-6).unwrap().mul(&w).unwrap().sum_all().unwrap();
            y.to_scalar::<f32>().unwrap() as f64
        };
        let (k, h) = (70usize, 1e-2f32);
        let (mut p, mut m) = (xv.clone(), xv.clone());
        p[k] += h;
        m[k] -= h;
        let fd = (loss(&p) - loss(&m)) / (2.0 * h as f64);
        let an = g1.flatten_all()?.to_vec1::<f32>()?[k] as f64;
        assert!((fd - an).abs() < 2e-2 * an.abs().max(1.0), "fd {fd} vs analytic {an}");
        Ok(())
    }

    #[test]
    fn half_precision_inputs_match_the_f32_composition_to_bf16_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2., (4, 96), &dev)?.to_dtype(DType::BF16)?;
        let x32 = x.to_dtype(DType::F32)?;
        let cases: [(&str, Tensor, Tensor); 3] = [
            ("gelu", gelu_tanh(&x)?, x32.gelu()?),
            ("softmax", softmax_last_dim(&x)?, candle_nn::ops::softmax(&x32, D::Minus1)?),
            ("layer_norm", layer_norm(&x, 1e-6)?, composed_layer_norm(&x32, 1e-6)?),
        ];
        for (name, half, reference) in cases {
            assert_eq!(half.dtype(), DType::BF16, "{name}");
            // One rounding to bf16 (8 significant bits): relative error at most 2^-8.
            let err = (half.to_dtype(DType::F32)? - &reference)?.abs()?;
            let bound = ((reference.abs()? * (1.0 / 256.0))? + 1e-6)?;
            assert_eq!(err.gt(&bound)?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?, 0.0, "{name}");
        }
        // Gradients flow back through the widening to a bf16 variable.
        let v = Var::from_tensor(&x)?;
        let grads = gelu_tanh(v.as_tensor())?.sum_all()?.backward()?;
        assert_eq!(grads.get(v.as_tensor()).map(|g| g.dtype()), Some(DType::BF16));
        Ok(())
    }
}
