//! AutoencoderKL (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
//! Models"): the VAE every latent diffusion model here works in. The encoder halves the image
//! once per block but the last (ResNet blocks, stride-2 convs), runs a mid block with one
//! single-head attention over all positions, and predicts a diagonal Gaussian (mean, log-variance)
//! per latent cell; the decoder mirrors it with nearest-neighbour upsampling. SDXL's VAE has 4
//! latent channels and 1x1 `quant_conv`s around the latent; SD3's and Flux's have 16 and none.
//! Pipelines scale latents to unit variance with `scaling_factor` (and `shift_factor`). Key names
//! mirror diffusers' `AutoencoderKL`.

use crate::error::{Error, Result};
use crate::models::FlopCount;
use crate::nn::{Attention, Conv2d, Downsample2D, GroupNorm, Init, ResnetBlock2D, ResnetShape, Upsample2D};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// GroupNorm eps everywhere in the VAE (diffusers hard-codes it).
const EPS: f64 = 1e-6;

/// `AutoencoderKL`'s config.json, field for field (defaults as diffusers has them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Native image side in pixels.
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// `sdxl-vae` (4 channels, quant convs), `sd3-vae` and `flux-vae` (16 channels, none): the
    /// same 1024px encoder/decoder, differing in latent width and latent scaling.
    pub fn preset(name: &str) -> Option<Self> {
        let (latent, quant, scale, shift) = match name.to_ascii_lowercase().as_str() {
            "sdxl-vae" => (4, true, 0.13025, None),
            "sd3-vae" => (16, false, 1.5305, Some(0.0609)),
            "flux-vae" => (16, false, 0.3611, Some(0.1159)),
            _ => return None,
        };
        Some(VaeConfig {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: latent,
            sample_size: 1024,
            scaling_factor: scale,
            shift_factor: shift,
            use_quant_conv: quant,
            use_post_quant_conv: quant,
            ..Default::default()
        })
    }

    pub fn preset_names() -> Vec<String> {
        ["sdxl-vae", "sd3-vae", "flux-vae"].map(String::from).to_vec()
    }

    /// Image size at each encoder level, the last being the latent's: one halving per block but
    /// the last (bottom-right padding, so odd sides round down).
    pub fn level_sizes(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        let mut sizes = vec![(h, w)];
        for _ in 1..self.block_out_channels.len() {
            let (h, w) = *sizes.last().expect("starts non-empty");
            sizes.push((Downsample2D::side(h, 0), Downsample2D::side(w, 0)));
        }
        sizes
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return Err(format!("down block `{t}` is not supported (AutoencoderKL uses DownEncoderBlock2D)"));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(format!("up block `{t}` is not supported (AutoencoderKL uses UpDecoderBlock2D)"));
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported (silu)", self.act_fn));
        }
        let groups = self.norm_num_groups;
        if groups == 0 || self.block_out_channels.iter().any(|c| !c.is_multiple_of(groups)) {
            return Err(format!("block_out_channels must be multiples of norm_num_groups {groups}"));
        }
        if self.scaling_factor == 0.0 {
            return Err("scaling_factor must be non-zero".into());
        }
        Ok(())
    }

    fn resnet(&self) -> ResnetShape {
        ResnetShape { groups: self.norm_num_groups, eps: EPS, temb: None }
    }

    /// Parameters (diffusers layout) from the real construction code, without allocating.
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        AutoencoderKL::new(rec.var_builder(), self, Init::Default)?;
        Ok(rec.params())
    }

    /// FLOPs of `encode` on an `h` x `w` image and of `decode` of its latent (batch 1), counted
    /// as FlopCounterMode counts them.
    pub fn flops(&self, h: usize, w: usize) -> Result<(FlopCount, FlopCount)> {
        let rec = ShapeRecorder::new();
        let vae = AutoencoderKL::new(rec.var_builder(), self, Init::Default)?;
        let (lh, lw) = vae.latent_size(h, w);
        Ok((vae.encode_flops(h, w), vae.decode_flops(lh, lw)))
    }
}

/// The mid block's attention (`attentions.0`): GroupNorm, one head as wide as the channels over
/// all h*w positions, and a residual connection.
#[derive(Clone, Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize, init: Init) -> candle_core::Result<Self> {
        Ok(SpatialAttention {
            group_norm: GroupNorm::new(&vb.pp("group_norm"), groups, channels, EPS)?,
            attn: Attention::new(vb, channels, 1, channels, true, init)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let y = self.attn.forward(&tokens, None)?;
        x + y.transpose(1, 2)?.reshape((b, c, h, w))?
    }

    fn flops(&self, h: usize, w: usize) -> FlopCount {
        let (linear, attention) = self.attn.flops(h * w, h * w);
        FlopCount { linear, attention, conv: 0 }
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, attention, resnet.
#[derive(Clone, Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<SpatialAttention>,
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &VaeConfig, init: Init) -> candle_core::Result<Self> {
        let c = *cfg.block_out_channels.last().expect("validated: non-empty");
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(&vb.pp(format!("resnets.{i}")), c, c, &cfg.resnet(), init))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let attention = if cfg.mid_block_add_attention {
            Some(SpatialAttention::new(vb.pp("attentions.0"), c, cfg.norm_num_groups, init)?)
        } else {
            None
        };
        Ok(MidBlock { resnets, attention })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }

    fn flops(&self, h: usize, w: usize) -> FlopCount {
        let mut f = self.attention.as_ref().map_or_else(FlopCount::default, |a| a.flops(h, w));
        f.conv += self.resnets.iter().map(|r| r.conv_flops(h, w)).sum::<u64>();
        f
    }
}

