//! A procedural captioned dataset for text-to-image training: one or two coloured shapes on
//! black, captioned "a red circle left of a small blue square". The grammar is small enough to
//! parse back, so `eval::prompt` can check an image against its prompt with plain geometry
//! instead of a learned judge. A few (colour, shape) pairs never appear in training, to test
//! whether a model composes words it has only seen apart.

use crate::error::{Error, Result};
use crate::train::data::{Dataset, Targets};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::fmt;
use std::path::Path;

/// The side of `dataset`'s square images.
pub const RESOLUTION: usize = 32;

/// An object's half-extent as a fraction of the image side (4.5 and 7 px at 32x32): two large
/// objects still fit side by side, and a small star still shows its points.
pub const SMALL_HALF: f64 = 0.14;
pub const LARGE_HALF: f64 = 0.22;
/// Empty space between two objects' boxes along the relation's axis (2.5 px at 32x32), so that
/// same-coloured neighbours stay separate components after anti-aliasing.
const GAP: f64 = 0.08;
/// Largest off-axis / on-axis offset of a generated pair: no relation looks diagonal.
const MAX_SLANT: f64 = 0.5;
/// The star's inner radius over its outer one: deep notches keep it far from convex shapes.
const STAR_INNER: f64 = 0.4;
const P_TWO_OBJECTS: f64 = 0.6;
/// Half the objects are captioned with their size, so the model learns captions with and without.
const P_SIZE_WORD: f64 = 0.5;
/// Samples per pixel side for anti-aliasing.
const SUPERSAMPLE: usize = 4;

/// A closed vocabulary: every value, its caption word(s), and what the category is called.
pub trait Word: Copy + PartialEq + 'static {
    const ALL: &'static [Self];
    const KIND: &'static str;
    fn word(self) -> &'static str;
}

macro_rules! vocabulary {
    ($name:ident, $kind:literal, $($variant:ident => $word:literal),+) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }
        impl Word for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];
            const KIND: &'static str = $kind;
            fn word(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }
    };
}

vocabulary!(Shape, "shape", Circle => "circle", Square => "square", Triangle => "triangle",
    Star => "star", Diamond => "diamond");
vocabulary!(Colour, "colour", Red => "red", Green => "green", Blue => "blue", Yellow => "yellow",
    Purple => "purple", White => "white");
vocabulary!(Size, "size", Small => "small", Large => "large");
vocabulary!(Relation, "relation", LeftOf => "left of", RightOf => "right of", Above => "above",
    Below => "below");

impl Colour {
    /// Saturated colours at least 27 degrees apart as RGB directions, so that a pixel blended
    /// with the black background keeps its hue (see `eval::prompt`).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [230, 30, 40],
            Colour::Green => [40, 190, 40],
            Colour::Blue => [40, 80, 240],
            Colour::Yellow => [230, 220, 20],
            Colour::Purple => [160, 40, 220],
            Colour::White => [235, 235, 235],
        }
    }
}

impl Size {
    /// Half-extent as a fraction of the image side.
    pub fn half(self) -> f64 {
        match self {
            Size::Small => SMALL_HALF,
            Size::Large => LARGE_HALF,
        }
    }
}

/// (colour, shape) pairs never rendered in `Split::Train`; each colour and shape still appears
/// in training with others.
pub const HELD_OUT: [(Colour, Shape); 4] = [
    (Colour::Purple, Shape::Star),
    (Colour::Yellow, Shape::Circle),
    (Colour::Green, Shape::Triangle),
    (Colour::Blue, Shape::Square),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// No held-out pair anywhere in the scene.
    Train,
    /// At least one held-out pair in every scene.
    HeldOut,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// (x, y) as fractions of the image side, y pointing down.
    pub centre: (f64, f64),
    /// Whether the caption names the size.
    pub size_in_caption: bool,
}

/// One object, or two with `objects[0] <relation> objects[1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub objects: Vec<Object>,
    pub relation: Option<Relation>,
}

/// What a caption asks for; `size` is `None` where the caption does not say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectSpec {
    pub colour: Colour,
    pub shape: Shape,
    pub size: Option<Size>,
}

/// A parsed caption: one object, or two with `objects[0] <relation> objects[1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptSpec {
    pub objects: Vec<ObjectSpec>,
    pub relation: Option<Relation>,
}

impl fmt::Display for ObjectSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a ")?;
        if let Some(size) = self.size {
            write!(f, "{} ", size.word())?;
        }
        write!(f, "{} {}", self.colour.word(), self.shape.word())
    }
}

