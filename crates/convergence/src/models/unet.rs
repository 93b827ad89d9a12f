//! The SDXL UNet (Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution
//! Image Synthesis"), diffusers' `UNet2DConditionModel`: a convolutional encoder-decoder over the
//! VAE latent whose ResNet blocks are conditioned on the timestep embedding, with transformer
//! stages (self-attention, cross-attention to the text tokens, GEGLU MLP) at the lower
//! resolutions and skip connections from every down stage to its mirror up stage. SDXL adds
//! "micro-conditioning": the pooled text vector and the image size / crop ids (the refiner: an
//! aesthetic score instead of the target size), embedded by sinusoids and an MLP and added to the
//! timestep embedding. Key names mirror diffusers; the config's `attention_head_dim` is, for
//! legacy reasons, the number of heads.

use crate::error::{Error, Result};
use crate::models::{Conditioning, Denoiser, FlopCount, Prediction};
use crate::nn::{
    linear, timestep_embedding, Attention, AttentionShape, Conv2d, Downsample2D, FeedForward, GroupNorm,
    Init, LayerNorm, Linear, ResnetBlock2D, ResnetShape, Sinusoid, TimestepEmbedding, Upsample2D,
};
use crate::weights::{ParamList, ShapeRecorder};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// A config value given once for all blocks or per block.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value of down block `i`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i],
        }
    }

    fn fits(&self, blocks: usize) -> bool {
        match self {
            PerBlock::One(_) => true,
            PerBlock::Each(v) => v.len() == blocks,
        }
    }
}

/// `UNet2DConditionModel`'s config.json: the fields that shape the model, plus those whose
/// non-default values select variants this implementation refuses (defaults as diffusers has
/// them, i.e. SD 1.x).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct UNetConfig {
    /// Native latent side.
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    pub downsample_padding: usize,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub transformer_layers_per_block: PerBlock,
    /// The number of heads per block (diffusers' legacy name).
    pub attention_head_dim: PerBlock,
    /// Must stay unset: diffusers itself refuses it for this class.
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer `proj_in`/`proj_out` are linears (SDXL, SD2) rather than 1x1 convs (SD1).
    pub use_linear_projection: bool,
    /// `"text_time"` (SDXL) or none.
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub time_embedding_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub center_input_sample: bool,
    pub only_cross_attention: bool,
    pub dual_cross_attention: bool,
    pub mid_block_scale_factor: f64,
    pub resnet_out_scale_factor: f64,
    pub resnet_skip_time_act: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub attention_type: String,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub timestep_post_act: Option<String>,
    pub time_embedding_act_fn: Option<String>,
    pub cross_attention_norm: Option<String>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        UNetConfig {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            time_embedding_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            center_input_sample: false,
            only_cross_attention: false,
            dual_cross_attention: false,
            mid_block_scale_factor: 1.0,
            resnet_out_scale_factor: 1.0,
            resnet_skip_time_act: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            attention_type: "default".into(),
            class_embed_type: None,
            num_class_embeds: None,
            encoder_hid_dim_type: None,
            time_cond_proj_dim: None,
            timestep_post_act: None,
            time_embedding_act_fn: None,
            cross_attention_norm: None,
            reverse_transformer_layers_per_block: None,
        }
    }
}

/// Whether a down/up block has transformer stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockKind {
    Plain,
    CrossAttn,
}

fn block_kind(name: &str, plain: &str, cross: &str) -> std::result::Result<BlockKind, String> {
    match name {
        n if n == plain => Ok(BlockKind::Plain),
        n if n == cross => Ok(BlockKind::CrossAttn),
        other => Err(format!("block type `{other}` is not supported ({plain} or {cross})")),
    }
}

