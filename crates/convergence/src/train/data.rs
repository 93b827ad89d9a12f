//! Datasets: MNIST-style IDX files (Fashion-MNIST from Debian's `dataset-fashion-mnist`) and
//! image folders (class subfolders, or captions in `.txt` sidecars). Every loader produces one
//! `Dataset`: u8 pixels held in memory, served as f32 in [-1, 1] (the diffusion convention), NCHW.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{ImageBuffer, Pixel};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where Debian's `dataset-fashion-mnist` package installs the data.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's class names, in label order.
pub const FASHION_CLASSES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"];

/// File extensions the folder loaders treat as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// What each image is paired with.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Class ids, indexing `classes` (the class names, in id order).
    Labels { ids: Vec<u32>, classes: Vec<String> },
    /// One caption per image.
    Captions(Vec<String>),
}

/// An image set held in memory as u8 pixels (NCHW order), with labels or captions.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub pixels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub targets: Targets,
}

impl Dataset {
    pub fn len(&self) -> usize {
        match &self.targets {
            Targets::Labels { ids, .. } => ids.len(),
            Targets::Captions(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Class names in id order (empty for a captioned set).
    pub fn classes(&self) -> &[String] {
        match &self.targets {
            Targets::Labels { classes, .. } => classes,
            Targets::Captions(_) => &[],
        }
    }

    /// Every image's class id, or `None` for a captioned set.
    pub fn label_ids(&self) -> Option<&[u32]> {
        match &self.targets {
            Targets::Labels { ids, .. } => Some(ids),
            Targets::Captions(_) => None,
        }
    }

    fn check_indices(&self, idx: &[usize]) -> Result<()> {
        match idx.iter().find(|&&i| i >= self.len()) {
            Some(i) => Err(Error::msg(format!(
                "image index {i} out of range for a dataset of {} images",
                self.len()
            ))),
            None => Ok(()),
        }
    }

    /// The images at `idx` as [B, C, H, W] f32 in [-1, 1].
    pub fn images(&self, idx: &[usize], dev: &Device) -> Result<Tensor> {
        self.check_indices(idx)?;
        let n = self.image_len();
        let mut data = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            data.extend(self.pixels[i * n..(i + 1) * n].iter().map(|&p| p as f32 / 127.5 - 1.0));
        }
        let shape = (idx.len(), self.channels, self.height, self.width);
        Ok(Tensor::from_vec(data, shape, dev)?)
    }

    /// The class ids at `idx` as a u32 tensor [B]; an error for a captioned set.
    pub fn labels(&self, idx: &[usize], dev: &Device) -> Result<Tensor> {
        self.check_indices(idx)?;
        let ids =
            self.label_ids().ok_or_else(|| Error::msg("this dataset has captions, not class labels"))?;
        let picked: Vec<u32> = idx.iter().map(|&i| ids[i]).collect();
        Ok(Tensor::from_vec(picked, idx.len(), dev)?)
    }

    /// The captions at `idx`; an error for a labelled set.
    pub fn captions(&self, idx: &[usize]) -> Result<Vec<&str>> {
        self.check_indices(idx)?;
        match &self.targets {
            Targets::Captions(c) => Ok(idx.iter().map(|&i| c[i].as_str()).collect()),
            Targets::Labels { .. } => Err(Error::msg("this dataset has class labels, not captions")),
        }
    }

    /// Images and class ids at `idx` (a labelled set's training batch).
    pub fn batch(&self, idx: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
        Ok((self.images(idx, dev)?, self.labels(idx, dev)?))
    }

    /// A new dataset holding the images at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Result<Dataset> {
        self.check_indices(idx)?;
        let n = self.image_len();
        let pixels = idx.iter().flat_map(|&i| self.pixels[i * n..(i + 1) * n].iter().copied()).collect();
        let targets = match &self.targets {
            Targets::Labels { ids, classes } => {
                Targets::Labels { ids: idx.iter().map(|&i| ids[i]).collect(), classes: classes.clone() }
            }
            Targets::Captions(c) => Targets::Captions(idx.iter().map(|&i| c[i].clone()).collect()),
        };
        Ok(Dataset { pixels, channels: self.channels, height: self.height, width: self.width, targets })
    }
}

// ---------------------------------------------------------------------------------------------
// IDX (MNIST layout)

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| Error::Corrupt {
            path: path.into(),
            format: "gzip",
            reason: e.to_string(),
        })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes: returns its dimensions and data.
fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_maybe_gz(path)?;
    let corrupt = |reason: String| Error::Corrupt { path: path.into(), format: "IDX", reason };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(corrupt("bad magic (expected unsigned-byte IDX: 00 00 08 nd)".into()));
    }
    let nd = bytes[3] as usize;
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        return Err(corrupt("truncated header".into()));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected: usize = dims.iter().product();
    if bytes.len() - header != expected {
        return Err(corrupt(format!(
            "{} data bytes for dims {dims:?} (expected {expected})",
            bytes.len() - header
        )));
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Finds `<stem>` or `<stem>.gz` in `dir`.
fn idx_path(dir: &Path, stem: &str) -> Result<PathBuf> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))].into_iter().find(|p| p.exists()).ok_or_else(|| {
        Error::io(
            dir.join(format!("{stem}[.gz]")),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found (Fashion-MNIST: apt-get install -y dataset-fashion-mnist)",
            ),
        )
    })
}

/// Loads the `train` or `t10k` split of an MNIST-layout directory; classes are named by number.
pub fn load_idx_split(dir: &Path, split: &str) -> Result<Dataset> {
    let img_path = idx_path(dir, &format!("{split}-images-idx3-ubyte"))?;
    let lbl_path = idx_path(dir, &format!("{split}-labels-idx1-ubyte"))?;
    let (dims, pixels) = read_idx(&img_path)?;
    let (ldims, labels) = read_idx(&lbl_path)?;
    if dims.len() != 3 || ldims.len() != 1 || dims[0] != ldims[0] {
        return Err(Error::Corrupt {
            path: img_path,
            format: "IDX",
            reason: format!("images {dims:?} do not match labels {ldims:?}"),
        });
    }
    let num_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
    Ok(Dataset {
        pixels,
        channels: 1,
        height: dims[1],
        width: dims[2],
        targets: Targets::Labels {
            ids: labels.into_iter().map(u32::from).collect(),
            classes: (0..num_classes).map(|c| c.to_string()).collect(),
        },
    })
}

/// Fashion-MNIST's `train` or `t10k` split from `FASHION_MNIST_DIR`, with its class names.
pub fn fashion_mnist(split: &str) -> Result<Dataset> {
    let mut ds = load_idx_split(Path::new(FASHION_MNIST_DIR), split)?;
    if let Targets::Labels { classes, .. } = &mut ds.targets {
        *classes = FASHION_CLASSES.iter().map(|c| c.to_string()).collect();
    }
    Ok(ds)
}

// ---------------------------------------------------------------------------------------------
// Image files and folders

/// The colour layout images are converted to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channels {
    Grey,
    Rgb,
}

impl Channels {
    pub fn count(self) -> usize {
        match self {
            Channels::Grey => 1,
            Channels::Rgb => 3,
        }
    }
}

/// How image sizes are handled when loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Keep each image's size; all images of a dataset must share it.
    Keep,
    /// Every image must already be `height` x `width`.
    Check { height: usize, width: usize },
    /// Scale so the image covers `height` x `width`, then centre-crop (aspect ratio kept).
    Resize { height: usize, width: usize },
}

/// How a folder of images becomes a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderOptions {
    pub channels: Channels,
    pub size: Size,
}

/// One decoded image: u8 pixels in CHW order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

