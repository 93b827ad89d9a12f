//! Building blocks, each written once: every architecture in `models/` is assembled from these.

pub mod adaln;
pub mod attention;
pub mod capture;
pub mod embeddings;
pub mod linear;
pub mod mlp;
pub mod mmdit;
pub mod norm;
pub mod patchify;
pub mod rope;

pub use adaln::{adaln_zero, gated_residual, modulate, AdaLayerNormContinuous};
pub use attention::{
    joint_attention, merge_heads, sdpa, sdpa_with_probs, split_heads, Attention, AttentionShape,
    JointAttention, Qkv, QkvProjection,
};
pub use capture::{AttentionCapture, CaptureSite, JointAttentionMap, JointLayout, TokenOrder};
pub use embeddings::{
    sincos_2d, sincos_2d_window, timestep_embedding, LabelEmbedding, Sinusoid, TextProjection,
    TimeTextEmbedding, TimestepEmbedding,
};
pub use linear::{linear, Init, Linear};
pub use mlp::FeedForward;
pub use mmdit::{JointBlockConfig, JointTransformerBlock};
pub use norm::{layer_norm, rms_norm};
pub use patchify::{patchify, unpatchify, PatchEmbed, PatchOrder};
pub use rope::Rope;