impl UNetConfig {
    /// `sdxl-base` and `sdxl-refiner`: the released SDXL 1.0 UNets (1024px, latent 128).
    pub fn preset(name: &str) -> Option<Self> {
        let s = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let sdxl = UNetConfig {
            sample_size: Some(128),
            use_linear_projection: true,
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            ..Default::default()
        };
        match name.to_ascii_lowercase().as_str() {
            "sdxl-base" => Some(UNetConfig {
                down_block_types: s(&["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
                up_block_types: s(&["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
                block_out_channels: vec![320, 640, 1280],
                cross_attention_dim: 2048,
                transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
                attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
                // Pooled CLIP-G (1280) + 6 size/crop ids x 256.
                projection_class_embeddings_input_dim: Some(2816),
                ..sdxl
            }),
            "sdxl-refiner" => Some(UNetConfig {
                down_block_types: s(&[
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                ]),
                up_block_types: s(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
                block_out_channels: vec![384, 768, 1536, 1536],
                cross_attention_dim: 1280,
                transformer_layers_per_block: PerBlock::One(4),
                attention_head_dim: PerBlock::Each(vec![6, 12, 24, 24]),
                // Pooled CLIP-G (1280) + 5 ids (size, crop, aesthetic score) x 256.
                projection_class_embeddings_input_dim: Some(2560),
                ..sdxl
            }),
            _ => None,
        }
    }

    pub fn preset_names() -> Vec<String> {
        ["sdxl-base", "sdxl-refiner"].map(String::from).to_vec()
    }

    fn blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Heads of down block `i` (`attention_head_dim` is the head count).
    pub fn heads(&self, i: usize) -> usize {
        self.attention_head_dim.get(i)
    }

    /// Width of the timestep embedding every resnet is conditioned on.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(4 * self.block_out_channels[0])
    }

    fn down_kind(&self, i: usize) -> BlockKind {
        block_kind(&self.down_block_types[i], "DownBlock2D", "CrossAttnDownBlock2D").expect("validated")
    }

    fn up_kind(&self, i: usize) -> BlockKind {
        block_kind(&self.up_block_types[i], "UpBlock2D", "CrossAttnUpBlock2D").expect("validated")
    }

    fn text_time(&self) -> bool {
        self.addition_embed_type.is_some()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_blocks()?;
        self.validate_variant()?;
        if self.text_time()
            && (self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none())
        {
            return Err("addition_embed_type `text_time` needs addition_time_embed_dim and \
                        projection_class_embeddings_input_dim"
                .into());
        }
        Ok(())
    }

    fn validate_blocks(&self) -> std::result::Result<(), String> {
        let n = self.blocks();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            block_kind(t, "DownBlock2D", "CrossAttnDownBlock2D")?;
        }
        for t in &self.up_block_types {
            block_kind(t, "UpBlock2D", "CrossAttnUpBlock2D")?;
        }
        let per_block = [
            ("layers_per_block", &self.layers_per_block),
            ("transformer_layers_per_block", &self.transformer_layers_per_block),
            ("attention_head_dim", &self.attention_head_dim),
        ];
        if let Some((name, _)) = per_block.iter().find(|(_, v)| !v.fits(n)) {
            return Err(format!("`{name}` must give one value or one per block ({n})"));
        }
        let groups = self.norm_num_groups;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let heads = self.heads(i);
            if groups == 0 || !c.is_multiple_of(groups) || heads == 0 || !c.is_multiple_of(heads) {
                return Err(format!(
                    "block {i}: {c} channels must split into norm_num_groups {groups} and {heads} heads"
                ));
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        Ok(())
    }

    /// Refuses the `UNet2DConditionModel` options that change the computation in ways SDXL
    /// (and SD 1.x/2.x) do not use.
    fn validate_variant(&self) -> std::result::Result<(), String> {
        let unsupported = [
            ("num_attention_heads", self.num_attention_heads.is_some()),
            ("mid_block_type", self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn")),
            ("addition_embed_type", !matches!(self.addition_embed_type.as_deref(), None | Some("text_time"))),
            ("act_fn", self.act_fn != "silu"),
            ("center_input_sample", self.center_input_sample),
            ("only_cross_attention", self.only_cross_attention),
            ("dual_cross_attention", self.dual_cross_attention),
            ("mid_block_scale_factor", self.mid_block_scale_factor != 1.0),
            ("resnet_out_scale_factor", self.resnet_out_scale_factor != 1.0),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            ("resnet_time_scale_shift", self.resnet_time_scale_shift != "default"),
            ("time_embedding_type", self.time_embedding_type != "positional"),
            ("attention_type", self.attention_type != "default"),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("time_embedding_act_fn", self.time_embedding_act_fn.is_some()),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            ("reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block.is_some()),
        ];
        match unsupported.iter().find(|(_, bad)| *bad) {
            Some((name, _)) => Err(format!("`{name}`: this value is not supported (SDXL-style UNets only)")),
            None => Ok(()),
        }
    }

    fn resnet(&self) -> ResnetShape {
        ResnetShape { groups: self.norm_num_groups, eps: self.norm_eps, temb: Some(self.time_embed_dim()) }
    }

    /// Parameters (diffusers layout) from the real construction code, without allocating.
    pub fn param_list(&self) -> Result<ParamList> {
        let rec = ShapeRecorder::new();
        UNet2DConditionModel::new(rec.var_builder(), self, Init::Default)?;
        Ok(rec.params())
    }

    /// Forward FLOPs at an `h` x `w` latent with `text_len` text tokens, batch 1, counted as
    /// FlopCounterMode counts them.
    pub fn flops(&self, h: usize, w: usize, text_len: usize) -> Result<FlopCount> {
        let rec = ShapeRecorder::new();
        Ok(UNet2DConditionModel::new(rec.var_builder(), self, Init::Default)?.flops(h, w, text_len))
    }

    /// The latent size at each level of the pyramid (level i: down block i and its mirror up
    /// block) for an `h` x `w` latent.
    pub fn level_sizes(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        let p = self.downsample_padding;
        let mut sizes = vec![(h, w)];
        for _ in 1..self.blocks() {
            let (h, w) = *sizes.last().expect("starts non-empty");
            sizes.push((Downsample2D::side(h, p), Downsample2D::side(w, p)));
        }
        sizes
    }

    /// The levels with transformer layers (down, mid and up together), highest resolution first.
    pub fn attention_levels(&self, h: usize, w: usize) -> Result<Vec<AttentionLevel>> {
        self.validate().map_err(Error::msg)?;
        let n = self.blocks();
        let sizes = self.level_sizes(h, w);
        let cross = |kind: BlockKind, stages: usize| if kind == BlockKind::CrossAttn { stages } else { 0 };
        let levels = (0..n).filter_map(|i| {
            let per_block = self.layers_per_block.get(i);
            // The down block's stages, its mirror up block's (one more), and the mid block's one.
            let stages = cross(self.down_kind(i), per_block)
                + cross(self.up_kind(n - 1 - i), per_block + 1)
                + usize::from(i + 1 == n);
            let (heads, layers) = (self.heads(i), stages * self.transformer_layers_per_block.get(i));
            let head_dim = self.block_out_channels[i] / heads;
            (layers > 0).then_some(AttentionLevel { size: sizes[i], heads, head_dim, layers })
        });
        Ok(levels.collect())
    }
}

/// One resolution at which the UNet attends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLevel {
    /// Latent (h, w) at this level: h * w image tokens.
    pub size: (usize, usize),
    pub heads: usize,
    pub head_dim: usize,
    /// Transformer blocks at this level in the whole network.
    pub layers: usize,
}

impl AttentionLevel {
    pub fn tokens(&self) -> usize {
        self.size.0 * self.size.1
    }
}

/// SDXL's added conditioning (`added_cond_kwargs`).
#[derive(Clone, Debug)]
pub struct TextTime {
    /// Pooled text vector [B, P] (SDXL: CLIP-G `text_embeds`, 1280).
    pub text_embeds: Tensor,
    /// Micro-conditioning ids [B, n]: [orig_h, orig_w, crop_top, crop_left, target_h, target_w]
    /// (refiner: [orig_h, orig_w, crop_top, crop_left, aesthetic_score]).
    pub time_ids: Tensor,
}

/// The LayerNorm eps of the transformer blocks and the GroupNorm eps before `proj_in`
/// (diffusers' `Transformer2DModel` defaults, which the UNet blocks do not override).
const BLOCK_LN_EPS: f64 = 1e-5;
const TRANSFORMER_GN_EPS: f64 = 1e-6;

/// diffusers' `BasicTransformerBlock` as the UNet uses it: pre-LN self-attention, cross-attention
/// to the text tokens and a GEGLU MLP, each residual; q/k/v without bias.
#[derive(Clone, Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
        init: Init,
    ) -> candle_core::Result<Self> {
        let shape = AttentionShape { dim, heads, head_dim: dim / heads, bias: false, qk_norm: false };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, BLOCK_LN_EPS)?,
            attn1: Attention::with_shape(vb.pp("attn1"), &shape, init)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, BLOCK_LN_EPS)?,
            attn2: Attention::cross(vb.pp("attn2"), &shape, context_dim, init)?,
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, BLOCK_LN_EPS)?,
            ff: FeedForward::geglu(vb.pp("ff"), dim, 4 * dim, dim, init)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn1.forward(&self.norm1.forward(x)?, None)?)?;
        let x = (&x + self.attn2.forward_context(&self.norm2.forward(&x)?, context, None)?)?;
        &x + self.ff.forward(&self.norm3.forward(&x)?)?
    }

    fn flops(&self, tokens: usize, text: usize) -> FlopCount {
        let (l1, a1) = self.attn1.flops(tokens, tokens);
        let (l2, a2) = self.attn2.flops(tokens, text);
        FlopCount { linear: l1 + l2 + self.ff.flops(tokens), attention: a1 + a2, conv: 0 }
    }
}

