//! CPU kernels as candle custom ops, each with its own backward: fewer graph nodes, no
//! temporaries, vectorisable loops. Half-precision (bf16/f16) activations are widened to f32 for
//! the kernel and narrowed after, so their arithmetic is f32 as the bf16 mode promises. Every op
//! falls back to the plain composition off the CPU, and is tested against that composition
//! (values and gradients).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape,
    Tensor, D,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Rows below this many elements are processed on one thread (spawning costs more).
const PAR_MIN: usize = 1 << 15;

/// exp(x) for f32 by range reduction x = k ln2 + r and a degree-6 polynomial; written so the
/// compiler vectorises it (libm's expf is a scalar call). Relative error < 2e-7 on [-87, 88].
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5 * 2^23 trick (`round()` is a libm call without SSE4.1); the
    // integer k is then in the low mantissa bits, read without `as i32`, whose saturating
    // conversion compiles to scalar code and would stop the loop from vectorising.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let k = shifted - MAGIC;
    let r = k.mul_add(-1.428_606_8e-6, k.mul_add(-0.693_145_75, x));
    // Horner's rule in fused multiply-adds (one rounding each; `simd_fn` kernels compile them
    // to FMA instructions, elsewhere they are exact library calls).
    let p = 0.001_388_889f32.mul_add(r, 0.008_333_334);
    let p =
        p.mul_add(r, 0.041_666_668).mul_add(r, 0.166_666_67).mul_add(r, 0.5).mul_add(r, 1.0).mul_add(r, 1.0);
    let k_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    p * f32::from_bits(k_bits.wrapping_add(127) << 23)
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

/// Defines `fn $name(args) $body` compiled twice, for baseline x86-64 (SSE2, 4 lanes: the binary
/// runs anywhere) and for AVX2 with FMA (8 lanes; `mul_add` is one instruction there), and calls
/// the AVX2 build where the CPU has both. The kernels' loops live in such functions: a closure
/// called from an AVX2 function is not reliably inlined into it, so it would keep the baseline
/// code (where `mul_add` is a library call: never use it in such a closure).
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $ret)? {
                    body($($a),*)
                }
                // SAFETY: the CPU was just checked to have AVX2.
                return unsafe { avx2($($a),*) };
            }
            body($($a),*)
        }
    };
}

/// Sum of `map(a_i)` in eight independent lanes: one running sum is a serial chain the compiler
/// may not reorder, so it would not vectorise.
#[inline(always)]
fn sum8(a: &[f32], map: impl Fn(f32) -> f32) -> f32 {
    sum8_zip(a, a, |x, _| map(x))
}

