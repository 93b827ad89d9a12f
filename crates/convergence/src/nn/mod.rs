//! Building blocks, each written once: every architecture in `models/` is assembled from these.

pub mod adaln;
pub mod attention;
pub mod embeddings;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod patchify;

pub use adaln::{gated_residual, modulate};
pub use attention::{merge_heads, sdpa, sdpa_with_probs, split_heads, Attention};
pub use embeddings::{sincos_2d, timestep_embedding, LabelEmbedding, Sinusoid, TimestepEmbedding};
pub use linear::{linear, Init};
pub use mlp::FeedForward;
pub use norm::{layer_norm, rms_norm};
pub use patchify::{patchify, unpatchify, PatchOrder};
