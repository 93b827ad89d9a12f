//! The joint-attention maps of a text-to-image MMDiT as pictures. One softmax over [image, text]
//! keys holds four kinds of attention (image->image, image->text, text->image, text->text); the
//! capture ([`crate::nn::AttentionCapture`]) keeps them as quadrants per layer and model call,
//! and this module draws, for chosen layers:
//!
//! - `quadrants_layer{L}_step{S}.png`: the whole [image + text] x [image + text] matrix (rows are
//!   queries, columns keys, image tokens first whatever the model's order), one colour scale,
//!   the text tokens named along their rows and columns, and each quadrant's share of the
//!   queries' attention;
//! - `token{k}_{word}_layer{L}.png`: for text token k, how much each image patch attends to it
//!   (its image->text column on the patch grid), over the generated image: "where does 'red'
//!   look?";
//! - `tokens_layer{L}.png`: all of those side by side, after the image itself.
//!
//! Maps are of one image of the batch (the conditional half under classifier-free guidance), at
//! one sampling step or averaged over all of them, averaged over heads or per kept head (then
//! every name ends in `_head{h}`).

use super::font::{draw_text, draw_text_vertical, text_height, text_width};
use super::grid::write_png;
use super::heatmap::{blend, heatmap, to_rgb_image, viridis};
use crate::error::{Error, Result};
use crate::nn::JointAttentionMap;
use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// Which sampling step's maps to draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepChoice {
    /// The maps of one model call (0-based; one call per sampling step).
    Call(usize),
    /// The last call recorded: the step where the image is formed.
    Last,
    /// The mean over every call recorded.
    Mean,
}

/// One layer's attention for one image at the chosen step(s). Each quadrant is [h, queries,
/// keys], h = 1 for the mean over heads, else one slot per kept head.
#[derive(Clone, Debug)]
pub struct LayerAttention {
    pub layer: usize,
    /// The kept heads, slot by slot; `None` for the mean over heads.
    pub heads: Option<Vec<usize>>,
    /// The model calls (sampling steps, 0-based) averaged.
    pub calls: Vec<usize>,
    pub image_to_image: Tensor,
    pub image_to_text: Tensor,
    pub text_to_image: Tensor,
    pub text_to_text: Tensor,
}