/// Sum of `map(a_i, b_i)` in eight independent lanes.
#[inline(always)]
fn sum8_zip(a: &[f32], b: &[f32], map: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| map(x, y)).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += map(x[k], y[k]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest element, in eight independent lanes (one running `f32::max` is a serial chain:
/// its NaN rule keeps the compiler from reordering it, ~3 cycles per element).
#[inline(always)]
fn max8(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = a.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for x in chunks {
        for k in 0..8 {
            acc[k] = if x[k] > acc[k] { x[k] } else { acc[k] };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// The most items of a parallel loop over `items` that one thread takes as a single piece: an
/// eighth of its share. rayon's adaptive split leaves the calling thread a quarter of the items
/// (with two threads) as one indivisible piece, and a thread that starts late, or is slowed, then
/// makes the other wait for it at the end of every op.
fn grain(items: usize) -> usize {
    items.div_ceil(8 * rayon::current_num_threads()).max(1)
}

/// A new buffer of `n` floats whose rows (chunks of `row`) `f` writes, in parallel when large.
/// The buffer is not zeroed on the calling thread first (a serial pass the size of every
/// activation, ~2 % of a training step): each row is zeroed by the thread that then writes it,
/// while it sits in that core's L1.
fn par_rows<F>(n: usize, row: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let mut out = Vec::with_capacity(n);
    let work = |(i, o): (usize, &mut [MaybeUninit<f32>])| f(i, zeroed(o));
    let spare = &mut out.spare_capacity_mut()[..n];
    if n >= PAR_MIN {
        let grain = grain(n.div_ceil(row.max(1)));
        spare.par_chunks_mut(row.max(1)).with_max_len(grain).enumerate().for_each(work);
    } else {
        spare.chunks_mut(row.max(1)).enumerate().for_each(work);
    }
    // SAFETY: the rows cover all n elements, and each was initialised above.
    unsafe { out.set_len(n) };
    out
}

/// `o` zeroed, as floats.
fn zeroed(o: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    o.fill(MaybeUninit::new(0.0));
    // SAFETY: every element of `o` was just initialised, and f32 has the layout of MaybeUninit<f32>.
    unsafe { &mut *(o as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// An output buffer of `n` floats for a kernel that writes every element through raw pointers
/// (gemm without accumulation), so it is not zeroed first on the calling thread.
struct Fresh(Vec<f32>);

impl Fresh {
    fn new(n: usize) -> Fresh {
        Fresh(Vec::with_capacity(n))
    }

    fn ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr()
    }

    /// The buffer as a row-major matrix of `cols` columns.
    fn rows(&mut self, cols: usize) -> Mat {
        Mat { ptr: self.ptr(), rs: cols as isize, cs: 1 }
    }

    /// The buffer, once written.
    ///
    /// # Safety
    /// All `n` elements have been written through [`Fresh::ptr`] or [`Fresh::rows`].
    unsafe fn written(mut self, n: usize) -> Vec<f32> {
        debug_assert!(n <= self.0.capacity());
        // SAFETY: forwarded from the caller.
        unsafe { self.0.set_len(n) };
        self.0
    }
}

/// Whether the f32 CPU kernels apply to `t`.
pub(crate) fn f32_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
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

simd_fn! {
    fn gelu_rows(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + fast_tanh(GELU_C * (v + GELU_A * v * v * v)));
        }
    }
}

/// gelu_tanh'(v), given t = tanh(sqrt(2/pi) (v + a v^3)).
#[inline(always)]
fn gelu_slope(v: f32, t: f32) -> f32 {
    0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * v * v)
}

simd_fn! {
    fn gelu_grad_rows(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(g) {
            *o = g * gelu_slope(v, fast_tanh(GELU_C * (v + GELU_A * v * v * v)));
        }
    }
}

simd_fn! {
    /// x replaced by gelu_tanh(x), and `slope` by gelu_tanh'(x): the backward then only multiplies.
    fn gelu_keeping_slope(x: &mut [f32], slope: &mut [f32]) {
        for (v, s) in x.iter_mut().zip(slope) {
            let t = fast_tanh(GELU_C * (*v + GELU_A * *v * *v * *v));
            *s = gelu_slope(*v, t);
            *v *= 0.5 * (1.0 + t);
        }
    }
}

simd_fn! {
    fn product_rows(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((o, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *o = a * b;
        }
    }
}

/// The element-wise product, on the threads (candle's runs on the calling thread only).
struct Product;

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("product: {:?} x {:?}", l1.dims(), l2.dims());
        }
        let y = par_rows(a.len(), 4096, |i, o| product_rows(&a[i * 4096..], &b[i * 4096..], o));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let y = par_rows(x.len(), 4096, |i, o| gelu_rows(&x[i * 4096..], o));
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
        let dx = par_rows(x.len(), 4096, |i, o| gelu_grad_rows(&x[i * 4096..], &g[i * 4096..], o));
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

simd_fn! {
    /// The row's logits are replaced by their softmax.
    fn softmax_row(o: &mut [f32]) {
        let max = max8(o);
        for o in o.iter_mut() {
            // Exactly 0 below exp's f32 range, so masked (-inf) keys get no weight at all.
            let z = *o - max;
            *o = if z < -87.0 { 0.0 } else { fast_exp(z) };
        }
        let inv = 1.0 / sum8(o, |v| v);
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

simd_fn! {
    /// The row's output gradient g is replaced by the logits' dx = y * (g - sum(g * y)).
    fn softmax_grad_row(y: &[f32], g: &mut [f32]) {
        let dot = sum8_zip(y, g, |y, g| y * g);
        for (g, y) in g.iter_mut().zip(y) {
            *g = y * (*g - dot);
        }
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let d = l.shape().dims().last().copied().unwrap_or(1);
        let y = par_rows(x.len(), d, |i, o| {
            o.copy_from_slice(&x[i * d..(i + 1) * d]);
            softmax_row(o)
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
        let dx = par_rows(g.len(), d, |i, o| {
            o.copy_from_slice(&g[i * d..(i + 1) * d]);
            softmax_grad_row(&y[i * d..(i + 1) * d], o)
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

/// mean and 1/sqrt(var + eps) of one row (two passes: the variance of centred values).
#[inline(always)]
fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let n = r.len() as f32;
    let mean = sum8(r, |v| v) / n;
    let var = sum8(r, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

simd_fn! {
    fn layer_norm_row(r: &[f32], o: &mut [f32], eps: f32) {
        let (mean, rstd) = row_stats(r, eps);
        for (o, v) in o.iter_mut().zip(r) {
            *o = (v - mean) * rstd;
        }
    }
}

/// LayerNorm's backward in place: `g` holds the gradient of the normalised row y and becomes
/// the row's dx = rstd * (g - mean(g) - y * mean(g * y)).
#[inline(always)]
fn norm_backward(r: &[f32], (mean, rstd): (f32, f32), g: &mut [f32]) {
    let n = r.len() as f32;
    let mean_g = sum8(g, |g| g) / n;
    let mean_gy = sum8_zip(r, g, |v, g| (v - mean) * rstd * g) / n;
    for (g, v) in g.iter_mut().zip(r) {
        *g = rstd * (*g - mean_g - (v - mean) * rstd * mean_gy);
    }
}

simd_fn! {
    fn layer_norm_grad_row(r: &[f32], dx: &mut [f32], eps: f32) {
        norm_backward(r, row_stats(r, eps), dx);
    }
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let d = l.shape().dims().last().copied().unwrap_or(1);
        let y = par_rows(x.len(), d, |i, o| layer_norm_row(&x[i * d..(i + 1) * d], o, self.eps));
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

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let d = l1.shape().dims().last().copied().unwrap_or(1);
        let dx = par_rows(g.len(), d, |i, o| {
            o.copy_from_slice(&g[i * d..(i + 1) * d]);
            layer_norm_grad_row(&x[i * d..(i + 1) * d], o, self.eps)
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

// Per-sample vectors broadcast over the tokens: adaLN modulation, gated residuals and linear
// biases. candle's backward of a broadcast reduces with an integer division per element and
// builds the product first; these compute the reductions in the same pass as the input gradient.

/// Whether the token-broadcast kernels apply: f32 on the CPU, x [B, L, D] and rows [B, D].
fn token_broadcast(x: &Tensor, rows: &[&Tensor]) -> bool {
    let (Ok((b, _, d)), true) = (x.dims3(), f32_cpu(x)) else {
        return false;
    };
    rows.iter().all(|r| r.dtype() == DType::F32 && r.dims() == [b, d])
}

/// Splits a [B, L, D] gradient buffer and `n` [B, D] reduction buffers (packed after it) into
/// per-sample pieces, processed in parallel: `f(sample, its [L, D] slice, its n rows)`.
fn per_sample<F>(out: &mut [f32], (b, l, d): (usize, usize, usize), n: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [&mut [f32]]) + Sync,
{
    let (tokens, rest) = out.split_at_mut(b * l * d);
    let mut rows: Vec<Vec<&mut [f32]>> = (0..b).map(|_| Vec::with_capacity(n)).collect();
    for block in rest.chunks_mut(b * d).take(n) {
        for (i, row) in block.chunks_mut(d).enumerate() {
            rows[i].push(row);
        }
    }
    let work = |(i, (t, r)): (usize, (&mut [f32], &mut Vec<&mut [f32]>))| f(i, t, r);
    if tokens.len() >= PAR_MIN {
        tokens.par_chunks_mut(l * d).zip(rows.par_iter_mut()).with_max_len(1).enumerate().for_each(work);
    } else {
        tokens.chunks_mut(l * d).zip(rows.iter_mut()).enumerate().for_each(work);
    }
}

/// Cuts a packed gradient ([B, L, D] then `n` [B, D]) into its tensors.
fn unpack(packed: &Tensor, (b, l, d): (usize, usize, usize), n: usize) -> Result<Vec<Tensor>> {
    let mut parts = vec![packed.narrow(0, 0, b * l * d)?.reshape((b, l, d))?];
    for k in 0..n {
        parts.push(packed.narrow(0, b * l * d + k * b * d, b * d)?.reshape((b, d))?);
    }
    Ok(parts)
}

/// The three inputs of a token-broadcast op as contiguous f32 slices.
fn contiguous3<'a>(op: &str, inputs: [(&'a CpuStorage, &Layout); 3]) -> Result<[&'a [f32]; 3]> {
    let [a, b, c] = inputs;
    Ok([contiguous_f32(a.0, a.1, op)?, contiguous_f32(b.0, b.1, op)?, contiguous_f32(c.0, c.1, op)?])
}

fn dims3(l: &Layout) -> Result<(usize, usize, usize)> {
    l.shape().dims3()
}

/// adaLN's `y * (1 + scale) + shift`, where y is x itself or, with `norm` = Some(eps), x's
/// LayerNorm (no affine) computed in the same pass: the normalised tensor is never stored, and
/// the backward has one node to go through instead of two.
struct Modulate {
    norm: Option<f32>,
}
struct ModulateGrad {
    norm: Option<f32>,
}

/// The row's (mean, 1/std) when it is normalised, else the identity's (0, 1).
#[inline(always)]
fn norm_stats(r: &[f32], norm: Option<f32>) -> (f32, f32) {
    norm.map_or((0.0, 1.0), |eps| row_stats(r, eps))
}

simd_fn! {
    fn modulate_row(x: &[f32], shift: &[f32], scale: &[f32], o: &mut [f32], norm: Option<f32>) {
        let (mean, rstd) = norm_stats(&x[..o.len()], norm);
        for (((o, v), sh), sc) in o.iter_mut().zip(x).zip(shift).zip(scale) {
            *o = (v - mean) * rstd * (1.0 + sc) + sh;
        }
    }
}

simd_fn! {
    /// One sample's [L, D] tokens, y each row (normalised or not): dy = g (1 + scale),
    /// dshift += sum_l g, dscale += sum_l g y, and dx = dy or LayerNorm's backward of it.
    fn modulate_grad_sample(x: &[f32], g: &[f32], scale: &[f32], dx: &mut [f32], dshift: &mut [f32], dscale: &mut [f32], norm: Option<f32>) {
        let d = scale.len();
        for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
            let (mean, rstd) = norm_stats(x, norm);
            for j in 0..d {
                dx[j] = g[j] * (1.0 + scale[j]);
                dshift[j] += g[j];
                dscale[j] += g[j] * (x[j] - mean) * rstd;
            }
            if norm.is_some() {
                norm_backward(x, (mean, rstd), dx);
            }
        }
    }
}

impl CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "modulate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, shift, scale] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (_, l, d) = dims3(l1)?;
        let y = par_rows(x.len(), d, |i, o| {
            modulate_row(&x[i * d..], &shift[i / l * d..], &scale[i / l * d..], o, self.norm)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, scale: &Tensor, _: &Tensor, g: &Tensor) -> Grads3 {
        let packed = x.apply_op3_no_bwd(scale, &g.contiguous()?, &ModulateGrad { norm: self.norm })?;
        let [dx, dshift, dscale]: [Tensor; 3] =
            unpack(&packed, x.dims3()?, 2)?.try_into().expect("three parts");
        Ok((Some(dx), Some(dshift), Some(dscale)))
    }
}

/// The gradients of a three-input op.
type Grads3 = Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;

impl CustomOp3 for ModulateGrad {
    fn name(&self) -> &'static str {
        "modulate-grad"
    }

    /// Packed [dx = g (1 + scale), dshift = sum_l g, dscale = sum_l g x].
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, scale, g] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, l, d) = dims3(l1)?;
        let mut out = vec![0f32; b * l * d + 2 * b * d];
        per_sample(&mut out, (b, l, d), 2, |i, dx, rows| {
            let (dshift, dscale) = rows.split_at_mut(1);
            let (xs, gs) = (&x[i * l * d..][..l * d], &g[i * l * d..][..l * d]);
            modulate_grad_sample(xs, gs, &scale[i * d..][..d], dx, dshift[0], dscale[0], self.norm);
        });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// `x * (1 + scale) + shift` with `shift`/`scale` [B, D] broadcast over the tokens of x [B, L, D].
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if token_broadcast(x, &[shift, scale]) {
        x.contiguous()?.apply_op3(&shift.contiguous()?, &scale.contiguous()?, Modulate { norm: None })
    } else {
        composed_modulate(x, shift, scale)
    }
}

/// `modulate(layer_norm(x, eps), shift, scale)` in one op (adaLN's modulated LayerNorm).
pub fn modulated_norm(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if token_broadcast(x, &[shift, scale]) {
        let op = Modulate { norm: Some(eps as f32) };
        x.contiguous()?.apply_op3(&shift.contiguous()?, &scale.contiguous()?, op)
    } else {
        composed_modulate(&layer_norm(x, eps)?, shift, scale)
    }
}

/// The reference composition of [`modulate`].
pub fn composed_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

struct GatedResidual;
struct GatedResidualGrad;

simd_fn! {
    fn gated_row(x: &[f32], gate: &[f32], y: &[f32], o: &mut [f32]) {
        for (((o, x), gt), y) in o.iter_mut().zip(x).zip(gate).zip(y) {
            *o = x + gt * y;
        }
    }
}

simd_fn! {
    /// One sample's [L, D] tokens: dy = g gate, dgate += sum_l g y.
    fn gated_grad_sample(gate: &[f32], y: &[f32], g: &[f32], dy: &mut [f32], dgate: &mut [f32]) {
        let d = gate.len();
        for ((dy, y), g) in dy.chunks_mut(d).zip(y.chunks(d)).zip(g.chunks(d)) {
            for j in 0..d {
                dy[j] = g[j] * gate[j];
                dgate[j] += g[j] * y[j];
            }
        }
    }
}

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, gate, y] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (_, l, d) = dims3(l1)?;
        let out = par_rows(x.len(), d, |i, o| gated_row(&x[i * d..], &gate[i / l * d..], &y[i * d..], o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, gate: &Tensor, y: &Tensor, _: &Tensor, g: &Tensor) -> Grads3 {
        let g = g.contiguous()?;
        let packed = gate.apply_op3_no_bwd(y, &g, &GatedResidualGrad)?;
        let [dy, dgate]: [Tensor; 2] = unpack(&packed, y.dims3()?, 1)?.try_into().expect("two parts");
        Ok((Some(g), Some(dgate), Some(dy)))
    }
}

impl CustomOp3 for GatedResidualGrad {
    fn name(&self) -> &'static str {
        "gated-residual-grad"
    }

    /// Packed [dy = g gate, dgate = sum_l g y].
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [gate, y, g] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, l, d) = dims3(l2)?;
        let mut out = vec![0f32; b * l * d + b * d];
        per_sample(&mut out, (b, l, d), 1, |i, dy, rows| {
            let (ys, gs) = (&y[i * l * d..][..l * d], &g[i * l * d..][..l * d]);
            gated_grad_sample(&gate[i * d..][..d], ys, gs, dy, rows[0]);
        });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// The adaLN-Zero residual `x + gate * branch`, `gate` [B, D] broadcast over the tokens.
pub fn gated_residual(x: &Tensor, gate: &Tensor, branch: &Tensor) -> Result<Tensor> {
    if token_broadcast(x, &[gate]) && branch.dims() == x.dims() && branch.dtype() == DType::F32 {
        x.contiguous()?.apply_op3(&gate.contiguous()?, &branch.contiguous()?, GatedResidual)
    } else {
        composed_gated_residual(x, gate, branch)
    }
}

/// The reference composition of [`gated_residual`].
pub fn composed_gated_residual(x: &Tensor, gate: &Tensor, branch: &Tensor) -> Result<Tensor> {
    x + branch.broadcast_mul(&gate.unsqueeze(1)?)?
}

struct LinearBias {
    then: Option<Then>,
}
struct ColumnSums;

/// What runs on a linear's output inside the same op, so that output is never a graph node
/// whose gradient candle would zero and accumulate (25 MB per DiT-S/2 block at batch 16 for the
/// MLP's hidden layer, 18 MB for self-attention's q, k, v).
struct Then {
    op: ThenOp,
    /// What the backward needs, kept here by the forward; `None` when no backward will run
    /// (nothing tracks gradients), and then nothing is kept.
    kept: Option<OnceLock<Tensor>>,
}

enum ThenOp {
    /// GELU-tanh (an MLP's first layer). Keeps the GELU's slope, so the backward only multiplies.
    Gelu,
    /// Self-attention over the output read as q, k, v side by side (the three projections
    /// stacked into one). Keeps q, k, v; the backward recomputes the probabilities from them.
    SelfAttention { heads: usize },
}

simd_fn! {
    /// sums[j] += g[i, j] over the rows of g.
    fn column_sums(g: &[f32], sums: &mut [f32]) {
        for row in g.chunks(sums.len()) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
    }
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear"
    }

    /// y = x W^T + b over x's last axis (x contiguous, any rank): every row of y starts as b and
    /// gemm accumulates the product onto it.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(ws) = s2 else {
            candle_core::bail!("linear: expected f32");
        };
        let bias = contiguous_f32(s3, l3, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let in_dim = l1.dims().last().copied().unwrap_or(0);
        let Some(w) = Operand::of(l2).filter(|w| w.n == 1 && w.cols == in_dim && w.rows == bias.len()) else {
            candle_core::bail!("linear: {:?} x {:?}^T + {:?}", l1.dims(), l2.dims(), l3.dims());
        };
        // The leading axes' product, not len / in_dim: x may have no input features at all.
        let rows = l1.dims().iter().rev().skip(1).product::<usize>();
        // SAFETY: the layout comes from candle and describes W's elements inside `ws`.
        let y = unsafe { linear_rows(x, (rows, in_dim), w.mat(ws, 0), bias) };
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = w.rows;
        let Some(then) = &self.then else {
            return Ok((CpuStorage::F32(y), Shape::from(dims)));
        };
        let (out, out_dims, kept) = match then.op {
            ThenOp::Gelu => {
                let (y, slope) = gelu_epilogue(y, then.kept.is_some());
                (y, dims.clone(), slope)
            }
            ThenOp::SelfAttention { heads } => {
                let ([q, k, v], scale) = self_attention_heads(&Layout::contiguous(dims.as_slice()), heads)?;
                // SAFETY: the heads describe y, whose layout is the contiguous one they came from.
                let out = unsafe { attend(q.on(&y), k.on(&y), v.on(&y), scale) };
                (out, vec![q.b, q.l, q.h * v.d], then.kept.is_some().then_some(y))
            }
        };
        if let (Some(slot), Some(kept)) = (&then.kept, kept) {
            let kept = Tensor::from_vec(kept, dims.as_slice(), &candle_core::Device::Cpu)?;
            slot.set(kept).map_err(|_| candle_core::Error::Msg("linear: one op run twice".into()))?;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    /// dx = g W, dW = g^T x, db = column sums of g. Only x, W and b stay in the graph (a
    /// separate bias add would keep the pre-bias product alive until the backward).
    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, _: &Tensor, g: &Tensor) -> Grads3 {
        // Back through what ran on the output first, from what the forward kept.
        let g = match &self.then {
            None => g.clone(),
            Some(then) => {
                let Some(kept) = then.kept.as_ref().and_then(OnceLock::get) else {
                    candle_core::bail!("linear: backward without what the forward kept for it");
                };
                match then.op {
                    ThenOp::Gelu => kept.apply_op2_no_bwd(&g.contiguous()?, &Product)?,
                    ThenOp::SelfAttention { heads } => {
                        kept.apply_op2_no_bwd(&g.contiguous()?, &SelfAttentionGrad { heads })?
                    }
                }
            }
        };
        let (dx, dw, db) = linear_grads(x, w, &g)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// rows x out = x (rows x in) W^T + b, on the threads: every row of y starts as b and gemm
/// accumulates the product onto it.
///
/// # Safety
/// `w` describes W [out, in] (out = b's length) inside live f32 data; x holds rows x in floats.
unsafe fn linear_rows(x: &[f32], (rows, in_dim): (usize, usize), w: Mat, bias: &[f32]) -> Vec<f32> {
    let out = bias.len();
    let mut y = par_rows(rows * out, out, |_, o| o.copy_from_slice(bias));
    // SAFETY: the caller's promise for x and W; `y` holds rows x out elements. W^T's element
    // (k, j) is W's (j, k): its strides swap.
    unsafe {
        matmul(
            (rows, out, in_dim),
            Mat::rows_of(&mut y, out),
            true,
            (1.0, Mat::rows_in(x, in_dim), w.t()),
            rayon::current_num_threads(),
        )
    };
    y
}

/// gelu_tanh of y, and its slope where a backward will want it (computed in place then).
fn gelu_epilogue(mut y: Vec<f32>, keep_slope: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    if !keep_slope {
        return (par_rows(y.len(), 4096, |i, o| gelu_rows(&y[i * 4096..], o)), None);
    }
    let n = y.len();
    let mut slope = Vec::with_capacity(n);
    let rows = y.par_chunks_mut(4096).zip(slope.spare_capacity_mut()[..n].par_chunks_mut(4096));
    rows.with_max_len(grain(n.div_ceil(4096))).for_each(|(y, s)| gelu_keeping_slope(y, zeroed(s)));
    // SAFETY: the chunks cover all n elements, each initialised by `zeroed`.
    unsafe { slope.set_len(n) };
    (y, Some(slope))
}

/// A linear layer's gradients from its output's: dx = g W, dW = g^T x, db = g's column sums.
fn linear_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    // As matrices [rows, in] and [rows, out]: views, since x and g are contiguous.
    let (in_dim, out) = (w.dim(1)?, w.dim(0)?);
    let (rows, x_dims) = (x.dims().iter().rev().skip(1).product::<usize>(), x.dims());
    let (x, g) = (x.contiguous()?.reshape((rows, in_dim))?, g.contiguous()?.reshape((rows, out))?);
    let (w, gt) = (walkable(w)?, walkable(&g.t()?)?);
    // The three side by side on the threads, which then meet once at the end rather than after
    // each (the last block of a product keeps one thread while the other waits).
    let (dx, (dw, db)) = rayon::join(
        || g.apply_op2_no_bwd(&w, &BatchedMatmul),
        || rayon::join(|| gt.apply_op2_no_bwd(&x, &BatchedMatmul), || g.apply_op1_no_bwd(&ColumnSums)),
    );
    let (dx, dw, db) = (dx?, dw?, db?);
    Ok((dx.reshape(x_dims)?, dw, db))
}

/// A transformer MLP, gelu_tanh(x W1^T + b1) W2^T + b2, as one op over x [..., in] and its
/// parameters flat, w = [W1 (hidden x in) | W2 (out x hidden)] and b = [b1 | b2] (candle's custom
/// ops take three inputs). The hidden layer, four times the width, is then no graph node: candle
/// would zero and add its gradient on the calling thread (25 MB per DiT-S/2 block at batch 16).
struct Mlp {
    hidden: usize,
    /// The GELU's output and slope, kept by the forward where a backward will run.
    kept: Option<OnceLock<[Tensor; 2]>>,
}

impl Mlp {
    /// (rows, in, out) of the op over these layouts, checked.
    fn shapes(&self, x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
        let in_dim = x.dims().last().copied().unwrap_or(0);
        let (h, nb) = (self.hidden, b.shape().elem_count());
        let out = nb.saturating_sub(h);
        if x.dims().is_empty() || nb <= h || w.shape().elem_count() != h * in_dim + out * h {
            candle_core::bail!(
                "mlp: x {:?}, flat weights {:?} and biases {:?} do not fit a hidden width of {h}",
                x.dims(),
                w.dims(),
                b.dims()
            );
        }
        Ok((x.dims().iter().rev().skip(1).product::<usize>(), in_dim, out))
    }
}

impl CustomOp3 for Mlp {
    fn name(&self) -> &'static str {
        "mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, in_dim, out) = self.shapes(l1, l2, l3)?;
        let [x, w, b] = [(s1, l1), (s2, l2), (s3, l3)].map(|(s, l)| contiguous_f32(s, l, self.name()));
        let (x, w, b) = (x?, w?, b?);
        let h = self.hidden;
        let (w1, w2) = w.split_at(h * in_dim);
        let (b1, b2) = b.split_at(h);
        // SAFETY: `shapes` checked that w holds W1 (h x in) then W2 (out x h), x rows x in.
        let hidden = unsafe { linear_rows(x, (rows, in_dim), Mat::rows_in(w1, in_dim), b1) };
        let (a, slope) = gelu_epilogue(hidden, self.kept.is_some());
        // SAFETY: as above; `a` holds rows x h floats.
        let y = unsafe { linear_rows(&a, (rows, h), Mat::rows_in(w2, h), b2) };
        if let (Some(slot), Some(slope)) = (&self.kept, slope) {
            let cpu = &candle_core::Device::Cpu;
            let kept = [Tensor::from_vec(a, (rows, h), cpu)?, Tensor::from_vec(slope, (rows, h), cpu)?];
            slot.set(kept).map_err(|_| candle_core::Error::Msg("mlp: one op run twice".into()))?;
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// Back through the second linear, the GELU (a product with the kept slope) and the first.
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _: &Tensor, g: &Tensor) -> Grads3 {
        let Some([a, slope]) = self.kept.as_ref().and_then(OnceLock::get) else {
            candle_core::bail!("mlp: backward without what the forward kept for it");
        };
        let (_, in_dim, out) = self.shapes(x.layout(), w.layout(), b.layout())?;
        let h = self.hidden;
        let w1 = w.narrow(0, 0, h * in_dim)?.reshape((h, in_dim))?;
        let w2 = w.narrow(0, h * in_dim, out * h)?.reshape((out, h))?;
        let (da, dw2, db2) = linear_grads(a, &w2, g)?;
        let dh = slope.apply_op2_no_bwd(&da, &Product)?;
        let (dx, dw1, db1) = linear_grads(x, &w1, &dh)?;
        let dw = Tensor::cat(&[dw1.flatten_all()?, dw2.flatten_all()?], 0)?;
        Ok((Some(dx), Some(dw), Some(Tensor::cat(&[db1, db2], 0)?)))
    }
}

/// `gelu_tanh(x W1^T + b1) W2^T + b2` in one op on the CPU in f32 (`None` elsewhere), with the
/// parameters flat: `w` = [W1 (hidden x in) | W2 (out x hidden)], `b` = [b1 | b2] (see [`Mlp`]).
pub fn mlp_gelu(x: &Tensor, w: &Tensor, b: &Tensor, hidden: usize) -> Result<Option<Tensor>> {
    if !(f32_cpu(x) && f32_cpu(w) && f32_cpu(b)) {
        return Ok(None);
    }
    let kept = [x, w, b].iter().any(|t| t.track_op()).then(OnceLock::new);
    let (w, b) = (w.flatten_all()?.contiguous()?, b.flatten_all()?.contiguous()?);
    x.contiguous()?.apply_op3(&w, &b, Mlp { hidden, kept }).map(Some)
}

/// A DiT block (adaLN-Zero) as one op while training: modulated LayerNorm, self-attention,
/// gated residual; modulated LayerNorm, MLP (GELU-tanh), gated residual. Over x [B, L, D], the
/// block's modulation m [B, 6 D] (shift, scale and gate of each branch, diffusers' chunk order)
/// and its parameters flat, [Wq | Wk | Wv | bq | bk | bv | Wo | bo | W1 | b1 | W2 | b2] (candle's
/// custom ops take three inputs). No activation inside is a graph node, whose gradient candle
/// would zero and add on the calling thread while the other threads wait (seven 6 MB tensors
/// per DiT-S/2 block at batch 16): the backward is one stretch of parallel kernels.
struct DitBlock {
    heads: usize,
    hidden: usize,
    /// The two LayerNorms' eps (diffusers gives the second the config's `norm_eps`).
    eps: [f32; 2],
    kept: OnceLock<BlockKept>,
}

/// What the block's backward reads, kept by its forward: the first norm's output h1, q k v side
/// by side, the attention's output a and its projection o, the residual stream between the
/// branches x2, the second norm's output h2, the GELU's output and slope, and the MLP's output f.
struct BlockKept {
    h1: Tensor,
    qkv: Tensor,
    a: Tensor,
    o: Tensor,
    x2: Tensor,
    h2: Tensor,
    gelu: Tensor,
    slope: Tensor,
    f: Tensor,
}

impl DitBlock {
    /// (offset, shape) of each parameter inside the flat vector for width `d`, checked against
    /// its length: Wqkv [3D, D], bqkv, Wo [D, D], bo, W1 [H, D], b1, W2 [D, H], b2.
    fn params(&self, d: usize, flat: usize) -> Result<[(usize, Vec<usize>); 8]> {
        let h = self.hidden;
        let shapes =
            [vec![3 * d, d], vec![3 * d], vec![d, d], vec![d], vec![h, d], vec![h], vec![d, h], vec![d]];
        let mut offset = 0;
        let parts = shapes.map(|s| {
            let at = offset;
            offset += s.iter().product::<usize>();
            (at, s)
        });
        if offset != flat {
            candle_core::bail!(
                "dit-block: {flat} flat parameters for width {d} and hidden width {h}, expected {offset}"
            );
        }
        Ok(parts)
    }

    /// (B, L, D) of x, checked against m [B, 6 D].
    fn dims(x: &Layout, m: &Layout) -> Result<(usize, usize, usize)> {
        let (b, l, d) = x.shape().dims3()?;
        if m.dims() != [b, 6 * d] {
            candle_core::bail!(
                "dit-block: x {:?} with modulation {:?}, expected [{b}, {}]",
                x.dims(),
                m.dims(),
                6 * d
            );
        }
        Ok((b, l, d))
    }
}

impl CustomOp3 for DitBlock {
    fn name(&self) -> &'static str {
        "dit-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, m, p] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, l, d) = Self::dims(l1, l2)?;
        let (rows, h) = (b * l, self.hidden);
        let [wqkv, bqkv, wo, bo, w1, b1, w2, b2] =
            self.params(d, p.len())?.map(|(at, s)| &p[at..][..s.iter().product()]);
        // Chunk k of a row's modulation starts at k d.
        let chunk = |i: usize, k: usize| &m[i / l * 6 * d + k * d..];
        let norm = |x: &[f32], k: usize, eps: f32| {
            par_rows(rows * d, d, |i, o| {
                modulate_row(&x[i * d..], chunk(i, k), chunk(i, k + 1), o, Some(eps))
            })
        };
        let gated = |x: &[f32], k: usize, y: &[f32]| {
            par_rows(rows * d, d, |i, o| gated_row(&x[i * d..], chunk(i, k), &y[i * d..], o))
        };
        let h1 = norm(x, 0, self.eps[0]);
        // SAFETY (the products): the slices hold the shapes `params` checked, x rows x D floats.
        let qkv = unsafe { linear_rows(&h1, (rows, d), Mat::rows_in(wqkv, d), bqkv) };
        let ([q, k, v], scale) = self_attention_heads(&Layout::contiguous((b, l, 3 * d)), self.heads)?;
        // SAFETY: the heads describe `qkv`, whose contiguous layout they came from.
        let a = unsafe { attend(q.on(&qkv), k.on(&qkv), v.on(&qkv), scale) };
        let o = unsafe { linear_rows(&a, (rows, d), Mat::rows_in(wo, d), bo) };
        let x2 = gated(x, 2, &o);
        let h2 = norm(&x2, 3, self.eps[1]);
        let (gelu, slope) =
            gelu_epilogue(unsafe { linear_rows(&h2, (rows, d), Mat::rows_in(w1, d), b1) }, true);
        let f = unsafe { linear_rows(&gelu, (rows, h), Mat::rows_in(w2, h), b2) };
        let out = gated(&x2, 5, &f);
        let cpu = &candle_core::Device::Cpu;
        let t = |v: Vec<f32>, width: usize| Tensor::from_vec(v, (b, l, width), cpu);
        let slope = slope.ok_or_else(|| candle_core::Error::Msg("dit-block: no GELU slope kept".into()))?;
        let kept = BlockKept {
            h1: t(h1, d)?,
            qkv: t(qkv, 3 * d)?,
            a: t(a, d)?,
            o: t(o, d)?,
            x2: t(x2, d)?,
            h2: t(h2, d)?,
            gelu: t(gelu, h)?,
            slope: t(slope, h)?,
            f: t(f, d)?,
        };
        self.kept.set(kept).map_err(|_| candle_core::Error::Msg("dit-block: one op run twice".into()))?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// Back through the block in reverse: each branch's gated residual, linears (and attention)
    /// and modulated norm; the residual stream's gradient joins where each branch left it.
    fn bwd(&self, x: &Tensor, m: &Tensor, p: &Tensor, _: &Tensor, g: &Tensor) -> Grads3 {
        let Some(k) = self.kept.get() else {
            candle_core::bail!("dit-block: backward without what the forward kept for it");
        };
        let (b, l, d) = Self::dims(x.layout(), m.layout())?;
        let parts = self.params(d, p.elem_count())?;
        let param =
            |i: usize| p.narrow(0, parts[i].0, parts[i].1.iter().product())?.reshape(parts[i].1.as_slice());
        let (g, m) = (g.contiguous()?, m.contiguous()?);
        let [e1, e2] = self.eps;
        let shape = (b, l, d);
        // dm's row per sample: [dshift1 | dscale1 | dgate1 | dshift2 | dscale2 | dgate2].
        let mut dm = vec![0f32; b * 6 * d];
        // The MLP branch, x3 = x2 + gate2 f.
        let df = on_samples(&m, [&k.f, &g], shape, &mut dm, |m, [f, g], df, dm| {
            gated_grad_sample(&m[5 * d..][..d], f, g, df, &mut dm[5 * d..]);
        })?;
        let (dgelu, dw2, db2) = linear_grads(&k.gelu, &param(6)?, &df)?;
        let (dh2, dw1, db1) = linear_grads(&k.h2, &param(4)?, &k.slope.apply_op2_no_bwd(&dgelu, &Product)?)?;
        // x2 reaches x3 along the residual and through the second norm.
        let dx2 = on_samples(&m, [&k.x2, &dh2, &g], shape, &mut dm, |m, [x2, dh2, g], dx2, dm| {
            let (dshift, dscale) = dm[3 * d..].split_at_mut(d);
            modulate_grad_sample(x2, dh2, &m[4 * d..][..d], dx2, dshift, dscale, Some(e2));
            dx2.iter_mut().zip(g).for_each(|(a, g)| *a += g);
        })?;
        // The attention branch, x2 = x + gate1 o.
        let dout = on_samples(&m, [&k.o, &dx2], shape, &mut dm, |m, [o, dx2], dout, dm| {
            gated_grad_sample(&m[2 * d..][..d], o, dx2, dout, &mut dm[2 * d..]);
        })?;
        let (da, dwo, dbo) = linear_grads(&k.a, &param(2)?, &dout)?;
        let dqkv = k.qkv.apply_op2_no_bwd(&da, &SelfAttentionGrad { heads: self.heads })?;
        let (dh1, dwqkv, dbqkv) = linear_grads(&k.h1, &param(0)?, &dqkv)?;
        // x reaches x2 along the residual and through the first norm.
        let dx = on_samples(&m, [x, &dh1, &dx2], shape, &mut dm, |m, [x, dh1, dx2], dx, dm| {
            let (dshift, dscale) = dm.split_at_mut(d);
            modulate_grad_sample(x, dh1, &m[d..][..d], dx, dshift, dscale, Some(e1));
            dx.iter_mut().zip(dx2).for_each(|(a, g)| *a += g);
        })?;
        let grads = [dwqkv, dbqkv, dwo, dbo, dw1, db1, dw2, db2].map(|t| t.flatten_all());
        let dp = Tensor::cat(&grads.into_iter().collect::<Result<Vec<_>>>()?, 0)?;
        let dm = Tensor::from_vec(dm, (b, 6 * d), x.device())?;
        Ok((Some(dx), Some(dm), Some(dp)))
    }
}

/// For each sample in parallel, `f(m_i, inputs_i, out_i, dm_i)`: its [6 D] row of the modulation
/// m, its [L, D] slice of each [B, L, D] input, its rows of a new [B, L, D] tensor (which this
/// returns) and its row of the [B, 6 D] modulation gradient.
fn on_samples<const N: usize, F>(
    m: &Tensor,
    inputs: [&Tensor; N],
    (b, l, d): (usize, usize, usize),
    dm: &mut [f32],
    f: F,
) -> Result<Tensor>
where
    F: Fn(&[f32], [&[f32]; N], &mut [f32], &mut [f32]) + Sync,
{
    let guards: Vec<_> = std::iter::once(m).chain(inputs).map(|t| t.storage_and_layout()).collect();
    let slices: Vec<&[f32]> = guards
        .iter()
        .map(|(s, l)| match &**s {
            candle_core::Storage::Cpu(c) => contiguous_f32(c, l, "dit-block"),
            _ => candle_core::bail!("dit-block: an input is not on the CPU"),
        })
        .collect::<Result<_>>()?;
    let (m, inputs) = slices.split_first().expect("m comes first");
    let mut out = vec![0f32; b * l * d];
    let samples = out.par_chunks_mut(l * d).zip(dm.par_chunks_mut(6 * d)).with_max_len(1);
    samples.enumerate().for_each(|(i, (o, r))| {
        let own: [&[f32]; N] = std::array::from_fn(|k| &inputs[k][i * l * d..][..l * d]);
        f(&m[i * 6 * d..][..6 * d], own, o, r)
    });
    Tensor::from_vec(out, (b, l, d), &candle_core::Device::Cpu)
}

/// A DiT block over x [B, L, D] with modulation m [B, 6 D] as one op while training on the CPU in
/// f32 (see [`DitBlock`]); `None` elsewhere, and when nothing tracks gradients (the op keeps its
/// activations for the backward). `attention` = [Wq, Wk, Wv, bq, bk, bv, Wo, bo] (self-attention
/// of `heads` heads, width D), `mlp` = [W1, b1, W2, b2]; `eps` the two LayerNorms'.
pub fn dit_block(
    x: &Tensor,
    m: &Tensor,
    attention: [&Tensor; 8],
    mlp: [&Tensor; 4],
    heads: usize,
    eps: [f64; 2],
) -> Result<Option<Tensor>> {
    let params: Vec<&Tensor> = attention.into_iter().chain(mlp).collect();
    let all = || [x, m].into_iter().chain(params.iter().copied());
    if !all().all(f32_cpu) || !all().any(|t| t.track_op()) || x.rank() != 3 {
        return Ok(None);
    }
    let hidden = mlp[0].dim(0)?;
    let flat = Tensor::cat(&params.iter().map(|t| t.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let op = DitBlock { heads, hidden, eps: eps.map(|e| e as f32), kept: OnceLock::new() };
    x.contiguous()?.apply_op3(&m.contiguous()?, &flat, op).map(Some)
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, self.name())?;
        let (rows, d) = l.shape().dims2()?;
        let sums_of = |g: &[f32]| {
            let mut sums = vec![0f32; d];
            column_sums(g, &mut sums);
            sums
        };
        let threads = rayon::current_num_threads();
        if g.len() < PAR_MIN || threads == 1 || d == 0 {
            return Ok((CpuStorage::F32(sums_of(g)), Shape::from(d)));
        }
        // Blocks of rows, then their partial sums added.
        let block = rows.div_ceil(4 * threads) * d;
        let partial: Vec<Vec<f32>> = g.par_chunks(block).with_max_len(1).map(sums_of).collect();
        let mut sums = vec![0f32; d];
        for p in &partial {
            sums.iter_mut().zip(p).for_each(|(s, v)| *s += v);
        }
        Ok((CpuStorage::F32(sums), Shape::from(d)))
    }
}

/// `x W^T + b` over the last axis of x [..., in], for W [out, in] (PyTorch's layout) and b [out],
/// in one op: no reshapes around it, each of which would cost the backward a zeroed gradient
/// and an add the size of the activation.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    match linear_op(x, w, b, None)? {
        Some(y) => Ok(y),
        None => flat_matmul_t(x, w)?.broadcast_add(b),
    }
}

/// `gelu_tanh(linear_bias(x, w, b))` in one op (see [`Then`]).
pub fn linear_bias_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    match linear_op(x, w, b, Some(ThenOp::Gelu))? {
        Some(y) => Ok(y),
        None => gelu_tanh(&linear_bias(x, w, b)?),
    }
}

/// Self-attention over `linear_bias(x, w, b)` [B, L, 3 H d] read as q, k, v side by side
/// (`heads` heads each) -> [B, L, H d], in one op on the CPU in f32 (see [`Then`]); `None`
/// elsewhere.
pub fn linear_self_attention(x: &Tensor, w: &Tensor, b: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    if x.rank() != 3 {
        candle_core::bail!("self-attention: x is {:?}, expected [B, L, D]", x.dims());
    }
    linear_op(x, w, b, Some(ThenOp::SelfAttention { heads }))
}

/// The fused linear on f32 CPU tensors, `None` elsewhere.
fn linear_op(x: &Tensor, w: &Tensor, b: &Tensor, then: Option<ThenOp>) -> Result<Option<Tensor>> {
    if !(f32_cpu(x) && f32_cpu(w) && f32_cpu(b) && x.rank() >= 1 && w.rank() == 2) {
        return Ok(None);
    }
    let then = then.map(|op| Then { op, kept: [x, w, b].iter().any(|t| t.track_op()).then(OnceLock::new) });
    x.contiguous()?.apply_op3(w, &b.contiguous()?, LinearBias { then }).map(Some)
}

/// x W^T over the last axis of x [..., in]: the leading axes flattened into one matrix product,
/// not a batched one (candle's batched matmul broadcasts W per batch element, and its backward
/// then materialises one weight gradient per element before summing them).
pub fn flat_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let rows = x.dims().iter().rev().skip(1).product::<usize>();
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    x.reshape((rows, in_dim))?.matmul(&w.t()?)?.reshape(dims)
}

/// A strided matrix in memory: element (r, c) at `ptr + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *mut f32,
    rs: isize,
    cs: isize,
}

// SAFETY: threads only ever touch disjoint blocks of a destination `Mat` (see `matmul`).
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// A contiguous row-major matrix of `cols` columns over `data`.
    fn rows_of(data: &mut [f32], cols: usize) -> Mat {
        Mat { ptr: data.as_mut_ptr(), rs: cols as isize, cs: 1 }
    }

    /// A contiguous row-major matrix of `cols` columns over read-only `data` (an operand: gemm
    /// never writes through it).
    fn rows_in(data: &[f32], cols: usize) -> Mat {
        Mat { ptr: data.as_ptr().cast_mut(), rs: cols as isize, cs: 1 }
    }

    /// The transposed view (the strides swap).
    fn t(self) -> Mat {
        Mat { rs: self.cs, cs: self.rs, ..self }
    }

    /// The view starting at element (r, c).
    fn at(self, r: usize, c: usize) -> Mat {
        // SAFETY (of later accesses): the caller keeps (r, c) inside the matrix.
        Mat { ptr: self.ptr.wrapping_offset(r as isize * self.rs + c as isize * self.cs), ..self }
    }
}

/// dst (m x n) = scale a (m x k) b (k x n), or dst += scale a b when `accumulate`, on `threads`
/// threads.
///
/// The product is cut along its longer output side into two blocks per thread (four where that
/// costs nothing, see below), each one single-threaded gemm call that packs its own share, so
/// the threads only meet at the end of
/// the product. gemm's own threading (`Parallelism::Rayon`) ran the DiT shapes 10-40 % slower on
/// two cores (the `linear-*` benchmarks, docs/PERFORMANCE.md).
///
/// # Safety
/// `a`, `b` and `dst` must describe m x k, k x n and m x n elements inside live allocations,
/// `dst` not overlapping the others.
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: Mat,
    accumulate: bool,
    (scale, a, b): (f32, Mat, Mat),
    threads: usize,
) {
    let one = |(m, n): (usize, usize), dst: Mat, a: Mat, b: Mat| {
        let alpha = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: forwarded from the caller, for a sub-block of the same matrices.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.ptr,
                dst.cs,
                dst.rs,
                accumulate,
                a.ptr,
                a.cs,
                a.rs,
                b.ptr,
                b.cs,
                b.rs,
                alpha,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    // Below ~1 MFLOP a product is over before a second thread would have started.
    if threads <= 1 || m * n * k < 1 << 19 {
        return one((m, n), dst, a, b);
    }
    if m >= n {
        // Row blocks share b. Where gemm reads b in place (unit stride along k, as the W^T of a
        // linear layer, and at most 2048 rows a block) more blocks cost only a call each and
        // even out the threads when one is slowed; where it packs b, each block packs it again.
        // Every block is a piece of its own for rayon (`with_max_len(1)`, see `grain`).
        let blocks = if b.rs == 1 && m <= 4 * threads * 2048 { 4 * threads } else { 2 * threads };
        let rows = m.div_ceil(blocks).next_multiple_of(8);
        (0..m.div_ceil(rows)).into_par_iter().with_max_len(1).for_each(|i| {
            let r0 = i * rows;
            one((rows.min(m - r0), n), dst.at(r0, 0), a.at(r0, 0), b)
        });
    } else {
        let cols = n.div_ceil(2 * threads).next_multiple_of(16);
        (0..n.div_ceil(cols)).into_par_iter().with_max_len(1).for_each(|j| {
            let c0 = j * cols;
            one((m, cols.min(n - c0)), dst.at(0, c0), a, b.at(0, c0))
        });
    }
}

/// A batched matrix operand: `n` matrices of `rows` x `cols` at `offset + i * batch`, with
/// element (r, c) at `r * rs + c * cs` (a transposed view just swaps the strides).
#[derive(Clone, Copy)]
struct Operand {
    n: usize,
    rows: usize,
    cols: usize,
    offset: usize,
    batch: usize,
    rs: isize,
    cs: isize,
}

impl Operand {
    /// Matrix `i` of the batch, inside `data` (the storage the layout describes).
    fn mat(&self, data: &[f32], i: usize) -> Mat {
        let ptr = data.as_ptr().wrapping_add(self.offset + i * self.batch).cast_mut();
        Mat { ptr, rs: self.rs, cs: self.cs }
    }

    /// `None` when the leading axes cannot be walked with one batch stride.
    fn of(l: &Layout) -> Option<Operand> {
        let (dims, strides) = (l.dims(), l.stride());
        let r = dims.len();
        if r < 2 {
            return None;
        }
        // Axes of size 1 never move the index, whatever their (arbitrary) stride; one of size 0
        // must stay, so the batch counts no matrices.
        let lead: Vec<(usize, usize)> = dims[..r - 2]
            .iter()
            .copied()
            .zip(strides[..r - 2].iter().copied())
            .filter(|&(d, _)| d != 1)
            .collect();
        let mergeable = lead.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0);
        mergeable.then(|| Operand {
            n: lead.iter().map(|&(d, _)| d).product(),
            rows: dims[r - 2],
            cols: dims[r - 1],
            offset: l.start_offset(),
            batch: lead.last().map_or(0, |&(_, s)| s),
            rs: strides[r - 2] as isize,
            cs: strides[r - 1] as isize,
        })
    }
}

