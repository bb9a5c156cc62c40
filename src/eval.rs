//! `qwen-vl eval`: how well a model answers questions about generated scenes ([`crate::synth`]).
//!
//! For each scene `0..n` of a seed, every [`eval_questions`] item is asked directly (the image
//! first in the user turn, then the question; greedy), and the scene's [`pipeline_question`] goes
//! through the multi-phase [`Pipeline`]. Scores: per-kind accuracy with [`answer_matches`],
//! grounding by the IoU of the first box the model writes against the shape's true box, and the
//! pipeline's final-answer accuracy.
//!
//! Scoring is kept apart from running ([`score_item`], [`summarise`]) so that outputs produced
//! elsewhere (transformers, through `tools/micro/eval_hf.py` and an [`ItemsFile`]) are scored by
//! exactly the same code.

use serde::{Deserialize, Serialize};

use crate::config::Family;
use crate::generate::{FinishReason, GenerateOptions, Sampling};
use crate::image::smart_resize;
use crate::pipeline::parse::parse_boxes;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::session::{Session, SessionOptions};
use crate::synth::{answer_matches, eval_questions, iou, pipeline_question, scene, QuestionKind};
use crate::tokenizer::{ChatMessage, Content};
use crate::{Error, Progress, Runtime};

/// A grounding answer counts as correct from this IoU on.
pub const IOU_THRESHOLD: f32 = 0.5;

/// How an evaluation runs.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Tokens each direct answer may take.
    pub max_new_tokens: usize,
    /// Settings of the pipeline run on each scene's pipeline question (greedy).
    pub pipeline: PipelineOptions,
    /// Share the image's encoding and KV prefix between a scene's questions (off: every
    /// question is computed from scratch, as a one-shot `generate` would).
    pub caches: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            max_new_tokens: 48,
            // Synthetic questions need one or two steps and one-line answers; the default
            // budgets are for real photos.
            pipeline: PipelineOptions {
                steps_tokens: 96,
                box_tokens: 48,
                caption_tokens: 24,
                answer_tokens: 24,
                ..Default::default()
            },
            caches: true,
        }
    }
}

/// One question asked and its scoring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalItem {
    /// Scene index (of the run's seed).
    pub scene: u64,
    /// What the question asks about; for a pipeline item, how its answer is compared.
    #[serde(with = "kind_name")]
    pub kind: QuestionKind,
    /// Whether the multi-phase pipeline answered it (else a direct question).
    pub pipeline: bool,
    /// The user's text (for a pipeline item, the question given to the pipeline).
    pub prompt: String,
    /// The expected answer.
    pub expected: String,
    /// What the model answered: the generated text with special tokens kept and the stop token
    /// dropped; for a pipeline item, the pipeline's final answer.
    pub output: String,
    /// Generated token ids, stop token included; empty for pipeline items.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// For grounding: the shape's box `[x1, y1, x2, y2]` in image pixels.
    pub target: Option<[f32; 4]>,
    /// The scene's size `[w, h]`.
    pub image_size: [u32; 2],
    /// The size `[w, h]` the image was resized to for the model (Qwen2.5-VL boxes are in it).
    pub resized_size: [u32; 2],
    /// Whether the answer matches (grounding: IoU at least [`IOU_THRESHOLD`]).
    #[serde(default)]
    pub correct: bool,
    /// For grounding: IoU of the first box in the output with `target` (0 when there is none).
    #[serde(default)]
    pub iou: Option<f32>,
    /// The scene's picture, relative to the items file (written by `qwen-vl eval --items`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `QuestionKind` as its report key (`colour`, ..., `yesno`, `grounding`), both ways.
mod kind_name {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::synth::QuestionKind;

    pub fn serialize<S: Serializer>(kind: &QuestionKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<QuestionKind, D::Error> {
        let name = String::deserialize(d)?;
        QuestionKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "unknown question kind `{name}` (expected colour, shape, count, position, yesno or grounding)"
                ))
            })
    }
}

/// Everything one evaluation asked, for comparing runs item by item and for re-scoring outputs
/// produced elsewhere (`qwen-vl eval --items FILE` writes it, `--score-items FILE` reads it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemsFile {
    /// The checkpoint folder.
    pub model: String,
    /// Its family's `model_type` (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`): how boxes are read.
    pub family: String,
    /// Scene seed.
    pub seed: u64,
    /// Scenes.
    pub n: usize,
    /// Tokens each direct answer could take.
    pub max_new_tokens: usize,
    /// Every question, scene by scene, the pipeline question last.
    pub items: Vec<EvalItem>,
}