fn list(v: &[usize]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

/// The distinct layers present in `maps`, sorted.
pub fn captured_layers(maps: &[JointAttentionMap]) -> Vec<usize> {
    let mut layers: Vec<usize> = maps.iter().map(|m| m.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    layers
}

impl LayerAttention {
    /// The maps of `layer` for batch element `batch` (under classifier-free guidance the model
    /// sees [uncond, cond]: the conditional image is the second half) at `step`.
    pub fn select(maps: &[JointAttentionMap], layer: usize, batch: usize, step: StepChoice) -> Result<Self> {
        let of_layer: Vec<&JointAttentionMap> = maps.iter().filter(|m| m.layer == layer).collect();
        if of_layer.is_empty() {
            return Err(Error::msg(format!(
                "attention: layer {layer} was not captured (captured layers: {})",
                list(&captured_layers(maps))
            )));
        }
        let chosen: Vec<&JointAttentionMap> = match step {
            StepChoice::Mean => of_layer,
            StepChoice::Last => {
                let last = of_layer.iter().map(|m| m.call).max().unwrap_or(0);
                of_layer.into_iter().filter(|m| m.call == last).collect()
            }
            StepChoice::Call(c) => {
                let found: Vec<_> = of_layer.iter().copied().filter(|m| m.call == c).collect();
                if found.is_empty() {
                    let calls: Vec<usize> = of_layer.iter().map(|m| m.call).collect();
                    return Err(Error::msg(format!(
                        "attention: layer {layer} has no map for step {} (steps captured: {})",
                        c + 1,
                        list(&calls.iter().map(|c| c + 1).collect::<Vec<_>>())
                    )));
                }
                found
            }
        };
        let b = chosen[0].image_to_text.dim(0)?;
        if batch >= b {
            return Err(Error::msg(format!("attention: batch element {batch} of a batch of {b}")));
        }
        let mean = |get: fn(&JointAttentionMap) -> &Tensor| -> Result<Tensor> {
            let parts = chosen
                .iter()
                .map(|m| get(m).get(batch)?.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((Tensor::stack(&parts, 0)?.sum(0)? / parts.len() as f64)?)
        };
        Ok(LayerAttention {
            layer,
            heads: chosen[0].heads.clone(),
            calls: chosen.iter().map(|m| m.call).collect(),
            image_to_image: mean(|m| &m.image_to_image)?,
            image_to_text: mean(|m| &m.image_to_text)?,
            text_to_image: mean(|m| &m.text_to_image)?,
            text_to_text: mean(|m| &m.text_to_text)?,
        })
    }

    /// Head slots: 1 for the mean, else the number of kept heads.
    pub fn slots(&self) -> usize {
        self.image_to_image.dim(0).unwrap_or(1)
    }

    /// (image tokens, text tokens).
    pub fn tokens(&self) -> Result<(usize, usize)> {
        let (_, n, t) = self.image_to_text.dims3()?;
        Ok((n, t))
    }

    /// The full matrix [h, N + T, N + T] of slot-wise probabilities, image tokens first: rows are
    /// queries, columns keys; every row sums to one.
    pub fn joint(&self) -> Result<Tensor> {
        let top = Tensor::cat(&[&self.image_to_image, &self.image_to_text], 2)?;
        let bottom = Tensor::cat(&[&self.text_to_image, &self.text_to_text], 2)?;
        Ok(Tensor::cat(&[top, bottom], 1)?)
    }

    /// How much each image patch attends to text token `k` in head slot `slot`: its image->text
    /// column, row-major on the gh x gw patch grid (image token i is patch (i / gw, i % gw)).
    pub fn token_map(&self, slot: usize, k: usize, grid: (usize, usize)) -> Result<Tensor> {
        let (n, t) = self.tokens()?;
        if k >= t || grid.0 * grid.1 != n {
            return Err(Error::msg(format!(
                "attention: token {k} of {t}, or a {}x{} grid for {n} image tokens",
                grid.0, grid.1
            )));
        }
        Ok(self.image_to_text.get(slot)?.narrow(1, k, 1)?.reshape(grid)?)
    }

    /// The share of the image queries' attention (mean over patches) that goes to text token `k`.
    pub fn token_share(&self, slot: usize, k: usize) -> Result<f32> {
        Ok(self.image_to_text.get(slot)?.narrow(1, k, 1)?.mean_all()?.to_scalar::<f32>()?)
    }

    /// The mean row mass of each quadrant: [image->image, image->text, text->image, text->text]
    /// (the first two add up to one, as do the last two).
    pub fn quadrant_shares(&self, slot: usize) -> Result<[f32; 4]> {
        let share = |q: &Tensor| -> Result<f32> { Ok(q.get(slot)?.sum(1)?.mean_all()?.to_scalar::<f32>()?) };
        Ok([
            share(&self.image_to_image)?,
            share(&self.image_to_text)?,
            share(&self.text_to_image)?,
            share(&self.text_to_text)?,
        ])
    }

    /// "step 20", "steps 1-20 (mean)".
    fn step_label(&self) -> String {
        match self.calls.as_slice() {
            [c] => format!("step {}", c + 1),
            calls => {
                let (lo, hi) = (calls.iter().min().copied(), calls.iter().max().copied());
                format!("mean of steps {}-{}", lo.unwrap_or(0) + 1, hi.unwrap_or(0) + 1)
            }
        }
    }

    fn step_tag(&self) -> String {
        match self.calls.as_slice() {
            [c] => (c + 1).to_string(),
            _ => "all".into(),
        }
    }

    fn head_label(&self, slot: usize) -> String {
        match &self.heads {
            None => "mean over heads".into(),
            Some(h) => format!("head {}", h[slot]),
        }
    }

    fn head_tag(&self, slot: usize) -> String {
        match &self.heads {
            None => String::new(),
            Some(h) => format!("_head{}", h[slot]),
        }
    }
}

/// A token's text as part of a file name: letters and digits only ("<eos>" -> "eos").
pub fn file_word(text: &str) -> String {
    let w: String = text.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    if w.is_empty() {
        "tok".into()
    } else {
        w
    }
}

/// The positions of a tokenized prompt that get their own heatmap: every non-padding token
/// (`attention_mask` 1) except a leading start token (`<bos>`, `<|startoftext|>`); the end token
/// stays, since the pooled vector is read from it.
pub fn word_positions(texts: &[String], attention_mask: &[u32]) -> Vec<usize> {
    let start = |t: &str| matches!(t, "<bos>" | "<s>" | "<|startoftext|>");
    (0..texts.len().min(attention_mask.len()))
        .filter(|&k| attention_mask[k] == 1 && !(k == 0 && start(&texts[0])))
        .collect()
}

/// What the pictures are drawn from besides the maps.
#[derive(Clone, Copy, Debug)]
pub struct AttentionFigures<'a> {
    /// The generated image [C, H, W] (or [1, C, H, W]) in [-1, 1].
    pub image: &'a Tensor,
    /// The image tokens' patch grid (rows, columns).
    pub grid: (usize, usize),
    /// The text of every text token, in sequence order (padding included).
    pub tokens: &'a [String],
    /// Positions in `tokens` that get a heatmap over the image (see [`word_positions`]).
    pub words: &'a [usize],
    /// Upscaling of the image for `image.png` and the overlays (nearest neighbour).
    pub scale: usize,
    /// Weight of a heatmap blended over the image.
    pub alpha: f32,
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const GREY: Rgb<u8> = Rgb([170, 170, 170]);
const BACKGROUND: Rgb<u8> = Rgb([24, 24, 28]);

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    write_png(path, img.as_raw(), img.width() as usize, img.height() as usize, 3)
}

fn paste(canvas: &mut RgbImage, img: &RgbImage, x: u32, y: u32) {
    for (px, py, p) in img.enumerate_pixels() {
        if x + px < canvas.width() && y + py < canvas.height() {
            canvas.put_pixel(x + px, y + py, *p);
        }
    }
}

/// Longest label that fits `width` pixels at font scale 1 ('~' marks a cut).
fn fit(text: &str, width: u32) -> String {
    let max = (width as usize + 1) / 6;
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
        s.push('~');
        s
    }
}

/// `map` (if any) blended over `image`, with `label` in a band underneath.
fn panel(image: &RgbImage, map: Option<&Tensor>, label: &str, alpha: f32) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    let over = match map {
        Some(m) => blend(image, &heatmap(m, h as usize, w as usize)?, alpha)?,
        None => image.clone(),
    };
    let band = text_height(1) + 6;
    let mut panel = RgbImage::from_pixel(w, h + band, BACKGROUND);
    paste(&mut panel, &over, 0, 0);
    draw_text(&mut panel, 3, (h + 3) as i64, &fit(label, w.saturating_sub(6)), 1, WHITE);
    Ok(panel)
}

