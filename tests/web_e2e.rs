//! The browser build end to end: web/index.html in headless Chromium (WebGPU on SwiftShader),
//! served from this repository on 127.0.0.1, loads the tiny fixture by URL, describes image0.png
//! with 16 greedy tokens and must produce the token ids of the native library on the CPU backend.
//! Then the same tab opens the pipeline page (`?mode=pipeline`, model files now from the page's
//! Cache API), which runs the 4-phase pipeline with a forced plan of 2 steps and must produce the
//! native CPU pipeline's report (steps, boxes, evidence, answer, per-phase token counts, cache
//! figures). Last, two turns in that page's chat box must reuse the first turn's KV prefix and
//! produce the native CPU session's tokens. Between the two, the page without ?model must open on
//! the bundled micro model (models/micro-qwen2-vl) with its example scene, and
//! `?mode=pipeline&autorun=1` alone must run that example through the pipeline and produce the
//! native CPU pipeline's report for it. Saves `screenshot.png`, `default.png`,
//! `default-pipeline.png` and `pipeline.png` under `$CARGO_TARGET_DIR/web-e2e/` (default
//! `target/web-e2e/`).
//!
//! Needs node, tests/web/node_modules (`npm ci` there), chromium and web/pkg (`web/build.sh`);
//! `.ci/run` installs all four. Without them the test prints SKIP, or fails under CI=true.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qwen_vl::generate::{GenerateOptions, Request};
use qwen_vl::pipeline::{FixedPlan, Pipeline, PipelineOptions, PipelineReport};
use qwen_vl::session::{RequestStats, Session, SessionOptions};
use qwen_vl::tokenizer::{ChatMessage, Content};
use qwen_vl::{Backend, LoadOptions, Runtime};
use serde_json::Value;

const FIXTURE: &str = "tests/fixtures/qwen2_vl_hub";
/// Where the test writes the fixture quantized to q4 (ignored by git).
const Q4_FOLDER: &str = "target/web-e2e-q4";
const PROMPT: &str = "Describe this image.";
const TOKENS: usize = 16;
const REPORT_PATH: &str = "/__e2e_report";
const PIPELINE_REPORT_PATH: &str = "/__e2e_report_pipeline";

/// What the page opens with when no ?model is given (web/app.js).
const MICRO: &str = "models/micro-qwen2-vl";
const EXAMPLE_IMAGE: &str = "web/example-scene.png";
const EXAMPLE_QUESTION: &str =
    "Is the blue diamond to the left or to the right of the purple diamond?";
const DEFAULT_REPORT_PATH: &str = "/__e2e_report_default";
/// The default page's pipeline run: the page's own options (4 steps, 4 regions, 256 image
/// tokens at least, 128 per crop at most) with the budgets `qwen-vl eval` uses.
const DEFAULT_PARAMS: [(&str, usize); 5] = [
    ("steps_tokens", 96),
    ("box_tokens", 48),
    ("caption_tokens", 24),
    ("answer_tokens", 24),
    ("max_context", 1024),
];

const QUESTION: &str = "Where is the red shape?";
/// The pipeline run: a forced plan of 2 steps and small budgets (SwiftShader runs on the CPU),
/// as (page parameter, value); [`native_pipeline`] builds the same options.
const PLAN_STEPS: usize = 2;
const PIPELINE_PARAMS: [(&str, usize); 8] = [
    ("plan_steps", PLAN_STEPS),
    ("main_tokens", 64),
    ("crop_tokens", 32),
    ("steps_tokens", 4),
    ("box_tokens", 2),
    ("caption_tokens", 4),
    ("answer_tokens", 4),
    ("max_context", 1024),
];
const PHASES: [&str; 4] = ["reasoning", "grounding", "evidence", "synthesis"];
/// Chat turns typed into the pipeline page's chat box (about image0.png), greedy replies of at
/// most `CHAT_TOKENS` tokens.
const CHAT: [&str; 2] = ["What is in the image?", "What colour is the circle?"];
const CHAT_TOKENS: usize = 4;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// What is missing to run the browser test, if anything.
fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        missing.push("node is not installed (apt-get install nodejs, node >= 20)".to_string());
    }
    if !root()
        .join("tests/web/node_modules/playwright-core")
        .is_dir()
    {
        missing.push("tests/web/node_modules is missing (run `npm ci` in tests/web)".to_string());
    }
    if !chromium().is_file() {
        missing.push(format!(
            "{} is missing (apt-get install chromium, or set CHROMIUM)",
            chromium().display()
        ));
    }
    for f in ["web/pkg/qwen_vl.js", "web/pkg/qwen_vl_bg.wasm"] {
        if !root().join(f).is_file() {
            missing.push(format!("{f} is missing (run web/build.sh)"));
        }
    }
    missing
}