impl ItemsFile {
    /// The family named by `family`.
    pub fn family(&self) -> Result<Family, Error> {
        match self.family.as_str() {
            "qwen2_vl" => Ok(Family::Qwen2Vl),
            "qwen2_5_vl" => Ok(Family::Qwen25Vl),
            "qwen3_vl" => Ok(Family::Qwen3Vl),
            other => Err(Error::BadInput(format!(
                "the items file names family `{other}`; expected qwen2_vl, qwen2_5_vl or qwen3_vl"
            ))),
        }
    }
}

/// Direct-question accuracy per kind; `None` (JSON `null`) when no question of that kind was
/// asked (a scene with one shape has no position question).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Accuracy {
    /// "What colour is ...?"
    pub colour: Option<f64>,
    /// "What shape is ...?"
    pub shape: Option<f64>,
    /// "How many ...?"
    pub count: Option<f64>,
    /// "Is ... left or right of / above or below ...?"
    pub position: Option<f64>,
    /// "Is there a ...?"
    pub yesno: Option<f64>,
}

/// Grounding scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroundingScore {
    /// Mean IoU of the first box with the target (a missing box counts 0).
    pub mean_iou: Option<f64>,
    /// Share of answers with IoU at least [`IOU_THRESHOLD`].
    pub iou_ge_0_5: Option<f64>,
}

/// Pipeline scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineScore {
    /// Share of final answers matching the expected one.
    pub answer_accuracy: Option<f64>,
}

/// The `--json` report: `{"n","accuracy":{..},"grounding":{..},"pipeline":{..}}`, plus `items`
/// when they are kept (`--verbose`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Scenes.
    pub n: usize,
    /// Direct questions, per kind.
    pub accuracy: Accuracy,
    /// Direct grounding questions.
    pub grounding: GroundingScore,
    /// The pipeline questions.
    pub pipeline: PipelineScore,
    /// Every item; empty (and left out of the JSON) unless kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<EvalItem>,
}

impl EvalReport {
    /// How many direct questions of `kind` were asked.
    pub fn asked(&self, kind: QuestionKind) -> usize {
        self.items
            .iter()
            .filter(|i| !i.pipeline && i.kind == kind)
            .count()
    }

    /// How many pipeline questions were asked.
    pub fn pipeline_asked(&self) -> usize {
        self.items.iter().filter(|i| i.pipeline).count()
    }
}

/// Scores `item.output` against `item.expected` (and `item.target`), setting `correct` and
/// `iou`. `family` is the model's: it says how a box is written.
pub fn score_item(family: Family, item: &mut EvalItem) {
    if item.kind == QuestionKind::Grounding && !item.pipeline {
        let [w, h] = item.image_size;
        let [rw, rh] = item.resized_size;
        let found = parse_boxes(family, &item.output, (w, h), (rw, rh));
        let value = match (found.first(), item.target) {
            (Some(b), Some(t)) => iou([b.bbox.x1, b.bbox.y1, b.bbox.x2, b.bbox.y2], t),
            _ => 0.0,
        };
        item.iou = Some(value);
        item.correct = value >= IOU_THRESHOLD;
    } else {
        item.iou = None;
        item.correct = answer_matches(item.kind, &item.output, &item.expected);
    }
}

/// The report of scored `items` over `n` scenes (items are kept in it).
pub fn summarise(n: usize, items: Vec<EvalItem>) -> EvalReport {
    let share = |hits: usize, total: usize| (total > 0).then(|| hits as f64 / total as f64);
    let accuracy_of = |kind: QuestionKind| {
        let asked: Vec<&EvalItem> = items
            .iter()
            .filter(|i| !i.pipeline && i.kind == kind)
            .collect();
        share(asked.iter().filter(|i| i.correct).count(), asked.len())
    };
    let grounding: Vec<&EvalItem> = items
        .iter()
        .filter(|i| !i.pipeline && i.kind == QuestionKind::Grounding)
        .collect();
    let mean_iou = (!grounding.is_empty()).then(|| {
        grounding
            .iter()
            .map(|i| f64::from(i.iou.unwrap_or(0.0)))
            .sum::<f64>()
            / grounding.len() as f64
    });
    let pipeline: Vec<&EvalItem> = items.iter().filter(|i| i.pipeline).collect();
    EvalReport {
        n,
        accuracy: Accuracy {
            colour: accuracy_of(QuestionKind::Colour),
            shape: accuracy_of(QuestionKind::Shape),
            count: accuracy_of(QuestionKind::Count),
            position: accuracy_of(QuestionKind::Position),
            yesno: accuracy_of(QuestionKind::YesNo),
        },
        grounding: GroundingScore {
            mean_iou,
            iou_ge_0_5: share(
                grounding.iter().filter(|i| i.correct).count(),
                grounding.len(),
            ),
        },
        pipeline: PipelineScore {
            answer_accuracy: share(
                pipeline.iter().filter(|i| i.correct).count(),
                pipeline.len(),
            ),
        },
        items,
    }
}

