//! Procedural scenes for the bundled micro model: 1 to 6 shapes (circle, square, triangle, star,
//! diamond) in six colours and three sizes on plain or textured backgrounds, at various image
//! sizes and aspect ratios, with the questions asked about them and their answers.
//!
//! Everything is deterministic in `(seed, index)`: scene `index` of seed `seed` is the same on
//! every machine (ChaCha8 seeded from both), so `qwen-vl synth` (training data) and
//! `qwen-vl eval --synthetic N --seed S` (scoring) agree on what a scene is, and unseen seeds
//! give unseen scenes.
//!
//! Two sets of items come out of a scene:
//! - [`eval_questions`]: one question per [`QuestionKind`] (colour, shape, count, position,
//!   yes/no, grounding), what `qwen-vl eval` scores;
//! - [`training_items`]: those question kinds again plus region captions and the multi-phase
//!   pipeline's own four prompts with the outputs it should produce (reasoning steps as JSON,
//!   grounding per step, crop captions, the final answer), each prompt built by
//!   [`crate::pipeline::prompts`] exactly as the pipeline builds it.

use ::image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::Family;
use crate::pipeline::crop_rect;
use crate::pipeline::parse::{format_box, BBox, LabeledBox};
use crate::pipeline::prompts::{
    caption_prompt, grounding_prompt, question_header, reasoning_prompt, synthesis_prompt,
    StepEvidence,
};

/// Image sides are drawn from this range, in pixels (each side on its own).
pub const SIDE_RANGE: (u32, u32) = (112, 256);
/// Most shapes in a scene.
pub const MAX_SHAPES: usize = 6;
/// Most reasoning steps a pipeline question needs (a position question locates two shapes);
/// training prompts ask for at most 2 to 4.
pub const PIPELINE_MAX_STEPS: usize = 2;
/// Margin around a box before cropping, as the pipeline's default.
pub const CROP_MARGIN: f32 = 0.1;

/// A shape's outline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    /// A disc.
    Circle,
    /// An axis-aligned square.
    Square,
    /// A triangle pointing up.
    Triangle,
    /// A five-pointed star.
    Star,
    /// A square standing on a corner.
    Diamond,
}

impl ShapeKind {
    /// Every kind.
    pub const ALL: [ShapeKind; 5] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Star,
        ShapeKind::Diamond,
    ];

    /// The word used in questions and answers.
    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Star => "star",
            ShapeKind::Diamond => "diamond",
        }
    }

    fn plural(self) -> String {
        format!("{}s", self.name())
    }
}

/// A fill colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// Orange.
    Orange,
}

impl Colour {
    /// Every colour.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    /// The word used in questions and answers.
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 35, 35],
            Colour::Green => [35, 165, 55],
            Colour::Blue => [35, 75, 215],
            Colour::Yellow => [240, 205, 30],
            Colour::Purple => [145, 55, 185],
            Colour::Orange => [245, 130, 25],
        }
    }
}

/// A size class; the radius is this fraction of the image's shorter side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    /// Radius 9-11 % of the shorter side.
    Small,
    /// Radius 13-15 %.
    Medium,
    /// Radius 18-21 %.
    Large,
}

impl Size {
    /// The word used in questions.
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    fn radius_range(self) -> (f32, f32) {
        match self {
            Size::Small => (0.09, 0.11),
            Size::Medium => (0.13, 0.15),
            Size::Large => (0.18, 0.21),
        }
    }

    fn smaller(self) -> Option<Size> {
        match self {
            Size::Large => Some(Size::Medium),
            Size::Medium => Some(Size::Small),
            Size::Small => None,
        }
    }
}

/// One shape in a scene.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shape {
    /// Outline.
    pub kind: ShapeKind,
    /// Fill colour name.
    pub colour: Colour,
    /// Size class.
    pub size: Size,
    /// Tight box `[x1, y1, x2, y2]` in image pixels.
    pub bbox: [f32; 4],
    /// Centre and radius in pixels.
    #[serde(skip)]
    centre: (f32, f32),
    #[serde(skip)]
    radius: f32,
    #[serde(skip)]
    rgb: [u8; 3],
}

impl Shape {
    /// `the red triangle`: unique in a scene, since no scene repeats a colour-kind pair.
    pub fn full_name(&self) -> String {
        format!("the {} {}", self.colour.name(), self.kind.name())
    }

    fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }

    fn centre_x(&self) -> f32 {
        (self.bbox[0] + self.bbox[2]) / 2.0
    }

    fn centre_y(&self) -> f32 {
        (self.bbox[1] + self.bbox[3]) / 2.0
    }

    /// The outline as a polygon (a circle has none).
    fn polygon(&self) -> Option<Vec<(f32, f32)>> {
        let ((cx, cy), r) = (self.centre, self.radius);
        let ring = |n: usize, start: f32, radius: &dyn Fn(usize) -> f32| -> Vec<(f32, f32)> {
            (0..n)
                .map(|i| {
                    let a = start + i as f32 * std::f32::consts::TAU / n as f32;
                    (cx + radius(i) * a.cos(), cy + radius(i) * a.sin())
                })
                .collect()
        };
        let up = -std::f32::consts::FRAC_PI_2;
        match self.kind {
            ShapeKind::Circle => None,
            ShapeKind::Square => {
                let h = 0.85 * r;
                Some(vec![
                    (cx - h, cy - h),
                    (cx + h, cy - h),
                    (cx + h, cy + h),
                    (cx - h, cy + h),
                ])
            }
            ShapeKind::Triangle => Some(vec![(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]),
            ShapeKind::Star => Some(ring(10, up, &|i| if i % 2 == 0 { r } else { 0.45 * r })),
            ShapeKind::Diamond => Some(ring(4, up, &|_| r)),
        }
    }

    fn tight_box(&self) -> [f32; 4] {
        match self.polygon() {
            None => {
                let ((cx, cy), r) = (self.centre, self.radius);
                [cx - r, cy - r, cx + r, cy + r]
            }
            Some(p) => p.iter().fold(
                [f32::MAX, f32::MAX, f32::MIN, f32::MIN],
                |[x1, y1, x2, y2], &(x, y)| [x1.min(x), y1.min(y), x2.max(x), y2.max(y)],
            ),
        }
    }

    /// Whether `(x, y)` is inside; `outline` is [`Shape::polygon`], computed once by the caller.
    fn contains(&self, outline: Option<&[(f32, f32)]>, x: f32, y: f32) -> bool {
        match outline {
            None => {
                let (dx, dy) = (x - self.centre.0, y - self.centre.1);
                dx * dx + dy * dy <= self.radius * self.radius
            }
            Some(p) => {
                // Even-odd rule.
                let mut inside = false;
                let mut j = p.len() - 1;
                for i in 0..p.len() {
                    let ((xi, yi), (xj, yj)) = (p[i], p[j]);
                    if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                        inside = !inside;
                    }
                    j = i;
                }
                inside
            }
        }
    }
}

/// The background behind the shapes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    /// One grey tone.
    Plain,
    /// Stripes of two close tones.
    Stripes,
    /// A checkerboard of two close tones.
    Checker,
    /// Per-pixel noise around one tone.
    Noise,
}

/// One generated scene.
#[derive(Debug, Clone, Serialize)]
pub struct Scene {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Background pattern.
    pub background: Background,
    /// The shapes, in drawing order (they never overlap).
    pub shapes: Vec<Shape>,
    #[serde(skip)]
    tone: [u8; 3],
    #[serde(skip)]
    contrast: i16,
    #[serde(skip)]
    period: u32,
    #[serde(skip)]
    noise_seed: u64,
}

fn rng_for(seed: u64, index: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng.set_word_pos(u128::from(index) << 20);
    rng
}

