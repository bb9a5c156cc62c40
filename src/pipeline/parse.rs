//! Readers for what the model writes in each pipeline phase, and the box format it is shown.
//!
//! Model output is untrusted text. Every function here takes any `&str`, never panics, and
//! answers "nothing usable" with an empty result, never an error:
//! - [`parse_steps`]: phase-1 reasoning steps;
//! - [`parse_boxes`] / [`format_box`]: phase-2 grounding boxes in each family's native format,
//!   to and from original-image pixels;
//! - [`clean_text`]: phase-3 captions and the phase-4 answer.
//!
//! JSON is read by a small tolerant reader (`Loose`, at the end of this file) rather than
//! serde_json's strict one, because real outputs are JSON-like, not JSON: code fences and prose
//! around it, single quotes, Python's `True`/`False`/`None`, trailing or missing commas, unquoted
//! keys, and output cut off by the token budget. Its rules:
//! - a value cut off mid-way (end of text) or ended by junk where a `,` or closer belongs keeps
//!   what was complete: a list keeps its complete items and drops the cut one (a cut nested list
//!   is kept with its own complete items); an object keeps its complete members;
//! - a quote closes a string only when followed by `,` `:` `}` `]` `)`, a line break or the end
//!   of the text, so `'the dog's tail'` and `"the sign "STOP""` read as one string each;
//! - nesting deeper than [`MAX_DEPTH`] ends the value there (no stack overflow on `[[[[...`).
//!
//! Text after the last `</think>` is what is read (thinking models reason before it).

use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::config::Family;

/// Longest reasoning-step text kept, in characters (longer text is cut at a word boundary).
pub const MAX_STEP_CHARS: usize = 500;
/// Longest box label kept, in characters.
pub const MAX_LABEL_CHARS: usize = 200;
/// Deepest JSON nesting read; anything deeper ends the value as if cut off.
pub const MAX_DEPTH: usize = 64;

/// One phase-1 reasoning step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasoningStep {
    /// The step, one line, whitespace collapsed, at most [`MAX_STEP_CHARS`] characters.
    pub text: String,
    /// Whether the step should be checked against a region of the image (phase 2/3).
    pub needs_vision: bool,
}

/// An axis-aligned box in original-image pixels: `x1 < x2`, `y1 < y2`, inside the image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BBox {
    /// Left edge.
    pub x1: f32,
    /// Top edge.
    pub y1: f32,
    /// Right edge.
    pub x2: f32,
    /// Bottom edge.
    pub y2: f32,
}

impl BBox {
    /// `x2 - x1`.
    pub fn width(&self) -> f32 {
        self.x2 - self.x1
    }

    /// `y2 - y1`.
    pub fn height(&self) -> f32 {
        self.y2 - self.y1
    }
}

/// A grounding box with the label the model gave it, if any.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabeledBox {
    /// The box, in original-image pixels.
    pub bbox: BBox,
    /// The object's name as the model wrote it (trimmed, at most [`MAX_LABEL_CHARS`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Phase 1: reasoning steps
// ---------------------------------------------------------------------------------------------

/// Reads up to `max_steps` reasoning steps from the model's phase-1 output.
///
/// Accepted, in order of preference:
/// 1. the first JSON list of steps: an array, or an object holding the array under a key
///    containing "step" (`steps`, `reasoning_steps`, ...), or numbered members (`"1"`,
///    `"step2"`, ...), or else the array under any key; items are objects, strings, or
///    `[text, flag]` pairs;
/// 2. otherwise every standalone single-step object (JSON lines), cut-off ones excluded;
/// 3. otherwise a plain-text list: numbered lines (`1. ...`, `2) ...`, `Step 3: ...`), or if
///    there are none, bullet lines (`- ...`, `* ...`, `• ...`).
///
/// In an object the text is the first string under `text`, `step`, `description`,
/// `reasoning`, `content`, `thought`, ... (keys compared lowercase without `_`/`-`/spaces); the
/// flag is a boolean-like value (`true`, `"yes"`, `1`, ...) under a key containing `vision`,
/// `visual`, `verif`, `look`, `image` or `ground` (`needs_vision`, `needs_visual_verification`,
/// `visual`, `verify`, ...). A plain-text line may carry `needs_vision: true` inline. A step
/// with no letter or digit (empty, or the prompt's `"..."` placeholder echoed) is skipped.
///
/// When the flag is missing or unreadable, `needs_vision` is true exactly when the step contains
/// one of the [`LOOKING_WORDS`] ("locate", "count", "color", "where", ...) as a whole word.
///
/// Empty or unusable output gives an empty list.
pub fn parse_steps(text: &str, max_steps: usize) -> Vec<ReasoningStep> {
    if max_steps == 0 {
        return Vec::new();
    }
    let text = final_part(text);
    let mut singles = Vec::new();
    for (value, complete) in json_values(text) {
        match steps_in_value(&value) {
            Found::List(mut steps) => {
                steps.truncate(max_steps);
                return steps;
            }
            Found::Single(step) if complete => singles.push(step),
            Found::Single(_) | Found::Nothing => {}
        }
    }
    let mut steps = if singles.is_empty() {
        list_steps(text)
    } else {
        singles
    };
    steps.truncate(max_steps);
    steps
}

/// Words (whole, case-insensitive) that make a step without an explicit flag need vision.
pub const LOOKING_WORDS: &[&str] = &[
    "look",
    "looks",
    "looking",
    "locate",
    "locates",
    "locating",
    "location",
    "find",
    "finds",
    "finding",
    "see",
    "sees",
    "seen",
    "check",
    "checks",
    "checking",
    "verify",
    "verifies",
    "verifying",
    "identify",
    "identifies",
    "identifying",
    "count",
    "counts",
    "counting",
    "observe",
    "observes",
    "observing",
    "inspect",
    "inspecting",
    "examine",
    "examining",
    "read",
    "reads",
    "reading",
    "detect",
    "detecting",
    "spot",
    "describe",
    "visible",
    "visually",
    "image",
    "picture",
    "photo",
    "show",
    "shows",
    "shown",
    "color",
    "colors",
    "colour",
    "colours",
    "where",
];

