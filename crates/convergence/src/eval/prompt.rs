//! Prompt faithfulness for `shapes` captions, judged by geometry instead of a learned model:
//! segment the image by palette colour, take connected components, classify each one's shape
//! and size from its pixels, and check every attribute the prompt asks for.

use crate::error::{Error, Result};
use crate::shapes::{parse_caption, Colour, PromptSpec, Relation, Shape, Size, Word, LARGE_HALF, SMALL_HALF};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

/// A pixel belongs to a palette colour when it is at least this fraction of that colour's
/// brightness (anti-aliased edges blend with black: half covered is the natural cut)...
const MIN_ALPHA: f64 = 0.5;
/// ...and at most this many degrees from it as an RGB direction (palette colours are >= 27
/// degrees apart, so this accepts off hues without crossing into a neighbour's half).
const MAX_ANGLE_DEG: f64 = 20.0;
/// A component is an object only if it covers this fraction of the image (8 px at 32x32; a
/// small star covers 24 or more)...
const MIN_AREA: f64 = 0.008;
/// ...and at least this share of its pixels are interior (all four neighbours in): drawn shapes
/// have a body [0.19, 0.77], clusters of uniform noise near a palette colour are nearly all edge
/// (at 0.10 about one noise image in eight still shows an object, at 0.12 one in two hundred).
const MIN_INTERIOR: f64 = 0.12;
/// Shape tests on a component, in this order, each cut about halfway between the ranges
/// measured on `shapes::render` at 32x32 (in brackets; they barely widen under noise of +-20 per
/// channel). Vertical skewness picks the upward triangle [-0.58, -0.50] from the rest [-0.09,
/// 0.11]...
const TRIANGLE_SKEW: f64 = -0.3;
/// ...area over convex hull area the star [0.51, 0.75] from the convex shapes [0.84, 1.0]...
const STAR_SOLIDITY: f64 = 0.8;
/// ...and the fourfold moment (see `Features::fourfold`) the square [-0.60, -0.56] from the
/// circle [-0.05, 0.04] from the diamond [0.54, 0.58].
const SQUARE_FOURFOLD: f64 = -0.3;
const DIAMOND_FOURFOLD: f64 = 0.3;

/// One connected region of one palette colour, as recognised.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    pub colour: Colour,
    pub shape: Shape,
    pub size: Size,
    /// Centroid (x, y) as fractions of width and height, y pointing down.
    pub centroid: (f64, f64),
    /// Pixels at least half covered.
    pub pixels: usize,
}

/// How one prompted object fared; `size` only where the prompt names one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectVerdict {
    pub colour: bool,
    pub shape: bool,
    pub size: Option<bool>,
}

/// How one image fared against its prompt; `relation` only where the prompt has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub objects: Vec<ObjectVerdict>,
    pub relation: Option<bool>,
}

impl Verdict {
    fn checks(&self) -> impl Iterator<Item = bool> + '_ {
        let objects = self.objects.iter().flat_map(|o| [Some(o.colour), Some(o.shape), o.size]);
        objects.chain([self.relation]).flatten()
    }

    /// Every prompted attribute right.
    pub fn correct(&self) -> bool {
        self.checks().all(|c| c)
    }

    fn rank(&self) -> (bool, usize) {
        (self.correct(), self.checks().filter(|&c| c).count())
    }
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The palette colour a pixel shows, or `None` for background and off-palette colours.
/// Colours are compared as directions, so a dimmed edge pixel keeps its hue.
fn classify(p: [u8; 3]) -> Option<Colour> {
    let p = p.map(f64::from);
    let min_cos = MAX_ANGLE_DEG.to_radians().cos();
    let fit = |c: Colour| {
        let q = c.rgb().map(f64::from);
        let cos = dot(p, q) / (dot(p, p) * dot(q, q)).sqrt();
        (coverage(p, c) >= MIN_ALPHA && cos >= min_cos).then_some((cos, c))
    };
    Colour::ALL.iter().filter_map(|&c| fit(c)).max_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, c)| c)
}