/// Scene `index` of seed `seed`.
pub fn scene(seed: u64, index: u64) -> Scene {
    let mut rng = rng_for(seed, index, 1);
    let width = rng.random_range(SIDE_RANGE.0..=SIDE_RANGE.1);
    let height = rng.random_range(SIDE_RANGE.0..=SIDE_RANGE.1);
    let background = match rng.random_range(0..4) {
        0 => Background::Plain,
        1 => Background::Stripes,
        2 => Background::Checker,
        _ => Background::Noise,
    };
    let light = rng.random_bool(0.7);
    let base: i16 = if light {
        rng.random_range(190..=245)
    } else {
        rng.random_range(25..=65)
    };
    let tint = |rng: &mut ChaCha8Rng| (base + rng.random_range(-8..=8)).clamp(0, 255) as u8;
    let tone = [tint(&mut rng), tint(&mut rng), tint(&mut rng)];
    let contrast = rng.random_range(12..=24) * if light { -1 } else { 1 };
    let period = rng.random_range(5..=14);
    let noise_seed = rng.random();

    let wanted = rng.random_range(1..=MAX_SHAPES);
    let short = width.min(height) as f32;
    let mut shapes: Vec<Shape> = Vec::new();
    let mut used = Vec::new();
    for _ in 0..wanted {
        // A colour-kind pair not used yet.
        let (kind, colour) = loop {
            let k = ShapeKind::ALL[rng.random_range(0..ShapeKind::ALL.len())];
            let c = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
            if !used.contains(&(k, c)) {
                break (k, c);
            }
        };
        let mut size = [Size::Small, Size::Medium, Size::Large][rng.random_range(0..3)];
        let placed = 'place: loop {
            let (lo, hi) = size.radius_range();
            let radius = short * rng.random_range(lo..hi);
            for _ in 0..60 {
                let cx = rng.random_range(radius + 2.0..width as f32 - radius - 2.0);
                let cy = rng.random_range(radius + 2.0..height as f32 - radius - 2.0);
                let mut shape = Shape {
                    kind,
                    colour,
                    size,
                    bbox: [0.0; 4],
                    centre: (cx, cy),
                    radius,
                    rgb: colour.rgb(),
                };
                shape.bbox = shape.tight_box();
                let gap = 0.08 * short;
                let clear = shapes.iter().all(|o| {
                    shape.bbox[0] > o.bbox[2] + gap
                        || o.bbox[0] > shape.bbox[2] + gap
                        || shape.bbox[1] > o.bbox[3] + gap
                        || o.bbox[1] > shape.bbox[3] + gap
                });
                if clear {
                    break 'place Some(shape);
                }
            }
            match size.smaller() {
                Some(s) => size = s,
                None => break None,
            }
        };
        if let Some(mut shape) = placed {
            for c in &mut shape.rgb {
                *c = (i16::from(*c) + rng.random_range(-12..=12)).clamp(0, 255) as u8;
            }
            used.push((kind, colour));
            shapes.push(shape);
        }
    }
    Scene {
        width,
        height,
        background,
        shapes,
        tone,
        contrast,
        period,
        noise_seed,
    }
}

impl Scene {
    /// The picture: background, then each shape with 4x4 supersampled edges.
    pub fn render(&self) -> RgbImage {
        let mut noise = ChaCha8Rng::seed_from_u64(self.noise_seed);
        let shift = |tone: [u8; 3], by: i16| tone.map(|t| (i16::from(t) + by).clamp(0, 255) as u8);
        let mut img = RgbImage::from_fn(self.width, self.height, |x, y| {
            let alt = match self.background {
                Background::Plain => false,
                Background::Stripes => (x + y) / self.period % 2 == 1,
                Background::Checker => (x / self.period + y / self.period) % 2 == 1,
                Background::Noise => false,
            };
            let by = if alt { self.contrast } else { 0 };
            let jitter = if self.background == Background::Noise {
                noise.random_range(-self.contrast.abs() / 2..=self.contrast.abs() / 2)
            } else {
                0
            };
            Rgb(shift(self.tone, by + jitter))
        });
        const SS: u32 = 4;
        for shape in &self.shapes {
            let outline = shape.polygon();
            let [x1, y1, x2, y2] = shape.bbox;
            let xs = (x1.floor().max(0.0) as u32)..(x2.ceil() as u32).min(self.width);
            let ys = (y1.floor().max(0.0) as u32)..(y2.ceil() as u32).min(self.height);
            for y in ys {
                for x in xs.clone() {
                    let mut hits = 0;
                    for sy in 0..SS {
                        for sx in 0..SS {
                            let px = x as f32 + (sx as f32 + 0.5) / SS as f32;
                            let py = y as f32 + (sy as f32 + 0.5) / SS as f32;
                            hits += u32::from(shape.contains(outline.as_deref(), px, py));
                        }
                    }
                    if hits == 0 {
                        continue;
                    }
                    let a = hits as f32 / (SS * SS) as f32;
                    let p = img.get_pixel_mut(x, y);
                    for c in 0..3 {
                        let v = a * f32::from(shape.rgb[c]) + (1.0 - a) * f32::from(p.0[c]);
                        p.0[c] = v.round() as u8;
                    }
                }
            }
        }
        img
    }

    fn largest(&self) -> Option<usize> {
        extreme(&self.shapes, |a, b| a > b)
    }

    fn smallest(&self) -> Option<usize> {
        extreme(&self.shapes, |a, b| a < b)
    }