/// The caption in our grammar.
impl fmt::Display for PromptSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, o) in self.objects.iter().enumerate() {
            if i > 0 {
                write!(f, " {} ", self.relation.map_or("and", Relation::word))?;
            }
            write!(f, "{o}")?;
        }
        Ok(())
    }
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

fn pairs(keep: impl Fn((Colour, Shape)) -> bool) -> Vec<(Colour, Shape)> {
    let all = Colour::ALL.iter().flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)));
    all.filter(|&p| keep(p)).collect()
}

/// Centres for `rel`: boxes apart by `GAP` along the relation's axis, and the off-axis offset
/// at most `MAX_SLANT` times the on-axis one.
fn place_pair(rng: &mut ChaCha8Rng, half: [f64; 2], rel: Relation) -> [(f64, f64); 2] {
    // `first` has the smaller coordinate along the axis (y points down).
    let (first, vertical) = match rel {
        Relation::LeftOf => (0, false),
        Relation::RightOf => (1, false),
        Relation::Above => (0, true),
        Relation::Below => (1, true),
    };
    let (hf, hs) = (half[first], half[1 - first]);
    let d = hf + hs + GAP;
    let f = uniform(rng, hf, 1.0 - hs - d);
    let s = uniform(rng, f + d, 1.0 - hs);
    let reach = MAX_SLANT * (s - f);
    let pf = uniform(rng, hf, 1.0 - hf);
    let ps = uniform(rng, (pf - reach).max(hs), (pf + reach).min(1.0 - hs));
    let at = |along: f64, across: f64| if vertical { (across, along) } else { (along, across) };
    let mut centres = [at(f, pf); 2];
    centres[1 - first] = at(s, ps);
    centres
}

impl Scene {
    /// A random scene of `split`.
    pub fn random(rng: &mut ChaCha8Rng, split: Split) -> Scene {
        let count = if rng.gen_bool(P_TWO_OBJECTS) { 2 } else { 1 };
        let held = rng.gen_range(0..count);
        let sizes: Vec<Size> = (0..count).map(|_| pick(rng, Size::ALL)).collect();
        let relation = (count == 2).then(|| pick(rng, Relation::ALL));
        let centres = match relation {
            Some(rel) => place_pair(rng, [sizes[0].half(), sizes[1].half()], rel).to_vec(),
            None => {
                let h = sizes[0].half();
                vec![(uniform(rng, h, 1.0 - h), uniform(rng, h, 1.0 - h))]
            }
        };
        let objects = (0..count)
            .map(|i| {
                let pool = match split {
                    Split::Train => pairs(|p| !HELD_OUT.contains(&p)),
                    Split::HeldOut if i == held => HELD_OUT.to_vec(),
                    Split::HeldOut => pairs(|_| true),
                };
                let (colour, shape) = pick(rng, &pool);
                let size_in_caption = rng.gen_bool(P_SIZE_WORD);
                Object { shape, colour, size: sizes[i], centre: centres[i], size_in_caption }
            })
            .collect();
        Scene { objects, relation }
    }

    /// What the caption says about this scene.
    pub fn spec(&self) -> PromptSpec {
        let objects = self
            .objects
            .iter()
            .map(|o| ObjectSpec {
                colour: o.colour,
                shape: o.shape,
                size: o.size_in_caption.then_some(o.size),
            })
            .collect();
        PromptSpec { objects, relation: self.relation }
    }
}

/// `n` scenes; scene `i` depends only on (`seed`, `i`, `split`), so sets grow without reshuffling.
/// Use different seeds for training and evaluation.
pub fn scenes(n: usize, seed: u64, split: Split) -> Vec<Scene> {
    (0..n)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            Scene::random(&mut rng, split)
        })
        .collect()
}

/// The scene's caption, e.g. "a small red star above a blue circle".
pub fn caption(scene: &Scene) -> String {
    scene.spec().to_string()
}