/// Area of the convex hull of the pixels' squares, from each row's end corners (monotone chain).
fn hull_area(pixels: &[(usize, usize)]) -> f64 {
    let mut ends: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for &(x, y) in pixels {
        let e = ends.entry(y).or_insert((x, x));
        *e = (e.0.min(x), e.1.max(x));
    }
    let mut pts: Vec<(i64, i64)> = ends
        .iter()
        .flat_map(|(&y, &(l, r))| {
            let (l, r, y) = (l as i64, r as i64 + 1, y as i64);
            [(l, y), (l, y + 1), (r, y), (r, y + 1)]
        })
        .collect();
    pts.sort_unstable();
    let cross =
        |o: (i64, i64), a: (i64, i64), b: (i64, i64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut hull: Vec<(i64, i64)> = Vec::new();
    for pass in [pts.clone(), pts.into_iter().rev().collect()] {
        let start = hull.len();
        for p in pass {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    let n = hull.len();
    (0..n).map(|i| cross((0, 0), hull[i], hull[(i + 1) % n])).sum::<i64>() as f64 / 2.0
}

/// Measurements of a component's pixels that tell shapes apart. Moments use every pixel, so one
/// pixel more or less at an edge barely moves them (a bounding box would jump).
#[derive(Clone, Copy, Debug)]
struct Features {
    /// Area over convex hull area: low only for the star's notches.
    solidity: f64,
    /// Third central moment of y over the variance^1.5: strongly negative for the upward
    /// triangle (its mass sits low, y pointing down), near zero for shapes symmetric top to bottom.
    skew: f64,
    /// (m40 + m04 - 6 m22) / (m20 + m02)^2, the cos 4θ part of the mass distribution: -0.6 for
    /// a square, 0 for a circle (and the 5-fold star), +0.6 for the same square turned 45°.
    fourfold: f64,
    centroid: (f64, f64),
    /// Bounding box (width, height) in pixels.
    size: (f64, f64),
}

/// `pixels` are the component's, `soft` its pixel centres with coverage weights.
fn features(pixels: &[(usize, usize)], soft: &[(f64, f64, f64)]) -> Features {
    let mass: f64 = soft.iter().map(|p| p.2).sum();
    let sum = soft.iter().fold((0.0, 0.0), |s, p| (s.0 + p.0 * p.2, s.1 + p.1 * p.2));
    let (cx, cy) = (sum.0 / mass, sum.1 / mass);
    let m = |a: i32, b: i32| {
        soft.iter().map(|p| (p.0 - cx).powi(a) * (p.1 - cy).powi(b) * p.2).sum::<f64>() / mass
    };
    // Each pixel is a unit square, not a point: it adds 1/12 to the variance along each axis.
    let (m20, m02) = (m(2, 0) + 1.0 / 12.0, m(0, 2) + 1.0 / 12.0);
    let span = |f: fn(&(usize, usize)) -> usize| {
        let (lo, hi) = pixels.iter().map(f).fold((usize::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
        (hi - lo + 1) as f64
    };
    Features {
        solidity: pixels.len() as f64 / hull_area(pixels),
        skew: m(0, 3) / m02.powf(1.5),
        fourfold: (m(4, 0) + m(0, 4) - 6.0 * m(2, 2)) / (m20 + m02).powi(2),
        centroid: (cx, cy),
        size: (span(|p| p.0), span(|p| p.1)),
    }
}

fn shape_of(f: &Features) -> Shape {
    if f.skew < TRIANGLE_SKEW {
        Shape::Triangle
    } else if f.solidity < STAR_SOLIDITY {
        Shape::Star
    } else if f.fourfold < SQUARE_FOURFOLD {
        Shape::Square
    } else if f.fourfold > DIAMOND_FOURFOLD {
        Shape::Diamond
    } else {
        Shape::Circle
    }
}

/// How much of pixel `p` colour `c` covers, on black.
fn coverage(p: [f64; 3], c: Colour) -> f64 {
    let q = c.rgb().map(f64::from);
    (dot(p, q) / dot(q, q)).clamp(0.0, 1.0)
}

/// Shape, size and centroid of one component of `rgb`. Moments weigh the component and the ring
/// around it by coverage, so anti-aliased edges count at their true position and a pixel that
/// noise pushes across the cut moves them little.
fn describe(rgb: &[u8], width: usize, height: usize, colour: Colour, pixels: &[(usize, usize)]) -> Component {
    let near: BTreeSet<(usize, usize)> = pixels
        .iter()
        .flat_map(|&(x, y)| {
            let xs = x.saturating_sub(1)..(x + 2).min(width);
            (y.saturating_sub(1)..(y + 2).min(height)).flat_map(move |ny| xs.clone().map(move |nx| (nx, ny)))
        })
        .collect();
    let soft: Vec<(f64, f64, f64)> = near
        .into_iter()
        .map(|(x, y)| {
            let p = &rgb[(y * width + x) * 3..][..3];
            (x as f64 + 0.5, y as f64 + 0.5, coverage([p[0], p[1], p[2]].map(f64::from), colour))
        })
        .collect();
    let f = features(pixels, &soft);
    // Every shape fills its box, so the larger side says the size (cut halfway between).
    let extent = (f.size.0 / width as f64).max(f.size.1 / height as f64);
    let size = if extent >= SMALL_HALF + LARGE_HALF { Size::Large } else { Size::Small };
    let centroid = (f.centroid.0 / width as f64, f.centroid.1 / height as f64);
    Component { colour, shape: shape_of(&f), size, centroid, pixels: pixels.len() }
}

/// How many pixels have all four neighbours in the set.
fn interior(pixels: &[(usize, usize)]) -> usize {
    let set: HashSet<(usize, usize)> = pixels.iter().copied().collect();
    let inside = |x: Option<usize>, y: Option<usize>| x.zip(y).is_some_and(|p| set.contains(&p));
    let count = |&&(x, y): &&(usize, usize)| {
        inside(x.checked_sub(1), Some(y))
            && inside(Some(x + 1), Some(y))
            && inside(Some(x), y.checked_sub(1))
            && inside(Some(x), Some(y + 1))
    };
    pixels.iter().filter(count).count()
}

/// The 8-connected regions of one palette colour that look like drawn objects, not specks.
fn regions(rgb: &[u8], width: usize, height: usize) -> Vec<(Colour, Vec<(usize, usize)>)> {
    let mut label: Vec<Option<Colour>> = rgb.chunks_exact(3).map(|p| classify([p[0], p[1], p[2]])).collect();
    let mut found = Vec::new();
    for start in 0..label.len() {
        let Some(colour) = label[start].take() else { continue };
        let (mut stack, mut pixels) = (vec![start], Vec::new());
        while let Some(i) = stack.pop() {
            let (x, y) = (i % width, i / width);
            pixels.push((x, y));
            for ny in y.saturating_sub(1)..(y + 2).min(height) {
                for nx in x.saturating_sub(1)..(x + 2).min(width) {
                    let j = ny * width + nx;
                    if label[j] == Some(colour) {
                        label[j] = None;
                        stack.push(j);
                    }
                }
            }
        }
        let area = pixels.len() as f64;
        if area >= MIN_AREA * (width * height) as f64 && interior(&pixels) as f64 >= MIN_INTERIOR * area {
            found.push((colour, pixels));
        }
    }
    found
}

/// The recognised objects of an RGB HWC image.
pub fn components(rgb: &[u8], width: usize, height: usize) -> Result<Vec<Component>> {
    if width == 0 || height == 0 || rgb.len() != width * height * 3 {
        return Err(Error::msg(format!(
            "expected a {width}x{height} RGB image ({} bytes), got {} bytes",
            width * height * 3,
            rgb.len()
        )));
    }
    Ok(regions(rgb, width, height)
        .iter()
        .map(|(c, pixels)| describe(rgb, width, height, *c, pixels))
        .collect())
}

/// `a <rel> b` from centroids: the offset must lie mostly along the relation's axis.
fn holds(rel: Relation, a: &Component, b: &Component) -> bool {
    let (dx, dy) = (b.centroid.0 - a.centroid.0, b.centroid.1 - a.centroid.1);
    match rel {
        Relation::LeftOf => dx > dy.abs(),
        Relation::RightOf => -dx > dy.abs(),
        Relation::Above => dy > dx.abs(),
        Relation::Below => -dy > dx.abs(),
    }
}

fn verdict(comps: &[Component], spec: &PromptSpec, chosen: &[Option<usize>]) -> Verdict {
    let objects = spec
        .objects
        .iter()
        .zip(chosen)
        .map(|(o, c)| match c.map(|i| &comps[i]) {
            Some(c) => {
                ObjectVerdict { colour: true, shape: c.shape == o.shape, size: o.size.map(|s| s == c.size) }
            }
            None => ObjectVerdict { colour: false, shape: false, size: o.size.map(|_| false) },
        })
        .collect();
    let relation = spec.relation.map(|r| match (chosen.first(), chosen.get(1)) {
        (Some(Some(a)), Some(Some(b))) => holds(r, &comps[*a], &comps[*b]),
        _ => false,
    });
    Verdict { objects, relation }
}

/// The best verdict over all ways of giving each remaining prompted object a distinct component
/// of its colour (or none): an image is judged by its most faithful reading. Exhaustive, which
/// is cheap for prompts of one or two objects.
fn best(comps: &[Component], spec: &PromptSpec, chosen: &mut Vec<Option<usize>>) -> Verdict {
    let Some(want) = spec.objects.get(chosen.len()) else { return verdict(comps, spec, chosen) };
    let candidates: Vec<usize> =
        (0..comps.len()).filter(|&i| comps[i].colour == want.colour && !chosen.contains(&Some(i))).collect();
    let mut with = |c: Option<usize>| {
        chosen.push(c);
        let v = best(comps, spec, chosen);
        chosen.pop();
        v
    };
    let mut top = with(None);
    for i in candidates {
        let v = with(Some(i));
        if v.rank() > top.rank() {
            top = v;
        }
    }
    top
}

/// Judges an RGB HWC image against a prompt.
pub fn judge(rgb: &[u8], width: usize, height: usize, spec: &PromptSpec) -> Result<Verdict> {
    Ok(best(&components(rgb, width, height)?, spec, &mut Vec::new()))
}

/// Right answers out of questions asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub correct: usize,
    pub total: usize,
}

impl Tally {
    fn add(&mut self, ok: bool) {
        self.correct += ok as usize;
        self.total += 1;
    }

    /// `None` when nothing was asked.
    pub fn accuracy(&self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }
}

/// Accuracy over many (image, prompt) pairs: per attribute (counted per prompted object; size
/// and relation only where prompted) and for whole prompts.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PromptReport {
    pub colour: Tally,
    pub shape: Tally,
    pub size: Tally,
    pub relation: Tally,
    pub whole: Tally,
}

impl PromptReport {
    pub fn add(&mut self, v: &Verdict) {
        for o in &v.objects {
            self.colour.add(o.colour);
            self.shape.add(o.shape);
            if let Some(s) = o.size {
                self.size.add(s);
            }
        }
        if let Some(r) = v.relation {
            self.relation.add(r);
        }
        self.whole.add(v.correct());
    }
}

impl fmt::Display for PromptReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<14}{:>9}{:>9}{:>10}", "attribute", "correct", "asked", "accuracy")?;
        let rows = [
            ("colour", self.colour),
            ("shape", self.shape),
            ("size", self.size),
            ("relation", self.relation),
            ("whole prompt", self.whole),
        ];
        for (name, t) in rows {
            let acc = t.accuracy().map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a));
            writeln!(f, "{name:<14}{:>9}{:>9}{acc:>10}", t.correct, t.total)?;
        }
        Ok(())
    }
}