struct BatchedMatmul;

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("batched-matmul: expected f32");
        };
        let (Some(x), Some(y)) = (Operand::of(l1), Operand::of(l2)) else {
            candle_core::bail!("batched-matmul: batch axes must be mergeable");
        };
        if x.n != y.n || x.cols != y.rows {
            candle_core::bail!("batched-matmul: {:?} x {:?}", l1.dims(), l2.dims());
        }
        let (m, k, p) = (x.rows, x.cols, y.cols);
        let mut c = Fresh::new(x.n * m * p);
        let c_rows = c.rows(p);
        let one = |i: usize, threads: usize| {
            // SAFETY: the operands' layouts come from candle and describe elements inside `a`
            // and `b`; `c` holds x.n products of m x p elements, the i-th from row i m.
            unsafe { matmul((m, p, k), c_rows.at(i * m, 0), false, (1.0, x.mat(a, i), y.mat(b, i)), threads) }
        };
        let threads = rayon::current_num_threads();
        if x.n >= threads && m * p * k >= 1 << 12 {
            // Enough matrices to keep every thread busy: one single-threaded product each.
            (0..x.n).into_par_iter().with_max_len(1).for_each(|i| one(i, 1));
        } else {
            (0..x.n).for_each(|i| one(i, threads));
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("rank >= 2") = p;
        // SAFETY: each of the x.n products wrote its m x p block (gemm without accumulation).
        Ok((CpuStorage::F32(unsafe { c.written(x.n * m * p) }), Shape::from(dims)))
    }

    /// dA = dC B^T, dB = A^T dC: the same product on transposed views.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = walkable(g)?;
        let da = g.apply_op2_no_bwd(&walkable(&b.t()?)?, &BatchedMatmul)?;
        let db = walkable(&a.t()?)?.apply_op2_no_bwd(&g, &BatchedMatmul)?;
        Ok((Some(da), Some(db)))
    }
}