/// Decodes an image file (PNG; other formats as the `image` crate is built for) into
/// `channels`, resized or size-checked per `size`. Errors name the file.
pub fn read_image(path: &Path, channels: Channels, size: Size) -> Result<Image> {
    let corrupt = |reason: String| Error::Corrupt { path: path.into(), format: "image", reason };
    let reader = image::ImageReader::open(path).map_err(|e| Error::io(path, e))?;
    let reader = reader.with_guessed_format().map_err(|e| Error::io(path, e))?;
    let decoded = reader.decode().map_err(|e| corrupt(e.to_string()))?;
    let (height, width, pixels) = match channels {
        Channels::Grey => fit(decoded.to_luma8(), size),
        Channels::Rgb => fit(decoded.to_rgb8(), size),
    };
    if let Size::Check { height: h, width: w } = size {
        if (h, w) != (height, width) {
            return Err(corrupt(format!("image is {width}x{height}, expected {w}x{h} (WxH)")));
        }
    }
    Ok(Image {
        channels: channels.count(),
        height,
        width,
        pixels: interleaved_to_chw(&pixels, channels.count()),
    })
}

/// Applies `Size::Resize` (cover, then centre-crop); returns (height, width, HWC pixels).
fn fit<P>(img: ImageBuffer<P, Vec<u8>>, size: Size) -> (usize, usize, Vec<u8>)
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let Size::Resize { height, width } = size else {
        return (img.height() as usize, img.width() as usize, img.into_raw());
    };
    let (th, tw) = (height.max(1) as u32, width.max(1) as u32);
    if (img.height(), img.width()) == (th, tw) {
        return (height, width, img.into_raw());
    }
    // Cover rather than stretch: distorting the aspect ratio would change what objects look like.
    let scale = (th as f64 / img.height() as f64).max(tw as f64 / img.width() as f64);
    let sh = ((img.height() as f64 * scale).round() as u32).max(th);
    let sw = ((img.width() as f64 * scale).round() as u32).max(tw);
    let scaled = imageops::resize(&img, sw, sh, FilterType::CatmullRom);
    let cropped = imageops::crop_imm(&scaled, (sw - tw) / 2, (sh - th) / 2, tw, th).to_image();
    (th as usize, tw as usize, cropped.into_raw())
}

fn interleaved_to_chw(hwc: &[u8], channels: usize) -> Vec<u8> {
    if channels == 1 {
        return hwc.to_vec();
    }
    (0..channels).flat_map(|c| hwc.iter().skip(c).step_by(channels).copied()).collect()
}

