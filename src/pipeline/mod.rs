//! The multi-phase visual-reasoning pipeline:
//! 1. reasoning: the model writes up to `max_steps` short steps as JSON, each flagged whether
//!    it needs visual verification;
//! 2. grounding: a box for each such step, in the family's native format, mapped back to
//!    original-image pixels;
//! 3. evidence: each region cropped (with a margin), all crops encoded by the vision tower in one
//!    batched call, then captioned;
//! 4. synthesis: the answer from the question, the steps and the evidence.
//!
//! Phases 1, 2 and 4 see the same image encoding (at least `main_min_tokens` visual tokens, as
//! the Qwen team advises for grounding) and start with the same image + question header, so
//! with caches on the image is encoded once and that prefix is computed once (prefix KV reuse
//! across phases; crops go to a second KV slot so they do not evict it). Model output is
//! untrusted: a phase that yields nothing usable is reported as such and the pipeline still
//! answers.

pub mod annotate;
pub mod parse;
pub mod prompts;

use web_time::Instant;

use crate::cache::vision::VisionCacheStats;
use crate::generate::{GenerateOptions, Sampling};
use crate::image::{smart_resize, PreprocessConfig};
use crate::session::{RequestStats, Session, SessionOptions};
use crate::tokenizer::{ChatMessage, Content};
use crate::{Error, Runtime};
use parse::{clean_text, parse_boxes, parse_steps, BBox};
use prompts::{
    caption_prompt, grounding_prompt, question_header, reasoning_prompt, synthesis_prompt,
    StepEvidence,
};

/// A fixed plan for benchmarks: every phase generates exactly its token budget (EOS ignored)
/// and the parsed steps and boxes are replaced by `steps` synthetic ones, so runs with and
/// without caches do the same work whatever random weights say.
#[derive(Debug, Clone, PartialEq)]
pub struct FixedPlan {
    /// Steps, all needing vision, each with a distinct box.
    pub steps: usize,
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Reasoning steps at most.
    pub max_steps: usize,
    /// Regions grounded and captioned at most.
    pub max_regions: usize,
    /// Visual tokens the main image gets at least (phases 1, 2, 4), within the checkpoint's
    /// `max_pixels`.
    pub main_min_tokens: usize,
    /// Visual tokens a crop gets at most (phase 3).
    pub crop_max_tokens: usize,
    /// Margin added around each box before cropping, as a fraction of its size.
    pub crop_margin: f32,
    /// Generated-token budgets per phase.
    pub steps_tokens: usize,
    /// Tokens for one grounding answer.
    pub box_tokens: usize,
    /// Tokens for one caption.
    pub caption_tokens: usize,
    /// Tokens for the answer.
    pub answer_tokens: usize,
    /// Sampling (greedy by default).
    pub sampling: Sampling,
    /// Vision cache and prefix KV reuse on (off: every phase recomputes everything).
    pub caches: bool,
    /// Vision cache budget in bytes.
    pub vision_cache_bytes: usize,
    /// KV positions per slot (default: what fits the budget).
    pub max_context: Option<usize>,
    /// KV budget for both slots.
    pub kv_budget_bytes: usize,
    /// Benchmark plan.
    pub plan: Option<FixedPlan>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            max_steps: 4,
            max_regions: 4,
            main_min_tokens: 1024,
            crop_max_tokens: 384,
            crop_margin: 0.1,
            steps_tokens: 256,
            box_tokens: 64,
            caption_tokens: 64,
            answer_tokens: 160,
            sampling: Sampling::default(),
            caches: true,
            vision_cache_bytes: 256 << 20,
            max_context: None,
            kv_budget_bytes: 1 << 30,
            plan: None,
        }
    }
}

/// One step of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    /// 1-based.
    pub index: usize,
    /// The step.
    pub text: String,
    /// Whether it needed visual verification.
    pub needs_vision: bool,
    /// Its region in original-image pixels `[x1, y1, x2, y2]`, if grounded.
    pub bbox: Option<[f32; 4]>,
    /// The caption of that region.
    pub evidence: Option<String>,
}