/// The labelled [image + text] x [image + text] heatmap of head slot `slot`.
fn quadrant_picture(att: &LayerAttention, slot: usize, tokens: &[String]) -> Result<RgbImage> {
    let (n, t) = att.tokens()?;
    let l = n + t;
    let m = att.joint()?.get(slot)?.flatten_all()?.to_vec1::<f32>()?;
    let cell = (640 / l.max(1)).clamp(1, 8) as u32;
    let gap = 3u32;
    let side = l as u32 * cell + gap;
    let word_room = tokens.iter().map(|w| text_width(&fit(w, 96), 1)).max().unwrap_or(0) + 6;
    let labels = cell >= 8;
    let (left, top) = (text_height(1) + 10, 2 * text_height(2) + text_height(1) + 30);
    let right = if labels { word_room } else { 0 } + 8;
    let bottom = if labels { word_room } else { 0 } + 8;
    let (lo, hi) = m
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let title = format!("layer {}, {}, {}", att.layer, att.step_label(), att.head_label(slot));
    let s = att.quadrant_shares(slot)?;
    let shares = format!(
        "row mass: image->image {:.1}%  image->text {:.1}%  text->image {:.1}%  text->text {:.1}%",
        100.0 * s[0],
        100.0 * s[1],
        100.0 * s[2],
        100.0 * s[3]
    );
    let scale_note = format!("rows: queries, columns: keys; colour from {lo:.4} to {hi:.4}");
    let width = (left + side + right).max(text_width(&title, 2).max(text_width(&shares, 1)) + 16);
    let mut img = RgbImage::from_pixel(width, top + side + bottom, BACKGROUND);
    draw_text(&mut img, 8, 6, &title, 2, WHITE);
    draw_text(&mut img, 8, (10 + text_height(2)) as i64, &shares, 1, GREY);
    draw_text(&mut img, 8, (14 + text_height(2) + text_height(1)) as i64, &scale_note, 1, GREY);
    // Key-axis captions above the two column blocks.
    let caption_y = (top - text_height(1) - 4) as i64;
    let (ix, tx) = (left, left + n as u32 * cell + gap);
    let image_keys = fit(&format!("image keys ({n})"), n as u32 * cell);
    draw_text(&mut img, ix as i64, caption_y, &image_keys, 1, WHITE);
    draw_text(
        &mut img,
        tx as i64,
        caption_y,
        &fit(&format!("text keys ({t})"), t as u32 * cell + right),
        1,
        WHITE,
    );
    // Query-axis captions left of the two row blocks, reading upwards.
    let image_queries = fit(&format!("image queries ({n})"), n as u32 * cell);
    let text_queries = fit("text queries", t as u32 * cell);
    draw_text_vertical(&mut img, 4, top as i64, &image_queries, 1, WHITE);
    draw_text_vertical(&mut img, 4, (top + n as u32 * cell + gap) as i64, &text_queries, 1, WHITE);
    let at = |i: usize| (i as u32 * cell) + if i >= n { gap } else { 0 };
    for (r, c) in (0..l).flat_map(|r| (0..l).map(move |c| (r, c))) {
        let v = m[r * l + c];
        let colour = viridis(if v.is_finite() { (v - lo) / span } else { 0.0 });
        for (dy, dx) in (0..cell).flat_map(|dy| (0..cell).map(move |dx| (dy, dx))) {
            img.put_pixel(left + at(c) + dx, top + at(r) + dy, colour);
        }
    }
    if labels {
        for (k, word) in tokens.iter().enumerate().take(t) {
            let word = fit(word, 96);
            let pos = at(n + k);
            // Along the text rows (right) and under the text columns (reading upwards).
            draw_text(&mut img, (left + side + 4) as i64, (top + pos) as i64, &word, 1, GREY);
            draw_text_vertical(&mut img, (left + pos + 1) as i64, (top + side + 4) as i64, &word, 1, GREY);
        }
    }
    Ok(img)
}