/// The same greedy run on the CPU backend through the library.
fn native_tokens(prompt: &str) -> Vec<u32> {
    native_tokens_of(FIXTURE, prompt)
}

/// Greedy tokens of the checkpoint at `model` (relative to the repository) on the CPU backend.
fn native_tokens_of(model: &str, prompt: &str) -> Vec<u32> {
    let (rt, image) = cpu_load(model, &format!("{FIXTURE}/image0.png"));
    let request = Request::user(prompt).with_image(image);
    let gen = GenerateOptions {
        max_new_tokens: TOKENS,
        ignore_eos: true,
        ..Default::default()
    };
    rt.generate(&request, &gen, &mut |_| {})
        .unwrap_or_else(|e| panic!("native generate: {e}"))
        .token_ids
}

/// The value of page parameter `name` in `table`.
fn lookup(table: &[(&str, usize)], name: &str) -> usize {
    table
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no page parameter {name}"))
}

fn param(name: &str) -> usize {
    lookup(&PIPELINE_PARAMS, name)
}

/// A checkpoint folder of this repository and an image, on the CPU backend.
fn cpu_load(model: &str, image: &str) -> (Runtime, image::RgbImage) {
    let dir = root().join(model);
    let options = LoadOptions {
        backend: Backend::Cpu,
        ..Default::default()
    };
    let rt = Runtime::load(&dir, &options, &mut |_| {})
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let image =
        qwen_vl::image::load_image(&root().join(image)).unwrap_or_else(|e| panic!("{image}: {e}"));
    (rt, image)
}

fn cpu_runtime() -> (Runtime, image::RgbImage) {
    cpu_load(FIXTURE, &format!("{FIXTURE}/image0.png"))
}