/// Cost of one phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseReport {
    /// `reasoning`, `grounding`, `evidence` or `synthesis`.
    pub name: &'static str,
    /// Wall-clock milliseconds.
    pub ms: f64,
    /// Prompt tokens over all requests of the phase.
    pub prompt_tokens: usize,
    /// Of which taken from the KV cache.
    pub reused_tokens: usize,
    /// Prompt tokens computed plus tokens generated.
    pub new_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Images answered from the vision cache.
    pub vision_cache_hits: usize,
    /// What went wrong or was skipped, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl PhaseReport {
    fn new(name: &'static str) -> Self {
        PhaseReport {
            name,
            ms: 0.0,
            prompt_tokens: 0,
            reused_tokens: 0,
            new_tokens: 0,
            generated_tokens: 0,
            vision_cache_hits: 0,
            note: None,
        }
    }

    fn add(&mut self, s: &RequestStats) {
        self.prompt_tokens += s.prompt_tokens;
        self.reused_tokens += s.reused_tokens;
        self.new_tokens += s.computed_tokens + s.generated_tokens;
        self.generated_tokens += s.generated_tokens;
        self.vision_cache_hits += s.vision_cache_hits;
    }
}

/// Cache figures at the end of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheReport {
    /// Vision-embedding cache counters.
    pub vision: VisionCacheStats,
    /// KV slots.
    pub kv_slots: usize,
    /// Positions per slot.
    pub kv_capacity: usize,
    /// Device bytes of all KV slots.
    pub kv_bytes: usize,
    /// Prompt tokens reused over the run.
    pub reused_tokens: usize,
    /// Prompt tokens computed over the run.
    pub computed_tokens: usize,
}

/// The `--json` report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineReport {
    /// The question.
    pub question: String,
    /// Steps with boxes and evidence.
    pub steps: Vec<StepReport>,
    /// The answer.
    pub answer: String,
    /// Per-phase costs.
    pub phases: Vec<PhaseReport>,
    /// Cache figures.
    pub cache: CacheReport,
    /// The model family.
    pub family: crate::Family,
    /// Original image size `[w, h]`.
    pub image_size: [u32; 2],
    /// Total milliseconds.
    pub total_ms: f64,
}

/// Preprocessing with the visual-token count raised to at least / capped at `tokens`.
fn with_tokens(
    base: &PreprocessConfig,
    min_tokens: Option<usize>,
    max_tokens: Option<usize>,
) -> PreprocessConfig {
    let f2 = base.factor() * base.factor();
    let mut p = base.clone();
    // Raised, but never past the checkpoint's own max_pixels: a model trained on small images
    // (the bundled micro model) keeps seeing the sizes it knows.
    if let Some(t) = min_tokens {
        p.min_pixels = p.min_pixels.max(t * f2).min(p.max_pixels);
    }
    if let Some(t) = max_tokens {
        p.max_pixels = p.max_pixels.min(t * f2).max(f2);
        p.min_pixels = p.min_pixels.min(p.max_pixels);
    }
    p
}

fn user(image: bool, text: String) -> Vec<ChatMessage> {
    let mut content = Vec::new();
    if image {
        content.push(Content::Image);
    }
    content.push(Content::Text(text));
    vec![ChatMessage {
        role: "user".into(),
        content,
    }]
}

/// A box grown by `margin` of its size on each side, clamped, as integer pixel bounds
/// `(x, y, width, height)`.
pub fn crop_rect(b: &BBox, margin: f32, w: u32, h: u32) -> (u32, u32, u32, u32) {
    let (mx, my) = (b.width() * margin, b.height() * margin);
    let x1 = (b.x1 - mx).floor().clamp(0.0, w as f32 - 1.0) as u32;
    let y1 = (b.y1 - my).floor().clamp(0.0, h as f32 - 1.0) as u32;
    let x2 = (b.x2 + mx).ceil().clamp(x1 as f32 + 1.0, w as f32) as u32;
    let y2 = (b.y2 + my).ceil().clamp(y1 as f32 + 1.0, h as f32) as u32;
    (x1, y1, x2 - x1, y2 - y1)
}

/// The pipeline on one runtime; keeps its caches across questions.
pub struct Pipeline<'rt> {
    session: Session<'rt>,
    opts: PipelineOptions,
}

