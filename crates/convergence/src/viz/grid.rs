//! Tensors in [-1, 1] to PNG files: one image, or a grid of them as torchvision's `make_grid`
//! lays it out (2 px black padding around and between images).

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Padding between and around grid cells, in pixels.
pub const GRID_PADDING: usize = 2;

/// [-1, 1] floats to bytes: round to nearest, clamp to [0, 255]; NaN becomes 0.
pub fn to_u8(values: &[f32]) -> Vec<u8> {
    values.iter().map(|&v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8).collect()
}

/// Any-shape tensor in [-1, 1] to bytes in the tensor's element order.
pub fn tensor_to_u8(t: &Tensor) -> Result<Vec<u8>> {
    Ok(to_u8(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
}

/// (channels, height, width) of an image batch [N, C, H, W] with C = 1 (grey) or 3 (RGB).
fn image_dims(t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = t
        .dims4()
        .map_err(|_| Error::msg(format!("expected images [N, C, H, W], got shape {:?}", t.dims())))?;
    if c != 1 && c != 3 {
        return Err(Error::msg(format!("expected 1 (grey) or 3 (RGB) channels, got {c}")));
    }
    Ok((n, c, h, w))
}

/// Encodes interleaved (HWC) bytes as a PNG at `path`.
pub fn write_png(path: &Path, hwc: &[u8], width: usize, height: usize, channels: usize) -> Result<()> {
    write_png_with_text(path, hwc, width, height, channels, &[])
}

/// [`write_png`] with tEXt chunks (keyword, text): how a generated image records its prompt,
/// seed and settings. Written to a temporary file and renamed, so a failure leaves no partial PNG.
pub fn write_png_with_text(
    path: &Path,
    hwc: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    text: &[(&str, String)],
) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| Error::msg(format!("{}: cannot write PNG: {e}", path.display()));
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| fail(&e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    enc.set_color(if channels == 1 { png::ColorType::Grayscale } else { png::ColorType::Rgb });
    enc.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        // tEXt is Latin-1; anything else (a prompt with emoji or CJK) goes in a UTF-8 iTXt chunk.
        let added = if value.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk(key.to_string(), value.clone())
        } else {
            enc.add_itxt_chunk(key.to_string(), value.clone())
        };
        added.map_err(|e| fail(&e))?;
    }
    let mut writer = enc.write_header().map_err(|e| fail(&e))?;
    writer.write_image_data(hwc).map_err(|e| fail(&e))?;
    writer.finish().map_err(|e| fail(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Lays an image batch out as a grid of `nrow` images per row; returns (HWC bytes, width, height).
pub fn grid_u8(images: &Tensor, nrow: usize) -> Result<(Vec<u8>, usize, usize)> {
    let (n, c, h, w) = image_dims(images)?;
    if n == 0 || nrow == 0 {
        return Err(Error::msg(format!("a grid needs images and nrow >= 1 (got {n} images, nrow {nrow})")));
    }
    let cols = nrow.min(n);
    let rows = n.div_ceil(cols);
    let p = GRID_PADDING;
    let (gw, gh) = (cols * (w + p) + p, rows * (h + p) + p);
    let chw = tensor_to_u8(images)?;
    let mut out = vec![0u8; gw * gh * c];
    for k in 0..n {
        let (ox, oy) = (p + (k % cols) * (w + p), p + (k / cols) * (h + p));
        for (y, x, ch) in (0..h).flat_map(|y| (0..w).flat_map(move |x| (0..c).map(move |ch| (y, x, ch)))) {
            out[((oy + y) * gw + ox + x) * c + ch] = chw[((k * c + ch) * h + y) * w + x];
        }
    }
    Ok((out, gw, gh))
}

/// Saves images [N, C, H, W] in [-1, 1] as one PNG grid, `nrow` images per row.
pub fn save_grid(images: &Tensor, nrow: usize, path: &Path) -> Result<()> {
    let c = image_dims(images)?.1;
    let (bytes, w, h) = grid_u8(images, nrow)?;
    write_png(path, &bytes, w, h, c)
}

/// Saves one image [C, H, W] (or [1, C, H, W]) in [-1, 1] as a PNG, without padding.
pub fn save_image(image: &Tensor, path: &Path) -> Result<()> {
    save_image_with_text(image, path, &[])
}

/// [`save_image`] with PNG tEXt metadata.
pub fn save_image_with_text(image: &Tensor, path: &Path, text: &[(&str, String)]) -> Result<()> {
    let image = if image.rank() == 3 { image.unsqueeze(0)? } else { image.clone() };
    let (n, c, h, w) = image_dims(&image)?;
    if n != 1 {
        return Err(Error::msg(format!("save_image takes one image, got a batch of {n}")));
    }
    let hwc = tensor_to_u8(&image.squeeze(0)?.permute((1, 2, 0))?)?;
    write_png_with_text(path, &hwc, w, h, c, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn png_text_metadata_round_trips() {
        let path = std::env::temp_dir().join(format!("conv-text-{}.png", std::process::id()));
        let img = Tensor::zeros((3, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        save_image_with_text(&img, &path, &[("prompt", "a red fox".into()), ("seed", "7".into())]).unwrap();
        let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()))
            .read_info()
            .unwrap();
        let info = reader.info();
        assert_eq!((info.width, info.height), (4, 2));
        let text: Vec<(String, String)> =
            info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
        assert_eq!(text, [("prompt".into(), "a red fox".into()), ("seed".into(), "7".into())]);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn to_u8_rounds_and_clamps() {
        assert_eq!(to_u8(&[-1.0, 0.0, 1.0, -0.99, 2.0, -3.0, f32::NAN]), [0, 128, 255, 1, 255, 0, 0]);
    }

    #[test]
    fn grid_geometry_and_pixels() {
        // Three 2x3 RGB images: image k has red = k/2 mapped to [-1, 1], green -1, blue +1.
        let mut v = Vec::new();
        for k in 0..3 {
            v.extend([k as f32 - 1.0; 6]);
            v.extend([-1.0f32; 6]);
            v.extend([1.0f32; 6]);
        }
        let t = Tensor::from_vec(v, (3, 3, 2, 3), &Device::Cpu).unwrap();
        let (bytes, w, h) = grid_u8(&t, 2).unwrap();
        assert_eq!((w, h), (2 * (3 + 2) + 2, 2 * (2 + 2) + 2));
        let px = |x: usize, y: usize| &bytes[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(px(0, 0), [0, 0, 0]); // padding
        assert_eq!(px(2, 2), [0, 0, 255]); // image 0, top-left
        assert_eq!(px(7, 3), [128, 0, 255]); // image 1 (second column), bottom-left
        assert_eq!(px(4, 6), [255, 0, 255]); // image 2 (second row), top-right
        assert_eq!(px(5, 3), [0, 0, 0]); // gap between columns
        assert_eq!(px(9, 7), [0, 0, 0]); // the missing fourth cell stays padding
        let dir = std::env::temp_dir().join(format!("conv-grid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        save_grid(&t, 2, &dir.join("g.png")).unwrap();
        let back = image::open(dir.join("g.png")).unwrap().to_rgb8();
        assert_eq!((back.width(), back.height(), back.get_pixel(7, 3).0), (12, 10, [128, 0, 255]));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn save_image_grey_and_bad_shapes() {
        let dir = std::env::temp_dir().join(format!("conv-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Tensor::from_vec(vec![-1.0f32, 0.0, 1.0, 0.5], (1, 2, 2), &Device::Cpu).unwrap();
        save_image(&t, &dir.join("one.png")).unwrap();
        let back = image::open(dir.join("one.png")).unwrap();
        assert_eq!(back.color(), image::ColorType::L8);
        assert_eq!(back.to_luma8().into_raw(), [0, 128, 255, 191]);
        let two = Tensor::zeros((2, 2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = save_grid(&two, 1, &dir.join("x.png")).unwrap_err().to_string();
        assert!(err.contains("1 (grey) or 3 (RGB) channels, got 2"), "{err}");
        let err = save_image(&t, &dir.join("missing").join("x.png")).unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("cannot write PNG"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