/// Keys that hold a step's text, in order of preference (normalized, see [`norm_key`]).
const STEP_TEXT_KEYS: &[&str] = &[
    "text",
    "step",
    "description",
    "reasoning",
    "content",
    "thought",
    "claim",
    "statement",
    "question",
    "task",
    "action",
    "instruction",
    "steptext",
    "stepdescription",
    "reason",
    "explanation",
];

/// A key containing one of these (normalized) holds a step's needs-vision flag.
const FLAG_KEY_MARKERS: &[&str] = &["vision", "visual", "verif", "look", "image", "ground"];

enum Found {
    List(Vec<ReasoningStep>),
    Single(ReasoningStep),
    Nothing,
}

fn steps_in_value(value: &Value) -> Found {
    match value {
        Value::Array(items) => steps_in_list(items).map_or(Found::Nothing, Found::List),
        Value::Object(map) => {
            // A list under a "steps"-like key wins, then numbered members, then the object as
            // one step, then a list under any other key or inside a member object
            // ({"analysis": {"steps": [...]}}).
            for (key, v) in map {
                if let Value::Array(items) = v {
                    if norm_key(key).contains("step") {
                        if let Some(steps) = steps_in_list(items) {
                            return Found::List(steps);
                        }
                    }
                }
            }
            if let Some(steps) = numbered_members(map) {
                return Found::List(steps);
            }
            if let Some(step) = step_from_object(map) {
                return Found::Single(step);
            }
            for v in map.values() {
                match v {
                    Value::Array(items) => {
                        if let Some(steps) = steps_in_list(items) {
                            return Found::List(steps);
                        }
                    }
                    Value::Object(_) => {
                        if let Found::List(steps) = steps_in_value(v) {
                            return Found::List(steps);
                        }
                    }
                    _ => {}
                }
            }
            Found::Nothing
        }
        _ => Found::Nothing,
    }
}

/// Steps held as numbered members, `{"1": ..., "2": ...}` or `{"step1": ..., "step_2": ...}`,
/// in number order; `None` when there are none.
fn numbered_members(map: &Map<String, Value>) -> Option<Vec<ReasoningStep>> {
    let mut numbered: Vec<(u64, &Value)> = map
        .iter()
        .filter_map(|(k, v)| {
            let k = norm_key(k);
            let digits = k.strip_prefix("step").unwrap_or(&k);
            digits.parse::<u64>().ok().map(|n| (n, v))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    let items: Vec<Value> = numbered.into_iter().map(|(_, v)| v.clone()).collect();
    steps_in_list(&items)
}

/// The steps of a list, `None` when no item is a step.
fn steps_in_list(items: &[Value]) -> Option<Vec<ReasoningStep>> {
    let steps: Vec<ReasoningStep> = items.iter().filter_map(step_from_item).collect();
    (!steps.is_empty()).then_some(steps)
}

fn step_from_item(item: &Value) -> Option<ReasoningStep> {
    match item {
        Value::String(s) => make_step(s, None),
        Value::Object(map) => step_from_object(map),
        Value::Array(pair) => match pair.as_slice() {
            [Value::String(s)] => make_step(s, None),
            [Value::String(s), flag, ..] => make_step(s, bool_like(flag)),
            _ => None,
        },
        _ => None,
    }
}

fn step_from_object(map: &Map<String, Value>) -> Option<ReasoningStep> {
    let text_under = |key_matches: &dyn Fn(&str) -> bool| {
        map.iter().find_map(|(k, v)| match v {
            Value::String(s) if key_matches(&norm_key(k)) && !s.trim().is_empty() => {
                Some(s.as_str())
            }
            _ => None,
        })
    };
    // The known text keys, then any key starting with "step" (`{"Step 1": "..."}`).
    let text = STEP_TEXT_KEYS
        .iter()
        .find_map(|want| text_under(&|k| k == *want))
        .or_else(|| text_under(&|k| k.starts_with("step")))?;
    // With several flag keys, the lexicographically first one decides (map order independent).
    let flag = map
        .iter()
        .filter(|(k, _)| {
            let k = norm_key(k);
            FLAG_KEY_MARKERS.iter().any(|m| k.contains(m))
        })
        .filter_map(|(k, v)| bool_like(v).map(|b| (k, b)))
        .min_by(|a, b| a.0.cmp(b.0))
        .map(|(_, b)| b);
    make_step(text, flag)
}

fn make_step(raw: &str, flag: Option<bool>) -> Option<ReasoningStep> {
    let text = limit_chars(&squash_ws(&strip_special_tokens(raw)), MAX_STEP_CHARS);
    // No letter or digit: empty, or a placeholder echoed from the prompt ("...").
    if !text.chars().any(char::is_alphanumeric) {
        return None;
    }
    let needs_vision = flag.unwrap_or_else(|| mentions_looking(&text));
    Some(ReasoningStep { text, needs_vision })
}

fn mentions_looking(text: &str) -> bool {
    text.split(|c: char| !c.is_alphabetic())
        .any(|w| LOOKING_WORDS.iter().any(|k| k.eq_ignore_ascii_case(w)))
}

fn bool_like(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "required" => Some(true),
            "false" | "no" | "n" | "0" | "none" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Steps from a plain-text list (the fallback when no JSON was found).
fn list_steps(text: &str) -> Vec<ReasoningStep> {
    let mut numbered = Vec::new();
    let mut bullets = Vec::new();
    for line in text.lines() {
        if let Some(item) = numbered_item(line) {
            numbered.push(item);
        } else if let Some(item) = bullet_item(line) {
            bullets.push(item);
        }
    }
    let items = if numbered.is_empty() {
        bullets
    } else {
        numbered
    };
    items.into_iter().filter_map(step_from_line).collect()
}

/// `1. x`, `2) x`, `(3) x`, `4: x`, `Step 5: x`, `**Step 6.** x`, `### Step 7 - x` -> `x`.
fn numbered_item(line: &str) -> Option<&str> {
    let s = line.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '#' | '*' | '>'));
    let (s, had_step) = match strip_prefix_ci(s, "step") {
        Some(rest) => (rest.trim_start(), true),
        None => (s, false),
    };
    let s = s.strip_prefix('(').unwrap_or(s);
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let rest = s[digits..].trim_start_matches('*');
    let rest = match rest.chars().next() {
        Some(c @ ('.' | ')' | ':' | '-' | '–' | '—')) => {
            let after = &rest[c.len_utf8()..];
            // "3.5 apples" is not an item; "3. apples" is.
            if !had_step && !after.starts_with(char::is_whitespace) {
                return None;
            }
            after
        }
        Some(c) if had_step && c.is_whitespace() => rest,
        _ => return None,
    };
    let rest = rest
        .trim_start_matches(|c: char| {
            c.is_whitespace() || matches!(c, '*' | ':' | '.' | ')' | '-' | '–' | '—')
        })
        .trim_end();
    (!rest.is_empty()).then_some(rest)
}

fn bullet_item(line: &str) -> Option<&str> {
    let s = line.trim_start();
    let rest = ["- ", "* ", "• ", "+ "]
        .iter()
        .find_map(|b| s.strip_prefix(b))?
        .trim();
    (!rest.is_empty()).then_some(rest)
}

/// A list line to a step, reading an inline `needs_vision: true` (or `needs vision: no`).
fn step_from_line(line: &str) -> Option<ReasoningStep> {
    let line = line.replace("**", "");
    let lower = line.to_ascii_lowercase();
    let marker = ["needs_vision", "needs vision", "needs-vision"]
        .iter()
        .find_map(|m| lower.find(m).map(|at| (at, m.len())));
    let Some((at, len)) = marker else {
        return make_step(&line, None);
    };
    // `lower` is `line` with ASCII case changes only: byte offsets are shared.
    let value = line[at + len..]
        .trim_start_matches(|c: char| c.is_whitespace() || matches!(c, ':' | '=' | '"' | '\''));
    let word: String = value
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    let flag = bool_like(&Value::String(word));
    let text = line[..at].trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, '-' | '–' | '—' | ',' | ';' | '(' | '[' | '|')
    });
    make_step(text, flag)
}