/// The page's chat turns on the CPU backend: a session as `WebModel::chat` builds it.
fn native_chat() -> Vec<(Vec<u32>, RequestStats)> {
    let (rt, image) = cpu_runtime();
    let mut session = Session::new(
        &rt,
        SessionOptions {
            kv_budget_bytes: 256 << 20,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("native session: {e}"));
    let options = GenerateOptions {
        max_new_tokens: CHAT_TOKENS,
        ..Default::default()
    };
    let images = [image];
    let mut history: Vec<ChatMessage> = Vec::new();
    let mut turns = Vec::new();
    for message in CHAT {
        let mut content = Vec::new();
        if history.is_empty() {
            content.push(Content::Image);
        }
        content.push(Content::Text(message.into()));
        history.push(ChatMessage {
            role: "user".into(),
            content,
        });
        let (out, stats) = session
            .generate(&history, &images, &rt.preprocess, &options, &mut |_| {})
            .unwrap_or_else(|e| panic!("native chat turn {message:?}: {e}"));
        history.push(ChatMessage {
            role: "assistant".into(),
            content: vec![Content::Text(out.text)],
        });
        turns.push((out.token_ids, stats));
    }
    turns
}

/// The pipeline page's run on the CPU backend: the page's defaults (src/web.rs) overridden by
/// [`PIPELINE_PARAMS`].
fn native_pipeline() -> PipelineReport {
    let (rt, image) = cpu_runtime();
    let options = PipelineOptions {
        max_steps: 4,
        max_regions: 4,
        main_min_tokens: param("main_tokens"),
        crop_max_tokens: param("crop_tokens"),
        steps_tokens: param("steps_tokens"),
        box_tokens: param("box_tokens"),
        caption_tokens: param("caption_tokens"),
        answer_tokens: param("answer_tokens"),
        caches: true,
        vision_cache_bytes: 128 << 20,
        max_context: Some(param("max_context")),
        kv_budget_bytes: 256 << 20,
        plan: Some(FixedPlan {
            steps: param("plan_steps"),
        }),
        ..Default::default()
    };
    Pipeline::new(&rt, options)
        .unwrap_or_else(|e| panic!("native pipeline: {e}"))
        .run(&image, QUESTION, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("native pipeline run: {e}"))
}

fn default_param(name: &str) -> usize {
    lookup(&DEFAULT_PARAMS, name)
}

/// The default page's pipeline run on the CPU backend: the micro model on the example scene.
fn native_default_pipeline() -> PipelineReport {
    let (rt, image) = cpu_load(MICRO, EXAMPLE_IMAGE);
    let options = PipelineOptions {
        max_steps: 4,
        max_regions: 4,
        main_min_tokens: 256,
        crop_max_tokens: 128,
        steps_tokens: default_param("steps_tokens"),
        box_tokens: default_param("box_tokens"),
        caption_tokens: default_param("caption_tokens"),
        answer_tokens: default_param("answer_tokens"),
        caches: true,
        vision_cache_bytes: 128 << 20,
        max_context: Some(default_param("max_context")),
        kv_budget_bytes: 256 << 20,
        plan: None,
        ..Default::default()
    };
    Pipeline::new(&rt, options)
        .unwrap_or_else(|e| panic!("native pipeline: {e}"))
        .run(&image, EXAMPLE_QUESTION, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("native pipeline run: {e}"))
}

fn query(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[test]
fn browser_generate_and_pipeline_match_native_cpu() {
    let missing = missing_prerequisites();
    if !missing.is_empty() {
        let why = missing.join("; ");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("web e2e: CI=true but the browser test cannot run: {why}");
        }
        eprintln!("SKIP browser_generate_and_pipeline_match_native_cpu because {why}");
        return;
    }

    // The reference, and a cross-check of the reference against the HF golden (whose prompt
    // differs: "Describe this image in one sentence.").
    let expected = native_tokens(PROMPT);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(FIXTURE).join("golden_img.json"))
            .expect("golden_img.json"),
    )
    .expect("golden_img.json is JSON");
    let golden_prompt = golden["prompt"].as_str().expect("golden prompt");
    let golden_ids: Vec<u32> = serde_json::from_value(golden["greedy_token_ids"].clone())
        .expect("golden greedy_token_ids");
    assert_eq!(
        native_tokens(golden_prompt),
        golden_ids,
        "the native CPU reference itself disagrees with the HF golden_img tokens"
    );

    let native_report = native_pipeline();
    let native_default = native_default_pipeline();
    let native_turns = native_chat();

    // A q4 folder written by `qwen-vl quantize`, which the page loads as stored (served from the
    // repository's ignored target/ folder).
    let q4 = root().join(Q4_FOLDER);
    let _ = std::fs::remove_dir_all(&q4);
    qwen_vl::quantize::quantize_dir(
        &root().join(FIXTURE),
        &q4,
        qwen_vl::quant::Scheme::Q4,
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("quantizing the fixture into {}: {e}", q4.display()));
    let expected_q4 = native_tokens_of(Q4_FOLDER, PROMPT);

    let server = Server::start(root().to_path_buf());
    let base = format!("http://127.0.0.1:{}", server.port);
    let url = format!(
        "{base}/web/?{}",
        query(&[
            ("model", format!("/{FIXTURE}/")),
            ("image", format!("/{FIXTURE}/image0.png")),
            ("prompt", PROMPT.to_string()),
            ("max_new_tokens", TOKENS.to_string()),
            ("autorun", "1".to_string()),
            ("report", REPORT_PATH.to_string()),
        ])
    );
    let mut pipeline_query = vec![
        ("mode", "pipeline".to_string()),
        ("model", format!("/{FIXTURE}/")),
        ("image", format!("/{FIXTURE}/image0.png")),
        ("question", QUESTION.to_string()),
        ("autorun", "1".to_string()),
        ("report", PIPELINE_REPORT_PATH.to_string()),
    ];
    pipeline_query.extend(PIPELINE_PARAMS.iter().map(|(k, v)| (*k, v.to_string())));
    let pipeline_url = format!("{base}/web/?{}", query(&pipeline_query));
    let q4_url = format!(
        "{base}/web/?{}",
        query(&[
            ("model", format!("/{Q4_FOLDER}/")),
            ("image", format!("/{FIXTURE}/image0.png")),
            ("prompt", PROMPT.to_string()),
            ("max_new_tokens", TOKENS.to_string()),
            ("autorun", "1".to_string()),
        ])
    );
    let default_url = format!("{base}/web/");
    let mut default_query = vec![
        ("mode", "pipeline".to_string()),
        ("autorun", "1".to_string()),
        ("report", DEFAULT_REPORT_PATH.to_string()),
    ];
    default_query.extend(DEFAULT_PARAMS.iter().map(|(k, v)| (*k, v.to_string())));
    let default_pipeline_url = format!("{base}/web/?{}", query(&default_query));

    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("web-e2e");
    std::fs::create_dir_all(&out_dir).expect("creating the screenshot folder");
    let screenshot = out_dir.join("screenshot.png");
    let pipeline_shot = out_dir.join("pipeline.png");
    let default_shot = out_dir.join("default.png");
    let default_pipeline_shot = out_dir.join("default-pipeline.png");
    let q4_shot = out_dir.join("q4.png");
    for f in [
        &q4_shot,
        &screenshot,
        &pipeline_shot,
        &default_shot,
        &default_pipeline_shot,
    ] {
        let _ = std::fs::remove_file(f);
    }

    eprintln!(
        "web e2e: opening {url}\nthen {default_url}\nthen {default_pipeline_url}\nthen {q4_url}\nthen {pipeline_url}"
    );
    // The fixture's pipeline page comes last: the chat turns run on the last page.
    let output = Command::new("node")
        .arg(root().join("tests/web/e2e.mjs"))
        .arg(&url)
        .arg(&screenshot)
        .arg(&default_url)
        .arg(&default_shot)
        .arg(&default_pipeline_url)
        .arg(&default_pipeline_shot)
        .arg(&q4_url)
        .arg(&q4_shot)
        .arg(&pipeline_url)
        .arg(&pipeline_shot)
        .env("CHROMIUM", chromium())
        .env("E2E_CHAT", CHAT.join("|"))
        .env("E2E_CHAT_TOKENS", CHAT_TOKENS.to_string())
        .output()
        .expect("running node tests/web/e2e.mjs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tests/web/e2e.mjs failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
    let runs: Vec<Value> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "e2e.mjs printed a line that is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"
                )
            })
        })
        .collect();
    assert_eq!(
        runs.len(),
        5,
        "e2e.mjs should print one JSON line per page (generate, default, default pipeline, q4 generate, pipeline):\n{stdout}\nstderr:\n{stderr}"
    );
    let run = &runs[0];
    eprintln!("web e2e: screenshot saved to {}", screenshot.display());
    let result = &run["result"];
    if let Some(err) = result.get("error") {
        panic!("the page reported an error: {err}\npage log:\n{stderr}");
    }
    let browser_ids: Vec<u32> = serde_json::from_value(result["token_ids"].clone())
        .unwrap_or_else(|e| panic!("no token_ids in the page's result ({e}): {result}"));
    let first_diff = browser_ids.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        browser_ids, expected,
        "browser tokens differ from the native CPU tokens (first difference at step {first_diff:?})"
    );

    // The page also POSTed the same JSON to the report URL.
    let posted: serde_json::Value = serde_json::from_str(
        &server
            .last_report(REPORT_PATH)
            .unwrap_or_else(|| panic!("the page did not POST its result to {REPORT_PATH}")),
    )
    .expect("the posted report is JSON");
    assert_eq!(&posted, result, "the POSTed report differs from #result");
    for key in [
        "family",
        "prompt_tokens",
        "token_ids",
        "text",
        "finish_reason",
        "timings_ms",
        "adapter",
    ] {
        assert!(
            result.get(key).is_some(),
            "the result lacks `{key}`: {result}"
        );
    }
    assert_eq!(result["finish_reason"], "length");

    let t = &result["timings_ms"];
    let decode_ms = t["decode"].as_f64().unwrap_or(0.0);
    let tps = if decode_ms > 0.0 {
        (TOKENS - 1) as f64 / (decode_ms / 1000.0)
    } else {
        0.0
    };
    eprintln!(
        "web e2e: {} in {} ({}); adapter {}; load {:.0} ms, vision {:.0} ms, prefill {:.0} ms, decode {:.0} ms ({tps:.1} tok/s); page wall {} ms; {} tokens match the CPU backend",
        run["browser"],
        run["stats"]["engine"],
        result["family"],
        result["adapter"]["name"],
        t["load"].as_f64().unwrap_or(0.0),
        t["vision"].as_f64().unwrap_or(0.0),
        t["prefill"].as_f64().unwrap_or(0.0),
        decode_ms,
        run["wall_ms"],
        browser_ids.len()
    );

    check_default_page(&runs[1], &runs[2], &native_default, &server, &stderr);
    let q4_result = &runs[3]["result"];
    if let Some(err) = q4_result.get("error") {
        panic!("the page reported an error on the q4 folder: {err}\npage log:\n{stderr}");
    }
    let q4_ids: Vec<u32> = serde_json::from_value(q4_result["token_ids"].clone())
        .unwrap_or_else(|e| panic!("no token_ids in the q4 page's result ({e}): {q4_result}"));
    assert_eq!(
        q4_ids, expected_q4,
        "browser tokens on the q4 folder differ from native --quant q4 on the CPU backend"
    );
    eprintln!(
        "web e2e: the q4 folder's {} tokens match the CPU backend",
        q4_ids.len()
    );
    check_pipeline(&runs[4], &native_report, &server, &stderr);
    check_chat(&runs[4], &native_turns);
    eprintln!(
        "web e2e: pipeline screenshot saved to {}",
        pipeline_shot.display()
    );
}

