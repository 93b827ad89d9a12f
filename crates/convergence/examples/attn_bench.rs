use candle_core::{Device, Tensor, Var};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, h, l, d) = (16, 6, 256, 64);
    let mk = || Var::from_tensor(&Tensor::randn(0f32, 1., (b, l, h * d), &dev).unwrap()).unwrap();
    let (q, k, v) = (mk(), mk(), mk());
    let w = Tensor::randn(0f32, 1., (b, l, h * d), &dev)?;
    let flop = 4.0 * (b * h * l * l * d) as f64;
    for _ in 0..5 {
        let t = Instant::now();
        let out = convergence::kernels::fused_attention(&q, &k, &v, h)?.unwrap();
        let tf = t.elapsed().as_secs_f64();
        let loss = (out * &w)?.sum_all()?;
        let t = Instant::now();
        let _g = loss.backward()?;
        let tb = t.elapsed().as_secs_f64();
        println!(
            "fwd {:.1} ms ({:.0} GFLOP/s)  bwd {:.1} ms ({:.0} GFLOP/s at 2.5x fwd flops)",
            tf * 1e3,
            flop / tf / 1e9,
            tb * 1e3,
            2.5 * flop / tb / 1e9
        );
    }
    Ok(())
}