    /// Names picking out shape `i` alone without saying its `hidden` attribute (`colour` or
    /// `kind`); empty when none does.
    fn references(&self, i: usize, hidden: Attribute) -> Vec<String> {
        let s = &self.shapes[i];
        let count = |f: &dyn Fn(&Shape) -> bool| self.shapes.iter().filter(|o| f(o)).count();
        let mut out = Vec::new();
        match hidden {
            Attribute::Colour => {
                if count(&|o| o.kind == s.kind) == 1 {
                    out.push(format!("the {}", s.kind.name()));
                }
                if count(&|o| o.kind == s.kind && o.size == s.size) == 1 {
                    out.push(format!("the {} {}", s.size.name(), s.kind.name()));
                }
            }
            Attribute::Kind => {
                if count(&|o| o.colour == s.colour) == 1 {
                    out.push(format!("the {} shape", s.colour.name()));
                }
                if count(&|o| o.colour == s.colour && o.size == s.size) == 1 {
                    out.push(format!("the {} {} shape", s.size.name(), s.colour.name()));
                }
            }
        }
        if self.shapes.len() > 1 {
            if self.largest() == Some(i) {
                out.push("the largest shape".into());
            }
            if self.smallest() == Some(i) {
                out.push("the smallest shape".into());
            }
        }
        out
    }
}

/// The index whose area beats every other by 20 %, if one does.
fn extreme(shapes: &[Shape], better: impl Fn(f32, f32) -> bool) -> Option<usize> {
    let (best, area) = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| (i, s.area()))
        .reduce(|a, b| if better(b.1, a.1) { b } else { a })?;
    let clear = shapes.iter().enumerate().all(|(i, s)| {
        i == best || (better(area, s.area()) && (area / s.area()).max(s.area() / area) > 1.2)
    });
    clear.then_some(best)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attribute {
    Colour,
    Kind,
}

/// What a question asks about; also the key of its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuestionKind {
    /// "What colour is the triangle?"
    Colour,
    /// "What shape is the red shape?"
    Shape,
    /// "How many shapes are there?"
    Count,
    /// "Is the red star to the left or to the right of the blue circle?"
    Position,
    /// "Is there a green square?"
    YesNo,
    /// "Find <|object_ref_start|>the red star<|object_ref_end|>"
    Grounding,
}

impl QuestionKind {
    /// Every kind, in report order.
    pub const ALL: [QuestionKind; 6] = [
        QuestionKind::Colour,
        QuestionKind::Shape,
        QuestionKind::Count,
        QuestionKind::Position,
        QuestionKind::YesNo,
        QuestionKind::Grounding,
    ];

    /// The key in reports: `colour`, `shape`, `count`, `position`, `yesno`, `grounding`.
    pub fn name(self) -> &'static str {
        match self {
            QuestionKind::Colour => "colour",
            QuestionKind::Shape => "shape",
            QuestionKind::Count => "count",
            QuestionKind::Position => "position",
            QuestionKind::YesNo => "yesno",
            QuestionKind::Grounding => "grounding",
        }
    }
}

/// One question about a scene (the image comes first in the user turn, then `prompt`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Question {
    /// What it asks about.
    pub kind: QuestionKind,
    /// The user's text.
    pub prompt: String,
    /// The expected reply (for grounding: the Qwen2-VL box answer).
    pub answer: String,
    /// For grounding: the target's box `[x1, y1, x2, y2]` in image pixels.
    pub target: Option<[f32; 4]>,
}

/// A question for the multi-phase pipeline and its expected final answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineQuestion {
    /// How to compare the answer ([`answer_matches`]).
    pub kind: QuestionKind,
    /// The question.
    pub question: String,
    /// The expected answer.
    pub answer: String,
    /// The reasoning steps the pipeline should write (all `needs_vision`), each with the shape
    /// it locates.
    #[serde(skip)]
    steps: Vec<(String, usize)>,
}

fn pick<T: Clone>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())].clone()
}

/// A shape and a name for it that hides `hidden`; falls back to the full name when no shape
/// can be named that way (then the question gives its own answer away, which is rare).
fn referenced(scene: &Scene, rng: &mut ChaCha8Rng, hidden: Attribute) -> (usize, String) {
    let candidates: Vec<(usize, Vec<String>)> = (0..scene.shapes.len())
        .map(|i| (i, scene.references(i, hidden)))
        .filter(|(_, r)| !r.is_empty())
        .collect();
    if candidates.is_empty() {
        let i = rng.random_range(0..scene.shapes.len());
        return (i, scene.shapes[i].full_name());
    }
    let (i, refs) = pick(rng, &candidates);
    (i, pick(rng, &refs))
}

fn colour_question(scene: &Scene, rng: &mut ChaCha8Rng) -> (Question, usize) {
    let (i, name) = referenced(scene, rng, Attribute::Colour);
    let q = Question {
        kind: QuestionKind::Colour,
        prompt: format!("What colour is {name}?"),
        answer: scene.shapes[i].colour.name().into(),
        target: None,
    };
    (q, i)
}