/// The chat turns: the second reuses the whole first prompt from the KV cache and the image
/// from the vision cache, and both produce the native CPU session's tokens and counts.
fn check_chat(run: &Value, native: &[(Vec<u32>, RequestStats)]) {
    let turns = run["stats"]["chatTurns"]
        .as_array()
        .unwrap_or_else(|| panic!("no chat turns in the page's stats: {}", run["stats"]));
    assert_eq!(turns.len(), CHAT.len(), "chat turns: {turns:?}");
    let num = |t: &Value, k: &str| {
        t[k].as_u64()
            .unwrap_or_else(|| panic!("the chat turn lacks `{k}`: {t}"))
    };
    assert!(
        num(&turns[1], "reused_tokens") >= num(&turns[0], "prompt_tokens")
            && num(&turns[1], "vision_cache_hits") == 1,
        "the second chat turn should reuse the first turn's prompt ({} tokens) and image: {}",
        num(&turns[0], "prompt_tokens"),
        turns[1]
    );
    for (i, (t, (ids, stats))) in turns.iter().zip(native).enumerate() {
        let browser_ids: Vec<u32> = serde_json::from_value(t["token_ids"].clone())
            .unwrap_or_else(|e| panic!("chat turn {} has no token_ids ({e}): {t}", i + 1));
        assert_eq!(
            &browser_ids,
            ids,
            "chat turn {} tokens: browser vs native CPU",
            i + 1
        );
        let keys = [
            "prompt_tokens",
            "reused_tokens",
            "computed_tokens",
            "generated_tokens",
            "vision_cache_hits",
        ];
        let browser: Vec<u64> = keys.iter().map(|k| num(t, k)).collect();
        let cpu: Vec<u64> = [
            stats.prompt_tokens,
            stats.reused_tokens,
            stats.computed_tokens,
            stats.generated_tokens,
            stats.vision_cache_hits,
        ]
        .iter()
        .map(|&v| v as u64)
        .collect();
        assert_eq!(
            browser,
            cpu,
            "chat turn {} {keys:?}: browser vs native CPU",
            i + 1
        );
    }
    eprintln!(
        "web e2e: chat: turn 2 reused {} of {} prompt tokens (computed {}), prefill {:.0} ms vs {:.0} ms for turn 1; tokens match the CPU backend",
        num(&turns[1], "reused_tokens"),
        num(&turns[1], "prompt_tokens"),
        num(&turns[1], "computed_tokens"),
        turns[1]["timings_ms"]["prefill"].as_f64().unwrap_or(0.0),
        turns[0]["timings_ms"]["prefill"].as_f64().unwrap_or(0.0)
    );
}