// ---------------------------------------------------------------------------------------------
// Phase 2: grounding boxes
// ---------------------------------------------------------------------------------------------

/// Reads the grounding boxes in `text` and returns them in original-image pixels.
///
/// Syntax is detected, the coordinate space comes from `family`:
/// - Qwen2-VL: `(x1,y1),(x2,y2)` corner pairs on a 0-1000 grid of the image, with or without
///   `<|box_start|>`/`<|box_end|>` around them (several pairs may share one `<|box_start|>`;
///   `(x1,y1) to (x2,y2)` and `(x1,y1,x2,y2)` are read too);
///   the label is the text of the latest `<|object_ref_start|>...<|object_ref_end|>` (or
///   Qwen-VL's `<ref>...</ref>`) before the box. Text decoded without special tokens gives
///   boxes without labels. JSON boxes are read when there are no corner pairs.
/// - Qwen2.5-VL: JSON boxes in absolute pixels of the resized model input (`resized_wh`).
/// - Qwen3-VL: JSON boxes on a 0-1000 grid of the image.
///
/// For Qwen2.5-VL/Qwen3-VL corner pairs are read when there are no JSON boxes. A JSON box is an
/// object with `bbox_2d` (or `bbox`, `box`, `bounding_box`, `coordinates`, ...) holding
/// `[x1, y1, x2, y2]`, `[[x1, y1], [x2, y2]]`, a list of those, or that text in a string; its
/// label is the first string under `label`, `name`, `object`, `category`, ... Bare
/// `[x1, y1, x2, y2]` arrays and `{"x1":..,"y1":..,"x2":..,"y2":..}` objects count too, anywhere
/// in the JSON. `point_2d` entries are points, not boxes, and are skipped.
///
/// Every box is mapped to `original_wh` pixels, corners reordered if swapped, clamped to
/// `[0, w] x [0, h]`; boxes with a NaN or with no area left are dropped. Order is the text's.
pub fn parse_boxes(
    family: Family,
    text: &str,
    original_wh: (u32, u32),
    resized_wh: (u32, u32),
) -> Vec<LabeledBox> {
    let text = final_part(text);
    let raw = match family {
        Family::Qwen2Vl => {
            let pairs = corner_pair_boxes(text);
            if pairs.is_empty() {
                json_boxes(text)
            } else {
                pairs
            }
        }
        Family::Qwen25Vl | Family::Qwen3Vl => {
            let json = json_boxes(text);
            if json.is_empty() {
                corner_pair_boxes(text)
            } else {
                json
            }
        }
    };
    raw.into_iter()
        .filter_map(|(coords, label)| {
            to_original(family, coords, original_wh, resized_wh)
                .map(|bbox| LabeledBox { bbox, label })
        })
        .collect()
}