impl<'rt> Pipeline<'rt> {
    /// Allocates the session (two KV slots) for `rt`.
    pub fn new(rt: &'rt Runtime, opts: PipelineOptions) -> Result<Self, Error> {
        let session = Session::new(
            rt,
            SessionOptions {
                slots: 2,
                max_context: opts.max_context,
                kv_budget_bytes: opts.kv_budget_bytes,
                prefix_reuse: opts.caches,
                vision_cache_bytes: if opts.caches {
                    opts.vision_cache_bytes
                } else {
                    0
                },
            },
        )?;
        Ok(Pipeline { session, opts })
    }

    /// Answers `question` about `image`; `on_text(phase, piece)` streams the model's text.
    pub async fn run_async(
        &mut self,
        image: &::image::RgbImage,
        question: &str,
        on_text: &mut dyn FnMut(&str, &str),
    ) -> Result<PipelineReport, Error> {
        let rt = self.session.runtime();
        let family = rt.family();
        let o = self.opts.clone();
        let start = Instant::now();
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::BadInput("the image is empty".into()));
        }
        let main_pre = with_tokens(&rt.preprocess, Some(o.main_min_tokens), None);
        let crop_pre = with_tokens(&rt.preprocess, None, Some(o.crop_max_tokens));
        let (rh, rw) = smart_resize(
            h as usize,
            w as usize,
            main_pre.factor(),
            main_pre.min_pixels,
            main_pre.max_pixels,
        )?;
        let resized_wh = (rw as u32, rh as u32);
        let fixed = o.plan.is_some();
        let gen = |max_new_tokens: usize| GenerateOptions {
            max_new_tokens,
            sampling: o.sampling.clone(),
            ignore_eos: fixed,
            max_context: None,
            kv_budget_bytes: o.kv_budget_bytes,
            keep_prefill_logits: false,
        };
        let image_list = std::slice::from_ref(image);
        let mut phases = Vec::new();

        // Slot 0 keeps the image + question prefix for phases 1, 2 and 4; crops use slot 1.
        self.session.pin_slot(Some(0));

        // 1. Reasoning steps.
        let t = Instant::now();
        let mut phase = PhaseReport::new("reasoning");
        let (out, stats) = self
            .session
            .generate_async(
                &user(true, reasoning_prompt(question, o.max_steps)),
                image_list,
                &main_pre,
                &gen(o.steps_tokens),
                &mut |p| on_text("reasoning", p),
            )
            .await?;
        phase.add(&stats);
        let mut steps = match &o.plan {
            Some(plan) => (0..plan.steps)
                .map(|i| parse::ReasoningStep {
                    text: format!("Check region {} of the image", i + 1),
                    needs_vision: true,
                })
                .collect(),
            None => parse_steps(&out.text, o.max_steps),
        };
        if steps.is_empty() {
            phase.note =
                Some("the model wrote no usable reasoning steps; answering directly".into());
        }
        phase.ms = t.elapsed().as_secs_f64() * 1e3;
        phases.push(phase);
        steps.truncate(o.max_steps);

        // 2. Grounding.
        let t = Instant::now();
        let mut phase = PhaseReport::new("grounding");
        let mut boxes: Vec<Option<BBox>> = vec![None; steps.len()];
        let mut grounded = 0;
        for (i, step) in steps.iter().enumerate() {
            if !step.needs_vision || grounded >= o.max_regions {
                continue;
            }
            grounded += 1;
            if grounded > 1 {
                on_text("grounding", "\n"); // one line per step in the stream
            }
            let prompt = format!(
                "{}{}",
                question_header(question),
                grounding_prompt(family, &step.text)
            );
            let (out, stats) = self
                .session
                .generate_async(
                    &user(true, prompt),
                    image_list,
                    &main_pre,
                    &gen(o.box_tokens),
                    &mut |p| on_text("grounding", p),
                )
                .await?;
            phase.add(&stats);
            boxes[i] = match &o.plan {
                // Synthetic boxes: a grid of regions across the image.
                Some(plan) => {
                    let k = plan.steps.max(1) as f32;
                    let (fw, fh) = (w as f32 / k, h as f32);
                    Some(BBox {
                        x1: fw * i as f32,
                        y1: 0.0,
                        x2: fw * (i as f32 + 1.0),
                        y2: fh,
                    })
                }
                None => parse_boxes(family, &out.text, (w, h), resized_wh)
                    .first()
                    .map(|b| b.bbox),
            };
        }
        if grounded == 0 {
            phase.note = Some("no step needed visual verification".into());
        } else if boxes.iter().all(Option::is_none) {
            phase.note = Some("the model gave no usable box for any step".into());
        }
        phase.ms = t.elapsed().as_secs_f64() * 1e3;
        phases.push(phase);

        // 3. Evidence: crop, encode all crops at once, caption each.
        let t = Instant::now();
        let mut phase = PhaseReport::new("evidence");
        let regions: Vec<(usize, ::image::RgbImage)> = boxes
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
            .map(|(i, b)| {
                let (x, y, cw, ch) = crop_rect(&b, o.crop_margin, w, h);
                (
                    i,
                    ::image::imageops::crop_imm(image, x, y, cw, ch).to_image(),
                )
            })
            .collect();
        let mut evidence: Vec<Option<String>> = vec![None; steps.len()];
        if !regions.is_empty() && o.caches {
            // One batched vision call fills the cache; the captions below then hit it.
            let crops: Vec<::image::RgbImage> = regions.iter().map(|(_, c)| c.clone()).collect();
            self.session.encode_images(&crops, &crop_pre)?;
        }
        self.session.pin_slot(Some(1));
        for (k, (i, crop)) in regions.iter().enumerate() {
            if k > 0 {
                on_text("evidence", "\n");
            }
            let (out, stats) = self
                .session
                .generate_async(
                    &user(true, caption_prompt(&steps[*i].text)),
                    std::slice::from_ref(crop),
                    &crop_pre,
                    &gen(o.caption_tokens),
                    &mut |p| on_text("evidence", p),
                )
                .await?;
            phase.add(&stats);
            let caption = clean_text(&out.text, 400);
            evidence[*i] = (!caption.is_empty()).then_some(caption);
        }
        if regions.is_empty() {
            phase.note = Some("no region to describe".into());
        }
        phase.ms = t.elapsed().as_secs_f64() * 1e3;
        phases.push(phase);

        // 4. Synthesis.
        self.session.pin_slot(Some(0));
        let t = Instant::now();
        let mut phase = PhaseReport::new("synthesis");
        let notes: Vec<StepEvidence> = steps
            .iter()
            .zip(&evidence)
            .map(|(s, e)| StepEvidence {
                text: &s.text,
                evidence: e.as_deref(),
            })
            .collect();
        let (out, stats) = self
            .session
            .generate_async(
                &user(true, synthesis_prompt(question, &notes)),
                image_list,
                &main_pre,
                &gen(o.answer_tokens),
                &mut |p| on_text("synthesis", p),
            )
            .await?;
        phase.add(&stats);
        let mut answer = clean_text(&out.text, 2000);
        if answer.is_empty() {
            phase.note = Some("the model gave an empty answer".into());
            answer = out.text.trim().to_string();
        }
        phase.ms = t.elapsed().as_secs_f64() * 1e3;
        phases.push(phase);

        let (reused, computed) = phases.iter().fold((0, 0), |(r, c), p| {
            (r + p.reused_tokens, c + p.prompt_tokens - p.reused_tokens)
        });
        Ok(PipelineReport {
            question: question.to_string(),
            steps: steps
                .iter()
                .enumerate()
                .map(|(i, s)| StepReport {
                    index: i + 1,
                    text: s.text.clone(),
                    needs_vision: s.needs_vision,
                    bbox: boxes[i].map(|b| [b.x1, b.y1, b.x2, b.y2]),
                    evidence: evidence[i].clone(),
                })
                .collect(),
            answer,
            phases,
            cache: CacheReport {
                vision: self.session.vision_stats(),
                kv_slots: 2,
                kv_capacity: self.session.capacity(),
                kv_bytes: self.session.kv_bytes(),
                reused_tokens: reused,
                computed_tokens: computed,
            },
            family,
            image_size: [w, h],
            total_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Blocking [`run_async`](Self::run_async).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run(
        &mut self,
        image: &::image::RgbImage,
        question: &str,
        on_text: &mut dyn FnMut(&str, &str),
    ) -> Result<PipelineReport, Error> {
        pollster::block_on(self.run_async(image, question, on_text))
    }
}
