//! Building blocks, each written once: every architecture in `models/` is assembled from these.

pub mod activation;
pub mod adaln;
pub mod attention;
pub mod capture;
pub mod conv;
pub mod embeddings;
pub mod linear;
pub mod mlp;
pub mod mmdit;
pub mod norm;
pub mod patchify;
pub mod rope;

pub use activation::Activation;
pub use adaln::{adaln_zero, gated_residual, modulate, modulated_norm, AdaLayerNormContinuous};
pub use attention::{
    biased_attention_probs, composed_sdpa, joint_attention, merge_heads, sdpa, split_heads, Attention,
    AttentionShape, BiasedSelfAttention, JointAttention, Qkv, QkvNames, QkvProjection,
};
pub use capture::{AttentionCapture, CaptureSite, JointAttentionMap, JointLayout, TokenOrder};
pub use conv::{Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, ResnetShape, Upsample2D};
pub use embeddings::{
    sincos_2d, sincos_2d_window, timestep_embedding, LabelEmbedding, SincosPositions, Sinusoid,
    TextProjection, TimeTextEmbedding, TimestepEmbedding,
};
pub use linear::{linear, Init, Linear};
pub use mlp::FeedForward;
pub use mmdit::{JointBlockConfig, JointTransformerBlock};
pub use norm::{layer_norm, layer_norm_affine, rms_norm, LayerNorm};
pub use patchify::{patchify, unpatchify, PatchEmbed, PatchOrder};
pub use rope::Rope;
