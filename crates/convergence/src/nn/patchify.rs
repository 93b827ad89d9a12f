//! Patchify and un-patchify: an image [B, C, H, W] <-> a sequence of p x p patches [B, N, C*p*p].

use super::linear::{Init, Linear};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Channel order inside one patch vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchOrder {
    /// (c, dy, dx): what a Conv2d(kernel = stride = p) patch embedding reads, and Flux's 2x2
    /// latent packing (`c*4 + dy*2 + dx`).
    ChannelFirst,
    /// (dy, dx, c): what DiT's and SD3's final linear writes (`nhwpqc -> nchpwq`).
    ChannelLast,
}

/// [B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], tokens row-major over the patch grid.
pub fn patchify(x: &Tensor, p: usize, order: PatchOrder) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    let x = x.reshape((b, c, gh, p, gw, p))?;
    let x = match order {
        PatchOrder::ChannelFirst => x.permute((0, 2, 4, 1, 3, 5))?,
        PatchOrder::ChannelLast => x.permute((0, 2, 4, 3, 5, 1))?,
    };
    x.contiguous()?.reshape((b, gh * gw, c * p * p))
}

/// Inverse of [`patchify`]: [B, gh*gw, C*p*p] -> [B, C, gh*p, gw*p].
pub fn unpatchify(x: &Tensor, gh: usize, gw: usize, p: usize, order: PatchOrder) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    if n != gh * gw || d % (p * p) != 0 {
        candle_core::bail!(
            "unpatchify: {n} tokens of dim {d} do not tile a {gh}x{gw} grid of {p}x{p} patches"
        );
    }
    let c = d / (p * p);
    let x = match order {
        PatchOrder::ChannelFirst => x.reshape((b, gh, gw, c, p, p))?.permute((0, 3, 1, 4, 2, 5))?,
        PatchOrder::ChannelLast => x.reshape((b, gh, gw, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?,
    };
    x.contiguous()?.reshape((b, c, gh * p, gw * p))
}

/// `nn.Conv2d(C, D, kernel = stride = p)` patch embedding (diffusers' `PatchEmbed.proj`), run as
/// the linear layer it is on non-overlapping patches: same numbers, one matmul.
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    proj: Linear,
    patch: usize,
}

impl PatchEmbed {
    /// `vb` is the conv's own prefix (`weight` [D, C, p, p], `bias` [D]).
    pub fn new(vb: &VarBuilder, in_channels: usize, dim: usize, patch: usize, init: Init) -> Result<Self> {
        let fan_in = in_channels * patch * patch;
        let weight = init.tensor(vb, &[dim, in_channels, patch, patch], "weight")?;
        let bias = vb.get_with_hints(dim, "bias", init.bias(fan_in))?;
        Ok(PatchEmbed { proj: Linear::new(weight.reshape((dim, fan_in))?, Some(bias)), patch })
    }

    /// [B, C, H, W] -> [B, (H/p)*(W/p), D], tokens row-major over the patch grid.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&patchify(x, self.patch, PatchOrder::ChannelFirst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn patch_embed_equals_the_strided_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
        let embed = PatchEmbed::new(&vb, 3, 5, 2, Init::Default)?;
        let (w, b) = (vb.get((5, 3, 2, 2), "weight")?, vb.get(5, "bias")?);
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 6), &dev)?;
        let conv = x.conv2d(&w, 0, 2, 1, 1)?.broadcast_add(&b.reshape((1, 5, 1, 1))?)?;
        let conv = conv.flatten_from(2)?.transpose(1, 2)?; // [B, gh*gw, D], row-major grid
        let ours = embed.forward(&x)?;
        let diff = (ours - conv)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn round_trip_both_orders_non_square() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 6), &Device::Cpu)?;
        for order in [PatchOrder::ChannelFirst, PatchOrder::ChannelLast] {
            let t = patchify(&x, 2, order)?;
            assert_eq!(t.dims(), &[2, 6, 12]);
            let back = unpatchify(&t, 2, 3, 2, order)?;
            assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn channel_first_index_is_c4_dy2_dx() -> Result<()> {
        // Flux packing: packed channel c*4 + dy*2 + dx of token (row, col) = x[c, 2row+dy, 2col+dx].
        let x = Tensor::arange(0f32, 2. * 4. * 4., &Device::Cpu)?.reshape((1, 2, 4, 4))?;
        let t = patchify(&x, 2, PatchOrder::ChannelFirst)?.to_vec3::<f32>()?;
        let at = |c: usize, y: usize, xx: usize| (c * 16 + y * 4 + xx) as f32;
        // token 3 = row 1, col 1; channel 1*4 + 1*2 + 0 -> c=1, dy=1, dx=0
        assert_eq!(t[0][3][6], at(1, 3, 2));
        let t = patchify(&x, 2, PatchOrder::ChannelLast)?.to_vec3::<f32>()?;
        // ChannelLast channel (dy*2 + dx)*C + c: dy=1, dx=0, c=1 -> 5
        assert_eq!(t[0][3][5], at(1, 3, 2));
        Ok(())
    }
}