/// A `DownEncoderBlock2D` or `UpDecoderBlock2D`: resnets, then an optional 2x resampling.
#[derive(Clone, Debug)]
struct ResnetStack<S> {
    resnets: Vec<ResnetBlock2D>,
    resample: Option<S>,
}

/// `layers` resnets from `c_in` to `c_out` channels at `vb.resnets.{j}`.
fn resnets(
    vb: &VarBuilder,
    layers: usize,
    (c_in, c_out): (usize, usize),
    cfg: &VaeConfig,
    init: Init,
) -> candle_core::Result<Vec<ResnetBlock2D>> {
    (0..layers)
        .map(|j| {
            let c = if j == 0 { c_in } else { c_out };
            ResnetBlock2D::new(&vb.pp(format!("resnets.{j}")), c, c_out, &cfg.resnet(), init)
        })
        .collect()
}

impl<S> ResnetStack<S> {
    fn run_resnets(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.resnets.iter().try_fold(x.clone(), |x, r| r.forward(&x, None))
    }

    fn resnet_flops(&self, h: usize, w: usize) -> u64 {
        self.resnets.iter().map(|r| r.conv_flops(h, w)).sum()
    }
}

/// The encoder: image [B, 3, H, W] -> moments [B, 2 * latent, H/f, W/f].
#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResnetStack<Downsample2D>>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig, init: Init) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        let mut c_in = boc[0];
        let mut down_blocks = vec![];
        for (i, &c) in boc.iter().enumerate() {
            let b = vb.pp(format!("down_blocks.{i}"));
            let resnets = resnets(&b, cfg.layers_per_block, (c_in, c), cfg, init)?;
            // The VAE's downsamplers pad bottom-right only (padding 0).
            let resample = if i + 1 < boc.len() {
                Some(Downsample2D::new(&b.pp("downsamplers.0"), c, 0, init)?)
            } else {
                None
            };
            down_blocks.push(ResnetStack { resnets, resample });
            c_in = c;
        }
        let top = *boc.last().expect("validated: non-empty");
        Ok(Encoder {
            conv_in: Conv2d::same(&vb.pp("conv_in"), cfg.in_channels, boc[0], 3, init)?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), cfg, init)?,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), cfg.norm_num_groups, top, EPS)?,
            conv_out: Conv2d::same(&vb.pp("conv_out"), top, 2 * cfg.latent_channels, 3, init)?,
        })
    }

    fn forward(&self, x: &Tensor, stage: &mut dyn FnMut(&str, &Tensor)) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        stage("enc.conv_in", &h);
        for (i, block) in self.down_blocks.iter().enumerate() {
            h = block.run_resnets(&h)?;
            if let Some(down) = &block.resample {
                h = down.forward(&h)?;
            }
            stage(&format!("enc.down{i}_out"), &h);
        }
        h = self.mid_block.forward(&h)?;
        stage("enc.mid_out", &h);
        let h = self.conv_out.forward(&self.conv_norm_out.forward(&h)?.silu()?)?;
        stage("enc.out", &h);
        Ok(h)
    }

    fn flops(&self, h: usize, w: usize) -> FlopCount {
        let mut conv = self.conv_in.flops(h, w);
        let (mut h, mut w) = (h, w);
        for block in &self.down_blocks {
            conv += block.resnet_flops(h, w);
            if let Some(down) = &block.resample {
                conv += down.flops(h, w);
                (h, w) = down.out_size(h, w);
            }
        }
        let mut f = self.mid_block.flops(h, w);
        f.conv += conv + self.conv_out.flops(h, w);
        f
    }
}