fn shape_question(scene: &Scene, rng: &mut ChaCha8Rng) -> (Question, usize) {
    let (i, name) = referenced(scene, rng, Attribute::Kind);
    let q = Question {
        kind: QuestionKind::Shape,
        prompt: format!("What shape is {name}?"),
        answer: scene.shapes[i].kind.name().into(),
        target: None,
    };
    (q, i)
}

fn count_question(scene: &Scene, rng: &mut ChaCha8Rng) -> Question {
    let (prompt, n) = match rng.random_range(0..3) {
        0 => ("How many shapes are there?".to_string(), scene.shapes.len()),
        1 => {
            let c = pick(rng, &Colour::ALL);
            let n = scene.shapes.iter().filter(|s| s.colour == c).count();
            (format!("How many {} shapes are there?", c.name()), n)
        }
        _ => {
            let k = pick(rng, &ShapeKind::ALL);
            let n = scene.shapes.iter().filter(|s| s.kind == k).count();
            (format!("How many {} are there?", k.plural()), n)
        }
    };
    Question {
        kind: QuestionKind::Count,
        prompt,
        answer: n.to_string(),
        target: None,
    }
}

/// Two shapes clearly apart horizontally or vertically, and the question about them.
fn position_question(scene: &Scene, rng: &mut ChaCha8Rng) -> Option<(Question, [usize; 2])> {
    let (w, h) = (scene.width as f32, scene.height as f32);
    let mut pairs = Vec::new();
    for a in 0..scene.shapes.len() {
        for b in 0..scene.shapes.len() {
            let (sa, sb) = (&scene.shapes[a], &scene.shapes[b]);
            if a != b && (sa.centre_x() - sb.centre_x()).abs() > 0.15 * w {
                pairs.push((a, b, true));
            }
            if a != b && (sa.centre_y() - sb.centre_y()).abs() > 0.15 * h {
                pairs.push((a, b, false));
            }
        }
    }
    if pairs.is_empty() {
        return None;
    }
    let (a, b, horizontal) = pick(rng, &pairs);
    let (sa, sb) = (&scene.shapes[a], &scene.shapes[b]);
    let (na, nb) = (sa.full_name(), sb.full_name());
    let (prompt, answer) = if horizontal {
        let side = if sa.centre_x() < sb.centre_x() {
            "left"
        } else {
            "right"
        };
        (
            format!("Is {na} to the left or to the right of {nb}?"),
            side,
        )
    } else {
        let side = if sa.centre_y() < sb.centre_y() {
            "above"
        } else {
            "below"
        };
        (format!("Is {na} above or below {nb}?"), side)
    };
    let q = Question {
        kind: QuestionKind::Position,
        prompt,
        answer: answer.into(),
        target: None,
    };
    Some((q, [a, b]))
}

fn yesno_question(scene: &Scene, rng: &mut ChaCha8Rng) -> Question {
    let present: Vec<(Colour, ShapeKind)> =
        scene.shapes.iter().map(|s| (s.colour, s.kind)).collect();
    let (c, k) = if rng.random_bool(0.5) {
        pick(rng, &present)
    } else {
        // Absent, but close to something present: same colour or same kind.
        let (c0, k0) = pick(rng, &present);
        loop {
            let (c, k) = if rng.random_bool(0.5) {
                (c0, pick(rng, &ShapeKind::ALL))
            } else {
                (pick(rng, &Colour::ALL), k0)
            };
            if !present.contains(&(c, k)) {
                break (c, k);
            }
        }
    };
    let yes = present.contains(&(c, k));
    Question {
        kind: QuestionKind::YesNo,
        prompt: format!("Is there a {} {}?", c.name(), k.name()),
        answer: if yes { "yes" } else { "no" }.into(),
        target: None,
    }
}

fn box_of(s: &Shape) -> BBox {
    let [x1, y1, x2, y2] = s.bbox;
    BBox { x1, y1, x2, y2 }
}

fn box_answer(scene: &Scene, b: BBox, label: &str) -> String {
    let wh = (scene.width, scene.height);
    let labeled = LabeledBox {
        bbox: b,
        label: Some(label.to_string()),
    };
    format_box(Family::Qwen2Vl, &labeled, wh, wh)
}