/// Writes `b` (original-image pixels) the way `family` writes a grounding answer; for few-shot
/// prompts and tests. Coordinates are rounded to integers on the family's grid (0-1000, or the
/// resized input's pixels for Qwen2.5-VL) and clamped to it; swapped corners are reordered.
///
/// - Qwen2-VL: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
///   (no ref part without a label);
/// - Qwen2.5-VL / Qwen3-VL: a ```` ```json ```` fence holding
///   `[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]` (no `label` without one).
pub fn format_box(
    family: Family,
    b: &LabeledBox,
    original_wh: (u32, u32),
    resized_wh: (u32, u32),
) -> String {
    let label = b
        .label
        .as_deref()
        .map(|l| limit_chars(&squash_ws(&strip_special_tokens(l)), MAX_LABEL_CHARS))
        .filter(|l| !l.is_empty());
    let grid = match family {
        Family::Qwen25Vl => resized_wh,
        Family::Qwen2Vl | Family::Qwen3Vl => (1000, 1000),
    };
    let [x1, y1, x2, y2] = to_grid(&b.bbox, original_wh, grid);
    match family {
        Family::Qwen2Vl => {
            let reference = label
                .map(|l| format!("<|object_ref_start|>{l}<|object_ref_end|>"))
                .unwrap_or_default();
            format!("{reference}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
        }
        Family::Qwen25Vl | Family::Qwen3Vl => {
            let label = label
                .map(|l| format!(", \"label\": {}", Value::String(l)))
                .unwrap_or_default();
            format!("```json\n[\n\t{{\"bbox_2d\": [{x1}, {y1}, {x2}, {y2}]{label}}}\n]\n```")
        }
    }
}

type RawBox = ([f64; 4], Option<String>);

fn to_original(
    family: Family,
    c: [f64; 4],
    (ow, oh): (u32, u32),
    (rw, rh): (u32, u32),
) -> Option<BBox> {
    let (ow, oh) = (f64::from(ow), f64::from(oh));
    let (gw, gh) = match family {
        Family::Qwen25Vl => (f64::from(rw), f64::from(rh)),
        Family::Qwen2Vl | Family::Qwen3Vl => (1000.0, 1000.0),
    };
    if gw <= 0.0 || gh <= 0.0 || c.iter().any(|v| v.is_nan()) {
        return None;
    }
    let (xa, xb) = (c[0] * ow / gw, c[2] * ow / gw);
    let (ya, yb) = (c[1] * oh / gh, c[3] * oh / gh);
    // Infinite coordinates clamp to the edge; inf - inf style NaNs fail the area test below.
    let b = BBox {
        x1: xa.min(xb).clamp(0.0, ow) as f32,
        y1: ya.min(yb).clamp(0.0, oh) as f32,
        x2: xa.max(xb).clamp(0.0, ow) as f32,
        y2: ya.max(yb).clamp(0.0, oh) as f32,
    };
    (b.x2 > b.x1 && b.y2 > b.y1).then_some(b)
}

fn to_grid(b: &BBox, (ow, oh): (u32, u32), (gw, gh): (u32, u32)) -> [i64; 4] {
    let map = |v: f32, o: u32, g: u32| -> i64 {
        let v = (f64::from(v) / f64::from(o) * f64::from(g)).round();
        if v.is_nan() {
            0
        } else {
            v.clamp(0.0, f64::from(g)) as i64
        }
    };
    let (xa, xb) = (map(b.x1, ow, gw), map(b.x2, ow, gw));
    let (ya, yb) = (map(b.y1, oh, gh), map(b.y2, oh, gh));
    [xa.min(xb), ya.min(yb), xa.max(xb), ya.max(yb)]
}

/// Qwen2-VL corner pairs `(x1,y1),(x2,y2)` (or `(x1,y1,x2,y2)`) with their
/// `<|object_ref_start|>` labels.
fn corner_pair_boxes(text: &str) -> Vec<RawBox> {
    const REFS: [(&str, &str); 2] = [
        ("<|object_ref_start|>", "<|object_ref_end|>"),
        ("<ref>", "</ref>"),
    ];
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut label: Option<String> = None;
    let mut first: Option<(f64, f64)> = None;
    let mut refs_open = [true; 2]; // false once a start had no end: later ones cannot either
    let mut i = 0;
    'scan: while i < bytes.len() {
        let b = bytes[i];
        if b == b'<' {
            for (r, (start, end)) in REFS.iter().enumerate() {
                if refs_open[r] && bytes[i..].starts_with(start.as_bytes()) {
                    let from = i + start.len();
                    match text[from..].find(end) {
                        Some(len) => {
                            let l = limit_chars(
                                &squash_ws(&strip_special_tokens(&text[from..from + len])),
                                MAX_LABEL_CHARS,
                            );
                            label = (!l.is_empty()).then_some(l);
                            i = from + len + end.len();
                        }
                        None => {
                            refs_open[r] = false;
                            i = from;
                        }
                    }
                    first = None;
                    continue 'scan;
                }
            }
        }
        if b == b'(' {
            if let Some((nums, next)) = tuple_at(bytes, i) {
                match (nums.as_slice(), first.take()) {
                    (&[x1, y1, x2, y2], _) => out.push(([x1, y1, x2, y2], label.clone())),
                    (&[x, y], Some((x1, y1))) => out.push(([x1, y1, x, y], label.clone())),
                    (&[x, y], None) => first = Some((x, y)),
                    _ => {}
                }
                i = next;
                continue;
            }
        }
        // Only separators (spaces, `,`, `-`, `to`) may stand between the corners of one box.
        if first.is_some() && bytes[i..].starts_with(b"to") {
            i += 2;
            continue;
        }
        if !(b.is_ascii_whitespace() || b == b',' || b == b'-') {
            first = None;
        }
        i += 1;
    }
    out
}

/// `(x, y)` or `(x1, y1, x2, y2)` at `bytes[i] == b'('`: the numbers and the index after `)`.
fn tuple_at(bytes: &[u8], i: usize) -> Option<(Vec<f64>, usize)> {
    let mut j = i + 1;
    let mut nums = Vec::with_capacity(4);
    loop {
        nums.push(number_at(bytes, &mut j)?);
        skip_spaces(bytes, &mut j);
        match bytes.get(j) {
            Some(b',') if nums.len() < 4 => j += 1,
            Some(b')') if nums.len() == 2 || nums.len() == 4 => return Some((nums, j + 1)),
            _ => return None,
        }
    }
}

fn skip_spaces(bytes: &[u8], j: &mut usize) {
    while bytes.get(*j).is_some_and(u8::is_ascii_whitespace) {
        *j += 1;
    }
}

/// A plain decimal number (`-12`, `3.5`) after optional spaces.
fn number_at(bytes: &[u8], j: &mut usize) -> Option<f64> {
    skip_spaces(bytes, j);
    let start = *j;
    if matches!(bytes.get(*j), Some(b'-' | b'+')) {
        *j += 1;
    }
    let digits_from = *j;
    while bytes
        .get(*j)
        .is_some_and(|b| b.is_ascii_digit() || *b == b'.')
    {
        *j += 1;
    }
    if *j == digits_from {
        return None;
    }
    std::str::from_utf8(&bytes[start..*j]).ok()?.parse().ok()
}