/// The decoder: latent [B, latent, h, w] -> image [B, 3, h*f, w*f].
#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<ResnetStack<Upsample2D>>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig, init: Init) -> candle_core::Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut c_in = reversed[0];
        let mut up_blocks = vec![];
        for (i, &c) in reversed.iter().enumerate() {
            let b = vb.pp(format!("up_blocks.{i}"));
            let layers = cfg.layers_per_block + 1;
            let resnets = resnets(&b, layers, (c_in, c), cfg, init)?;
            let resample = if i + 1 < reversed.len() {
                Some(Upsample2D::new(&b.pp("upsamplers.0"), c, init)?)
            } else {
                None
            };
            up_blocks.push(ResnetStack { resnets, resample });
            c_in = c;
        }
        let bottom = cfg.block_out_channels[0];
        Ok(Decoder {
            conv_in: Conv2d::same(&vb.pp("conv_in"), cfg.latent_channels, reversed[0], 3, init)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), cfg, init)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), cfg.norm_num_groups, bottom, EPS)?,
            conv_out: Conv2d::same(&vb.pp("conv_out"), bottom, cfg.out_channels, 3, init)?,
        })
    }

    fn forward(&self, z: &Tensor, stage: &mut dyn FnMut(&str, &Tensor)) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        stage("dec.conv_in", &h);
        h = self.mid_block.forward(&h)?;
        stage("dec.mid_out", &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.run_resnets(&h)?;
            if let Some(up) = &block.resample {
                let (_, _, hh, ww) = h.dims4()?;
                h = up.forward(&h, 2 * hh, 2 * ww)?;
            }
            stage(&format!("dec.up{i}_out"), &h);
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }

    fn flops(&self, h: usize, w: usize) -> FlopCount {
        let mut f = self.mid_block.flops(h, w);
        f.conv += self.conv_in.flops(h, w);
        let (mut h, mut w) = (h, w);
        for block in &self.up_blocks {
            f.conv += block.resnet_flops(h, w);
            if let Some(up) = &block.resample {
                (h, w) = (2 * h, 2 * w);
                f.conv += up.flops(h, w);
            }
        }
        f.conv += self.conv_out.flops(h, w);
        f
    }
}

/// The posterior of one encoded image: a diagonal Gaussian per latent cell.
#[derive(Clone, Debug)]
pub struct LatentDist {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDist {
    /// The reparameterised draw mean + exp(logvar / 2) * noise, `noise` ~ N(0, 1) shaped like
    /// the mean.
    pub fn sample(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        &self.mean + (&self.logvar * 0.5)?.exp()?.mul(noise)?
    }
}

/// A diffusers `AutoencoderKL`.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Builds the model from `vb` (a checkpoint, a fresh `VarMap` initialised with `init`, or a
    /// shape recorder).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let z = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::same(&vb.pp("quant_conv"), 2 * z, 2 * z, 1, init)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::same(&vb.pp("post_quant_conv"), z, z, 1, init)?)
        } else {
            None
        };
        Ok(AutoencoderKL {
            cfg: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), cfg, init)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg, init)?,
            quant_conv,
            post_quant_conv,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Image [B, in_channels, H, W] in [-1, 1] -> posterior over [B, latent, H/f, W/f].
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<LatentDist> {
        self.encode_with(x, &mut |_, _| {})
    }

    /// [`Self::encode`], handing each stage's output to `stage` under the reference fixtures'
    /// tap names (`enc.conv_in`, `enc.down{i}_out`, `enc.mid_out`, `enc.out`, `quant_conv_out`).
    pub fn encode_with(
        &self,
        x: &Tensor,
        stage: &mut dyn FnMut(&str, &Tensor),
    ) -> candle_core::Result<LatentDist> {
        let mut moments = self.encoder.forward(x, stage)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
            stage("quant_conv_out", &moments);
        }
        let z = self.cfg.latent_channels;
        Ok(LatentDist {
            mean: moments.narrow(1, 0, z)?,
            logvar: moments.narrow(1, z, z)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Latent [B, latent, h, w] (VAE space, not the pipeline's scaled space) -> image.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.decode_with(z, &mut |_, _| {})
    }

    /// [`Self::decode`] with stage outputs (`post_quant_conv_out`, `dec.conv_in`, `dec.mid_out`,
    /// `dec.up{i}_out`).
    pub fn decode_with(
        &self,
        z: &Tensor,
        stage: &mut dyn FnMut(&str, &Tensor),
    ) -> candle_core::Result<Tensor> {
        match &self.post_quant_conv {
            Some(p) => {
                let z = p.forward(z)?;
                stage("post_quant_conv_out", &z);
                self.decoder.forward(&z, stage)
            }
            None => self.decoder.forward(z, stage),
        }
    }

    /// VAE latent -> the pipeline's latent: (z - shift_factor) * scaling_factor.
    pub fn to_latent(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        (z - self.cfg.shift_factor.unwrap_or(0.0))? * self.cfg.scaling_factor
    }

    /// The pipeline's latent -> VAE latent: z / scaling_factor + shift_factor.
    pub fn from_latent(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        (z / self.cfg.scaling_factor)? + self.cfg.shift_factor.unwrap_or(0.0)
    }

    /// Latent size of an `h` x `w` image.
    pub fn latent_size(&self, h: usize, w: usize) -> (usize, usize) {
        *self.cfg.level_sizes(h, w).last().expect("at least the input size")
    }

    /// FLOPs of `encode` on one `h` x `w` image.
    pub fn encode_flops(&self, h: usize, w: usize) -> FlopCount {
        let (lh, lw) = self.latent_size(h, w);
        let mut f = self.encoder.flops(h, w);
        f.conv += self.quant_conv.as_ref().map_or(0, |q| q.flops(lh, lw));
        f
    }

    /// FLOPs of `decode` on one `h` x `w` latent.
    pub fn decode_flops(&self, h: usize, w: usize) -> FlopCount {
        let mut f = self.decoder.flops(h, w);
        f.conv += self.post_quant_conv.as_ref().map_or(0, |q| q.flops(h, w));
        f
    }
}