fn grounding_question(scene: &Scene, rng: &mut ChaCha8Rng) -> Question {
    let i = rng.random_range(0..scene.shapes.len());
    let s = &scene.shapes[i];
    let name = s.full_name();
    Question {
        kind: QuestionKind::Grounding,
        prompt: grounding_prompt(Family::Qwen2Vl, &name),
        answer: box_answer(scene, box_of(s), &name),
        target: Some(s.bbox),
    }
}

/// The questions `qwen-vl eval` asks about scene `index` of `seed`: one per kind, in
/// [`QuestionKind::ALL`] order (position only when two shapes are clearly apart; a scene with a
/// single shape has none).
pub fn eval_questions(scene: &Scene, seed: u64, index: u64) -> Vec<Question> {
    let mut rng = rng_for(seed, index, 2);
    let mut out = vec![
        colour_question(scene, &mut rng).0,
        shape_question(scene, &mut rng).0,
        count_question(scene, &mut rng),
    ];
    if let Some((q, _)) = position_question(scene, &mut rng) {
        out.push(q);
    }
    out.push(yesno_question(scene, &mut rng));
    out.push(grounding_question(scene, &mut rng));
    out
}

/// The pipeline question about scene `index` of `seed`: the colour or shape of one named shape
/// (one step), or where one shape is relative to another (two steps).
pub fn pipeline_question(scene: &Scene, seed: u64, index: u64) -> PipelineQuestion {
    let mut rng = rng_for(seed, index, 3);
    pipeline_question_with(scene, &mut rng)
}

fn pipeline_question_with(scene: &Scene, rng: &mut ChaCha8Rng) -> PipelineQuestion {
    let locate = |name: &str| format!("Locate {name}");
    let choice = rng.random_range(0..3);
    if choice == 2 {
        if let Some((q, [a, b])) = position_question(scene, rng) {
            return PipelineQuestion {
                kind: QuestionKind::Position,
                question: q.prompt,
                answer: q.answer,
                steps: vec![
                    (locate(&scene.shapes[a].full_name()), a),
                    (locate(&scene.shapes[b].full_name()), b),
                ],
            };
        }
    }
    let (q, i) = if choice == 0 {
        colour_question(scene, rng)
    } else {
        shape_question(scene, rng)
    };
    let name = q
        .prompt
        .trim_end_matches('?')
        .split_once(" is ")
        .map(|(_, n)| n.to_string())
        .unwrap_or_default();
    PipelineQuestion {
        kind: q.kind,
        question: q.prompt,
        answer: q.answer,
        steps: vec![(locate(&name), i)],
    }
}

/// One supervised turn: the image (or crop) first, then `prompt`; the reply is `answer`.
#[derive(Debug, Clone)]
pub struct TrainingItem {
    /// What the item teaches: a [`QuestionKind`] name, `caption`, or `pipeline_reasoning`,
    /// `pipeline_grounding`, `pipeline_caption`, `pipeline_answer`.
    pub task: &'static str,
    /// The image: `None` for the scene, `Some(crop)` for a region.
    pub crop: Option<RgbImage>,
    /// The user's text.
    pub prompt: String,
    /// The reply.
    pub answer: String,
}

/// `a red triangle`: what a crop's caption says.
fn caption_of(s: &Shape) -> String {
    let article = if s.colour == Colour::Orange {
        "an"
    } else {
        "a"
    };
    format!("{article} {} {}", s.colour.name(), s.kind.name())
}

/// Per-edge jitter of a plain caption request's crop, as a share of the shape's size.
const CAPTION_JITTER: f32 = 0.08;
/// The same for the pipeline's evidence crops, which come from the model's own grounding: the
/// micro model's boxes are off by about a quarter of the shape's size (seed 9999, 200 scenes:
/// median centre error 58 on the 0-1000 grid for shapes about 220 wide), so its caption turns
/// see crops that loose, shapes cut at an edge or a neighbour coming in.
const PIPELINE_CAPTION_JITTER: f32 = 0.25;

/// The scene's box with each edge moved by up to `amount` of the shape's size, as a model's box
/// would be.
fn jittered(scene: &Scene, s: &Shape, amount: f32, rng: &mut ChaCha8Rng) -> BBox {
    let b = box_of(s);
    let (w, h) = (b.width(), b.height());
    let mut j = |size: f32| rng.random_range(-amount..=amount) * size;
    BBox {
        x1: (b.x1 + j(w)).max(0.0),
        y1: (b.y1 + j(h)).max(0.0),
        x2: (b.x2 + j(w)).min(scene.width as f32),
        y2: (b.y2 + j(h)).min(scene.height as f32),
    }
}