/// Re-scores an items file's outputs (from this runtime or from elsewhere) with [`score_item`].
pub fn rescore(file: &ItemsFile) -> Result<EvalReport, Error> {
    let family = file.family()?;
    let mut items = file.items.clone();
    for item in &mut items {
        score_item(family, item);
    }
    Ok(summarise(file.n, items))
}

/// Evaluates `rt` on scenes `0..n` of `seed`; `progress` hears of each finished scene. The
/// report keeps every item.
pub fn run(
    rt: &Runtime,
    n: usize,
    seed: u64,
    opts: &EvalOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<EvalReport, Error> {
    let family = rt.family();
    let mut session = Session::new(
        rt,
        SessionOptions {
            prefix_reuse: opts.caches,
            vision_cache_bytes: if opts.caches { 64 << 20 } else { 0 },
            ..Default::default()
        },
    )?;
    let mut pipeline_opts = opts.pipeline.clone();
    pipeline_opts.sampling = Sampling::default();
    pipeline_opts.plan = None;
    let mut pipeline = Pipeline::new(rt, pipeline_opts)?;
    let generate = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        sampling: Sampling::default(),
        ..Default::default()
    };
    let eos = rt.tokenizer.eos_ids().to_vec();
    let pre = &rt.preprocess;
    let mut items = Vec::new();
    for index in 0..n as u64 {
        let s = scene(seed, index);
        let image = s.render();
        let (rh, rw) = smart_resize(
            s.height as usize,
            s.width as usize,
            pre.factor(),
            pre.min_pixels,
            pre.max_pixels,
        )?;
        let item = |kind, pipeline, prompt: String, expected: String| EvalItem {
            scene: index,
            kind,
            pipeline,
            prompt,
            expected,
            output: String::new(),
            token_ids: Vec::new(),
            target: None,
            image_size: [s.width, s.height],
            resized_size: [rw as u32, rh as u32],
            correct: false,
            iou: None,
            image: None,
        };
        for q in eval_questions(&s, seed, index) {
            let messages = [ChatMessage {
                role: "user".into(),
                content: vec![Content::Image, Content::Text(q.prompt.clone())],
            }];
            let (out, _) = session.generate(
                &messages,
                std::slice::from_ref(&image),
                pre,
                &generate,
                &mut |_| {},
            )?;
            let mut it = item(q.kind, false, q.prompt, q.answer);
            it.output = answer_text(rt, &out.token_ids, out.finish_reason, &eos)?;
            it.token_ids = out.token_ids;
            it.target = q.target;
            score_item(family, &mut it);
            items.push(it);
        }
        let pq = pipeline_question(&s, seed, index);
        let report = pipeline.run(&image, &pq.question, &mut |_, _| {})?;
        let mut it = item(pq.kind, true, pq.question, pq.answer);
        it.output = report.answer;
        score_item(family, &mut it);
        items.push(it);
        progress(Progress {
            stage: "eval",
            done: index as usize + 1,
            total: n,
            item: format!("scene {index}"),
        });
    }
    Ok(summarise(n, items))
}

