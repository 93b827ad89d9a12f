//! Attention maps as pictures: a [H, W] map is min-max normalised, coloured with viridis,
//! scaled up by nearest neighbour (so each attended patch stays a crisp block) and optionally
//! blended over the image it belongs to.

use super::grid::{tensor_to_u8, write_png};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};
use std::path::Path;

/// Matplotlib's viridis at nine evenly spaced points; colours in between are interpolated.
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 45, 123],
    [59, 82, 139],
    [44, 114, 142],
    [33, 145, 140],
    [40, 174, 128],
    [94, 201, 98],
    [173, 220, 48],
    [253, 231, 37],
];

/// The viridis colour at `t` in [0, 1] (clamped; NaN maps to the low end).
pub fn viridis(t: f32) -> Rgb<u8> {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let pos = t * (VIRIDIS.len() - 1) as f32;
    let i = (pos.floor() as usize).min(VIRIDIS.len() - 2);
    let f = pos - i as f32;
    let mix = |a: u8, b: u8| (a as f32 + (b as f32 - a as f32) * f).round() as u8;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    Rgb([mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2])])
}

/// A [H, W] map coloured by viridis after min-max normalisation (a flat map is all low
/// colour; non-finite entries count as the minimum), resized to `height` x `width` by nearest
/// neighbour.
pub fn heatmap(map: &Tensor, height: usize, width: usize) -> Result<RgbImage> {
    let (mh, mw) = map
        .dims2()
        .map_err(|_| Error::msg(format!("heatmap: expected a [H, W] map, got shape {:?}", map.dims())))?;
    if mh == 0 || mw == 0 || height == 0 || width == 0 {
        return Err(Error::msg(format!("heatmap: empty map {mh}x{mw} or output {height}x{width}")));
    }
    let v = map.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let finite = v.iter().copied().filter(|x| x.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    Ok(RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let (sy, sx) = (y as usize * mh / height, x as usize * mw / width);
        let value = v[sy * mw + sx];
        viridis(if value.is_finite() { (value - lo) / span } else { 0.0 })
    }))
}

/// `over` blended onto `base` with weight `alpha` (0 = only base, 1 = only over).
pub fn blend(base: &RgbImage, over: &RgbImage, alpha: f32) -> Result<RgbImage> {
    if base.dimensions() != over.dimensions() {
        return Err(Error::msg(format!(
            "blend: image sizes differ ({:?} vs {:?})",
            base.dimensions(),
            over.dimensions()
        )));
    }
    let a = alpha.clamp(0.0, 1.0);
    let mut out = base.clone();
    for (o, h) in out.pixels_mut().zip(over.pixels()) {
        for c in 0..3 {
            o.0[c] = (o.0[c] as f32 * (1.0 - a) + h.0[c] as f32 * a).round() as u8;
        }
    }
    Ok(out)
}

/// An image [C, H, W] (or [1, C, H, W]) in [-1, 1], grey or RGB, as RGB scaled up by `scale`.
pub fn to_rgb_image(image: &Tensor, scale: usize) -> Result<RgbImage> {
    let image = if image.rank() == 4 { image.squeeze(0)? } else { image.clone() };
    let (c, h, w) = image
        .dims3()
        .map_err(|_| Error::msg(format!("expected an image [C, H, W], got shape {:?}", image.dims())))?;
    if c != 1 && c != 3 {
        return Err(Error::msg(format!("expected 1 (grey) or 3 (RGB) channels, got {c}")));
    }
    let chw = tensor_to_u8(&image)?;
    let s = scale.max(1);
    Ok(RgbImage::from_fn((w * s) as u32, (h * s) as u32, |x, y| {
        let (x, y) = (x as usize / s, y as usize / s);
        let at = |ch: usize| chw[(ch.min(c - 1) * h + y) * w + x];
        Rgb([at(0), at(1), at(2)])
    }))
}

/// The picture an attention map is drawn over.
#[derive(Clone, Copy, Debug)]
pub struct Backdrop<'a> {
    /// [C, H, W] in [-1, 1], grey or RGB.
    pub image: &'a Tensor,
    /// Weight of the heatmap in the blend.
    pub alpha: f32,
}

/// Saves `map` [H, W] as a PNG: over `backdrop` (at the backdrop's size times `scale`) or alone
/// (at the map's size times `scale`).
pub fn save_heatmap(map: &Tensor, backdrop: Option<Backdrop>, scale: usize, path: &Path) -> Result<()> {
    let s = scale.max(1);
    let img = match backdrop {
        Some(b) => {
            let base = to_rgb_image(b.image, s)?;
            let heat = heatmap(map, base.height() as usize, base.width() as usize)?;
            blend(&base, &heat, b.alpha)?
        }
        None => {
            let (h, w) = map.dims2().unwrap_or((0, 0));
            heatmap(map, h * s, w * s)?
        }
    };
    write_png(path, img.as_raw(), img.width() as usize, img.height() as usize, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn map(v: &[f32], h: usize, w: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn min_and_max_get_the_colormap_ends() {
        let img = heatmap(&map(&[0.2, 0.7, f32::NAN, 0.45], 2, 2), 6, 6).unwrap();
        assert_eq!(img.dimensions(), (6, 6));
        assert_eq!(img.get_pixel(0, 0).0, VIRIDIS[0]); // minimum, top-left block
        assert_eq!(img.get_pixel(5, 2).0, VIRIDIS[8]); // maximum, top-right block (rows 0-2)
        assert_eq!(img.get_pixel(2, 3).0, VIRIDIS[0]); // NaN counts as the minimum
        assert_eq!(img.get_pixel(3, 3).0, viridis(0.5).0); // midpoint, bottom-right block
        assert_eq!(viridis(0.5).0, VIRIDIS[4]);
        let flat = heatmap(&map(&[3.0; 4], 2, 2), 2, 2).unwrap();
        assert!(flat.pixels().all(|p| p.0 == VIRIDIS[0]));
        assert!(heatmap(&map(&[1.0; 4], 1, 4).unsqueeze(0).unwrap(), 2, 2).is_err());
    }

    #[test]
    fn blends_over_a_grey_image_and_saves() {
        let base = Tensor::from_vec(vec![-1.0f32, 1.0], (1, 1, 2), &Device::Cpu).unwrap();
        let m = map(&[0.0, 1.0], 1, 2);
        let dir = std::env::temp_dir().join(format!("conv-heat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.png");
        save_heatmap(&m, Some(Backdrop { image: &base, alpha: 0.5 }), 4, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (8, 4));
        // Black pixel under the low end: half of viridis(0); white under the high end.
        assert_eq!(img.get_pixel(1, 1).0, [34, 1, 42]);
        assert_eq!(img.get_pixel(6, 3).0, [254, 243, 146]);
        save_heatmap(&m, None, 3, &path).unwrap();
        assert_eq!(image::image_dimensions(&path).unwrap(), (6, 3));
        std::fs::remove_dir_all(&dir).ok();
    }
}