/// The outline in the unit box [-1, 1]^2 (y down); empty for the circle, which is tested exactly.
fn outline(shape: Shape) -> Vec<(f64, f64)> {
    match shape {
        Shape::Circle => vec![],
        Shape::Square => vec![(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
        Shape::Diamond => vec![(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
        Shape::Triangle => vec![(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
        Shape::Star => {
            let points: Vec<(f64, f64)> = (0..10)
                .map(|k| {
                    let a = (k as f64 * 36.0 - 90.0).to_radians();
                    let r = if k % 2 == 0 { 1.0 } else { STAR_INNER };
                    (r * a.cos(), r * a.sin())
                })
                .collect();
            // Stretch the star to fill the box like the other shapes, so extent means size.
            let (top, bottom) = (-1.0, points[4].1);
            let width = points[2].0;
            points.iter().map(|&(x, y)| (x / width, (2.0 * (y - top) / (bottom - top)) - 1.0)).collect()
        }
    }
}

/// Even-odd rule.
fn inside(polygon: &[(f64, f64)], u: f64, v: f64) -> bool {
    if polygon.is_empty() {
        return u * u + v * v <= 1.0;
    }
    let mut hit = false;
    let mut j = polygon.len() - 1;
    for (i, &(xi, yi)) in polygon.iter().enumerate() {
        let (xj, yj) = polygon[j];
        if (yi > v) != (yj > v) && u < xi + (v - yi) * (xj - xi) / (yj - yi) {
            hit = !hit;
        }
        j = i;
    }
    hit
}

/// Blends `o` into an RGB HWC image, each pixel by the fraction of its subsamples inside.
fn draw(img: &mut [u8], side: usize, o: &Object) {
    let polygon = outline(o.shape);
    let s = side as f64;
    let (h, cx, cy) = (o.size.half() * s, o.centre.0 * s, o.centre.1 * s);
    let span = |c: f64| ((c - h).floor().max(0.0) as usize)..((c + h).ceil().max(0.0) as usize).min(side);
    let step = 1.0 / SUPERSAMPLE as f64;
    for y in span(cy) {
        for x in span(cx) {
            let hits = (0..SUPERSAMPLE * SUPERSAMPLE)
                .filter(|k| {
                    let u = x as f64 + (k % SUPERSAMPLE) as f64 * step + step / 2.0 - cx;
                    let v = y as f64 + (k / SUPERSAMPLE) as f64 * step + step / 2.0 - cy;
                    inside(&polygon, u / h, v / h)
                })
                .count();
            let a = hits as f64 / (SUPERSAMPLE * SUPERSAMPLE) as f64;
            let px = &mut img[(y * side + x) * 3..][..3];
            for (p, c) in px.iter_mut().zip(o.colour.rgb()) {
                *p = (*p as f64 * (1.0 - a) + c as f64 * a).round() as u8;
            }
        }
    }
}

/// The scene as `side` x `side` RGB, HWC, on black.
pub fn render(scene: &Scene, side: usize) -> Vec<u8> {
    let mut img = vec![0u8; side * side * 3];
    for o in &scene.objects {
        draw(&mut img, side, o);
    }
    img
}

/// `n` captioned RESOLUTION x RESOLUTION RGB images of `scenes(n, seed, split)`.
pub fn dataset(n: usize, seed: u64, split: Split) -> Dataset {
    let scenes = scenes(n, seed, split);
    let plane = RESOLUTION * RESOLUTION;
    let images: Vec<Vec<u8>> = scenes
        .par_iter()
        .map(|s| {
            let hwc = render(s, RESOLUTION);
            (0..3 * plane).map(|i| hwc[(i % plane) * 3 + i / plane]).collect()
        })
        .collect();
    Dataset {
        pixels: images.concat(),
        channels: 3,
        height: RESOLUTION,
        width: RESOLUTION,
        targets: Targets::Captions(scenes.iter().map(caption).collect()),
    }
}

/// The captions of `scenes(n, seed, split)`, to prompt a model with.
pub fn eval_prompts(n: usize, seed: u64, split: Split) -> Vec<String> {
    scenes(n, seed, split).iter().map(caption).collect()
}

/// `eval_prompts` written one per line.
pub fn write_prompts(path: &Path, n: usize, seed: u64, split: Split) -> Result<()> {
    let text: String = eval_prompts(n, seed, split).iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Words of a caption, consumed left to right; errors quote the whole caption.
struct Parser<'a> {
    text: &'a str,
    words: Vec<String>,
    at: usize,
}

impl Parser<'_> {
    fn skip(&mut self, optional: &[&str]) {
        while self.words.get(self.at).is_some_and(|w| optional.contains(&w.as_str())) {
            self.at += 1;
        }
    }

    /// The value whose word(s) come next, if any.
    fn try_word<T: Word>(&mut self) -> Option<T> {
        let rest = &self.words[self.at..];
        let found = T::ALL.iter().copied().find(|t| {
            let want: Vec<&str> = t.word().split(' ').collect();
            rest.len() >= want.len() && rest.iter().zip(&want).all(|(w, v)| w == v)
        })?;
        self.at += found.word().split(' ').count();
        Some(found)
    }

    fn word<T: Word>(&mut self) -> Result<T> {
        if let Some(t) = self.try_word() {
            return Ok(t);
        }
        let problem = match self.words.get(self.at) {
            Some(w) => format!("unknown {} '{w}'", T::KIND),
            None => format!("missing {}", T::KIND),
        };
        let known: Vec<&str> = T::ALL.iter().map(|t| t.word()).collect();
        Err(Error::msg(format!("{problem} in \"{}\"; known: {}", self.text, known.join(", "))))
    }

    fn object(&mut self) -> Result<ObjectSpec> {
        self.skip(&["a", "an"]);
        let size = self.try_word();
        Ok(ObjectSpec { size, colour: self.word()?, shape: self.word()? })
    }
}

/// Parses a caption of our grammar: `[a|an] [size] colour shape [([to the] relation | and)
/// [a|an] [size] colour shape]`, case-insensitive, with a trailing full stop allowed.
pub fn parse_caption(text: &str) -> Result<PromptSpec> {
    let lower = text.trim().trim_end_matches('.').to_lowercase();
    let words = lower.split_whitespace().map(str::to_string).collect();
    let mut p = Parser { text, words, at: 0 };
    let mut objects = vec![p.object()?];
    let mut relation = None;
    if p.at < p.words.len() {
        // "and" places two objects without relating them (how `Display` writes such a spec).
        if p.words[p.at] == "and" {
            p.at += 1;
        } else {
            p.skip(&["to", "the"]);
            relation = Some(p.word()?);
        }
        objects.push(p.object()?);
    }
    match p.words.get(p.at) {
        Some(w) => Err(Error::msg(format!("unexpected '{w}' after the second object in \"{text}\""))),
        None => Ok(PromptSpec { objects, relation }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_varied() {
        let a = scenes(50, 7, Split::Train);
        assert_eq!(a, scenes(50, 7, Split::Train));
        assert_eq!(a[..20], scenes(20, 7, Split::Train)[..]);
        assert_ne!(a, scenes(50, 8, Split::Train));
        let two = a.iter().filter(|s| s.objects.len() == 2).count();
        assert!((15..=45).contains(&two), "{two} of 50 scenes have two objects");
    }

    #[test]
    fn captions_parse_back() {
        for split in [Split::Train, Split::HeldOut] {
            for s in scenes(500, 3, split) {
                assert_eq!(parse_caption(&caption(&s)).unwrap(), s.spec(), "{}", caption(&s));
            }
        }
        let spec = parse_caption("  An LARGE red   Star to the left of a blue circle. ").unwrap();
        assert_eq!(spec.to_string(), "a large red star left of a blue circle");
    }

    #[test]
    fn parse_errors_name_the_word() {
        let err = |t: &str| parse_caption(t).unwrap_err().to_string();
        assert!(err("a pink circle").starts_with("unknown colour 'pink' in \"a pink circle\"; known: red,"));
        assert!(err("a red blob").starts_with("unknown shape 'blob'"));
        assert!(err("a red circle near a blue star").starts_with("unknown relation 'near'"));
        assert!(err("a red").starts_with("missing shape"));
        assert!(err("").starts_with("missing colour"));
        assert!(err("a red circle above a blue star twice").starts_with("unexpected 'twice'"));
    }

    #[test]
    fn held_out_pairs_stay_out_of_training() {
        let held = |s: &Scene| s.objects.iter().any(|o| HELD_OUT.contains(&(o.colour, o.shape)));
        assert!(!scenes(2000, 1, Split::Train).iter().any(held));
        assert!(scenes(500, 1, Split::HeldOut).iter().all(held));
    }

    #[test]
    fn images_are_in_range_and_show_their_objects() {
        let ds = dataset(64, 5, Split::Train);
        assert_eq!((ds.len(), ds.channels, ds.height, ds.width), (64, 3, 32, 32));
        let plane = 32 * 32;
        for (i, s) in scenes(64, 5, Split::Train).iter().enumerate() {
            let img = &ds.pixels[i * 3 * plane..(i + 1) * 3 * plane];
            let lit = (0..plane).filter(|&p| (0..3).any(|c| img[c * plane + p] > 100)).count();
            let least = s.objects.iter().map(|o| o.size.half() * 32.0).fold(f64::MAX, f64::min);
            assert!(lit as f64 > least * least, "scene {i}: {lit} lit pixels");
            assert!(lit < plane / 2, "scene {i}: {lit} lit pixels");
        }
        let square = Object {
            shape: Shape::Square,
            colour: Colour::Red,
            size: Size::Large,
            centre: (0.5, 0.5),
            size_in_caption: false,
        };
        let img = render(&Scene { objects: vec![square], relation: None }, 32);
        assert_eq!(&img[(16 * 32 + 16) * 3..][..3], &Colour::Red.rgb());
        assert_eq!(&img[..3], &[0, 0, 0]);
    }
}