/// The pipeline page's report: 4 phases, 2 grounded and described steps, prefix KV reuse and
/// vision cache hits, and everything the native CPU run of the same plan says.
fn check_pipeline(run: &Value, native: &PipelineReport, server: &Server, log: &str) {
    let report = &run["result"];
    if let Some(err) = report.get("error") {
        panic!("the pipeline page reported an error: {err}\npage log:\n{log}");
    }
    let posted: Value = serde_json::from_str(
        &server.last_report(PIPELINE_REPORT_PATH).unwrap_or_else(|| {
            panic!("the pipeline page did not POST its report to {PIPELINE_REPORT_PATH}")
        }),
    )
    .expect("the posted pipeline report is JSON");
    assert_eq!(
        &posted, report,
        "the POSTed pipeline report differs from #result"
    );

    // The second page found the model files in the Cache API the first one filled.
    let stats = &run["stats"];
    assert!(
        stats["cachedBytes"].as_u64().unwrap_or(0) > 0 && stats["downloadedBytes"] == 0,
        "the pipeline page should load the checkpoint from the browser cache, not download it: cached {} bytes, downloaded {}",
        stats["cachedBytes"],
        stats["downloadedBytes"]
    );
    // Every phase streamed its text to the page as it ran, in order.
    assert_eq!(
        stats["pipeline"]["streamedPhases"],
        serde_json::json!(PHASES),
        "phases whose text reached the page, in order"
    );

    let phases = report["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases in the report: {report}"));
    let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, PHASES, "the report's phases");
    let num = |p: &Value, k: &str| {
        p[k].as_u64()
            .unwrap_or_else(|| panic!("phase {} lacks `{k}`: {p}", p["name"]))
    };
    // A forced plan ignores EOS: each phase generates exactly its budget.
    let budgets = [
        param("steps_tokens"),
        PLAN_STEPS * param("box_tokens"),
        PLAN_STEPS * param("caption_tokens"),
        param("answer_tokens"),
    ];
    for (p, budget) in phases.iter().zip(budgets) {
        assert_eq!(
            num(p, "generated_tokens"),
            budget as u64,
            "tokens generated in phase {}",
            p["name"]
        );
    }
    assert!(
        num(&phases[3], "reused_tokens") > 0,
        "synthesis should reuse the image + question prefix from the KV cache: {}",
        phases[3]
    );
    for p in &phases[1..] {
        assert!(
            num(p, "vision_cache_hits") > 0,
            "phase {} should take its image embeddings from the vision cache: {p}",
            p["name"]
        );
    }
    let vision = &report["cache"]["vision"];
    assert!(
        vision["hits"].as_u64().unwrap_or(0) >= 4
            && report["cache"]["reused_tokens"].as_u64().unwrap_or(0) > 0,
        "cache figures: {}",
        report["cache"]
    );

    let [w, h] = [0, 1].map(|i| report["image_size"][i].as_f64().unwrap_or(0.0));
    let steps = report["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in the report: {report}"));
    assert_eq!(steps.len(), PLAN_STEPS, "steps in the report: {report}");
    for s in steps {
        let b: Vec<f64> = s["bbox"]
            .as_array()
            .unwrap_or_else(|| panic!("step {} has no box: {s}", s["index"]))
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert!(
            b.len() == 4
                && 0.0 <= b[0]
                && b[0] < b[2]
                && b[2] <= w
                && 0.0 <= b[1]
                && b[1] < b[3]
                && b[3] <= h,
            "step {} box {b:?} is not inside the {w}x{h} image",
            s["index"]
        );
        assert!(
            s["evidence"].as_str().is_some_and(|e| !e.is_empty()),
            "step {} has no evidence: {s}",
            s["index"]
        );
    }

    // Greedy decoding on the same plan: the browser's report equals the CPU backend's.
    assert_matches_native(report, native);

    let ms: Vec<String> = phases
        .iter()
        .map(|p| {
            format!(
                "{} {:.0} ms",
                p["name"].as_str().unwrap_or("?"),
                p["ms"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    eprintln!(
        "web e2e: pipeline ({PLAN_STEPS}-step plan) total {:.0} ms: {}; {} prompt tokens reused, {} computed; vision cache {} hits, {} misses; steps, boxes, evidence, answer and token counts match the CPU backend",
        report["total_ms"].as_f64().unwrap_or(0.0),
        ms.join(", "),
        report["cache"]["reused_tokens"],
        report["cache"]["computed_tokens"],
        vision["hits"],
        vision["misses"]
    );
}

/// The browser's pipeline report equals the native CPU run's: steps (text, box, evidence), the
/// answer, per-phase token counts and cache figures.
fn assert_matches_native(report: &Value, native: &PipelineReport) {
    let steps = report["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in the report: {report}"));
    assert_eq!(
        steps.len(),
        native.steps.len(),
        "steps: browser {report} vs native CPU {:?}",
        native.steps
    );
    let phases = report["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases in the report: {report}"));
    let num = |p: &Value, k: &str| {
        p[k].as_u64()
            .unwrap_or_else(|| panic!("phase {} lacks `{k}`: {p}", p["name"]))
    };
    let vision = &report["cache"]["vision"];
    for (i, (s, n)) in steps.iter().zip(&native.steps).enumerate() {
        let b: Vec<f64> = s["bbox"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let nb: Vec<f64> = n
            .bbox
            .map(|b| b.map(f64::from).to_vec())
            .unwrap_or_default();
        assert_eq!(b, nb, "step {} box: browser vs native CPU", i + 1);
        assert_eq!(
            s["text"],
            n.text,
            "step {} text: browser vs native CPU",
            i + 1
        );
        assert_eq!(
            s["evidence"].as_str(),
            n.evidence.as_deref(),
            "step {} evidence: browser vs native CPU",
            i + 1
        );
    }
    assert_eq!(
        report["answer"], native.answer,
        "the answer: browser vs native CPU"
    );
    for (p, n) in phases.iter().zip(&native.phases) {
        let browser: Vec<u64> = [
            "prompt_tokens",
            "reused_tokens",
            "new_tokens",
            "generated_tokens",
            "vision_cache_hits",
        ]
        .iter()
        .map(|k| num(p, k))
        .collect();
        let cpu = [
            n.prompt_tokens,
            n.reused_tokens,
            n.new_tokens,
            n.generated_tokens,
            n.vision_cache_hits,
        ]
        .map(|v| v as u64)
        .to_vec();
        assert_eq!(
            browser, cpu,
            "phase {} [prompt, reused, new, generated, vision hits]: browser vs native CPU",
            n.name
        );
    }
    assert_eq!(
        [
            vision["hits"].as_u64(),
            vision["misses"].as_u64(),
            report["cache"]["reused_tokens"].as_u64(),
            report["cache"]["computed_tokens"].as_u64()
        ],
        [
            Some(native.cache.vision.hits),
            Some(native.cache.vision.misses),
            Some(native.cache.reused_tokens as u64),
            Some(native.cache.computed_tokens as u64)
        ],
        "cache [vision hits, vision misses, reused tokens, computed tokens]: browser vs native CPU"
    );
}

/// The page without ?model opened the micro model and the example scene; the same page with
/// `?mode=pipeline&autorun=1` ran the example through the pipeline exactly as the native CPU
/// backend does.
fn check_default_page(
    opened: &Value,
    run: &Value,
    native: &PipelineReport,
    server: &Server,
    log: &str,
) {
    let micro = format!("/{MICRO}/");
    for (page, what) in [
        (opened, "the page without ?model"),
        (run, "the default pipeline page"),
    ] {
        let model = page["stats"]["model"].as_str().unwrap_or("");
        assert!(
            model.ends_with(&micro),
            "{what} should load {micro}, loaded {model:?}\npage log:\n{log}"
        );
    }
    let report = &run["result"];
    if let Some(err) = report.get("error") {
        panic!("the default pipeline page reported an error: {err}\npage log:\n{log}");
    }
    let posted: Value =
        serde_json::from_str(&server.last_report(DEFAULT_REPORT_PATH).unwrap_or_else(|| {
            panic!("the default pipeline page did not POST its report to {DEFAULT_REPORT_PATH}")
        }))
        .expect("the posted default pipeline report is JSON");
    assert_eq!(
        &posted, report,
        "the POSTed default report differs from #result"
    );
    assert_eq!(report["question"], EXAMPLE_QUESTION);
    assert_matches_native(report, native);
    eprintln!(
        "web e2e: default page: {micro} on {EXAMPLE_IMAGE}: {} steps, answer {:?} (= native CPU), total {:.0} ms",
        native.steps.len(),
        native.answer,
        report["total_ms"].as_f64().unwrap_or(0.0)
    );
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A static file server for the repository root (GET/HEAD) that also accepts POSTed reports.
struct Server {
    port: u16,
    /// (path, body) of each POST, in order.
    reports: Arc<Mutex<Vec<(String, String)>>>,
}

impl Server {
    fn start(root: PathBuf) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = listener.local_addr().expect("local address").port();
        let reports = Arc::new(Mutex::new(Vec::new()));
        let shared = reports.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let root = root.clone();
                let reports = shared.clone();
                std::thread::spawn(move || {
                    if let Err(e) = serve(stream, &root, &reports) {
                        eprintln!("web e2e server: {e}");
                    }
                });
            }
        });
        Server { port, reports }
    }

    /// The body of the last report POSTed to `path`.
    fn last_report(&self, path: &str) -> Option<String> {
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        reports
            .iter()
            .rev()
            .find(|(p, _)| p == path)
            .map(|(_, body)| body.clone())
    }
}