/// `a.matmul(b)` over equal leading (batch) axes, e.g. attention's Q K^T and P V on [B, H, L, d].
/// candle threads each small product of a batch in turn; here the batch's products are spread
/// over the threads, one single-threaded product each (1.3-3x faster for attention's shapes).
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fits = f32_cpu(a)
        && f32_cpu(b)
        && a.rank() >= 3
        && a.rank() == b.rank()
        && a.dims()[..a.rank() - 2] == b.dims()[..b.rank() - 2];
    if !fits {
        return a.matmul(b);
    }
    walkable(a)?.apply_op2(&walkable(b)?, BatchedMatmul)
}

/// `t` itself where its batch axes merge into one stride, else a contiguous copy.
fn walkable(t: &Tensor) -> Result<Tensor> {
    if Operand::of(t.layout()).is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Per-head matrices of an attention operand: [B, H, L, d] with any strides, or the projections'
/// own [B, L, H*d] read as `heads` heads in place (no split or merge copies).
#[derive(Clone, Copy, Debug)]
struct Heads {
    ptr: *mut f32,
    b: usize,
    h: usize,
    l: usize,
    d: usize,
    offset: usize,
    strides: [isize; 4],
}

// SAFETY: threads only ever write disjoint heads (or disjoint rows of one head), see the kernel.
unsafe impl Send for Heads {}
unsafe impl Sync for Heads {}

impl Heads {
    fn of(l: &Layout, heads: usize, what: &str) -> Result<Heads> {
        let st: Vec<isize> = l.stride().iter().map(|&s| s as isize).collect();
        let (ptr, offset) = (std::ptr::null_mut(), l.start_offset());
        match *l.dims() {
            [b, h, n, d] => Ok(Heads { ptr, b, h, l: n, d, offset, strides: [st[0], st[1], st[2], st[3]] }),
            [b, n, hd] if heads > 0 && hd % heads == 0 => {
                let (h, d) = (heads, hd / heads);
                Ok(Heads { ptr, b, h, l: n, d, offset, strides: [st[0], d as isize * st[2], st[1], st[2]] })
            }
            _ => candle_core::bail!(
                "attention: {what} is {:?}, expected [B, H, L, d] or [B, L, {heads}*d]",
                l.dims()
            ),
        }
    }

    /// These heads inside `data`, the storage their layout describes.
    fn on(self, data: &[f32]) -> Heads {
        self.at(data.as_ptr().cast_mut())
    }

    /// These heads in the storage starting at `base`.
    fn at(self, base: *mut f32) -> Heads {
        Heads { ptr: base.wrapping_add(self.offset), offset: 0, ..self }
    }

    /// The same heads in a contiguous buffer of B H L d floats at `data`: [B, H, L, d] when
    /// `rank4`, else [B, L, H*d].
    fn packed(self, data: *mut f32, rank4: bool) -> Heads {
        let (h, l, d) = (self.h as isize, self.l as isize, self.d as isize);
        let strides = if rank4 { [h * l * d, l * d, d, 1] } else { [l * h * d, d, h * d, 1] };
        Heads { ptr: data, offset: 0, strides, ..self }
    }

    /// Head `h` of sample `b`, an L x d matrix.
    fn head(&self, b: usize, h: usize) -> Mat {
        let [sb, sh, sl, sd] = self.strides;
        let ptr = self.ptr.wrapping_offset(b as isize * sb + h as isize * sh);
        Mat { ptr, rs: sl, cs: sd }
    }
}

/// Query rows per tile: a tile's scores (rows x Lk floats) stay within 256 KiB, so the scores
/// and their gradient sit in L2 beside the head's keys and values.
fn query_tile(lk: usize) -> usize {
    (65_536 / lk.max(1)).clamp(16, 128)
}

fn f32_data<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("attention: {what} must be f32"),
    }
}

