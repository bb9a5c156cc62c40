//! The trained micro model (models/micro-qwen2-vl) through the Rust runtime gives transformers'
//! greedy outputs, token for token, on unseen synthetic scenes, and therefore its scores.
//!
//! `tests/fixtures/micro_hf_items.json` holds what HF transformers generated for every direct
//! question of scenes 0..N of seed 4242 (written by `tools/micro/eval_hf.py` from a
//! `qwen-vl eval --items` run; see the README). Unlike the random-weight fixtures, this model's
//! outputs are short, structured answers (colour words, counts, boxes) that depend on what is in
//! the image, so a wrong image path, wrong position ids or a wrong box parser shows up here as a
//! different answer. Also checks that the report's scores equal the HF outputs' scores under the
//! same scorer.

mod common;

use std::path::Path;

use qwen_vl::eval::{self, EvalOptions, ItemsFile};
use qwen_vl::{Backend, LoadOptions, Runtime};

fn check(backend: Backend) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let hf_path = root.join("tests/fixtures/micro_hf_items.json");
    let hf: ItemsFile = serde_json::from_slice(
        &std::fs::read(&hf_path).unwrap_or_else(|e| panic!("reading {}: {e}", hf_path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not an items file: {e}", hf_path.display()));
    if backend == Backend::Wgpu && !common::wgpu_or_skip("micro_model wgpu") {
        return;
    }
    let dir = root.join("models/micro-qwen2-vl");
    let rt = Runtime::load(
        &dir,
        &LoadOptions {
            backend,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let options = EvalOptions {
        max_new_tokens: hf.max_new_tokens,
        ..Default::default()
    };
    let report = eval::run(&rt, hf.n, hf.seed, &options, &mut |_| {})
        .unwrap_or_else(|e| panic!("eval::run failed: {e}"));
    let ours: Vec<_> = report.items.iter().filter(|i| !i.pipeline).collect();
    assert_eq!(ours.len(), hf.items.len(), "same questions as the HF file");
    let mut differ = Vec::new();
    for (a, b) in ours.iter().zip(&hf.items) {
        assert_eq!(
            (a.scene, &a.prompt),
            (b.scene, &b.prompt),
            "the scenes' questions changed since the HF file was made (src/synth.rs must stay deterministic)"
        );
        if a.token_ids != b.token_ids {
            differ.push(format!(
                "scene {} {:?}: ours {:?} ({:?}), HF {:?} ({:?})",
                a.scene, a.prompt, a.output, a.token_ids, b.output, b.token_ids
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "{} of {} outputs differ from transformers':\n{}",
        differ.len(),
        ours.len(),
        differ.join("\n")
    );
    let hf_report = eval::rescore(&hf).expect("score the HF outputs");
    let right = |r: &eval::EvalReport| {
        let v = serde_json::to_value(r).unwrap();
        (v["accuracy"].clone(), v["grounding"].clone())
    };
    assert_eq!(
        right(&report),
        right(&hf_report),
        "same outputs, same scores"
    );
    println!(
        "{backend:?}: {} direct outputs equal HF's; scores {}",
        ours.len(),
        serde_json::to_string(&report).unwrap()
    );
}

#[test]
fn micro_model_matches_transformers_on_unseen_scenes_cpu() {
    check(Backend::Cpu);
}

#[test]
fn micro_model_matches_transformers_on_unseen_scenes_wgpu() {
    check(Backend::Wgpu);
}

/// The README's first command: `qwen-vl pipeline` with no --model runs the bundled micro model
/// (the same report as with `--model models/micro-qwen2-vl`) on the example scene, and
/// `--annotate` writes the image with the boxes.
#[test]
fn readme_first_command_runs_the_pipeline_on_the_micro_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let annotated = std::env::temp_dir().join(format!("qwen-vl-answer-{}.png", std::process::id()));
    let run = |model: Option<&str>| -> serde_json::Value {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-vl"));
        cmd.current_dir(root).args([
            "pipeline",
            "--device",
            "cpu",
            "--image",
            "web/example-scene.png",
            "--question",
            "Is the blue diamond to the left or to the right of the purple diamond?",
            "--json",
        ]);
        if let Some(m) = model {
            cmd.args(["--model", m]);
        } else {
            cmd.arg("--annotate").arg(&annotated);
        }
        let out = cmd.output().expect("running qwen-vl pipeline");
        assert!(
            out.status.success(),
            "qwen-vl pipeline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "--json output is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
        // Timings differ between runs; everything else is deterministic.
        for key in ["total_ms", "timings_ms"] {
            report.as_object_mut().map(|o| o.remove(key));
        }
        for phase in report["phases"].as_array_mut().into_iter().flatten() {
            phase.as_object_mut().map(|o| o.remove("ms"));
        }
        report
    };
    let default = run(None);
    let explicit = run(Some("models/micro-qwen2-vl"));
    assert_eq!(
        default, explicit,
        "the default model is not models/micro-qwen2-vl"
    );
    assert_eq!(default["family"], "qwen2_vl");
    assert!(
        default["answer"]
            .as_str()
            .is_some_and(|a| !a.trim().is_empty()),
        "no answer: {default}"
    );
    let picture = image::open(&annotated)
        .unwrap_or_else(|e| panic!("--annotate did not write {}: {e}", annotated.display()));
    let example = image::open(root.join("web/example-scene.png")).expect("web/example-scene.png");
    assert_eq!(
        (picture.width(), picture.height()),
        (example.width(), example.height()),
        "the annotated image has the input's size"
    );
    let _ = std::fs::remove_file(&annotated);
}
