//! Pictures from tensors and numbers: image grids, line plots and attention heatmaps, all
//! written as PNG with our own drawing code (a built-in 5x7 font, no system fonts).

pub mod attention;
mod font;
pub mod grid;
pub mod heatmap;
pub mod plot;

pub use grid::{save_grid, save_image, save_image_with_text, tensor_to_u8, to_u8};
pub use heatmap::{blend, heatmap, save_heatmap, viridis, Backdrop};
pub use plot::{LinePlot, Series};
