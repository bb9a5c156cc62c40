//! Sessions, caches and the pipeline: the vision cache's accounting under a byte budget, prefix
//! KV reuse (after truncation, across turns, never across different images) with greedy outputs
//! bit-identical to an uncached run, the pipeline report on every family's fixture, and the chat
//! image switch.

mod common;

use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use qwen_vl::cache::vision::{CachedImage, VisionCache};
use qwen_vl::generate::GenerateOptions;
use qwen_vl::pipeline::{FixedPlan, Pipeline, PipelineOptions};
use qwen_vl::session::{Session, SessionOptions};
use qwen_vl::tokenizer::{ChatMessage, Content};
use qwen_vl::{Backend, Runtime};

fn rt(name: &str, backend: Backend) -> Option<Arc<Runtime>> {
    if backend == Backend::Wgpu && !common::wgpu_or_skip(name) {
        return None;
    }
    Some(common::runtime(&common::fixtures().join(name), backend))
}

fn image(name: &str, file: &str) -> image::RgbImage {
    qwen_vl::image::load_image(&common::fixtures().join(name).join(file)).expect("fixture image")
}

fn user(image: bool, text: &str) -> ChatMessage {
    let mut content = Vec::new();
    if image {
        content.push(Content::Image);
    }
    content.push(Content::Text(text.into()));
    ChatMessage {
        role: "user".into(),
        content,
    }
}

fn assistant(text: &str) -> ChatMessage {
    ChatMessage {
        role: "assistant".into(),
        content: vec![Content::Text(text.into())],
    }
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        ignore_eos: true,
        ..Default::default()
    }
}

fn cached() -> SessionOptions {
    SessionOptions {
        max_context: Some(2048),
        ..Default::default()
    }
}

fn uncached() -> SessionOptions {
    SessionOptions {
        max_context: Some(2048),
        prefix_reuse: false,
        vision_cache_bytes: 0,
        ..Default::default()
    }
}