fn is_image(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    path.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// The entries of `dir` (hidden ones skipped) that satisfy `keep`, sorted by name.
fn sorted_entries(dir: &Path, keep: fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if !is_hidden(&path) && keep(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let files = sorted_entries(dir, is_image)?;
    if files.is_empty() {
        return Err(Error::config(
            dir,
            format!("no images found (expected files ending in .{})", IMAGE_EXTENSIONS.join(", .")),
        ));
    }
    Ok(files)
}

/// Collects decoded images of one size into a flat pixel buffer.
struct Collector {
    opts: FolderOptions,
    pixels: Vec<u8>,
    /// (height, width) and the file that set them, for the mixed-sizes error.
    first: Option<(usize, usize, PathBuf)>,
}

impl Collector {
    fn new(opts: FolderOptions) -> Self {
        Collector { opts, pixels: Vec::new(), first: None }
    }

    fn push(&mut self, path: &Path) -> Result<()> {
        let img = read_image(path, self.opts.channels, self.opts.size)?;
        match &self.first {
            None => self.first = Some((img.height, img.width, path.to_path_buf())),
            Some((h, w, first)) if (*h, *w) != (img.height, img.width) => {
                return Err(Error::config(
                    path,
                    format!(
                        "mixed image sizes: this one is {}x{}, {} is {w}x{h} (WxH); \
                         pass a size to resize them",
                        img.width,
                        img.height,
                        first.display()
                    ),
                ))
            }
            Some(_) => {}
        }
        self.pixels.extend(img.pixels);
        Ok(())
    }

    fn finish(self, targets: Targets) -> Dataset {
        let (height, width) = self.first.map_or((0, 0), |(h, w, _)| (h, w));
        Dataset { pixels: self.pixels, channels: self.opts.channels.count(), height, width, targets }
    }
}

/// Loads `root/<class name>/*.{png,jpg,jpeg}`: classes sorted by folder name become ids 0, 1, ...
pub fn load_class_folders(root: &Path, opts: FolderOptions) -> Result<Dataset> {
    let class_dirs = sorted_entries(root, Path::is_dir)?;
    if class_dirs.is_empty() {
        return Err(Error::config(root, "no class subfolders (expected <root>/<class name>/*.png)"));
    }
    let mut collector = Collector::new(opts);
    let (mut ids, mut classes) = (Vec::new(), Vec::new());
    for (id, dir) in class_dirs.iter().enumerate() {
        for file in images_in(dir)? {
            collector.push(&file)?;
            ids.push(id as u32);
        }
        classes.push(dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()));
    }
    Ok(collector.finish(Targets::Labels { ids, classes }))
}

/// Loads `root/*.{png,jpg,jpeg}`, each captioned by the sidecar with the same stem (`a.png` +
/// `a.txt`, whitespace trimmed). A missing sidecar is an error naming it.
pub fn load_captioned_folder(root: &Path, opts: FolderOptions) -> Result<Dataset> {
    let mut collector = Collector::new(opts);
    let mut captions = Vec::new();
    for file in images_in(root)? {
        let sidecar = file.with_extension("txt");
        let text = std::fs::read_to_string(&sidecar).map_err(|e| Error::io(&sidecar, e))?;
        collector.push(&file)?;
        captions.push(text.trim().to_string());
    }
    Ok(collector.finish(Targets::Captions(captions)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty temp directory unique to this test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("conv-data-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_grey(path: &Path, w: u32, h: u32, value: u8) {
        image::GrayImage::from_pixel(w, h, image::Luma([value])).save(path).unwrap();
    }

    fn write_rgb(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        image::RgbImage::from_pixel(w, h, image::Rgb(rgb)).save(path).unwrap();
    }

    const GREY_4: FolderOptions = FolderOptions { channels: Channels::Grey, size: Size::Keep };

    #[test]
    fn idx_round_trip_and_corruption() {
        let dir = temp_dir("idx");
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        img.extend([0u8, 255, 10, 20]);
        std::fs::write(dir.join("train-images-idx3-ubyte"), &img).unwrap();
        std::fs::write(dir.join("train-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 2, 7, 3]).unwrap();
        let ds = load_idx_split(&dir, "train").unwrap();
        assert_eq!((ds.len(), ds.height, ds.width), (2, 1, 2));
        assert_eq!(ds.classes().len(), 8);
        let (x, y) = ds.batch(&[0], &Device::Cpu).unwrap();
        assert_eq!(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![-1.0, 1.0]);
        assert_eq!(y.to_vec1::<u32>().unwrap(), vec![7]);
        let err = ds.images(&[2], &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("index 2 out of range"), "{err}");
        img.pop();
        std::fs::write(dir.join("train-images-idx3-ubyte"), &img).unwrap();
        let err = load_idx_split(&dir, "train").unwrap_err().to_string();
        assert!(err.contains("train-images-idx3-ubyte") && err.contains("3 data bytes"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn class_folders_sorted_by_name() {
        let root = temp_dir("classes");
        for (class, values) in [("zebra", vec![255u8]), ("ant", vec![0, 51])] {
            std::fs::create_dir(root.join(class)).unwrap();
            for (i, v) in values.iter().enumerate() {
                write_grey(&root.join(class).join(format!("{i}.png")), 3, 2, *v);
            }
        }
        std::fs::write(root.join("ant").join("notes.md"), "not an image").unwrap();
        let ds = load_class_folders(&root, GREY_4).unwrap();
        assert_eq!(ds.classes(), ["ant", "zebra"]);
        assert_eq!(ds.label_ids().unwrap(), [0, 0, 1]);
        assert_eq!((ds.channels, ds.height, ds.width), (1, 2, 3));
        let x = ds.images(&[1, 2], &Device::Cpu).unwrap();
        assert_eq!(x.dims(), [2, 1, 2, 3]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - (51.0 / 127.5 - 1.0)).abs() < 1e-6 && v[6] == 1.0, "{v:?}");
        assert!(ds.captions(&[0]).is_err());
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn captions_from_sidecars_rgb_planar() {
        let root = temp_dir("captions");
        write_rgb(&root.join("b.png"), 2, 2, [255, 0, 0]);
        std::fs::write(root.join("b.txt"), "  a red square\n").unwrap();
        write_rgb(&root.join("a.png"), 2, 2, [0, 0, 255]);
        std::fs::write(root.join("a.txt"), "blue").unwrap();
        let opts = FolderOptions { channels: Channels::Rgb, size: Size::Keep };
        let ds = load_captioned_folder(&root, opts).unwrap();
        assert_eq!(ds.captions(&[0, 1]).unwrap(), ["blue", "a red square"]);
        let v = ds.images(&[1], &Device::Cpu).unwrap();
        assert_eq!(v.dims(), [1, 3, 2, 2]);
        // Planar layout: the red plane is all 1, green and blue all -1.
        let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, [1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]);
        assert!(ds.labels(&[0], &Device::Cpu).is_err());
        std::fs::remove_file(root.join("a.txt")).unwrap();
        let err = load_captioned_folder(&root, opts).unwrap_err().to_string();
        assert!(err.contains("a.txt"), "{err}");
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn resize_covers_then_crops_and_check_rejects() {
        let root = temp_dir("resize");
        let path = root.join("wide.png");
        write_grey(&path, 8, 4, 200);
        let img = read_image(&path, Channels::Grey, Size::Resize { height: 2, width: 2 }).unwrap();
        assert_eq!((img.height, img.width), (2, 2));
        assert!(img.pixels.iter().all(|&p| p == 200), "{:?}", img.pixels);
        let rgb = read_image(&path, Channels::Rgb, Size::Keep).unwrap();
        assert_eq!((rgb.channels, rgb.pixels.len()), (3, 3 * 32));
        let err =
            read_image(&path, Channels::Grey, Size::Check { height: 4, width: 4 }).unwrap_err().to_string();
        assert!(err.contains("wide.png") && err.contains("8x4"), "{err}");
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn folder_errors_name_the_culprit() {
        let root = temp_dir("errors");
        let err = load_class_folders(&root, GREY_4).unwrap_err().to_string();
        assert!(err.contains("no class subfolders"), "{err}");
        std::fs::create_dir(root.join("empty")).unwrap();
        let err = load_class_folders(&root, GREY_4).unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("no images found"), "{err}");
        write_grey(&root.join("empty").join("a.png"), 4, 4, 0);
        write_grey(&root.join("empty").join("b.png"), 5, 4, 0);
        let err = load_class_folders(&root, GREY_4).unwrap_err().to_string();
        assert!(err.contains("b.png") && err.contains("mixed image sizes") && err.contains("a.png"), "{err}");
        std::fs::write(root.join("empty").join("b.png"), b"not a png").unwrap();
        let err = load_class_folders(&root, GREY_4).unwrap_err().to_string();
        assert!(err.contains("b.png") && err.contains("not a valid image"), "{err}");
        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn subset_keeps_order_and_targets() {
        let ds = Dataset {
            pixels: vec![0, 1, 2],
            channels: 1,
            height: 1,
            width: 1,
            targets: Targets::Labels { ids: vec![5, 6, 7], classes: vec!["x".into()] },
        };
        let sub = ds.subset(&[2, 0]).unwrap();
        assert_eq!((sub.pixels.clone(), sub.label_ids().unwrap().to_vec()), (vec![2, 0], vec![7, 5]));
        assert_eq!(sub.classes(), ["x"]);
        assert!(ds.subset(&[3]).is_err());
    }
}