fn mime(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "wasm" => "application/wasm",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "jinja" | "txt" | "md" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nCache-Control: no-store\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn serve(
    mut stream: TcpStream,
    root: &Path,
    reports: &Mutex<Vec<(String, String)>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("/").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let Some(path) = percent_decode(path) else {
        return respond(&mut stream, "400 Bad Request", &[], b"bad path");
    };

    if method == "POST" {
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        if ![REPORT_PATH, PIPELINE_REPORT_PATH, DEFAULT_REPORT_PATH].contains(&path.as_str()) {
            return respond(&mut stream, "404 Not Found", &[], b"");
        }
        reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path, String::from_utf8_lossy(&body).into_owned()));
        return respond(&mut stream, "204 No Content", &[], b"");
    }
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, "405 Method Not Allowed", &[], b"");
    }
    if path.split('/').any(|c| c == "..") {
        return respond(&mut stream, "403 Forbidden", &[], b"");
    }
    let mut file = root.join(path.trim_start_matches('/'));
    if file.is_dir() {
        if !path.ends_with('/') {
            let location = format!("{path}/");
            return respond(
                &mut stream,
                "301 Moved Permanently",
                &[("Location", location)],
                b"",
            );
        }
        file = file.join("index.html");
    }
    match std::fs::read(&file) {
        Ok(bytes) => {
            let headers = [
                ("Content-Type", mime(&file).to_string()),
                ("Content-Length", bytes.len().to_string()),
            ];
            let body: &[u8] = if method == "HEAD" { &[] } else { &bytes };
            respond(&mut stream, "200 OK", &headers, body)
        }
        Err(_) => respond(
            &mut stream,
            "404 Not Found",
            &[("Content-Length", "9".to_string())],
            b"not found",
        ),
    }
}