/// The generated text with special tokens kept (a Qwen2-VL box is written with them) and the
/// stop token that ended the run dropped.
fn answer_text(
    rt: &Runtime,
    ids: &[u32],
    finish: FinishReason,
    eos: &[u32],
) -> Result<String, Error> {
    let ids = match ids.split_last() {
        Some((last, rest)) if finish == FinishReason::Stop && eos.contains(last) => rest,
        _ => ids,
    };
    Ok(rt.tokenizer.decode(ids, false)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(kind: QuestionKind, output: &str, expected: &str) -> EvalItem {
        EvalItem {
            scene: 0,
            kind,
            pipeline: false,
            prompt: String::new(),
            expected: expected.into(),
            output: output.into(),
            token_ids: Vec::new(),
            target: None,
            image_size: [200, 100],
            resized_size: [196, 112],
            correct: false,
            iou: None,
            image: None,
        }
    }

    #[test]
    fn grounding_is_scored_by_the_first_box_on_the_thousand_grid() {
        // Target [20, 10, 100, 60] on a 200x100 image is (100,100),(500,600) on the grid.
        let mut it = item(
            QuestionKind::Grounding,
            "<|object_ref_start|>the red star<|object_ref_end|><|box_start|>(100,100),(500,600)<|box_end|><|box_start|>(0,0),(10,10)<|box_end|>",
            "",
        );
        it.target = Some([20.0, 10.0, 100.0, 60.0]);
        score_item(Family::Qwen2Vl, &mut it);
        let v = it.iou.unwrap();
        assert!((v - 1.0).abs() < 1e-4, "iou {v}, expected 1");
        assert!(it.correct);

        // [0, 10, 50, 60]: overlap 30x50 = 1500 of union 2500 + 4000 - 1500 = 5000.
        it.output = "(0,100),(250,600)".into();
        score_item(Family::Qwen2Vl, &mut it);
        let v = it.iou.unwrap();
        assert!((v - 0.3).abs() < 1e-4, "iou {v}, expected 0.3");
        assert!(!it.correct);

        it.output = "I cannot see it.".into();
        score_item(Family::Qwen2Vl, &mut it);
        assert_eq!(it.iou, Some(0.0), "no box must count as IoU 0");
    }

    #[test]
    fn summary_averages_per_kind_and_leaves_unasked_kinds_null() {
        let mut items = vec![
            item(QuestionKind::Colour, "Red.", "red"),
            item(QuestionKind::Colour, "blue", "red"),
            item(QuestionKind::Count, "three", "3"),
            item(QuestionKind::Grounding, "(100,100),(500,600)", ""),
            item(QuestionKind::Grounding, "nothing", ""),
            item(QuestionKind::Shape, "the star", "star"),
        ];
        items[3].target = Some([20.0, 10.0, 100.0, 60.0]);
        items[4].target = Some([20.0, 10.0, 100.0, 60.0]);
        items[5].pipeline = true;
        for it in &mut items {
            score_item(Family::Qwen2Vl, it);
        }
        let r = summarise(2, items);
        assert_eq!(r.accuracy.colour, Some(0.5));
        assert_eq!(r.accuracy.count, Some(1.0));
        assert_eq!(
            r.accuracy.shape, None,
            "the only shape item is a pipeline item"
        );
        assert_eq!(r.accuracy.position, None);
        assert_eq!(r.pipeline.answer_accuracy, Some(1.0));
        assert_eq!(r.grounding.iou_ge_0_5, Some(0.5));
        let m = r.grounding.mean_iou.unwrap();
        assert!((m - 0.5).abs() < 1e-4, "mean IoU {m}, expected 0.5");
        assert_eq!(r.asked(QuestionKind::Colour), 2);
        assert_eq!(r.pipeline_asked(), 1);
    }

    #[test]
    fn items_file_round_trips_and_rescoring_recomputes() {
        let mut a = item(QuestionKind::YesNo, "yes", "yes");
        a.correct = false; // stale: rescoring must not trust it
        let file = ItemsFile {
            model: "m".into(),
            family: "qwen2_vl".into(),
            seed: 1,
            n: 1,
            max_new_tokens: 48,
            items: vec![a],
        };
        let text = serde_json::to_string(&file).unwrap();
        assert!(text.contains("\"kind\":\"yesno\""), "{text}");
        let back: ItemsFile = serde_json::from_str(&text).unwrap();
        assert_eq!(back.items, file.items);
        assert_eq!(rescore(&back).unwrap().accuracy.yesno, Some(1.0));

        let bad = text.replace("\"yesno\"", "\"colour_name\"");
        let err = serde_json::from_str::<ItemsFile>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown question kind"), "{err}");
        let mut odd = back;
        odd.family = "llava".into();
        assert!(rescore(&odd).is_err());
    }

    #[test]
    fn report_json_has_exactly_the_contract_keys() {
        let r = summarise(0, Vec::new());
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4, "{v}");
        for k in ["n", "accuracy", "grounding", "pipeline"] {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
        let acc: Vec<&String> = v["accuracy"].as_object().unwrap().keys().collect();
        assert_eq!(acc.len(), 5, "{v}");
        assert!(v["grounding"].get("iou_ge_0_5").is_some());
        assert!(v["pipeline"].get("answer_accuracy").is_some());
    }
}