#[test]
fn vision_cache_counts_hits_misses_and_evicts_under_budget() {
    let d = Device::flex();
    let entry = |rows: usize| CachedImage {
        grid: [1, 2, 2],
        embeds: Tensor::zeros([rows, 8], &d),
        deepstack: vec![],
    };
    // Entries of 4*8*4 = 128 bytes; the budget holds two.
    let mut c = VisionCache::new(256);
    let (a, b, k3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    assert!(c.get(&a).is_none());
    c.insert(a, entry(4));
    c.insert(b, entry(4));
    assert!(c.get(&a).is_some(), "a is cached");
    c.insert(k3, entry(4)); // evicts b, the least recently used
    assert!(c.get(&b).is_none(), "b was evicted");
    assert!(c.get(&a).is_some() && c.get(&k3).is_some());
    c.insert([4u8; 32], entry(100)); // 3200 bytes > budget: not stored
    let s = c.stats();
    assert_eq!(
        (
            s.hits,
            s.misses,
            s.evictions,
            s.rejected,
            s.entries,
            s.bytes
        ),
        (3, 2, 1, 1, 2, 256),
        "{s:?}"
    );
}

fn prefix_reuse_is_bit_identical(backend: Backend) {
    let Some(rt) = rt("qwen2_vl_hub", backend) else {
        return;
    };
    let img = image("qwen2_vl_hub", "image0.png");
    let turn1 = vec![user(true, "Describe this image.")];
    let mut s = Session::new(&rt, cached()).expect("session");
    let (first, st1) = s
        .generate(
            &turn1,
            std::slice::from_ref(&img),
            &rt.preprocess,
            &greedy(8),
            &mut |_| {},
        )
        .expect("turn 1");
    assert_eq!(st1.reused_tokens, 0);
    assert_eq!(st1.vision_cache_misses, 1);
    let mut turn2 = turn1.clone();
    turn2.push(assistant(&first.text));
    turn2.push(user(false, "And what colour dominates?"));
    let (second, st2) = s
        .generate(
            &turn2,
            std::slice::from_ref(&img),
            &rt.preprocess,
            &greedy(8),
            &mut |_| {},
        )
        .expect("turn 2");
    assert_eq!(
        st2.vision_cache_hits, 1,
        "the image embedding must come from the cache"
    );
    assert!(
        st2.reused_tokens >= st1.prompt_tokens,
        "turn 2 reuses turn 1's prompt: {st2:?} after {st1:?}"
    );
    let mut fresh = Session::new(&rt, uncached()).expect("session");
    let (want, stf) = fresh
        .generate(
            &turn2,
            std::slice::from_ref(&img),
            &rt.preprocess,
            &greedy(8),
            &mut |_| {},
        )
        .expect("fresh");
    assert_eq!(stf.reused_tokens, 0);
    assert_eq!(
        second.token_ids, want.token_ids,
        "cached and uncached greedy outputs differ on {backend:?}"
    );

    // Truncation: a shorter request sharing only the image prefix reuses exactly that prefix.
    let other = vec![user(true, "Count the shapes.")];
    let (o1, st3) = s
        .generate(
            &other,
            std::slice::from_ref(&img),
            &rt.preprocess,
            &greedy(8),
            &mut |_| {},
        )
        .expect("truncated");
    let (o2, _) = fresh
        .generate(
            &other,
            std::slice::from_ref(&img),
            &rt.preprocess,
            &greedy(8),
            &mut |_| {},
        )
        .expect("fresh");
    assert!(
        st3.reused_tokens > 0 && st3.reused_tokens < st3.prompt_tokens,
        "{st3:?}"
    );
    assert_eq!(
        o1.token_ids, o2.token_ids,
        "output after truncating the cache differs"
    );
}

#[test]
fn prefix_reuse_is_bit_identical_cpu() {
    prefix_reuse_is_bit_identical(Backend::Cpu);
}

#[test]
fn prefix_reuse_is_bit_identical_wgpu() {
    prefix_reuse_is_bit_identical(Backend::Wgpu);
}

#[test]
fn different_images_with_equal_token_counts_never_share_a_prefix() {
    let Some(rt) = rt("qwen2_vl_hub", Backend::Cpu) else {
        return;
    };
    let a = image("qwen2_vl_hub", "image0.png");
    // Same size, different pixels: the same number of pad tokens.
    let mut b = a.clone();
    b.pixels_mut()
        .for_each(|p| p.0 = [255 - p.0[0], p.0[1], 255 - p.0[2]]);
    let msgs = vec![user(true, "Describe this image.")];
    let mut s = Session::new(&rt, cached()).expect("session");
    let (_, sa) = s
        .generate(
            &msgs,
            std::slice::from_ref(&a),
            &rt.preprocess,
            &greedy(4),
            &mut |_| {},
        )
        .expect("a");
    let (out_b, sb) = s
        .generate(
            &msgs,
            std::slice::from_ref(&b),
            &rt.preprocess,
            &greedy(4),
            &mut |_| {},
        )
        .expect("b");
    let first_pad = rt
        .tokenizer
        .encode_chat(&msgs, &[1])
        .expect("ids")
        .iter()
        .position(|&t| t == rt.model.config.image_token_id)
        .expect("a pad");
    assert_eq!(sa.prompt_tokens, sb.prompt_tokens, "same pad count");
    assert_eq!(
        sb.reused_tokens, first_pad,
        "reuse must stop at the first pad of the other image"
    );
    let mut fresh = Session::new(&rt, uncached()).expect("session");
    let (want, _) = fresh
        .generate(
            &msgs,
            std::slice::from_ref(&b),
            &rt.preprocess,
            &greedy(4),
            &mut |_| {},
        )
        .expect("fresh b");
    assert_eq!(out_b.token_ids, want.token_ids);
}

#[test]
fn chat_image_switch_does_not_leak_the_old_image() {
    let Some(rt) = rt("qwen2_vl_hub", Backend::Cpu) else {
        return;
    };
    let a = image("qwen2_vl_hub", "image0.png");
    let b = image("qwen2_vl_hub", "image2.png");
    let mut s = Session::new(&rt, cached()).expect("session");
    let convo_a = vec![user(true, "What is this?")];
    let (ra, _) = s
        .generate(
            &convo_a,
            std::slice::from_ref(&a),
            &rt.preprocess,
            &greedy(6),
            &mut |_| {},
        )
        .expect("a");
    let mut convo_a2 = convo_a.clone();
    convo_a2.push(assistant(&ra.text));
    convo_a2.push(user(false, "Tell me more."));
    s.generate(
        &convo_a2,
        std::slice::from_ref(&a),
        &rt.preprocess,
        &greedy(6),
        &mut |_| {},
    )
    .expect("a2");
    // /image b: a new conversation about b in the same session.
    let convo_b = vec![user(true, "What is this?")];
    let (rb, sb) = s
        .generate(
            &convo_b,
            std::slice::from_ref(&b),
            &rt.preprocess,
            &greedy(6),
            &mut |_| {},
        )
        .expect("b");
    let mut fresh = Session::new(&rt, uncached()).expect("session");
    let (want, _) = fresh
        .generate(
            &convo_b,
            std::slice::from_ref(&b),
            &rt.preprocess,
            &greedy(6),
            &mut |_| {},
        )
        .expect("fresh b");
    assert_eq!(
        rb.token_ids, want.token_ids,
        "the reply about the new image differs from a fresh session's"
    );
    assert_eq!(
        sb.vision_cache_misses, 1,
        "the new image is encoded, not taken from the old one"
    );
}

fn pipeline_report_is_valid(name: &str) {
    let Some(rt) = rt(name, Backend::Cpu) else {
        return;
    };
    let img = image(name, "image0.png");
    let opts = PipelineOptions {
        main_min_tokens: 64,
        crop_max_tokens: 32,
        steps_tokens: 24,
        box_tokens: 12,
        caption_tokens: 8,
        answer_tokens: 12,
        ..Default::default()
    };
    // The random model writes no parsable steps: the pipeline must say so and still answer.
    let report = Pipeline::new(&rt, opts.clone())
        .expect("pipeline")
        .run(&img, "What colour is the circle?", &mut |_, _| {})
        .expect("run");
    let v = serde_json::to_value(&report).expect("json");
    for key in ["question", "steps", "answer", "phases", "cache"] {
        assert!(v.get(key).is_some(), "{name}: report lacks `{key}`: {v}");
    }
    let names: Vec<&str> = report.phases.iter().map(|p| p.name).collect();
    assert_eq!(names, ["reasoning", "grounding", "evidence", "synthesis"]);
    assert!(
        report.phases[3].reused_tokens > 0,
        "{name}: synthesis reuses the image + question prefix"
    );
    // With a fixed plan every phase runs; greedy outputs are identical with caches on and off.
    let run = |caches: bool| {
        let o = PipelineOptions {
            caches,
            plan: Some(FixedPlan { steps: 2 }),
            ..opts.clone()
        };
        Pipeline::new(&rt, o)
            .expect("pipeline")
            .run(&img, "Where is the red shape?", &mut |_, _| {})
            .expect("run")
    };
    let (on, off) = (run(true), run(false));
    assert_eq!(on.steps.len(), 2);
    assert!(
        on.steps
            .iter()
            .all(|s| s.bbox.is_some() && s.evidence.is_some()),
        "{name}: every step grounded and described"
    );
    assert_eq!(
        serde_json::to_string(&on.steps).unwrap(),
        serde_json::to_string(&off.steps).unwrap(),
        "{name}: steps differ with caches off"
    );
    assert_eq!(
        on.answer, off.answer,
        "{name}: answers differ with caches off"
    );
    assert!(
        on.cache.vision.hits >= 4,
        "{name}: phases 2-4 hit the vision cache: {:?}",
        on.cache.vision
    );
    assert_eq!(off.cache.reused_tokens, 0);
    assert!(on.cache.reused_tokens > 0);
}

#[test]
fn pipeline_report_is_valid_qwen2_vl() {
    pipeline_report_is_valid("qwen2_vl_hub");
}

#[test]
fn pipeline_report_is_valid_qwen2_5_vl() {
    pipeline_report_is_valid("qwen2_5_vl");
}

#[test]
fn pipeline_report_is_valid_qwen3_vl() {
    pipeline_report_is_valid("qwen3_vl");
}

#[test]
fn annotate_draws_inside_the_boxes_only() {
    let img = image::RgbImage::from_pixel(100, 80, image::Rgb([0, 0, 0]));
    let out = qwen_vl::pipeline::annotate::annotate(&img, &[(1, [10.0, 20.0, 60.0, 70.0])]);
    assert_ne!(
        out.get_pixel(10, 45),
        &image::Rgb([0, 0, 0]),
        "left edge drawn"
    );
    assert_eq!(
        out.get_pixel(80, 10),
        &image::Rgb([0, 0, 0]),
        "outside untouched"
    );
    assert_eq!(
        out.get_pixel(35, 50),
        &image::Rgb([0, 0, 0]),
        "inside untouched"
    );
}