/// Judges `width` x `height` RGB HWC images against their captions.
pub fn evaluate<'a, 'b>(
    pairs: impl IntoIterator<Item = (&'a [u8], &'b str)>,
    width: usize,
    height: usize,
) -> Result<PromptReport> {
    let mut report = PromptReport::default();
    for (rgb, caption) in pairs {
        report.add(&judge(rgb, width, height, &parse_caption(caption)?)?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{render, scenes, Object, Scene, Split};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn palette_keeps_hues_apart() {
        for (i, &a) in Colour::ALL.iter().enumerate() {
            assert_eq!(classify(a.rgb()), Some(a));
            assert_eq!(classify(a.rgb().map(|c| c / 2 + 10)), Some(a), "{a:?} at half brightness");
            for &b in &Colour::ALL[i + 1..] {
                let (p, q) = (a.rgb().map(f64::from), b.rgb().map(f64::from));
                let angle = (dot(p, q) / (dot(p, p) * dot(q, q)).sqrt()).acos().to_degrees();
                assert!(angle > 1.3 * MAX_ANGLE_DEG, "{a:?} and {b:?} are {angle:.1} degrees apart");
            }
        }
        assert_eq!(classify([0, 0, 0]), None);
        assert_eq!(classify([60, 60, 60]), None);
    }

    #[test]
    fn every_shape_colour_and_size_is_recognised_anywhere() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for (k, (&shape, &size)) in
            Shape::ALL.iter().flat_map(|s| Size::ALL.iter().map(move |z| (s, z))).enumerate()
        {
            for i in 0..300 {
                let colour = Colour::ALL[(i + k) % Colour::ALL.len()];
                let h = size.half();
                let centre = (h + (1.0 - 2.0 * h) * rng.gen::<f64>(), h + (1.0 - 2.0 * h) * rng.gen::<f64>());
                let o = Object { shape, colour, size, centre, size_in_caption: true };
                let found =
                    components(&render(&Scene { objects: vec![o], relation: None }, 32), 32, 32).unwrap();
                let what = format!("{size:?} {colour:?} {shape:?} at {centre:?}: {found:?}");
                assert_eq!(found.len(), 1, "{what}");
                assert_eq!((found[0].colour, found[0].shape, found[0].size), (colour, shape, size), "{what}");
                let off = (found[0].centroid.0 - centre.0).hypot(found[0].centroid.1 - centre.1);
                assert!(off < h / 2.0, "{what}");
            }
        }
    }

    fn rendered(n: usize, seed: u64) -> Vec<(Vec<u8>, Scene)> {
        let mut all = scenes(n, seed, Split::Train);
        all.extend(scenes(n, seed, Split::HeldOut));
        all.into_iter().map(|s| (render(&s, 32), s)).collect()
    }

    fn score(pairs: &[(Vec<u8>, PromptSpec)]) -> PromptReport {
        let captions: Vec<String> = pairs.iter().map(|(_, p)| p.to_string()).collect();
        evaluate(pairs.iter().zip(&captions).map(|((img, _), c)| (&img[..], c.as_str())), 32, 32).unwrap()
    }

    #[test]
    fn ground_truth_scores_high() {
        let truth = rendered(200, 11);
        let report = score(&truth.iter().map(|(img, s)| (img.clone(), s.spec())).collect::<Vec<_>>());
        println!("captions as generated:\n{report}");
        assert!(report.whole.accuracy().unwrap() >= 0.98, "{report}");
        assert!(report.size.total > 100 && report.relation.total > 100, "{report}");
        // Every size named, not only the half the captions mention.
        let sized: Vec<(Vec<u8>, PromptSpec)> = truth
            .iter()
            .map(|(img, s)| {
                let mut spec = s.spec();
                for (o, obj) in spec.objects.iter_mut().zip(&s.objects) {
                    o.size = Some(obj.size);
                }
                (img.clone(), spec)
            })
            .collect();
        let report = score(&sized);
        println!("every size named:\n{report}");
        assert!(report.whole.accuracy().unwrap() >= 0.98, "{report}");
        // Sampled images are never clean: noise of +-20 per channel must not change the verdicts.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let noisy: Vec<(Vec<u8>, PromptSpec)> = sized
            .into_iter()
            .map(|(img, spec)| {
                (
                    img.iter().map(|&p| (p as i32 + rng.gen_range(-20..=20)).clamp(0, 255) as u8).collect(),
                    spec,
                )
            })
            .collect();
        let report = score(&noisy);
        println!("every size named, noise +-20:\n{report}");
        assert!(report.whole.accuracy().unwrap() >= 0.98, "{report}");
    }

    fn next<T: Word>(x: T) -> T {
        T::ALL[(T::ALL.iter().position(|&a| a == x).unwrap_or(0) + 1) % T::ALL.len()]
    }

    /// The prompt with one thing changed: object 0's colour or shape, or the relation reversed.
    fn corrupt(s: &Scene, what: usize) -> Option<PromptSpec> {
        let mut spec = s.spec();
        match what {
            0 => spec.objects[0].colour = next(spec.objects[0].colour),
            1 => spec.objects[0].shape = next(spec.objects[0].shape),
            _ => {
                spec.relation = Some(match spec.relation? {
                    Relation::LeftOf => Relation::RightOf,
                    Relation::RightOf => Relation::LeftOf,
                    Relation::Above => Relation::Below,
                    Relation::Below => Relation::Above,
                })
            }
        }
        Some(spec)
    }

    #[test]
    fn wrong_prompts_score_low() {
        let truth = rendered(200, 12);
        for (what, name) in ["colour", "shape", "relation"].iter().enumerate() {
            let pairs: Vec<_> =
                truth.iter().filter_map(|(img, s)| Some((img.clone(), corrupt(s, what)?))).collect();
            let report = score(&pairs);
            println!("wrong {name}:\n{report}");
            assert!(report.whole.total > 150 && report.whole.accuracy().unwrap() < 0.1, "{report}");
        }
    }

    #[test]
    fn blank_and_noise_images_score_nothing() {
        let prompts: Vec<PromptSpec> = rendered(100, 13).iter().map(|(_, s)| s.spec()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let noise: Vec<(Vec<u8>, PromptSpec)> =
            prompts.iter().map(|p| ((0..32 * 32 * 3).map(|_| rng.gen()).collect(), p.clone())).collect();
        let specks: usize = noise.iter().map(|(img, _)| components(img, 32, 32).unwrap().len()).sum();
        assert!(specks < 10, "{specks} objects found in 200 noise images");
        let report = score(&noise);
        println!("uniform noise:\n{report}");
        assert!(report.whole.accuracy().unwrap() < 0.02, "{report}");
        let blank: Vec<_> = prompts.iter().map(|p| (vec![0u8; 32 * 32 * 3], p.clone())).collect();
        assert_eq!(score(&blank).whole.correct, 0);
        assert!(components(&[0; 10], 32, 32).is_err());
    }
}