/// Writes `image.png` and, for each of `layers` (all captured ones when empty), the quadrant
/// picture, one overlay per word and the word strip, from `maps` of batch element `batch` at
/// `step`, into `dir` (created). Returns the paths written, in order.
pub fn write_attention_maps(
    maps: &[JointAttentionMap],
    figures: &AttentionFigures,
    layers: &[usize],
    batch: usize,
    step: StepChoice,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    let layers = if layers.is_empty() { captured_layers(maps) } else { layers.to_vec() };
    if layers.is_empty() {
        return Err(Error::msg("attention: no maps were captured"));
    }
    let selected =
        layers.iter().map(|&l| LayerAttention::select(maps, l, batch, step)).collect::<Result<Vec<_>>>()?;
    let (n, t) = selected[0].tokens()?;
    if figures.grid.0 * figures.grid.1 != n {
        return Err(Error::msg(format!(
            "attention: {n} image tokens do not fill a {}x{} patch grid",
            figures.grid.0, figures.grid.1
        )));
    }
    if figures.tokens.len() != t {
        return Err(Error::msg(format!(
            "attention: the maps have {t} text tokens, {} token texts were given",
            figures.tokens.len()
        )));
    }
    if let Some(&k) = figures.words.iter().find(|&&k| k >= t) {
        return Err(Error::msg(format!("attention: word position {k} of {t} text tokens")));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = vec![];
    let base = to_rgb_image(figures.image, figures.scale)?;
    let path = dir.join("image.png");
    save(&base, &path)?;
    written.push(path);
    // The strip's panels: the image at a moderate size, then one per word.
    let small = to_rgb_image(figures.image, figures.scale.min(4))?;
    for att in &selected {
        for slot in 0..att.slots() {
            let head = att.head_tag(slot);
            let path = dir.join(format!("quadrants_layer{}_step{}{head}.png", att.layer, att.step_tag()));
            save(&quadrant_picture(att, slot, figures.tokens)?, &path)?;
            written.push(path);
            let mut panels = vec![panel(&small, None, "image", 0.0)?];
            for &k in figures.words {
                let word = &figures.tokens[k];
                let map = att.token_map(slot, k, figures.grid)?;
                let label = format!("'{word}' {:.1}%", 100.0 * att.token_share(slot, k)?);
                let path = dir.join(format!("token{k}_{}_layer{}{head}.png", file_word(word), att.layer));
                let full = match &att.heads {
                    None => format!("{label}, layer {}", att.layer),
                    Some(h) => format!("{label}, layer {} head {}", att.layer, h[slot]),
                };
                save(&panel(&base, Some(&map), &full, figures.alpha)?, &path)?;
                written.push(path);
                panels.push(panel(&small, Some(&map), &label, figures.alpha)?);
            }
            let title = format!(
                "layer {}, {}, {}: where does each word look? (image->text attention; % = share of the patches' attention)",
                att.layer,
                att.step_label(),
                att.head_label(slot)
            );
            let path = dir.join(format!("tokens_layer{}{head}.png", att.layer));
            save(&strip(&panels, &title), &path)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Panels side by side under a title line.
fn strip(panels: &[RgbImage], title: &str) -> RgbImage {
    let pad = 6u32;
    let head = text_height(1) + 2 * pad;
    let w: u32 = panels.iter().map(|p| p.width() + pad).sum::<u32>() + pad;
    let h = panels.iter().map(|p| p.height()).max().unwrap_or(0) + head + pad;
    let mut img = RgbImage::from_pixel(w.max(text_width(title, 1) + 2 * pad), h, BACKGROUND);
    draw_text(&mut img, pad as i64, pad as i64, title, 1, WHITE);
    let mut x = pad;
    for p in panels {
        paste(&mut img, p, x, head);
        x += p.width() + pad;
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn words_skip_the_start_token_and_padding_and_names_are_file_safe() {
        let texts: Vec<String> =
            ["<bos>", "red", "circle", "<eos>", "<pad>"].iter().map(|s| s.to_string()).collect();
        assert_eq!(word_positions(&texts, &[1, 1, 1, 1, 0]), vec![1, 2, 3]);
        assert_eq!(file_word("<eos>"), "eos");
        assert_eq!(file_word("<|endoftext|>"), "endoftext");
        assert_eq!(file_word("!"), "tok");
    }

    #[test]
    fn steps_are_chosen_or_averaged_and_unknown_layers_are_named() -> Result<()> {
        let dev = Device::Cpu;
        let map = |call: usize, v: f32| -> Result<JointAttentionMap> {
            let q = |a: usize, b: usize| Tensor::full(v, (2, 1, a, b), &dev);
            Ok(JointAttentionMap {
                layer: 3,
                call,
                heads: None,
                image_to_image: q(4, 4)?,
                image_to_text: q(4, 2)?,
                text_to_image: q(2, 4)?,
                text_to_text: q(2, 2)?,
            })
        };
        let maps = vec![map(0, 1.0)?, map(1, 3.0)?];
        let value = |s: StepChoice| -> Result<f32> {
            let a = LayerAttention::select(&maps, 3, 1, s)?;
            Ok(a.token_map(0, 1, (2, 2))?.flatten_all()?.to_vec1::<f32>()?[0])
        };
        assert_eq!(value(StepChoice::Last)?, 3.0);
        assert_eq!(value(StepChoice::Call(0))?, 1.0);
        assert_eq!(value(StepChoice::Mean)?, 2.0);
        let err = LayerAttention::select(&maps, 0, 1, StepChoice::Last).unwrap_err().to_string();
        assert!(err.contains("layer 0") && err.contains("captured layers: 3"), "{err}");
        let err = LayerAttention::select(&maps, 3, 1, StepChoice::Call(5)).unwrap_err().to_string();
        assert!(err.contains("step 6") && err.contains("1, 2"), "{err}");
        Ok(())
    }
}