/// diffusers' `Transformer2DModel` over a feature map: GroupNorm, `proj_in` to tokens, the
/// transformer blocks, `proj_out` back, plus the input. A 1x1-conv projection (SD 1.x) is the
/// same per-position linear map, so both are kept as linears applied to the tokens.
#[derive(Clone, Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
    /// The projections are stored (and counted by torch) as 1x1 convolutions.
    conv_projection: bool,
}

/// A projection at `vb`: a linear, or a 1x1 conv [out, in, 1, 1] viewed as one.
fn projection(
    vb: &VarBuilder,
    c_in: usize,
    c_out: usize,
    conv: bool,
    init: Init,
) -> candle_core::Result<Linear> {
    if !conv {
        return linear(vb, c_in, c_out, true, init);
    }
    let weight = init.tensor(vb, &[c_out, c_in, 1, 1], "weight")?.squeeze(3)?.squeeze(2)?;
    Ok(Linear::new(weight, Some(vb.get_with_hints(c_out, "bias", init.bias(c_in))?)))
}

impl Transformer2D {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        cfg: &UNetConfig,
        init: Init,
    ) -> candle_core::Result<Self> {
        let conv = !cfg.use_linear_projection;
        let blocks = (0..layers)
            .map(|k| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{k}")),
                    channels,
                    heads,
                    cfg.cross_attention_dim,
                    init,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Transformer2D {
            norm: GroupNorm::new(&vb.pp("norm"), cfg.norm_num_groups, channels, TRANSFORMER_GN_EPS)?,
            proj_in: projection(&vb.pp("proj_in"), channels, channels, conv, init)?,
            blocks,
            proj_out: projection(&vb.pp("proj_out"), channels, channels, conv, init)?,
            conv_projection: conv,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        let mut t = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let y = self.proj_out.forward(&t)?.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        x + y
    }

    fn flops(&self, h: usize, w: usize, text: usize) -> FlopCount {
        let tokens = h * w;
        let mut f: FlopCount = self.blocks.iter().map(|b| b.flops(tokens, text)).sum();
        let proj = self.proj_in.flops(tokens) + self.proj_out.flops(tokens);
        if self.conv_projection {
            f.conv += proj;
        } else {
            f.linear += proj;
        }
        f
    }
}

/// One resnet (`resnets.{j}`) and, in cross-attention blocks, the transformer after it
/// (`attentions.{j}`).
#[derive(Clone, Debug)]
struct Stage {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2D>,
}

impl Stage {
    /// `attention`: (heads, transformer layers) for a cross-attention stage.
    fn new(
        vb: &VarBuilder,
        j: usize,
        (c_in, c_out): (usize, usize),
        attention: Option<(usize, usize)>,
        cfg: &UNetConfig,
        init: Init,
    ) -> candle_core::Result<Self> {
        let attention = match attention {
            Some((heads, layers)) => {
                Some(Transformer2D::new(vb.pp(format!("attentions.{j}")), c_out, heads, layers, cfg, init)?)
            }
            None => None,
        };
        Ok(Stage {
            resnet: ResnetBlock2D::new(&vb.pp(format!("resnets.{j}")), c_in, c_out, &cfg.resnet(), init)?,
            attention,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.resnet.forward(x, Some(temb))?;
        match &self.attention {
            Some(a) => a.forward(&x, context),
            None => Ok(x),
        }
    }

    fn flops(&self, h: usize, w: usize, text: usize) -> FlopCount {
        let resnet = FlopCount {
            linear: self.resnet.linear_flops(),
            attention: 0,
            conv: self.resnet.conv_flops(h, w),
        };
        resnet + self.attention.as_ref().map_or_else(FlopCount::default, |a| a.flops(h, w, text))
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`: stages, then a stride-2 conv but in the last block.
#[derive(Clone, Debug)]
struct DownBlock {
    stages: Vec<Stage>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    fn new(vb: VarBuilder, i: usize, c_in: usize, cfg: &UNetConfig, init: Init) -> candle_core::Result<Self> {
        let c = cfg.block_out_channels[i];
        let attention = (cfg.down_kind(i) == BlockKind::CrossAttn)
            .then(|| (cfg.heads(i), cfg.transformer_layers_per_block.get(i)));
        let stages = (0..cfg.layers_per_block.get(i))
            .map(|j| Stage::new(&vb, j, (if j == 0 { c_in } else { c }, c), attention, cfg, init))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let downsampler = if i + 1 < cfg.blocks() {
            Some(Downsample2D::new(&vb.pp("downsamplers.0"), c, cfg.downsample_padding, init)?)
        } else {
            None
        };
        Ok(DownBlock { stages, downsampler })
    }

    /// Runs the block, pushing every stage's output (and the downsampled one) as a skip.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for stage in &self.stages {
            x = stage.forward(&x, temb, context)?;
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }

    /// (FLOPs, output size) at an `h` x `w` input.
    fn flops(&self, h: usize, w: usize, text: usize) -> (FlopCount, (usize, usize)) {
        let mut f: FlopCount = self.stages.iter().map(|s| s.flops(h, w, text)).sum();
        match &self.downsampler {
            Some(d) => {
                f.conv += d.flops(h, w);
                (f, d.out_size(h, w))
            }
            None => (f, (h, w)),
        }
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`: each stage first concatenates the matching skip on the
/// channels; then a 2x upsampling but in the last block.
#[derive(Clone, Debug)]
struct UpBlock {
    stages: Vec<Stage>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// Up block `i` mirrors down block `n - 1 - i`; `c_prev` is the previous up block's width.
    fn new(
        vb: VarBuilder,
        i: usize,
        c_prev: usize,
        cfg: &UNetConfig,
        init: Init,
    ) -> candle_core::Result<Self> {
        let n = cfg.blocks();
        let mirror = n - 1 - i;
        let c = cfg.block_out_channels[mirror];
        // The last stage's skip comes from the block below the mirror (or conv_in).
        let c_skip_last = cfg.block_out_channels[mirror.saturating_sub(1)];
        let layers = cfg.layers_per_block.get(mirror) + 1;
        let attention = (cfg.up_kind(i) == BlockKind::CrossAttn)
            .then(|| (cfg.heads(mirror), cfg.transformer_layers_per_block.get(mirror)));
        let stages = (0..layers)
            .map(|j| {
                let c_in = if j == 0 { c_prev } else { c };
                let c_skip = if j + 1 == layers { c_skip_last } else { c };
                Stage::new(&vb, j, (c_in + c_skip, c), attention, cfg, init)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let upsampler =
            if i + 1 < n { Some(Upsample2D::new(&vb.pp("upsamplers.0"), c, init)?) } else { None };
        Ok(UpBlock { stages, upsampler })
    }

    /// Runs the block, consuming its skips from the end of `skips`; the upsampler resizes to the
    /// next skip's size.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for stage in &self.stages {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("UNet: ran out of skip connections");
            };
            x = stage.forward(&Tensor::cat(&[&x, &skip], 1)?, temb, context)?;
        }
        if let Some(up) = &self.upsampler {
            let (_, _, h, w) = x.dims4()?;
            let (h, w) = match skips.last() {
                Some(s) => (s.dim(2)?, s.dim(3)?),
                None => (2 * h, 2 * w),
            };
            x = up.forward(&x, h, w)?;
        }
        Ok(x)
    }

    /// FLOPs at an `h` x `w` input, upsampling to `target`.
    fn flops(&self, h: usize, w: usize, text: usize, target: (usize, usize)) -> FlopCount {
        let mut f: FlopCount = self.stages.iter().map(|s| s.flops(h, w, text)).sum();
        f.conv += self.upsampler.as_ref().map_or(0, |u| u.flops(target.0, target.1));
        f
    }
}

/// An SDXL-style `UNet2DConditionModel`.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    cfg: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    /// `UNetMidBlock2DCrossAttn`: resnet + transformer, then a resnet.
    mid_block: Vec<Stage>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (a checkpoint, a fresh `VarMap` initialised with `init`, or a
    /// shape recorder).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, init: Init) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let (boc, n) = (&cfg.block_out_channels, cfg.blocks());
        let temb = cfg.time_embed_dim();
        let add_embedding = match cfg.projection_class_embeddings_input_dim.filter(|_| cfg.text_time()) {
            Some(dim) => Some(TimestepEmbedding::new(vb.pp("add_embedding"), dim, temb, init)?),
            None => None,
        };
        let down_blocks = (0..n)
            .map(|i| {
                DownBlock::new(vb.pp(format!("down_blocks.{i}")), i, boc[i.saturating_sub(1)], cfg, init)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let up_blocks = (0..n)
            .map(|i| UpBlock::new(vb.pp(format!("up_blocks.{i}")), i, boc[(n - i).min(n - 1)], cfg, init))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(UNet2DConditionModel {
            cfg: cfg.clone(),
            conv_in: Conv2d::same(&vb.pp("conv_in"), cfg.in_channels, boc[0], cfg.conv_in_kernel, init)?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], temb, init)?,
            add_embedding,
            down_blocks,
            mid_block: Self::mid_block(&vb.pp("mid_block"), cfg, init)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                boc[0],
                cfg.norm_eps,
            )?,
            conv_out: Conv2d::same(&vb.pp("conv_out"), boc[0], cfg.out_channels, cfg.conv_out_kernel, init)?,
        })
    }

    fn mid_block(vb: &VarBuilder, cfg: &UNetConfig, init: Init) -> candle_core::Result<Vec<Stage>> {
        let last = cfg.blocks() - 1;
        let c = cfg.block_out_channels[last];
        let attention = (cfg.heads(last), cfg.transformer_layers_per_block.get(last));
        Ok(vec![
            Stage::new(vb, 0, (c, c), Some(attention), cfg, init)?,
            Stage::new(vb, 1, (c, c), None, cfg, init)?,
        ])
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The conditioning vector [B, time_embed_dim]: TimestepEmbedding(sinusoid(t)), plus, for
    /// SDXL, add_embedding(concat[text_embeds, sinusoids of the time ids]).
    fn conditioning(
        &self,
        t: &Tensor,
        added: Option<&TextTime>,
        dtype: candle_core::DType,
        stage: &mut dyn FnMut(&str, &Tensor),
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let t_proj =
            timestep_embedding(t, &Sinusoid::new(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift))?
                .to_dtype(dtype)?;
        stage("time_proj", &t_proj);
        let emb = self.time_embedding.forward(&t_proj)?;
        stage("time_embedding", &emb);
        let Some(mlp) = &self.add_embedding else { return Ok(emb) };
        let Some(added) = added else {
            candle_core::bail!("this UNet (addition_embed_type text_time) needs text_embeds and time_ids");
        };
        emb + self.added_embedding(mlp, added, dtype, stage)?
    }

    /// SDXL's add_embedding(concat[text_embeds, flattened sinusoids of the time ids]).
    fn added_embedding(
        &self,
        mlp: &TimestepEmbedding,
        TextTime { text_embeds, time_ids }: &TextTime,
        dtype: candle_core::DType,
        stage: &mut dyn FnMut(&str, &Tensor),
    ) -> candle_core::Result<Tensor> {
        let c = &self.cfg;
        let width = c.addition_time_embed_dim.expect("validated: text_time has a width");
        let sinusoid = Sinusoid::new(width, c.flip_sin_to_cos, c.freq_shift);
        let ids = timestep_embedding(&time_ids.flatten_all()?, &sinusoid)?
            .reshape((text_embeds.dim(0)?, ()))?
            .to_dtype(dtype)?;
        stage("add_time_proj", &ids);
        let expected = c.projection_class_embeddings_input_dim.expect("validated: text_time has a width");
        let got = text_embeds.dim(1)? + ids.dim(1)?;
        if got != expected {
            candle_core::bail!(
                "text_embeds ({}) + {} time ids x {width} = {got} values, but add_embedding takes {expected}",
                text_embeds.dim(1)?,
                time_ids.dim(1)?
            );
        }
        let aug = mlp.forward(&Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &ids], 1)?)?;
        stage("add_embedding", &aug);
        Ok(aug)
    }

    /// Noise prediction [B, out, H, W] for latent x [B, in, H, W], timestep t (scalar or [B],
    /// the scheduler's discrete timestep used as is), text tokens [B, T, cross_attention_dim] and
    /// SDXL's added conditioning.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<&TextTime>,
    ) -> candle_core::Result<Tensor> {
        self.forward_with(x, t, context, added, &mut |_, _| {})
    }

    /// [`Self::forward`], handing each stage's output to `stage` under the reference fixtures'
    /// tap names (`time_proj`, `time_embedding`, `add_time_proj`, `add_embedding`, `conv_in`,
    /// `down{i}_out`, `mid_out`, `up{i}_out`).
    pub fn forward_with(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<&TextTime>,
        stage: &mut dyn FnMut(&str, &Tensor),
    ) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let t = if t.rank() == 0 { t.broadcast_as(b)? } else { t.clone() };
        let temb = self.conditioning(&t, added, x.dtype(), stage)?;
        let mut h = self.conv_in.forward(x)?;
        stage("conv_in", &h);
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            h = block.forward(&h, &temb, context, &mut skips)?;
            stage(&format!("down{i}_out"), &h);
        }
        for s in &self.mid_block {
            h = s.forward(&h, &temb, context)?;
        }
        stage("mid_out", &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward(&h, &temb, context, &mut skips)?;
            stage(&format!("up{i}_out"), &h);
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }

    /// Forward FLOPs (batch 1) at an `h` x `w` latent with `text` text tokens.
    pub fn flops(&self, h: usize, w: usize, text: usize) -> FlopCount {
        let embed = self.time_embedding.flops(1) + self.add_embedding.as_ref().map_or(0, |m| m.flops(1));
        let mut f = FlopCount { linear: embed, attention: 0, conv: self.conv_in.flops(h, w) };
        // The spatial size of every skip, in push order.
        let mut sizes = vec![(h, w)];
        let mut size = (h, w);
        for block in &self.down_blocks {
            let (bf, out) = block.flops(size.0, size.1, text);
            f += bf;
            sizes.extend(std::iter::repeat_n(size, block.stages.len()));
            if block.downsampler.is_some() {
                sizes.push(out);
            }
            size = out;
        }
        f += self.mid_block.iter().map(|s| s.flops(size.0, size.1, text)).sum();
        for block in &self.up_blocks {
            sizes.truncate(sizes.len().saturating_sub(block.stages.len()));
            let target = sizes.last().copied().unwrap_or((2 * size.0, 2 * size.1));
            f += block.flops(size.0, size.1, text, target);
            if block.upsampler.is_some() {
                size = target;
            }
        }
        f.conv += self.conv_out.flops(size.0, size.1);
        f
    }
}

impl Denoiser for UNet2DConditionModel {
    fn forward(&self, x: &Tensor, t: &Tensor, cond: &Conditioning) -> candle_core::Result<Tensor> {
        let Some(context) = &cond.text_tokens else {
            candle_core::bail!("the UNet needs text tokens (encoder_hidden_states)");
        };
        let added = match (&cond.pooled, &cond.time_ids) {
            (Some(text_embeds), Some(time_ids)) => {
                Some(TextTime { text_embeds: text_embeds.clone(), time_ids: time_ids.clone() })
            }
            _ => None,
        };
        UNet2DConditionModel::forward(self, x, t, context, added.as_ref())
    }

    /// The noise, as SDXL base and refiner are trained (the sampler refuses a scheduler config
    /// with another `prediction_type`).
    fn prediction(&self) -> Prediction {
        Prediction::Epsilon
    }
}