fn crop(image: &RgbImage, b: &BBox) -> RgbImage {
    let (x, y, w, h) = crop_rect(b, CROP_MARGIN, image.width(), image.height());
    ::image::imageops::crop_imm(image, x, y, w, h).to_image()
}

/// Everything the micro model is trained on for scene `index` of `seed` (`image` is
/// `scene.render()`): the six question kinds, a region caption, and the pipeline's four phases
/// for one pipeline question.
pub fn training_items(scene: &Scene, image: &RgbImage, seed: u64, index: u64) -> Vec<TrainingItem> {
    let mut rng = rng_for(seed, index, 4);
    let mut out = Vec::new();
    let mut push = |task: &'static str, crop: Option<RgbImage>, prompt: String, answer: String| {
        out.push(TrainingItem {
            task,
            crop,
            prompt,
            answer,
        })
    };
    for q in eval_questions(scene, seed ^ 0x5eed, index) {
        push(q.kind.name(), None, q.prompt, q.answer);
    }
    // A region caption, for a plain request.
    let s = &scene.shapes[rng.random_range(0..scene.shapes.len())];
    let region = crop(image, &jittered(scene, s, CAPTION_JITTER, &mut rng));
    push("caption", Some(region), caption_prompt(""), caption_of(s));

    // The pipeline, phase by phase.
    let pq = pipeline_question_with(scene, &mut rng);
    // Written the way the prompt shows it: `[{"text": "...", "needs_vision": true}]`.
    let steps_json = format!(
        "[{}]",
        pq.steps
            .iter()
            .map(|(text, _)| {
                format!(
                    "{{\"text\": {}, \"needs_vision\": true}}",
                    serde_json::Value::String(text.clone())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The pipeline's --max-steps varies the prompt's "at most N": train on 2 to 4.
    let max_steps = rng.random_range(PIPELINE_MAX_STEPS..=4);
    push(
        "pipeline_reasoning",
        None,
        reasoning_prompt(&pq.question, max_steps),
        steps_json,
    );
    let mut evidence = Vec::new();
    for (text, i) in &pq.steps {
        let s = &scene.shapes[*i];
        push(
            "pipeline_grounding",
            None,
            format!(
                "{}{}",
                question_header(&pq.question),
                grounding_prompt(Family::Qwen2Vl, text)
            ),
            box_answer(scene, box_of(s), text),
        );
        let region = crop(
            image,
            &jittered(scene, s, PIPELINE_CAPTION_JITTER, &mut rng),
        );
        push(
            "pipeline_caption",
            Some(region),
            caption_prompt(text),
            caption_of(s),
        );
        evidence.push((text.clone(), caption_of(s)));
    }
    let notes: Vec<StepEvidence<'_>> = evidence
        .iter()
        .map(|(text, seen)| StepEvidence {
            text,
            evidence: Some(seen),
        })
        .collect();
    push(
        "pipeline_answer",
        None,
        synthesis_prompt(&pq.question, &notes),
        pq.answer.clone(),
    );
    out
}

/// Lowercase words of `text` without punctuation, chat special tokens or a leading article.
fn normalise(text: &str) -> Vec<String> {
    let text = crate::pipeline::parse::strip_special_tokens(text).to_lowercase();
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    match words.first().map(String::as_str) {
        Some("the" | "a" | "an") => words[1..].to_vec(),
        _ => words,
    }
}

/// Whether a model's `output` gives `answer` for a question of `kind`: the same words after
/// [`normalise`] (`Red.` = `red`, `the left` = `left`); for counts the first number, also
/// written as a word (`three`). Grounding is scored by IoU, not here.
pub fn answer_matches(kind: QuestionKind, output: &str, answer: &str) -> bool {
    let (out, want) = (normalise(output), normalise(answer));
    if kind == QuestionKind::Count {
        const WORDS: [&str; 11] = [
            "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        ];
        let number = |w: &String| {
            w.parse::<usize>()
                .ok()
                .or_else(|| WORDS.iter().position(|n| n == w))
        };
        return match (out.iter().find_map(number), want.iter().find_map(number)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
    }
    !want.is_empty() && out == want
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes (0 when either has no area).
pub fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let area = |r: [f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let inter = area([
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_differ_by_index_and_seed() {
        let a = scene(7, 3);
        let b = scene(7, 3);
        assert_eq!(a.render().as_raw(), b.render().as_raw());
        assert_eq!(eval_questions(&a, 7, 3), eval_questions(&b, 7, 3));
        assert_ne!(scene(7, 4).render().as_raw(), a.render().as_raw());
        assert_ne!(scene(8, 3).render().as_raw(), a.render().as_raw());
    }

    #[test]
    fn scenes_respect_their_constraints() {
        for i in 0..300 {
            let s = scene(1, i);
            assert!((SIDE_RANGE.0..=SIDE_RANGE.1).contains(&s.width));
            assert!((SIDE_RANGE.0..=SIDE_RANGE.1).contains(&s.height));
            assert!((1..=MAX_SHAPES).contains(&s.shapes.len()), "scene {i}");
            for (j, a) in s.shapes.iter().enumerate() {
                let [x1, y1, x2, y2] = a.bbox;
                assert!(x1 >= 0.0 && y1 >= 0.0 && x2 <= s.width as f32 && y2 <= s.height as f32);
                for b in &s.shapes[j + 1..] {
                    assert!(iou(a.bbox, b.bbox) == 0.0, "scene {i}: shapes overlap");
                    assert!((a.colour, a.kind) != (b.colour, b.kind), "scene {i}");
                }
            }
        }
    }

    #[test]
    fn shapes_are_drawn_in_their_colour_inside_their_box() {
        let s = (0..50)
            .map(|i| scene(2, i))
            .find(|s| s.background == Background::Plain)
            .unwrap();
        let img = s.render();
        for shape in &s.shapes {
            let (cx, cy) = (shape.centre_x() as u32, shape.centre_y() as u32);
            // The centre of every kind is inside it (the star's inner radius is 45 %).
            let p = img.get_pixel(cx, cy).0;
            for (got, want) in p.iter().zip(shape.rgb) {
                assert!((i16::from(*got) - i16::from(want)).abs() <= 1, "{shape:?}");
            }
        }
    }

    #[test]
    fn questions_answer_from_the_scene() {
        for i in 0..200 {
            let s = scene(3, i);
            let qs = eval_questions(&s, 3, i);
            for q in &qs {
                match q.kind {
                    QuestionKind::Count => {
                        assert!(q.answer.parse::<usize>().unwrap() <= s.shapes.len())
                    }
                    QuestionKind::Colour => {
                        assert!(Colour::ALL.iter().any(|c| c.name() == q.answer))
                    }
                    QuestionKind::Shape => {
                        assert!(ShapeKind::ALL.iter().any(|k| k.name() == q.answer))
                    }
                    QuestionKind::Position => {
                        assert!(["left", "right", "above", "below"].contains(&q.answer.as_str()))
                    }
                    QuestionKind::YesNo => assert!(["yes", "no"].contains(&q.answer.as_str())),
                    QuestionKind::Grounding => {
                        let t = q.target.unwrap();
                        let wh = (s.width, s.height);
                        let parsed =
                            crate::pipeline::parse::parse_boxes(Family::Qwen2Vl, &q.answer, wh, wh);
                        let b = parsed[0].bbox;
                        assert!(iou(t, [b.x1, b.y1, b.x2, b.y2]) > 0.9, "{q:?}");
                    }
                }
            }
            let p = pipeline_question(&s, 3, i);
            assert!(!p.steps.is_empty() && p.steps.len() <= PIPELINE_MAX_STEPS);
        }
    }

    #[test]
    fn training_items_follow_the_pipeline_prompts() {
        let s = scene(4, 0);
        let img = s.render();
        let items = training_items(&s, &img, 4, 0);
        let reasoning = items
            .iter()
            .find(|t| t.task == "pipeline_reasoning")
            .unwrap();
        let steps = crate::pipeline::parse::parse_steps(&reasoning.answer, PIPELINE_MAX_STEPS);
        assert!(!steps.is_empty() && steps.iter().all(|s| s.needs_vision));
        assert!(items.iter().any(|t| t.task == "pipeline_answer"));
        assert!(items
            .iter()
            .filter(|t| t.task.ends_with("caption"))
            .all(|t| t.crop.is_some()));
    }

    #[test]
    fn answers_are_compared_loosely_but_not_too_loosely() {
        use QuestionKind::*;
        assert!(answer_matches(Colour, "Red.", "red"));
        assert!(answer_matches(Position, "The left", "left"));
        assert!(answer_matches(Count, "There are 3 shapes.", "3"));
        assert!(answer_matches(Count, "three", "3"));
        assert!(!answer_matches(Count, "4", "3"));
        assert!(!answer_matches(Colour, "red and blue", "red"));
        assert!(!answer_matches(YesNo, "", "yes"));
        assert!((iou([0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0]) - 1.0 / 3.0).abs() < 1e-6);
    }
}