/// softmax(Q K^T / sqrt(d)) V tiled over query rows: each thread holds one tile's scores
/// (rows x Lk), never the [L, L] matrix, and the backward recomputes a tile's probabilities from
/// q and k instead of keeping them. Inputs are [B, H, L, d] or [B, L, H*d] (`heads` heads); the
/// output is [B, Lq, H*dv], heads merged, as the output projection wants it.
struct FusedAttention {
    heads: usize,
}

/// The gradient of self-attention over q, k, v side by side in one [B, L, 3 H d] tensor (see
/// [`ThenOp::SelfAttention`]), given the tensor and the output gradient; packed like the tensor.
struct SelfAttentionGrad {
    heads: usize,
}

/// The logit scale 1/sqrt(d), once q, k and v are checked against each other.
fn attention_scale(q: &Heads, k: &Heads, v: &Heads) -> Result<f32> {
    if q.b != k.b || k.b != v.b || q.h != k.h || k.h != v.h || q.d != k.d || k.l != v.l {
        candle_core::bail!(
            "attention: q, k, v (batch, heads, length, width) = ({}, {}, {}, {}), ({}, {}, {}, {}), ({}, {}, {}, {}): \
             batch and heads must agree, q and k widths, k and v lengths",
            q.b, q.h, q.l, q.d, k.b, k.h, k.l, k.d, v.b, v.h, v.l, v.d
        );
    }
    Ok(1.0 / (q.d as f32).sqrt())
}

