//! Line plots (loss curves, metric sweeps) drawn entirely by our own code: axes with numbered
//! ticks, axis labels, title and legend in the built-in 5x7 font, so nothing depends on system
//! fonts or a plotting stack.

use super::font::{draw_text, draw_text_vertical, text_height, text_width};
use crate::error::{Error, Result};
use image::{Rgb, RgbImage};
use std::path::Path;

/// Series colours (matplotlib's tab10), cycled.
const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];
const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const TICK_LEN: i64 = 4;

/// One named line: (x, y) points joined in order; non-finite points break the line.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A line plot; build it with the chained setters, then `render` or `save`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis; points with x <= 0 are skipped.
    pub log_x: bool,
    pub width: u32,
    pub height: u32,
    pub series: Vec<Series>,
}

/// The data window and where it lands in the image.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Frame {
    fn px(&self, x: f64) -> i64 {
        self.left + ((x - self.x.0) / (self.x.1 - self.x.0) * (self.right - self.left) as f64).round() as i64
    }

    fn py(&self, y: f64) -> i64 {
        self.bottom
            - ((y - self.y.0) / (self.y.1 - self.y.0) * (self.bottom - self.top) as f64).round() as i64
    }

    fn contains(&self, x: i64, y: i64) -> bool {
        (self.left..=self.right).contains(&x) && (self.top..=self.bottom).contains(&y)
    }
}

impl LinePlot {
    pub fn new(title: impl Into<String>) -> Self {
        LinePlot {
            title: title.into(),
            x_label: String::new(),
            y_label: String::new(),
            log_x: false,
            width: 800,
            height: 500,
            series: Vec::new(),
        }
    }

    pub fn x_label(mut self, label: impl Into<String>) -> Self {
        self.x_label = label.into();
        self
    }

    pub fn y_label(mut self, label: impl Into<String>) -> Self {
        self.y_label = label.into();
        self
    }

    pub fn log_x(mut self, on: bool) -> Self {
        self.log_x = on;
        self
    }

    pub fn size(mut self, width: u32, height: u32) -> Self {
        self.width = width;
        self.height = height;
        self
    }

    pub fn series(mut self, name: impl Into<String>, points: impl IntoIterator<Item = (f64, f64)>) -> Self {
        self.series.push(Series { name: name.into(), points: points.into_iter().collect() });
        self
    }

    /// A point in axis units (log10 x on a log axis), or `None` if it cannot be drawn.
    fn axis_point(&self, (x, y): (f64, f64)) -> Option<(f64, f64)> {
        if self.log_x && (x <= 0.0 || x.is_nan()) {
            return None;
        }
        let x = if self.log_x { x.log10() } else { x };
        (x.is_finite() && y.is_finite()).then_some((x, y))
    }

    /// The data range in axis units, widened when flat and padded by 5% like matplotlib.
    fn data_range(&self) -> Result<((f64, f64), (f64, f64))> {
        let points = self.series.iter().flat_map(|s| s.points.iter()).filter_map(|&p| self.axis_point(p));
        let (mut x, mut y) = ((f64::INFINITY, f64::NEG_INFINITY), (f64::INFINITY, f64::NEG_INFINITY));
        for (px, py) in points {
            x = (x.0.min(px), x.1.max(px));
            y = (y.0.min(py), y.1.max(py));
        }
        if x.0 > x.1 {
            return Err(Error::msg(format!("plot `{}`: no finite points to draw", self.title)));
        }
        Ok((padded(x), padded(y)))
    }

    /// Text scale: 2 (10x14 px characters) unless the image is small.
    fn scale(&self) -> u32 {
        if self.width >= 480 && self.height >= 300 {
            2
        } else {
            1
        }
    }

    /// Draws the plot into a new RGB image of `width` x `height`.
    pub fn render(&self) -> Result<RgbImage> {
        let (xr, yr) = self.data_range()?;
        let s = self.scale();
        let x_ticks = if self.log_x { log_ticks(xr.0, xr.1) } else { linear_ticks(xr.0, xr.1, 6) };
        let y_ticks = linear_ticks(yr.0, yr.1, 5);
        let frame = self.layout(xr, yr, &x_ticks, &y_ticks)?;
        let mut img = RgbImage::from_pixel(self.width, self.height, BACKGROUND);
        self.draw_axes(&mut img, &frame, &x_ticks, &y_ticks);
        for (k, series) in self.series.iter().enumerate() {
            self.draw_series(&mut img, &frame, series, Rgb(PALETTE[k % PALETTE.len()]));
        }
        self.draw_legend(&mut img, &frame);
        self.draw_labels(&mut img, &frame, s);
        Ok(img)
    }