/// Every JSON box in `text`, in order.
fn json_boxes(text: &str) -> Vec<RawBox> {
    let mut out = Vec::new();
    for (value, _) in json_values(text) {
        walk_boxes(&value, &mut out);
    }
    out
}

/// Keys that hold a box, in order of preference (normalized).
const BOX_KEYS: &[&str] = &[
    "bbox2d",
    "bbox",
    "box2d",
    "box",
    "boundingbox",
    "bboxes",
    "boxes",
    "coordinates",
    "coords",
    "rect",
];

/// Keys that hold a box's label, in order of preference (normalized).
const LABEL_KEYS: &[&str] = &[
    "label",
    "name",
    "object",
    "category",
    "class",
    "text",
    "description",
    "caption",
    "textcontent",
    "ref",
];

fn walk_boxes(value: &Value, out: &mut Vec<RawBox>) {
    match value {
        Value::Array(items) => {
            if let Some(c) = coords(value) {
                out.push((c, None));
            } else {
                for item in items {
                    walk_boxes(item, out);
                }
            }
        }
        Value::Object(map) => {
            let held = BOX_KEYS.iter().find_map(|want| {
                map.iter()
                    .filter(|(k, _)| norm_key(k) == *want)
                    .find_map(|(_, v)| boxes_under_key(v))
            });
            if let Some(found) = held {
                let label = object_label(map);
                out.extend(found.into_iter().map(|c| (c, label.clone())));
            } else if let Some(c) = coords(value) {
                out.push((c, object_label(map)));
            } else {
                for (k, v) in map {
                    if !norm_key(k).contains("point") {
                        walk_boxes(v, out);
                    }
                }
            }
        }
        _ => {}
    }
}

/// One box, or a list of boxes, held under a box key; `None` when it holds neither.
fn boxes_under_key(v: &Value) -> Option<Vec<[f64; 4]>> {
    if let Some(c) = coords(v) {
        return Some(vec![c]);
    }
    let Value::Array(items) = v else { return None };
    let all: Vec<[f64; 4]> = items.iter().filter_map(coords).collect();
    (!all.is_empty()).then_some(all)
}