/// softmax(Q K^T scale) V as [B, Lq, H*dv], tile by tile over the threads.
///
/// # Safety
/// The heads describe live f32 data checked by [`attention_scale`].
unsafe fn attend(q: Heads, k: Heads, v: Heads, scale: f32) -> Vec<f32> {
    let n_out = q.b * q.l * q.h * v.d;
    if k.l == 0 {
        // No keys: every weighted sum is empty (the composition's P V is zero too).
        return vec![0.0; n_out];
    }
    let mut data = Fresh::new(n_out);
    let out = Heads { l: q.l, ..v }.packed(data.ptr(), false);
    let rows = query_tile(k.l);
    let tiles = q.l.div_ceil(rows);
    (0..q.b * q.h * tiles).into_par_iter().with_max_len(1).for_each(|t| {
        let (b, h, r0) = (t / tiles / q.h, t / tiles % q.h, t % tiles * rows);
        let n = rows.min(q.l - r0);
        let mut p = vec![0f32; n * k.l];
        // SAFETY: the heads are live (the caller's promise) or point into `data`; `p` holds n x Lk;
        // each task writes its own rows of one head of the output.
        unsafe {
            let (q_rows, k_t) = (q.head(b, h).at(r0, 0), k.head(b, h).t());
            matmul((n, k.l, q.d), Mat::rows_of(&mut p, k.l), false, (scale, q_rows, k_t), 1);
            p.chunks_mut(k.l).for_each(softmax_row);
            let p = Mat::rows_of(&mut p, k.l);
            matmul((n, v.d, k.l), out.head(b, h).at(r0, 0), false, (1.0, p, v.head(b, h)), 1);
        }
    });
    // SAFETY: the tiles cover every query row of every head, each written by gemm.
    unsafe { data.written(n_out) }
}

/// Per head, tile by tile: P recomputed, dV += P^T dO, dS = softmax'(dO V^T), dQ = scale dS K,
/// dK += scale dS^T Q, written into `dq`, `dk`, `dv` (all of them, Lq > 0 and Lk > 0).
///
/// # Safety
/// The heads describe live f32 data checked by [`attention_scale`]; the gradients' heads have
/// their operands' shapes, in buffers no other thread touches.
unsafe fn attend_grad(q: Heads, k: Heads, v: Heads, go: Heads, scale: f32, [dq, dk, dv]: [Heads; 3]) {
    let rows = query_tile(k.l);
    (0..q.b * q.h).into_par_iter().with_max_len(1).for_each(|bh| {
        let (b, h) = (bh / q.h, bh % q.h);
        let (km, vm, dk, dv) = (k.head(b, h), v.head(b, h), dk.head(b, h), dv.head(b, h));
        let (mut p, mut ds) = (vec![0f32; rows * k.l], vec![0f32; rows * k.l]);
        for r0 in (0..q.l).step_by(rows) {
            let n = rows.min(q.l - r0);
            let (p, ds) = (&mut p[..n * k.l], &mut ds[..n * k.l]);
            let (q_rows, g_rows, dq_rows) =
                (q.head(b, h).at(r0, 0), go.head(b, h).at(r0, 0), dq.head(b, h).at(r0, 0));
            let more = r0 > 0;
            // SAFETY: the caller's promise; each task owns one head's gradients.
            unsafe {
                matmul((n, k.l, q.d), Mat::rows_of(p, k.l), false, (scale, q_rows, km.t()), 1);
                p.chunks_mut(k.l).for_each(softmax_row);
                matmul((k.l, v.d, n), dv, more, (1.0, Mat::rows_of(p, k.l).t(), g_rows), 1);
                matmul((n, k.l, v.d), Mat::rows_of(ds, k.l), false, (1.0, g_rows, vm.t()), 1);
                p.chunks(k.l).zip(ds.chunks_mut(k.l)).for_each(|(y, g)| softmax_grad_row(y, g));
                matmul((n, q.d, k.l), dq_rows, false, (scale, Mat::rows_of(ds, k.l), km), 1);
                matmul((k.l, q.d, n), dk, more, (scale, Mat::rows_of(ds, k.l).t(), q_rows), 1);
            }
        }
    });
}

/// The output gradient's heads, checked against the output's shape [B, Lq, H*dv].
fn output_grad_heads(l: &Layout, q: &Heads, v: &Heads) -> Result<Heads> {
    let go = Heads::of(l, q.h, "the output gradient")?;
    if go.b != q.b || go.l != q.l || go.d != v.d {
        candle_core::bail!(
            "attention: the output gradient is {:?}, expected [{}, {}, {}]",
            l.dims(),
            q.b,
            q.l,
            q.h * v.d
        );
    }
    Ok(go)
}

/// The CPU f32 data of a tensor's storage.
fn cpu_f32<'a>(s: &'a candle_core::Storage, what: &str) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_data(c, what),
        _ => candle_core::bail!("attention: {what} is not on the CPU"),
    }
}

impl FusedAttention {
    /// q, k, v heads and the logit scale 1/sqrt(d).
    fn shapes(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<(Heads, Heads, Heads, f32)> {
        let (q, k, v) =
            (Heads::of(q, self.heads, "q")?, Heads::of(k, self.heads, "k")?, Heads::of(v, self.heads, "v")?);
        let scale = attention_scale(&q, &k, &v)?;
        Ok((q, k, v, scale))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v, scale) = self.shapes(l1, l2, l3)?;
        let (q, k, v) = (q.on(f32_data(s1, "q")?), k.on(f32_data(s2, "k")?), v.on(f32_data(s3, "v")?));
        // SAFETY: the heads come from candle's layouts of these storages, checked by `shapes`.
        let out = unsafe { attend(q, k, v, scale) };
        Ok((CpuStorage::F32(out), Shape::from((q.b, q.l, q.h * v.d))))
    }

    /// Each gradient comes back in its input's shape.
    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _: &Tensor, g: &Tensor) -> Grads3 {
        let g = g.contiguous()?;
        let (sq, lq) = q.storage_and_layout();
        let (sk, lk) = k.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (qh, kh, vh, scale) = self.shapes(lq, lk, lv)?;
        if qh.l == 0 || kh.l == 0 {
            // No query rows or no keys: the output did not depend on q, k or v (and no tile
            // would write their gradients).
            return Ok((Some(q.zeros_like()?), Some(k.zeros_like()?), Some(v.zeros_like()?)));
        }
        let go = output_grad_heads(lg, &qh, &vh)?.on(cpu_f32(&sg, "the output gradient")?);
        let (qh, kh, vh) = (qh.on(cpu_f32(&sq, "q")?), kh.on(cpu_f32(&sk, "k")?), vh.on(cpu_f32(&sv, "v")?));
        let (mut dq, mut dk, mut dv) =
            (Fresh::new(q.elem_count()), Fresh::new(k.elem_count()), Fresh::new(v.elem_count()));
        let grads = [
            qh.packed(dq.ptr(), q.rank() == 4),
            kh.packed(dk.ptr(), k.rank() == 4),
            vh.packed(dv.ptr(), v.rank() == 4),
        ];
        // SAFETY: the heads come from candle's layouts of these storages (checked by `shapes`) or
        // from the fresh buffers, in the same shapes; Lq > 0, so `attend_grad` writes all of them.
        unsafe { attend_grad(qh, kh, vh, go, scale, grads) };
        let grad = |data: Fresh, t: &Tensor| {
            Tensor::from_vec(unsafe { data.written(t.elem_count()) }, t.shape(), t.device())
        };
        Ok((Some(grad(dq, q)?), Some(grad(dk, k)?), Some(grad(dv, v)?)))
    }
}

/// The q, k and v heads inside a [B, L, 3 H d] layout, and the logit scale.
fn self_attention_heads(l: &Layout, heads: usize) -> Result<([Heads; 3], f32)> {
    let (_, _, width) = l.shape().dims3()?;
    if width % 3 != 0 {
        candle_core::bail!("self-attention: q, k, v side by side need a width divisible by 3, not {width}");
    }
    let inner = width / 3;
    let part = |i: usize, what: &str| Heads::of(&l.narrow(2, i * inner, inner)?, heads, what);
    let [q, k, v] = [part(0, "q")?, part(1, "k")?, part(2, "v")?];
    let scale = attention_scale(&q, &k, &v)?;
    Ok(([q, k, v], scale))
}

impl CustomOp2 for SelfAttentionGrad {
    fn name(&self) -> &'static str {
        "self-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ([q, k, v], scale) = self_attention_heads(l1, self.heads)?;
        let n = l1.shape().elem_count();
        if q.l == 0 {
            return Ok((CpuStorage::F32(vec![0.0; n]), l1.shape().clone()));
        }
        let data = f32_data(s1, "qkv")?;
        let go = output_grad_heads(l2, &q, &v)?.on(f32_data(s2, "the output gradient")?);
        let mut grad = Fresh::new(n);
        // The gradient's heads: the same parts of a contiguous layout of the same shape.
        let (parts, _) = self_attention_heads(&Layout::contiguous(l1.shape()), self.heads)?;
        let grads = parts.map(|h| h.at(grad.ptr()));
        // SAFETY: the heads come from candle's layouts of these storages (checked by
        // `self_attention_heads`) or lie inside `grad`, of qkv's shape; Lq > 0, so `attend_grad`
        // writes all of it.
        unsafe { attend_grad(q.on(data), k.on(data), v.on(data), go, scale, grads) };
        Ok((CpuStorage::F32(unsafe { grad.written(n) }), l1.shape().clone()))
    }
}

