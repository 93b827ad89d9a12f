//! The convolutional blocks the VAE and the UNet share: `nn.Conv2d`, `nn.GroupNorm`, diffusers'
//! `ResnetBlock2D` and the 2x `Downsample2D` / `Upsample2D`. Each also counts its forward FLOPs
//! the way torch's FlopCounterMode does (a multiply-add is 2; bias, norm and activation are free).

use super::linear::{linear, Init, Linear};
use super::norm::layer_norm;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A biased `nn.Conv2d` with square kernel, stride and symmetric zero padding (`weight` [out, in, k, k]).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// The conv at `vb`; fresh weights follow PyTorch's default (bounds 1/sqrt(fan_in)).
    pub fn new(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        init: Init,
    ) -> Result<Self> {
        let weight = init.tensor(vb, &[c_out, c_in, kernel, kernel], "weight")?;
        let bias = vb.get_with_hints(c_out, "bias", init.bias(c_in * kernel * kernel))?;
        Ok(Conv2d { weight, bias, stride, padding })
    }

    /// A stride-1 conv that keeps the spatial size (`padding = (k - 1) / 2`).
    pub fn same(vb: &VarBuilder, c_in: usize, c_out: usize, kernel: usize, init: Init) -> Result<Self> {
        Self::new(vb, c_in, c_out, kernel, 1, (kernel - 1) / 2, init)
    }

    fn kernel(&self) -> usize {
        self.weight.dims()[2]
    }

    /// Output size for an `h` x `w` input.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let side = |x: usize| (x + 2 * self.padding - self.kernel()) / self.stride + 1;
        (side(h), side(w))
    }

    /// FLOPs for one `h` x `w` input (batch 1).
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        let (oh, ow) = self.out_size(h, w);
        let d = self.weight.dims();
        2 * (oh * ow * d[0] * d[1] * d[2] * d[3]) as u64
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?.broadcast_add(&self.bias.reshape((
            1,
            (),
            1,
            1,
        ))?)
    }
}

/// `nn.GroupNorm` with affine: channels split into `groups`, each normalised over its channels
/// and all positions, computed by the LayerNorm kernel on the [B, groups, rest] view.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: &VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {channels} channels do not split into {groups} groups");
        }
        Ok(GroupNorm {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    /// x [B, C, ...] -> same shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let y = layer_norm(&x.reshape((dims[0], self.groups, ()))?, self.eps)?.reshape(dims)?;
        // The affine parameters broadcast over every axis after the channels.
        let mut affine = vec![1usize; dims.len()];
        affine[1] = dims[1];
        y.broadcast_mul(&self.weight.reshape(affine.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine.as_slice())?)
    }
}

/// What every resnet of one model shares: GroupNorm groups and eps, and the width of the
/// timestep embedding it is conditioned on (none in the VAE).
#[derive(Clone, Copy, Debug)]
pub struct ResnetShape {
    pub groups: usize,
    pub eps: f64,
    pub temb: Option<usize>,
}

/// diffusers' `ResnetBlock2D` (`resnet_time_scale_shift="default"`, output scale 1):
/// conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb))))) + shortcut(x), the shortcut a
/// 1x1 conv when the width changes.
#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(vb: &VarBuilder, c_in: usize, c_out: usize, s: &ResnetShape, init: Init) -> Result<Self> {
        let time_emb_proj = match s.temb {
            Some(t) => Some(linear(&vb.pp("time_emb_proj"), t, c_out, true, init)?),
            None => None,
        };
        let conv_shortcut = if c_in == c_out {
            None
        } else {
            Some(Conv2d::same(&vb.pp("conv_shortcut"), c_in, c_out, 1, init)?)
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(&vb.pp("norm1"), s.groups, c_in, s.eps)?,
            conv1: Conv2d::same(&vb.pp("conv1"), c_in, c_out, 3, init)?,
            time_emb_proj,
            norm2: GroupNorm::new(&vb.pp("norm2"), s.groups, c_out, s.eps)?,
            conv2: Conv2d::same(&vb.pp("conv2"), c_out, c_out, 3, init)?,
            conv_shortcut,
        })
    }

    /// x [B, C_in, H, W], temb [B, T] (required when the block has a time projection).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        if let Some(proj) = &self.time_emb_proj {
            let Some(t) = temb else {
                candle_core::bail!("ResnetBlock2D: this block is conditioned on a timestep embedding");
            };
            h = h.broadcast_add(&proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        match &self.conv_shortcut {
            Some(c) => c.forward(x)? + h,
            None => x + h,
        }
    }

    /// Convolution FLOPs at an `h` x `w` input (batch 1).
    pub fn conv_flops(&self, h: usize, w: usize) -> u64 {
        let shortcut = self.conv_shortcut.as_ref().map_or(0, |c| c.flops(h, w));
        self.conv1.flops(h, w) + self.conv2.flops(h, w) + shortcut
    }

    /// The time projection's FLOPs (a linear layer on one embedding per sample).
    pub fn linear_flops(&self) -> u64 {
        self.time_emb_proj.as_ref().map_or(0, |l| l.flops(1))
    }
}