/// `[x1,y1,x2,y2]`, `[[x1,y1],[x2,y2]]`, `{x1,y1,x2,y2}` (or `xmin..`, `left..`), or a string
/// holding one of those.
fn coords(v: &Value) -> Option<[f64; 4]> {
    match v {
        Value::Array(items) => match items.as_slice() {
            [a, b, c, d] => Some([num(a)?, num(b)?, num(c)?, num(d)?]),
            [Value::Array(p), Value::Array(q)] => match (p.as_slice(), q.as_slice()) {
                ([a, b], [c, d]) => Some([num(a)?, num(b)?, num(c)?, num(d)?]),
                _ => None,
            },
            _ => None,
        },
        Value::Object(map) => {
            let get = |names: [&str; 4]| -> Option<[f64; 4]> {
                let one = |n: &str| {
                    map.iter()
                        .find(|(k, _)| norm_key(k) == n)
                        .and_then(|(_, v)| num(v))
                };
                Some([
                    one(names[0])?,
                    one(names[1])?,
                    one(names[2])?,
                    one(names[3])?,
                ])
            };
            get(["x1", "y1", "x2", "y2"])
                .or_else(|| get(["xmin", "ymin", "xmax", "ymax"]))
                .or_else(|| get(["left", "top", "right", "bottom"]))
        }
        Value::String(s) => {
            let s = s.trim();
            if !(s.starts_with('[') || s.starts_with('(')) {
                return None;
            }
            match Loose::new(s).value(false) {
                Parsed::Done(inner) => coords(&inner),
                Parsed::Cut(_) => None,
            }
        }
        _ => None,
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn object_label(map: &Map<String, Value>) -> Option<String> {
    LABEL_KEYS.iter().find_map(|want| {
        map.iter().find_map(|(k, v)| match v {
            Value::String(s) if norm_key(k) == *want => {
                let l = limit_chars(&squash_ws(&strip_special_tokens(s)), MAX_LABEL_CHARS);
                (!l.is_empty()).then_some(l)
            }
            _ => None,
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Phase 3/4: captions and answers
// ---------------------------------------------------------------------------------------------

/// Cleans a caption or answer for display, at most `max_chars` characters:
/// keeps the text after the last `</think>`; drops a leading `<|im_start|>role` line and
/// everything from the first `<|im_end|>`, `<|endoftext|>` or `<|im_start|>` on; removes other
/// `<|...|>` tokens and code fences; unwraps a whole-text JSON object holding the text under
/// `answer`, `final_answer`, `caption`, `description`, `text` or `response`; strips leading
/// labels (`Answer:`, `**Final answer:**`, `Caption:`, `A:`, ...) and quotes around the whole
/// text; trims every line, collapses spaces and blank-line runs; cuts at a word boundary when
/// one lies in the last half of the limit.
pub fn clean_text(text: &str, max_chars: usize) -> String {
    let mut t = final_part(text).trim_start();
    if let Some(rest) = t.strip_prefix("<|im_start|>") {
        t = rest.split_once('\n').map_or("", |(_, body)| body);
    }
    let end = ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
        .iter()
        .filter_map(|tok| t.find(tok))
        .min();
    if let Some(end) = end {
        t = &t[..end];
    }
    let t = tidy_lines(&strip_code_fences(&strip_special_tokens(t)));
    let t = unwrap_json_answer(&t).unwrap_or(t);
    let mut s = t.as_str();
    for _ in 0..3 {
        let next = strip_label(s);
        if next.len() == s.len() {
            break;
        }
        s = next;
    }
    let s = unquote(s.trim());
    limit_chars(&tidy_lines(s), max_chars)
}

/// Removes every chat special token `<|name|>` (name: ASCII letters, digits, `_`).
pub fn strip_special_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("<|") {
        let after = &rest[at + 2..];
        let name_len = after
            .bytes()
            .take(65)
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        if name_len > 0 && name_len <= 64 && after[name_len..].starts_with("|>") {
            out.push_str(&rest[..at]);
            rest = &after[name_len + 2..];
        } else {
            out.push_str(&rest[..at + 2]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Removes Markdown code fences (```` ``` ````, with the language tag of an opening fence that
/// ends its line), keeping what they enclose.
pub fn strip_code_fences(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut open = false;
    while let Some(at) = rest.find("```") {
        out.push_str(&rest[..at]);
        rest = rest[at..].trim_start_matches('`');
        if !open {
            rest = &rest[fence_tag_len(rest)..];
        }
        open = !open;
    }
    out.push_str(rest);
    out
}

/// Length of a fence's language tag (`json`, `python`, ...) when it runs to the end of its line.
fn fence_tag_len(after_fence: &str) -> usize {
    let tag = after_fence
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+'))
        .count();
    let rest = after_fence[tag..].trim_start_matches([' ', '\t']);
    if rest.is_empty() || rest.starts_with(['\n', '\r']) {
        tag
    } else {
        0
    }
}

fn unwrap_json_answer(t: &str) -> Option<String> {
    if !(t.starts_with('{') && t.ends_with('}')) {
        return None;
    }
    let mut reader = Loose::new(t);
    let Parsed::Done(Value::Object(map)) = reader.value(false) else {
        return None;
    };
    if reader.pos != t.len() {
        return None;
    }
    [
        "answer",
        "finalanswer",
        "caption",
        "description",
        "text",
        "response",
    ]
    .iter()
    .find_map(|want| {
        map.iter().find_map(|(k, v)| match v {
            Value::String(s) if norm_key(k) == *want => Some(tidy_lines(s)),
            _ => None,
        })
    })
}

/// `Answer: x` / `**Final Answer:** x` / `A: x` -> `x`; anything else unchanged.
fn strip_label(s: &str) -> &str {
    const LABELS: &[&str] = &[
        "final answer",
        "short answer",
        "answer",
        "caption",
        "description",
        "response",
        "output",
        "a",
    ];
    let body = s.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '*' | '#'));
    for label in LABELS {
        if let Some(rest) = strip_prefix_ci(body, label) {
            if let Some(rest) = rest.trim_start_matches(['*', ' ']).strip_prefix(':') {
                return rest.trim_start_matches(|c: char| c.is_whitespace() || c == '*');
            }
        }
    }
    s
}

fn unquote(s: &str) -> &str {
    for (open, close) in [('"', '"'), ('\'', '\''), ('“', '”'), ('‘', '’'), ('`', '`')] {
        if let Some(inner) = s.strip_prefix(open).and_then(|r| r.strip_suffix(close)) {
            if !inner.contains(open) && !inner.contains(close) {
                return inner.trim();
            }
        }
    }
    s
}

/// Trims lines, collapses runs of spaces and of blank lines, trims the whole.
fn tidy_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = false;
    for line in s.lines() {
        let line = squash_ws(line);
        if line.is_empty() {
            blank = !out.is_empty();
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank { "\n\n" } else { "\n" });
        }
        out.push_str(&line);
        blank = false;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Shared text helpers
// ---------------------------------------------------------------------------------------------

/// The answer part of a thinking model's output: after the last `</think>`.
fn final_part(text: &str) -> &str {
    match text.rfind("</think>") {
        Some(at) => &text[at + "</think>".len()..],
        None => text,
    }
}

/// Every whitespace run to one space, trimmed.
fn squash_ws(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// At most `max` characters; cut at the last whitespace when that keeps at least half.
fn limit_chars(s: &str, max: usize) -> String {
    let Some((cut, next)) = s.char_indices().nth(max) else {
        return s.to_string();
    };
    let head = &s[..cut];
    if next.is_whitespace() {
        return head.trim_end().to_string();
    }
    match head.rfind(char::is_whitespace) {
        Some(ws) if head[..ws].chars().count() >= max / 2 => head[..ws].trim_end().to_string(),
        _ => head.to_string(),
    }
}

/// `s` without an ASCII-case-insensitive `prefix`.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// A key compared loosely: ASCII letters and digits, lowercase (`Needs-Vision` -> `needsvision`).
fn norm_key(key: &str) -> String {
    key.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tolerant JSON reader
// ---------------------------------------------------------------------------------------------

/// The JSON values in `text`, in order, each with whether it was complete.
///
/// Fenced blocks and the text between them are read separately, so a block cut off before its
/// closing fence still ends at the fence. In each, every `{`/`[` not inside an earlier value
/// starts a candidate; a candidate that yields nothing restarts the search one byte later. The
/// search stops after a work budget proportional to the text (bounds pathological input).
fn json_values(text: &str) -> Vec<(Value, bool)> {
    let mut out = Vec::new();
    for segment in fence_segments(text) {
        let bytes = segment.as_bytes();
        let mut budget = 16 * bytes.len() + 65_536;
        let mut i = 0;
        while let Some(off) = bytes[i..].iter().position(|&b| b == b'{' || b == b'[') {
            let start = i + off;
            let mut reader = Loose::new(segment);
            reader.pos = start;
            let parsed = reader.value(false);
            let end = reader.pos.max(start + 1);
            budget = budget.saturating_sub(end - start);
            i = match parsed {
                Parsed::Done(v) => {
                    out.push((v, true));
                    end
                }
                Parsed::Cut(Some(v)) if !is_empty_container(&v) => {
                    out.push((v, false));
                    end
                }
                Parsed::Cut(_) => start + 1,
            };
            if budget == 0 || i >= bytes.len() {
                break;
            }
        }
    }
    out
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

/// The contents of each ```` ``` ```` block and the text around them, in order.
fn fence_segments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("```") {
        out.push(&rest[..open]);
        let after = rest[open..].trim_start_matches('`');
        let body = &after[fence_tag_len(after)..];
        match body.find("```") {
            Some(close) => {
                out.push(&body[..close]);
                rest = body[close..].trim_start_matches('`');
            }
            None => {
                out.push(body);
                rest = "";
            }
        }
    }
    out.push(rest);
    out
}

/// The outcome of reading one value.
enum Parsed {
    /// A complete value.
    Done(Value),
    /// Cut off (end of text) or ended by junk: the complete part of a container, or `None`.
    Cut(Option<Value>),
}

/// A tolerant JSON / Python-literal reader over `text` from `pos` (see the module doc).
struct Loose<'a> {
    text: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Loose<'a> {
    fn new(text: &'a str) -> Self {
        Loose {
            text,
            pos: 0,
            depth: 0,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    /// Skips whitespace and `// comments`.
    fn skip_ws(&mut self) {
        loop {
            match self.peek() {
                Some(b) if b.is_ascii_whitespace() => self.pos += 1,
                Some(b'/') if self.bytes().get(self.pos + 1) == Some(&b'/') => {
                    while self.peek().is_some_and(|b| b != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    /// One value. `bare_ok`: in an object member's value position, where unquoted text up to
    /// `,` `}` `]` or the line end reads as a string.
    fn value(&mut self, bare_ok: bool) -> Parsed {
        self.skip_ws();
        let Some(b) = self.peek() else {
            return Parsed::Cut(None);
        };
        match b {
            b'{' => self.object(),
            b'[' => self.array(b']'),
            b'(' => self.array(b')'),
            b'"' | b'\'' => match self.string(b) {
                Some(s) => Parsed::Done(Value::String(s)),
                None => Parsed::Cut(None),
            },
            b'-' | b'+' | b'.' | b'0'..=b'9' => self.number(),
            _ if b.is_ascii_alphabetic() || b == b'_' => self.word(bare_ok),
            _ => Parsed::Cut(None),
        }
    }

    fn enter(&mut self) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        self.depth += 1;
        self.pos += 1;
        true
    }

    fn array(&mut self, close: u8) -> Parsed {
        if !self.enter() {
            return Parsed::Cut(None);
        }
        let mut items = Vec::new();
        let ended = loop {
            self.skip_ws();
            match self.peek() {
                None => break false,
                Some(b) if b == close => {
                    self.pos += 1;
                    break true;
                }
                Some(b',') => {
                    self.pos += 1;
                    continue;
                }
                Some(_) => {}
            }
            match self.value(false) {
                Parsed::Done(v) => items.push(v),
                // A cut nested list keeps its complete items; a cut object is an incomplete item.
                Parsed::Cut(Some(v @ Value::Array(_))) => {
                    items.push(v);
                    break false;
                }
                Parsed::Cut(_) => break false,
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                // A missing comma between items ({..}\n{..}) is forgiven.
                Some(b'{' | b'[' | b'"' | b'\'') | None => {}
                Some(b) if b == close => {}
                Some(_) => break false,
            }
        };
        self.depth -= 1;
        let v = Value::Array(items);
        if ended {
            Parsed::Done(v)
        } else {
            Parsed::Cut(Some(v))
        }
    }

    fn object(&mut self) -> Parsed {
        if !self.enter() {
            return Parsed::Cut(None);
        }
        let mut map = Map::new();
        let ended = loop {
            self.skip_ws();
            match self.peek() {
                None => break false,
                Some(b'}') => {
                    self.pos += 1;
                    break true;
                }
                Some(b',') => {
                    self.pos += 1;
                    continue;
                }
                Some(_) => {}
            }
            let Some(key) = self.key() else { break false };
            self.skip_ws();
            if self.peek() != Some(b':') {
                break false;
            }
            self.pos += 1;
            match self.value(true) {
                Parsed::Done(v) => {
                    map.insert(key, v);
                }
                Parsed::Cut(Some(v)) => {
                    map.insert(key, v);
                    break false;
                }
                Parsed::Cut(None) => break false,
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                // A missing comma before the next key is forgiven.
                Some(b'}' | b'"' | b'\'') | None => {}
                Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
                Some(_) => break false,
            }
        };
        self.depth -= 1;
        let v = Value::Object(map);
        if ended {
            Parsed::Done(v)
        } else {
            Parsed::Cut(Some(v))
        }
    }

    /// A member key: a quoted string, or a bare `[A-Za-z0-9_$-]+` word.
    fn key(&mut self) -> Option<String> {
        match self.peek()? {
            q @ (b'"' | b'\'') => self.string(q),
            _ => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'-'))
                {
                    self.pos += 1;
                }
                (self.pos > start).then(|| self.text[start..self.pos].to_string())
            }
        }
    }

    /// A string opened by `quote` at `pos`; `None` when the text ends inside it.
    fn string(&mut self, quote: u8) -> Option<String> {
        let bytes = self.bytes();
        let mut out = String::new();
        let mut i = self.pos + 1;
        let mut run = i; // start of the not-yet-copied plain run
        loop {
            let Some(&b) = bytes.get(i) else {
                self.pos = bytes.len();
                return None;
            };
            if b == b'\\' {
                out.push_str(&self.text[run..i]);
                let Some(c) = self.text[i + 1..].chars().next() else {
                    self.pos = bytes.len();
                    return None;
                };
                i += 1 + c.len_utf8();
                match c {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'u' => match hex4(bytes, i) {
                        Some(hi) => {
                            i += 4;
                            let mut code = hi;
                            let pair = (0xD800..0xDC00).contains(&hi)
                                && bytes.get(i..i + 2) == Some(b"\\u".as_slice());
                            if let Some(lo) = hex4(bytes, i + 2)
                                .filter(|lo| pair && (0xDC00..0xE000).contains(lo))
                            {
                                i += 6;
                                code = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                            }
                            out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                        }
                        None => out.push('u'),
                    },
                    other => out.push(other),
                }
                run = i;
            } else if b == quote && self.closes_string(i + 1) {
                out.push_str(&self.text[run..i]);
                self.pos = i + 1;
                return Some(out);
            } else {
                i += 1;
            }
        }
    }

    /// Whether a quote followed by `bytes[at..]` closes its string (see the module doc).
    fn closes_string(&self, at: usize) -> bool {
        for &b in &self.bytes()[at..] {
            match b {
                b' ' | b'\t' => continue,
                b'\n' | b'\r' | b',' | b':' | b'}' | b']' | b')' => return true,
                _ => return false,
            }
        }
        true
    }

    fn number(&mut self) -> Parsed {
        let bytes = self.bytes();
        let start = self.pos;
        let mut i = start;
        if matches!(bytes.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let mantissa = i;
        let mut digits = 0;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
            digits += 1;
        }
        if bytes.get(i) == Some(&b'.') {
            i += 1;
            while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
                digits += 1;
            }
        }
        if digits == 0 {
            self.pos = i.max(mantissa);
            return Parsed::Cut(None);
        }
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            let mut j = i + 1;
            if matches!(bytes.get(j), Some(b'-' | b'+')) {
                j += 1;
            }
            let exp = j;
            while bytes.get(j).is_some_and(u8::is_ascii_digit) {
                j += 1;
            }
            if j > exp {
                i = j;
            }
        }
        self.pos = i;
        if i >= bytes.len() {
            return Parsed::Cut(None); // the text may have been cut mid-number
        }
        let f: f64 = self.text[start..i]
            .trim_start_matches('+')
            .parse()
            .unwrap_or(f64::NAN);
        Parsed::Done(number_value(f))
    }

    fn word(&mut self, bare_ok: bool) -> Parsed {
        let bytes = self.bytes();
        let start = self.pos;
        let mut i = start;
        while bytes
            .get(i)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        {
            i += 1;
        }
        let literal = match &self.text[start..i] {
            "true" | "True" | "TRUE" => Some(Value::Bool(true)),
            "false" | "False" | "FALSE" => Some(Value::Bool(false)),
            "null" | "None" | "NULL" | "Null" | "nil" | "NaN" | "Infinity" | "undefined" => {
                Some(Value::Null)
            }
            _ => None,
        };
        if let Some(v) = literal {
            self.pos = i;
            return if i >= bytes.len() {
                Parsed::Cut(None) // `tr` of a cut `true` must not read as anything
            } else {
                Parsed::Done(v)
            };
        }
        if !bare_ok {
            self.pos = i;
            return Parsed::Cut(None);
        }
        while bytes
            .get(i)
            .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b'\n' | b'\r'))
        {
            i += 1;
        }
        self.pos = i;
        if i >= bytes.len() {
            return Parsed::Cut(None);
        }
        Parsed::Done(Value::String(self.text[start..i].trim().to_string()))
    }
}

fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at + 4)?;
    digits
        .iter()
        .try_fold(0u32, |acc, &b| Some(acc * 16 + char::from(b).to_digit(16)?))
}

fn number_value(f: f64) -> Value {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(text: &str) -> (Value, bool) {
        match Loose::new(text).value(false) {
            Parsed::Done(v) => (v, true),
            Parsed::Cut(v) => (v.unwrap_or(Value::Null), false),
        }
    }

    #[test]
    fn loose_reader_accepts_python_literals_quotes_and_trailing_commas() {
        let (v, done) = read("{'a': True, 'b': None, c: 'it's', \"d\": [1, 2.5, -3e2,],}");
        assert!(done);
        assert_eq!(
            v,
            json!({"a": true, "b": null, "c": "it's", "d": [1, 2.5, -300]})
        );
    }

    #[test]
    fn cut_list_keeps_complete_items_and_drops_the_cut_one() {
        let (v, done) = read(r#"[{"a": 1}, {"a": 2}, {"a": 3, "b": "xy"#);
        assert!(!done);
        assert_eq!(v, json!([{"a": 1}, {"a": 2}]));
        let (v, _) = read(r#"{"steps": [[1, 2], [3, 4], [5"#);
        assert_eq!(v, json!({"steps": [[1, 2], [3, 4], []]}));
        let (v, _) = read("[1, 2, 3, 12");
        assert_eq!(v, json!([1, 2, 3]), "a number at the very end may be cut");
        let (v, _) = read("[true, tr");
        assert_eq!(v, json!([true]));
    }

    #[test]
    fn quote_heuristic_keeps_inner_quotes() {
        let (v, _) = read(r#"["Read the sign "STOP" on the pole", 'the dog's tail']"#);
        assert_eq!(
            v,
            json!(["Read the sign \"STOP\" on the pole", "the dog's tail"])
        );
    }

    #[test]
    fn escapes_and_surrogates_decode() {
        let (v, _) = read(r#"["a\"b\\c\n\u00e9\ud83d\ude00\x"]"#);
        assert_eq!(v, json!(["a\"b\\c\né😀x"]));
    }

    #[test]
    fn nesting_beyond_the_limit_ends_the_value() {
        let deep = "[".repeat(10_000);
        let (v, done) = read(&deep);
        assert!(!done);
        let mut depth = 0;
        let mut cur = &v;
        while let Value::Array(items) = cur {
            depth += 1;
            match items.first() {
                Some(inner) => cur = inner,
                None => break,
            }
        }
        assert_eq!(depth, MAX_DEPTH);
    }

    #[test]
    fn limit_chars_prefers_word_boundaries() {
        assert_eq!(limit_chars("hello world again", 13), "hello world");
        assert_eq!(limit_chars("hello world", 11), "hello world");
        assert_eq!(limit_chars("hello world", 5), "hello");
        assert_eq!(limit_chars("abcdefghij", 4), "abcd");
        assert_eq!(limit_chars("héllo wörld", 8), "héllo");
        assert_eq!(limit_chars("anything", 0), "");
    }

    #[test]
    fn numbered_items_are_recognised() {
        assert_eq!(numbered_item("1. Find it"), Some("Find it"));
        assert_eq!(numbered_item("  2) Find it"), Some("Find it"));
        assert_eq!(numbered_item("(3) Find it"), Some("Find it"));
        assert_eq!(numbered_item("**Step 4:** Find it"), Some("Find it"));
        assert_eq!(numbered_item("### Step 5 - Find it"), Some("Find it"));
        assert_eq!(numbered_item("Step 6 Find it"), Some("Find it"));
        assert_eq!(numbered_item("3.5 apples are left"), None);
        assert_eq!(numbered_item("2024 was a year"), None);
        assert_eq!(numbered_item("Stepping stones"), None);
        assert_eq!(numbered_item("1."), None);
    }
}