/// Scaled dot-product attention softmax(Q K^T / sqrt(d)) V -> [B, Lq, H*dv], in one kernel on
/// the CPU in f32 (`None` elsewhere: the caller composes it). q, k, v are [B, H, L, d] (any
/// strides) or [B, L, H*d] with `heads` heads.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) {
        return Ok(None);
    }
    q.apply_op3(k, v, FusedAttention { heads }).map(Some)
}

// The optimiser's element-wise updates, in place and in one pass each (as candle ops, one AdamW
// step over DiT-S/2's 33M parameters was ~13 allocating single-threaded passes).

/// Elements per parallel chunk of the optimiser kernels.
const OPT_CHUNK: usize = 1 << 16;

fn contiguous_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the updated tensor must be contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: expected f32"),
    }
}

/// An exponential moving average updated in place: avg = beta avg + (1 - beta) f(x), with
/// f(x) = scale x, or (scale x)^2 for Adam's second moment.
struct MovingAverage {
    beta: f32,
    scale: f32,
    square: bool,
}

simd_fn! {
    fn moving_average_chunk(avg: &mut [f32], x: &[f32], beta: f32, scale: f32, square: bool) {
        for (a, &x) in avg.iter_mut().zip(x) {
            let x = scale * x;
            *a = beta * *a + (1.0 - beta) * if square { x * x } else { x };
        }
    }
}

impl InplaceOp2 for MovingAverage {
    fn name(&self) -> &'static str {
        "moving-average"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let avg = contiguous_f32_mut(s1, l1, self.name())?;
        let x = contiguous_f32(s2, l2, self.name())?;
        if avg.len() != x.len() {
            candle_core::bail!("moving-average: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        avg.par_chunks_mut(OPT_CHUNK)
            .zip(x.par_chunks(OPT_CHUNK))
            .for_each(|(a, x)| moving_average_chunk(a, x, self.beta, self.scale, self.square));
        Ok(())
    }
}

/// AdamW's parameter update in place, from the moments m and v:
/// p = p (1 - lr wd) - lr (m / c1) / (sqrt(v / c2) + eps).
struct AdamUpdate {
    lr: f32,
    decay: f32,
    c1: f32,
    c2: f32,
    eps: f32,
}

simd_fn! {
    fn adam_update_chunk(p: &mut [f32], m: &[f32], v: &[f32], u: &AdamUpdate) {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p = *p * u.decay - u.lr * ((m / u.c1) / ((v / u.c2).sqrt() + u.eps));
        }
    }
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let p = contiguous_f32_mut(s1, l1, self.name())?;
        let (m, v) = (contiguous_f32(s2, l2, self.name())?, contiguous_f32(s3, l3, self.name())?);
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("adam-update: {:?}, {:?}, {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let chunks = m.par_chunks(OPT_CHUNK).zip(v.par_chunks(OPT_CHUNK));
        p.par_chunks_mut(OPT_CHUNK).zip(chunks).for_each(|(p, (m, v))| adam_update_chunk(p, m, v, self));
        Ok(())
    }
}

/// One AdamW update's scalars: bias corrections c1 = 1 - b1^t and c2 = 1 - b2^t, and the
/// gradient's clip factor.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub c1: f64,
    pub c2: f64,
}

fn cpu_f32_contiguous(t: &Tensor) -> bool {
    f32_cpu(t) && t.is_contiguous()
}

/// AdamW on one parameter, in place: moments m, v from the gradient g, then p. `Ok(false)`
/// (nothing done) unless all four are contiguous f32 CPU tensors; the caller composes it then.
/// m and v must not share storage with anything (they are overwritten).
pub fn adamw_in_place(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: &AdamStep) -> Result<bool> {
    if ![p, g, m, v].iter().all(|t| cpu_f32_contiguous(t)) {
        return Ok(false);
    }
    let (b1, b2, clip) = (s.betas.0 as f32, s.betas.1 as f32, s.clip as f32);
    m.inplace_op2(g, &MovingAverage { beta: b1, scale: clip, square: false })?;
    v.inplace_op2(g, &MovingAverage { beta: b2, scale: clip, square: true })?;
    let decay = (1.0 - s.lr * s.weight_decay) as f32;
    let (c1, c2, eps) = (s.c1 as f32, s.c2 as f32, s.eps as f32);
    p.inplace_op3(m, v, &AdamUpdate { lr: s.lr as f32, decay, c1, c2, eps })?;
    Ok(true)
}

/// avg = beta avg + (1 - beta) x in place (the weights' EMA); `Ok(false)` as above.
pub fn moving_average_in_place(avg: &Tensor, x: &Tensor, beta: f64) -> Result<bool> {
    if !(cpu_f32_contiguous(avg) && cpu_f32_contiguous(x)) {
        return Ok(false);
    }
    avg.inplace_op2(x, &MovingAverage { beta: beta as f32, scale: 1.0, square: false })?;
    Ok(true)
}