/// diffusers' `Downsample2D` with a conv (`downsamplers.0.conv`): a stride-2 3x3 conv. With
/// `padding = 0` (the VAE) the input is first padded by one row and column at the bottom and
/// right only, so the halving is exact for even sides (torch's `F.pad(x, (0, 1, 0, 1))`).
#[derive(Clone, Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: &VarBuilder, channels: usize, padding: usize, init: Init) -> Result<Self> {
        Ok(Downsample2D {
            conv: Conv2d::new(&vb.pp("conv"), channels, channels, 3, 2, padding, init)?,
            padding,
        })
    }

    /// The output side for an input side, without a built layer: ceil(side / 2) with padding 1,
    /// floor(side / 2) with the bottom-right padding.
    pub fn side(side: usize, padding: usize) -> usize {
        let total = if padding == 0 { 1 } else { 2 * padding };
        (side + total - 3) / 2 + 1
    }

    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        (Self::side(h, self.padding), Self::side(w, self.padding))
    }

    pub fn flops(&self, h: usize, w: usize) -> u64 {
        let extra = usize::from(self.padding == 0);
        self.conv.flops(h + extra, w + extra)
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            self.conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D` with a conv (`upsamplers.0.conv`): nearest-neighbour resize, then a
/// 3x3 conv.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: &VarBuilder, channels: usize, init: Init) -> Result<Self> {
        Ok(Upsample2D { conv: Conv2d::same(&vb.pp("conv"), channels, channels, 3, init)? })
    }

    /// x [B, C, H, W] -> [B, C, h, w]: 2x normally; the UNet passes the size of the skip
    /// connection it meets next, which differs from 2x only for odd sides.
    pub fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        self.conv.forward(&x.upsample_nearest2d(h, w)?)
    }

    /// FLOPs at the upsampled `h` x `w` size.
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        self.conv.flops(h, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn group_norm_normalises_each_group_over_channels_and_positions() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let gn = GroupNorm::new(&VarBuilder::from_varmap(&vm, DType::F32, &dev), 2, 4, 0.0)?;
        let x = Tensor::randn(1f32, 3., (2, 4, 3, 5), &dev)?;
        let y = gn.forward(&x)?;
        // Channels 2 and 3 form group 1 of sample 1: zero mean, unit variance over 2 * 15 values.
        let g = y.get(1)?.narrow(0, 2, 2)?.flatten_all()?;
        let mean = g.mean_all()?.to_scalar::<f32>()?;
        let var = g.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
        Ok(())
    }

    #[test]
    fn downsample_pads_bottom_right_only() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let down = Downsample2D::new(&vb, 1, 0, Init::Default)?;
        assert_eq!(down.out_size(8, 6), (4, 3));
        assert_eq!(down.out_size(7, 5), (Downsample2D::side(7, 0), Downsample2D::side(5, 0)));
        assert_eq!((Downsample2D::side(7, 0), Downsample2D::side(7, 1)), (3, 4));
        assert_eq!(down.forward(&Tensor::zeros((1, 1, 8, 6), DType::F32, &dev)?)?.dims(), &[1, 1, 4, 3]);
        // A 3x3 all-ones kernel without bias sums the window at (2i, 2j): the first output reads
        // rows/cols 0..3 of the input (no padding at the top-left), the last one the padded zeros.
        let weight = Tensor::ones((1, 1, 3, 3), DType::F32, &dev)?;
        let bias = Tensor::zeros(1, DType::F32, &dev)?;
        let ones = Conv2d { weight, bias, stride: 2, padding: 0 };
        let down = Downsample2D { conv: ones, padding: 0 };
        let x = Tensor::arange(0f32, 16., &dev)?.reshape((1, 1, 4, 4))?;
        let y = down.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        // Window at (0,0): rows 0-2, cols 0-2; at (2,2): rows 2-3, cols 2-3 plus zeros.
        assert_eq!(y, vec![45., 39., 66., 50.]);
        assert_eq!(down.flops(4, 4), 2 * 4 * 9);
        Ok(())
    }
}