    /// Renders and writes the plot as a PNG.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.render()?
            .save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| Error::msg(format!("{}: cannot write PNG: {e}", path.display())))
    }

    /// Margins sized to fit the tick labels, axis labels and title.
    fn layout(&self, x: (f64, f64), y: (f64, f64), x_ticks: &[Tick], y_ticks: &[Tick]) -> Result<Frame> {
        let s = self.scale();
        let line = text_height(s) as i64;
        let label_w = y_ticks.iter().map(|t| text_width(&t.label, s)).max().unwrap_or(0) as i64;
        let y_label_w = if self.y_label.is_empty() { 0 } else { line + 8 };
        let x_label_h = if self.x_label.is_empty() { 0 } else { line + 8 };
        let title_h = if self.title.is_empty() { 0 } else { line + 10 };
        let last_x_w = x_ticks.last().map_or(0, |t| text_width(&t.label, s)) as i64;
        let frame = Frame {
            x,
            y,
            left: 8 + y_label_w + label_w + 4 + TICK_LEN,
            top: 10 + title_h,
            right: self.width as i64 - 1 - (last_x_w / 2 + 4).max(16),
            bottom: self.height as i64 - 1 - (8 + x_label_h + line + 4 + TICK_LEN),
        };
        if frame.right - frame.left < 20 || frame.bottom - frame.top < 20 {
            return Err(Error::msg(format!(
                "plot `{}`: {}x{} is too small for its labels",
                self.title, self.width, self.height
            )));
        }
        Ok(frame)
    }

    fn draw_axes(&self, img: &mut RgbImage, f: &Frame, x_ticks: &[Tick], y_ticks: &[Tick]) {
        let s = self.scale();
        for t in x_ticks.iter().filter(|t| (f.x.0..=f.x.1).contains(&t.pos)) {
            let x = f.px(t.pos);
            line(img, (x, f.top), (x, f.bottom), 1, GRID, None);
            line(img, (x, f.bottom), (x, f.bottom + TICK_LEN), 1, INK, None);
            let w = text_width(&t.label, s) as i64;
            draw_text(img, x - w / 2, f.bottom + TICK_LEN + 4, &t.label, s, INK);
        }
        for t in y_ticks.iter().filter(|t| (f.y.0..=f.y.1).contains(&t.pos)) {
            let y = f.py(t.pos);
            line(img, (f.left, y), (f.right, y), 1, GRID, None);
            line(img, (f.left - TICK_LEN, y), (f.left, y), 1, INK, None);
            let (w, h) = (text_width(&t.label, s) as i64, text_height(s) as i64);
            draw_text(img, f.left - TICK_LEN - 4 - w, y - h / 2, &t.label, s, INK);
        }
        let corners = [(f.left, f.top), (f.right, f.top), (f.right, f.bottom), (f.left, f.bottom)];
        for i in 0..4 {
            line(img, corners[i], corners[(i + 1) % 4], 1, INK, None);
        }
    }

    fn draw_series(&self, img: &mut RgbImage, f: &Frame, series: &Series, color: Rgb<u8>) {
        let width = self.scale() as i64;
        let mut prev: Option<(i64, i64)> = None;
        let mut drawn = 0;
        for &p in &series.points {
            let Some((x, y)) = self.axis_point(p) else {
                prev = None;
                continue;
            };
            let here = (f.px(x), f.py(y));
            line(img, prev.unwrap_or(here), here, width, color, Some(f));
            prev = Some(here);
            drawn += 1;
        }
        // A lone point would be a dot one line wide: mark it so it can be seen.
        if let (Some((x, y)), 1) = (prev, drawn) {
            line(img, (x - 2, y), (x + 2, y), width + 2, color, Some(f));
        }
    }

    fn draw_legend(&self, img: &mut RgbImage, f: &Frame) {
        let s = self.scale() as i64;
        let named: Vec<(usize, &Series)> =
            self.series.iter().enumerate().filter(|(_, x)| !x.name.is_empty()).collect();
        if named.is_empty() {
            return;
        }
        let row = text_height(s as u32) as i64 + 4 * s;
        let swatch = 12 * s;
        let text_w = named.iter().map(|(_, x)| text_width(&x.name, s as u32)).max().unwrap_or(0) as i64;
        let (w, h) = (swatch + text_w + 10 * s, row * named.len() as i64 + 2 * s);
        let (x0, y0) = (f.right - 6 - w, f.top + 6);
        for y in y0..=y0 + h {
            line(img, (x0, y), (x0 + w, y), 1, BACKGROUND, None);
        }
        let box_corners = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)];
        for i in 0..4 {
            line(img, box_corners[i], box_corners[(i + 1) % 4], 1, Rgb([160; 3]), None);
        }
        for (r, (k, series)) in named.iter().enumerate() {
            let ty = y0 + 3 * s + r as i64 * row;
            let mid = ty + text_height(s as u32) as i64 / 2;
            let color = Rgb(PALETTE[k % PALETTE.len()]);
            line(img, (x0 + 3 * s, mid), (x0 + 3 * s + swatch, mid), s, color, None);
            draw_text(img, x0 + 6 * s + swatch, ty, &series.name, s as u32, INK);
        }
    }

    fn draw_labels(&self, img: &mut RgbImage, f: &Frame, s: u32) {
        let line_h = text_height(s) as i64;
        let centre_x = (f.left + f.right) / 2;
        let title_w = text_width(&self.title, s) as i64;
        draw_text(img, (self.width as i64 - title_w) / 2, 10, &self.title, s, INK);
        let xl_w = text_width(&self.x_label, s) as i64;
        draw_text(img, centre_x - xl_w / 2, self.height as i64 - 8 - line_h, &self.x_label, s, INK);
        let yl_h = text_width(&self.y_label, s) as i64;
        draw_text_vertical(img, 8, (f.top + f.bottom) / 2 - yl_h / 2, &self.y_label, s, INK);
    }
}