/// The sum of squares of a contiguous f32 CPU tensor (`None` otherwise), accumulated per chunk
/// in f32 lanes and across chunks in f64, without the squared copy.
pub fn sum_squares(t: &Tensor) -> Result<Option<f64>> {
    if !cpu_f32_contiguous(t) {
        return Ok(None);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let x = contiguous_f32(cpu, layout, "sum-squares")?;
    Ok(Some(x.par_chunks(OPT_CHUNK).map(|c| sum_squares_chunk(c) as f64).sum()))
}

simd_fn! {
    fn sum_squares_chunk(x: &[f32]) -> f32 {
        sum8(x, |v| v * v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The largest difference between two backward passes' gradients of `v`.
    fn grad_diff(
        a: &candle_core::backprop::GradStore,
        b: &candle_core::backprop::GradStore,
        v: &Tensor,
    ) -> f32 {
        max_diff(a.get(v).expect("gradient"), b.get(v).expect("gradient"))
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

    type Op = fn(&[Tensor]) -> Result<Tensor>;

    /// The fused op and its composition agree in value and in every input's gradient (under a
    /// random linear functional of the output), and a central difference confirms one gradient.
    fn check_against_composition(shapes: &[&[usize]], fused: Op, composed: Op) -> Result<()> {
        let dev = Device::Cpu;
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::from_tensor(&Tensor::randn(0f32, 1., *s, &dev)?))
            .collect::<Result<_>>()?;
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&inputs)?, composed(&inputs)?);
        assert_eq!(a.dims(), b.dims());
        // f32 rounding, relative to the values' size.
        let size = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        assert!(max_diff(&a, &b) < 1e-6 * size, "values differ by {} (largest {size})", max_diff(&a, &b));
        let w = Tensor::randn(0f32, 1., a.dims(), &dev)?;
        let (ga, gb) = ((a * &w)?.sum_all()?.backward()?, (b * &w)?.sum_all()?.backward()?);
        for (k, v) in vars.iter().enumerate() {
            assert_eq!(ga.get(v.as_tensor()).expect("fused gradient").dims(), v.dims(), "input {k}");
            let d = grad_diff(&ga, &gb, v.as_tensor());
            assert!(d < 1e-4, "input {k}: gradients differ by {d}");
        }
        // The gradient at the second input's first element, by central differences. The loss is
        // summed in f64: an f32 sum of a few thousand terms rounds by more than the difference
        // resolves (the MLP's check failed 3 times in 30 that way).
        let w64 = w.to_dtype(DType::F64)?;
        let loss = |h: f32| -> Result<f64> {
            let mut bumped = inputs.clone();
            let mut v = bumped[1].flatten_all()?.to_vec1::<f32>()?;
            v[0] += h;
            bumped[1] = Tensor::from_vec(v, inputs[1].dims(), &dev)?;
            (fused(&bumped)?.to_dtype(DType::F64)? * &w64)?.sum_all()?.to_scalar::<f64>()
        };
        let fd = ((loss(1e-2)? - loss(-1e-2)?) / 2e-2) as f32;
        let an = ga.get(vars[1].as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?[0];
        assert!((fd - an).abs() < 1e-2 * an.abs().max(1.0), "finite difference {fd} vs {an}");
        Ok(())
    }

    #[test]
    fn modulate_matches_composition_with_gradients() -> Result<()> {
        check_against_composition(
            &[&[3, 70, 48], &[3, 48], &[3, 48]],
            |t| modulate(&t[0], &t[1], &t[2]),
            |t| composed_modulate(&t[0], &t[1], &t[2]),
        )
    }

    #[test]
    fn sum_squares_and_moving_average_match_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (5, 40_001), &dev)?;
        let composed = x.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let fast = sum_squares(&x)?.expect("the CPU kernel");
        assert!((fast - composed).abs() < 1e-5 * composed, "{fast} vs {composed}");
        let avg = Tensor::randn(0f32, 1., (5, 40_001), &dev)?;
        let expected = ((&avg * 0.9)? + (&x * 0.1)?)?;
        assert!(moving_average_in_place(&avg, &x, 0.9)?);
        assert!(max_diff(&avg, &expected) < 1e-6);
        Ok(())
    }

    #[test]
    fn linear_gelu_matches_the_composition_with_gradients() -> Result<()> {
        check_against_composition(
            &[&[3, 100, 24], &[40, 24], &[40]],
            |t| linear_bias_gelu(&t[0], &t[1], &t[2]),
            |t| t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2])?.gelu(),
        )?;
        // Without gradients the GELU slope is not kept; the values are the same.
        let dev = Device::Cpu;
        let (x, w, b) = (
            Tensor::randn(0f32, 1., (7, 24), &dev)?,
            Tensor::randn(0f32, 1., (40, 24), &dev)?,
            Tensor::randn(0f32, 1., 40, &dev)?,
        );
        let plain = x.matmul(&w.t()?)?.broadcast_add(&b)?.gelu()?;
        assert!(max_diff(&linear_bias_gelu(&x, &w, &b)?, &plain) < 1e-5);
        Ok(())
    }

    /// The MLP op on its parameters [x, W1, b1, W2, b2], gathered flat as it takes them.
    fn fused_mlp(t: &[Tensor]) -> Result<Tensor> {
        let w = Tensor::cat(&[t[1].flatten_all()?, t[3].flatten_all()?], 0)?;
        let b = Tensor::cat(&[&t[2], &t[4]], 0)?;
        Ok(mlp_gelu(&t[0], &w, &b, t[1].dim(0)?)?.expect("f32 on the CPU"))
    }

    #[test]
    fn mlp_matches_the_composition_with_gradients() -> Result<()> {
        // Values and the gradients of x and of all four parameters (through the flat gathering).
        check_against_composition(&[&[3, 50, 24], &[40, 24], &[40], &[16, 40], &[16]], fused_mlp, |t| {
            let h = t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2])?.gelu()?;
            h.broadcast_matmul(&t[3].t()?)?.broadcast_add(&t[4])
        })?;
        // Without gradients nothing is kept; the values are the same.
        let dev = Device::Cpu;
        let t: Vec<Tensor> = [&[7usize, 24][..], &[40, 24], &[40], &[16, 40], &[16]]
            .iter()
            .map(|s| Tensor::randn(0f32, 1., *s, &dev))
            .collect::<Result<_>>()?;
        let plain = linear_bias(&linear_bias_gelu(&t[0], &t[1], &t[2])?, &t[3], &t[4])?;
        assert!(max_diff(&fused_mlp(&t)?, &plain) < 1e-5);
        // A hidden width that does not fit the flat parameters is an error, not a misread.
        let (w, b) =
            (Tensor::zeros(40 * 24 + 16 * 40, DType::F32, &dev)?, Tensor::zeros(56, DType::F32, &dev)?);
        assert!(mlp_gelu(&t[0], &w, &b, 39).is_err());
        assert!(mlp_gelu(&t[0], &w, &b, 40)?.is_some());
        Ok(())
    }

    #[test]
    fn modulated_norm_matches_composition_with_gradients() -> Result<()> {
        check_against_composition(
            &[&[3, 70, 48], &[3, 48], &[3, 48]],
            |t| modulated_norm(&t[0], &t[1], &t[2], 1e-6),
            |t| composed_modulate(&composed_layer_norm(&t[0], 1e-6)?, &t[1], &t[2]),
        )
    }

    #[test]
    fn gated_residual_matches_composition_with_gradients() -> Result<()> {
        check_against_composition(
            &[&[2, 700, 40], &[2, 40], &[2, 700, 40]],
            |t| gated_residual(&t[0], &t[1], &t[2]),
            |t| composed_gated_residual(&t[0], &t[1], &t[2]),
        )
    }

    #[test]
    fn linear_bias_matches_matmul_plus_bias_with_gradients() -> Result<()> {
        check_against_composition(
            &[&[300, 24], &[10, 24], &[10]],
            |t| linear_bias(&t[0], &t[1], &t[2]),
            |t| t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2]),
        )?;
        // Any rank: [B, L, in] in, [B, L, out] out, no reshape in the graph.
        check_against_composition(
            &[&[3, 100, 24], &[10, 24], &[10]],
            |t| linear_bias(&t[0], &t[1], &t[2]),
            |t| t[0].broadcast_matmul(&t[1].t()?)?.broadcast_add(&t[2]),
        )
    }

    /// softmax(Q K^T / sqrt(d)) V from candle's own ops: heads [B, H, L, d] in, [B, L, H*dv] out.
    fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(3)? as f64).sqrt();
        let p = candle_nn::ops::softmax(&(q * scale)?.matmul(&k.t()?.contiguous()?)?, D::Minus1)?;
        let (b, h, l, d) = p.matmul(v)?.dims4()?;
        p.matmul(v)?.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))
    }

    #[test]
    fn fused_attention_matches_the_composition_and_its_gradients() -> Result<()> {
        // Cross-attention (Lq != Lk, dv != d) with more query rows than one tile (Lk = 600 gives
        // 109-row tiles: two full and a partial one), three threads; inputs as the projections
        // write them ([B, L, H*d]) and as strided [B, H, L, d] views.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a thread pool");
        pool.install(|| -> Result<()> {
            let dev = Device::Cpu;
            let (b, h, lq, lk, d, dv) = (2, 3, 250, 600, 8, 4);
            let var = |l: usize, w: usize| Var::from_tensor(&Tensor::randn(0f32, 1., (b, l, h * w), &dev)?);
            let (q, k, v) = (var(lq, d)?, var(lk, d)?, var(lk, dv)?);
            let heads = |t: &Tensor, w: usize| t.reshape((b, t.dim(1)?, h, w))?.transpose(1, 2);
            let (q4, k4, v4) = (heads(&q, d)?, heads(&k, d)?, heads(&v, dv)?);
            let reference = composed_attention(&q4.contiguous()?, &k4.contiguous()?, &v4.contiguous()?)?;
            let w = Tensor::randn(0f32, 1., (b, lq, h * dv), &dev)?;
            let g_ref = (&reference * &w)?.sum_all()?.backward()?;
            for (name, out) in [
                ("[B, L, H*d]", fused_attention(&q, &k, &v, h)?.expect("the CPU kernel")),
                ("[B, H, L, d] views", fused_attention(&q4, &k4, &v4, 0)?.expect("the CPU kernel")),
            ] {
                assert!(max_diff(&out, &reference) < 1e-5, "{name}: {}", max_diff(&out, &reference));
                let g = (&out * &w)?.sum_all()?.backward()?;
                for (x, what) in [(&q, "q"), (&k, "k"), (&v, "v")] {
                    let d = grad_diff(&g, &g_ref, x.as_tensor());
                    assert!(d < 1e-4, "{name}: d{what} differs by {d}");
                }
            }
            // A finite difference on one query and one key element, through the fused kernel.
            let loss = |q: &Tensor, k: &Tensor| -> Result<f32> {
                (fused_attention(q, k, v.as_tensor(), h)?.expect("the CPU kernel") * &w)?
                    .sum_all()?
                    .to_scalar::<f32>()
            };
            let g = (fused_attention(&q, &k, &v, h)?.expect("the CPU kernel") * &w)?.sum_all()?.backward()?;
            let eps = 1e-2f32;
            for (x, at) in [(&q, (1, 200, 13)), (&k, (0, 450, 2))] {
                let analytic = g
                    .get(x.as_tensor())
                    .expect("gradient")
                    .get(at.0)?
                    .get(at.1)?
                    .get(at.2)?
                    .to_scalar::<f32>()?;
                let bumped = |delta: f32| -> Result<f32> {
                    let mut data = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    data[(at.0 * x.dim(1)? + at.1) * x.dim(2)? + at.2] += delta;
                    let t = Tensor::from_vec(data, x.shape(), &dev)?;
                    if std::ptr::eq(x, &q) {
                        loss(&t, k.as_tensor())
                    } else {
                        loss(q.as_tensor(), &t)
                    }
                };
                let numeric = (bumped(eps)? - bumped(-eps)?) / (2.0 * eps);
                assert!(
                    (numeric - analytic).abs() < 2e-2 * (1.0 + analytic.abs()),
                    "{numeric} vs {analytic}"
                );
            }
            Ok(())
        })
    }

    #[test]
    fn linear_then_self_attention_matches_the_composition_with_gradients() -> Result<()> {
        // One op: x W^T + b read as q, k, v side by side, then attention (two tiles per head).
        // Against the linear and the three-input attention kernel on the parts: the output and
        // the gradients of x, W and b.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a thread pool");
        pool.install(|| -> Result<()> {
            let dev = Device::Cpu;
            let (b, l, dim, h, d) = (2, 300, 20, 3, 8);
            let var = |s: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1., s, &dev)?);
            let (x, w, bias) = (var(&[b, l, dim])?, var(&[3 * h * d, dim])?, var(&[3 * h * d])?);
            let fused = linear_self_attention(&x, &w, &bias, h)?.expect("the CPU kernel");
            let qkv = linear_bias(&x, &w, &bias)?;
            let part = |i: usize| qkv.narrow(2, i * h * d, h * d);
            let apart = fused_attention(&part(0)?, &part(1)?, &part(2)?, h)?.expect("the CPU kernel");
            assert!(max_diff(&fused, &apart) < 1e-5, "{}", max_diff(&fused, &apart));
            let g = Tensor::randn(0f32, 1., (b, l, h * d), &dev)?;
            let (gf, ga) = ((&fused * &g)?.sum_all()?.backward()?, (&apart * &g)?.sum_all()?.backward()?);
            for (v, what) in [(&x, "x"), (&w, "W"), (&bias, "b")] {
                let d = grad_diff(&gf, &ga, v);
                assert!(d < 1e-4, "d{what} differs by {d}");
            }
            // Without gradients nothing is kept; the values are the same.
            let plain = linear_self_attention(x.as_tensor(), w.as_tensor(), bias.as_tensor(), h)?;
            assert!(max_diff(&plain.expect("the CPU kernel"), &fused) < 1e-6);
            let odd = Tensor::zeros((1, 4, 10), DType::F32, &dev)?;
            assert!(linear_self_attention(
                &odd,
                &Tensor::zeros((10, 10), DType::F32, &dev)?,
                &odd.get(0)?.get(0)?,
                1
            )
            .is_err());
            Ok(())
        })
    }

    #[test]
    fn empty_axes_give_empty_or_zero_results() -> Result<()> {
        let dev = Device::Cpu;
        let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev);
        let randn = |s: &[usize]| Tensor::randn(0f32, 1., s, &dev);
        // No input features: x W^T + b is b on every row.
        let b = randn(&[6])?;
        let y = linear_bias(&zeros(&[1, 4, 0])?, &zeros(&[6, 0])?, &b)?;
        assert_eq!(y.dims(), [1, 4, 6]);
        assert_eq!(max_diff(&y, &b.broadcast_as((1, 4, 6))?), 0.0);
        // No matrices in the batch.
        let c = batched_matmul(&zeros(&[0, 3, 4])?, &zeros(&[0, 4, 5])?)?;
        assert_eq!((c.dims(), c.elem_count()), (&[0, 3, 5][..], 0));
        // No keys: the weighted sums are empty, and nothing flows back.
        let q = Var::from_tensor(&randn(&[1, 5, 8])?)?;
        let (k, v) = (zeros(&[1, 0, 8])?, zeros(&[1, 0, 8])?);
        let out = fused_attention(&q, &k, &v, 2)?.expect("the CPU kernel");
        assert_eq!((out.dims(), out.abs()?.sum_all()?.to_scalar::<f32>()?), (&[1, 5, 8][..], 0.0));
        let g = out.sum_all()?.backward()?;
        assert_eq!(g.get(&q).expect("gradient").abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn products_split_over_threads_match_the_plain_matmul() -> Result<()> {
        // Big enough to be cut into blocks (more rows than columns, then the reverse), odd
        // sizes, three threads; forward and the gradients (dx = g W and dW = g^T x are split too,
        // and the bias's column sums of g once g has enough rows).
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a thread pool");
        pool.install(|| -> Result<()> {
            let dev = Device::Cpu;
            for (m, k, n) in [(131, 67, 70), (37, 101, 150), (400, 67, 90)] {
                let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?)?;
                let w = Var::from_tensor(&Tensor::randn(0f32, 1., (n, k), &dev)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f32, 1., n, &dev)?)?;
                let fused = linear_bias(&x, &w, &b)?;
                let plain = x.matmul(&w.t()?)?.broadcast_add(&b)?;
                assert!(max_diff(&fused, &plain) < 1e-4, "{m}x{k}x{n}: {}", max_diff(&fused, &plain));
                let g = Tensor::randn(0f32, 1., (m, n), &dev)?;
                let (gf, gp) = ((fused * &g)?.sum_all()?.backward()?, (plain * &g)?.sum_all()?.backward()?);
                for v in [&x, &w, &b] {
                    let d = grad_diff(&gf, &gp, v.as_tensor());
                    assert!(d < 1e-3, "{m}x{k}x{n}: gradients differ by {d}");
                }
            }
            Ok(())
        })
    }

    #[test]
    fn batched_matmul_matches_matmul_with_gradients() -> Result<()> {
        // Q K^T on [B, H, L, d] (a transposed operand), P V, and a batch smaller than the threads.
        check_against_composition(
            &[&[2, 3, 17, 8], &[2, 3, 19, 8]],
            |t| batched_matmul(&t[0], &t[1].t()?),
            |t| t[0].matmul(&t[1].t()?),
        )?;
        check_against_composition(
            &[&[4, 33, 21], &[4, 21, 9]],
            |t| batched_matmul(&t[0], &t[1]),
            |t| t[0].matmul(&t[1]),
        )?;
        check_against_composition(
            &[&[1, 40, 64], &[1, 64, 40]],
            |t| batched_matmul(&t[0], &t[1]),
            |t| t[0].matmul(&t[1]),
        )?;
        // A size-1 axis with a stride that fits no merge ([1, 3] transposed to [3, 1]).
        check_against_composition(
            &[&[1, 3, 5, 4], &[3, 1, 4, 6]],
            |t| batched_matmul(&t[0].transpose(0, 1)?, &t[1]),
            |t| t[0].transpose(0, 1)?.matmul(&t[1]),
        )
    }
}