/// Widens a flat range, then pads it by 5% on each side.
fn padded((lo, hi): (f64, f64)) -> (f64, f64) {
    let (lo, hi) = if hi - lo <= 1e-12 * lo.abs().max(1.0) {
        let d = (lo.abs() * 0.05).max(0.5);
        (lo - d, hi + d)
    } else {
        (lo, hi)
    };
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// A tick: its position in axis units and its label.
#[derive(Clone, Debug, PartialEq)]
struct Tick {
    pos: f64,
    label: String,
}

/// The 1, 2 or 5 times a power of ten nearest `raw` (Heckbert's "nice numbers").
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

/// About `target` evenly spaced round-number ticks inside [lo, hi].
fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<Tick> {
    let step = nice_step((hi - lo) / target as f64);
    let (first, last) = ((lo / step).ceil() as i64, (hi / step).floor() as i64);
    (first..=last).map(|k| Tick { pos: k as f64 * step, label: format_tick(k as f64 * step, step) }).collect()
}

/// Ticks for a log axis spanning 10^lo..10^hi: decades, plus 2x and 5x when few decades show.
fn log_ticks(lo: f64, hi: f64) -> Vec<Tick> {
    let few_decades = hi.floor() - lo.ceil() < 2.0;
    let multiples: &[f64] = if few_decades { &[1.0, 2.0, 5.0] } else { &[1.0] };
    let mut ticks = Vec::new();
    for e in lo.floor() as i32..=hi.ceil() as i32 {
        for &m in multiples {
            let v = m * 10f64.powi(e);
            if (lo..=hi).contains(&v.log10()) {
                ticks.push(Tick { pos: v.log10(), label: format_tick(v, 10f64.powi(e)) });
            }
        }
    }
    if ticks.len() < 2 {
        // Less than a factor of ~2.5 shown: round-number ticks in value space read better.
        let (a, b) = (10f64.powf(lo), 10f64.powf(hi));
        let step = nice_step((b - a) / 5.0);
        let (first, last) = ((a / step).ceil() as i64, (b / step).floor() as i64);
        ticks = (first..=last)
            .map(|k| k as f64 * step)
            .filter(|&v| v > 0.0)
            .map(|v| Tick { pos: v.log10(), label: format_tick(v, step) })
            .collect();
    }
    ticks
}

/// Formats a tick value to the precision its spacing `step` needs (scientific when huge/tiny).
fn format_tick(v: f64, step: f64) -> String {
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let mag = v.abs().log10().floor();
    let step_mag = step.log10().floor();
    if !(-3.0..6.0).contains(&mag) {
        format!("{:.*e}", (mag - step_mag).max(0.0) as usize, v)
    } else {
        format!("{:.*}", (-step_mag).max(0.0) as usize, v)
    }
}

/// Draws a line `width` pixels thick (Bresenham, stamping squares), clipped to `clip` if given.
fn line(
    img: &mut RgbImage,
    (x0, y0): (i64, i64),
    (x1, y1): (i64, i64),
    width: i64,
    c: Rgb<u8>,
    clip: Option<&Frame>,
) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for (ox, oy) in (0..width).flat_map(|i| (0..width).map(move |j| (i, j))) {
            let (px, py) = (x + ox - width / 2, y + oy - width / 2);
            let inside_image = px >= 0 && py >= 0 && px < img.width() as i64 && py < img.height() as i64;
            if inside_image && clip.is_none_or(|f| f.contains(px, py)) {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
        if (x, y) == (x1, y1) {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(ticks: &[Tick]) -> Vec<&str> {
        ticks.iter().map(|t| t.label.as_str()).collect()
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(labels(&linear_ticks(0.0, 1.0, 5)), ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(labels(&linear_ticks(-3.0, 1234.0, 5)), ["0", "200", "400", "600", "800", "1000", "1200"]);
        assert_eq!(format_tick(0.30000000000000004, 0.1), "0.3");
        assert_eq!(format_tick(2.5e-5, 5e-6), "2.5e-5");
        assert_eq!(format_tick(3e7, 1e7), "3e7");
        assert_eq!(labels(&log_ticks(0.0, 4.0)), ["1", "10", "100", "1000", "10000"]);
        assert_eq!(labels(&log_ticks(-1.0, 0.5)), ["0.1", "0.2", "0.5", "1", "2"]);
        assert_eq!(labels(&log_ticks(0.5, 0.6)), ["3.2", "3.4", "3.6", "3.8"]);
    }

    #[test]
    fn plot_has_requested_size_and_draws_series() {
        let plot = LinePlot::new("FCD vs steps")
            .x_label("sampling steps")
            .y_label("FCD")
            .log_x(true)
            .size(640, 400)
            .series("euler", [(1.0, 80.0), (10.0, 20.0), (100.0, 5.0), (0.0, 1.0)])
            .series("heun", [(2.0, 60.0), (20.0, 10.0), (200.0, 3.0)]);
        let img = plot.render().unwrap();
        assert_eq!((img.width(), img.height()), (640, 400));
        let (xr, yr) = plot.data_range().unwrap();
        let frame = plot.layout(xr, yr, &log_ticks(xr.0, xr.1), &linear_ticks(yr.0, yr.1, 5)).unwrap();
        let count = |color: [u8; 3]| {
            img.enumerate_pixels()
                .filter(|(x, y, p)| frame.contains(*x as i64, *y as i64) && p.0 == color)
                .count()
        };
        // Each series is a 2 px wide line a few hundred pixels long, plus its legend swatch.
        assert!(
            count(PALETTE[0]) > 300 && count(PALETTE[1]) > 300,
            "{} {}",
            count(PALETTE[0]),
            count(PALETTE[1])
        );
        // Tick labels and the title put ink outside the plot area.
        let ink_outside = img
            .enumerate_pixels()
            .filter(|(x, y, p)| !frame.contains(*x as i64, *y as i64) && p.0 == [0, 0, 0])
            .count();
        assert!(ink_outside > 500, "{ink_outside}");
        let path = std::env::temp_dir().join(format!("conv-plot-{}.png", std::process::id()));
        plot.save(&path).unwrap();
        assert_eq!(image::image_dimensions(&path).unwrap(), (640, 400));
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn empty_or_tiny_plots_are_errors() {
        let err = LinePlot::new("loss").series("a", [(f64::NAN, 1.0)]).render().unwrap_err();
        assert!(err.to_string().contains("no finite points"), "{err}");
        let err = LinePlot::new("loss").size(30, 30).series("a", [(0.0, 1.0)]).render().unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
        // A single point still renders (as a marker).
        let img = LinePlot::new("one").series("a", [(3.0, 3.0)]).render().unwrap();
        assert!(img.pixels().any(|p| p.0 == PALETTE[0]));
    }
}
