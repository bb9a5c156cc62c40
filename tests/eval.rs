//! `qwen_vl::eval::run` end to end on the bundled random-weight checkpoint (CPU backend): the
//! report has the contract's keys, every score is a share in [0, 1], and every question of the
//! scene plus its pipeline question is an item. Random weights score about nothing; this proves
//! the plumbing, not accuracy.

use std::path::Path;

use qwen_vl::eval::{self, EvalOptions};
use qwen_vl::pipeline::PipelineOptions;
use qwen_vl::synth::{self, QuestionKind};
use qwen_vl::{Backend, LoadOptions, Runtime};

#[test]
fn eval_report_on_the_random_fixture_has_the_contract_shape() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_hub");
    let rt = Runtime::load(
        &dir,
        &LoadOptions {
            backend: Backend::Cpu,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));

    // A seed whose scene 0 has all six question kinds (a one-shape scene has no position one).
    let seed = (0..100)
        .find(|&s| synth::eval_questions(&synth::scene(s, 0), s, 0).len() == 6)
        .expect("no seed in 0..100 gives a scene with six questions");
    let options = EvalOptions {
        max_new_tokens: 8,
        pipeline: PipelineOptions {
            max_steps: 2,
            max_regions: 2,
            steps_tokens: 24,
            box_tokens: 12,
            caption_tokens: 8,
            answer_tokens: 8,
            ..Default::default()
        },
        caches: true,
    };
    let mut scenes_done = Vec::new();
    let report = eval::run(&rt, 1, seed, &options, &mut |p| scenes_done.push(p.done))
        .unwrap_or_else(|e| panic!("eval::run failed: {e}"));
    assert_eq!(scenes_done, vec![1], "progress must report each scene once");

    assert_eq!(
        report.items.len(),
        7,
        "six direct questions plus one pipeline question, got {:#?}",
        report.items
    );
    assert_eq!(report.pipeline_asked(), 1);
    for kind in QuestionKind::ALL {
        assert_eq!(report.asked(kind), 1, "one {} question", kind.name());
    }
    for it in report.items.iter().filter(|i| !i.pipeline) {
        let generated = it.token_ids.len();
        assert!(
            (1..=8).contains(&generated),
            "{} generated {generated} tokens with a budget of 8",
            it.kind.name()
        );
    }
    let grounding = report
        .items
        .iter()
        .find(|i| i.kind == QuestionKind::Grounding)
        .expect("a grounding item");
    assert!(grounding.target.is_some() && grounding.iou.is_some());

    let mut v = serde_json::to_value(&report).expect("the report serialises");
    let items = v
        .as_object_mut()
        .and_then(|o| o.remove("items"))
        .expect("the kept items are in the JSON");
    assert_eq!(items.as_array().map(Vec::len), Some(7));
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .unwrap_or_else(|| panic!("{v} is not an object"))
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&v), ["accuracy", "grounding", "n", "pipeline"], "{v}");
    assert_eq!(v["n"], 1);
    assert_eq!(
        keys(&v["accuracy"]),
        ["colour", "count", "position", "shape", "yesno"],
        "{v}"
    );
    assert_eq!(keys(&v["grounding"]), ["iou_ge_0_5", "mean_iou"], "{v}");
    assert_eq!(keys(&v["pipeline"]), ["answer_accuracy"], "{v}");
    let shares = [
        &v["accuracy"]["colour"],
        &v["accuracy"]["shape"],
        &v["accuracy"]["count"],
        &v["accuracy"]["position"],
        &v["accuracy"]["yesno"],
        &v["grounding"]["mean_iou"],
        &v["grounding"]["iou_ge_0_5"],
        &v["pipeline"]["answer_accuracy"],
    ];
    for s in shares {
        let x = s
            .as_f64()
            .unwrap_or_else(|| panic!("{s} is not a number in {v}"));
        assert!((0.0..=1.0).contains(&x), "{x} is not in [0, 1]: {v}");
    }

    // Re-scoring the same outputs through an items file gives the same report.
    let file = eval::ItemsFile {
        model: dir.display().to_string(),
        family: rt.family().model_type().into(),
        seed,
        n: 1,
        max_new_tokens: 8,
        items: report.items.clone(),
    };
    let text = serde_json::to_string(&file).expect("the items file serialises");
    let back: eval::ItemsFile = serde_json::from_str(&text).expect("the items file reads back");
    let again = eval::rescore(&back).expect("rescoring");
    assert_eq!(
        again, report,
        "rescoring the same outputs changed the report"
    );
}

/// `qwen-vl synth` writes the training data the micro model's script reads: every turn of
/// `training_items`, and one scenes.jsonl record per scene with its size and shapes (the
/// training script's image-token probes are built from those boxes).
#[test]
fn synth_cli_writes_turns_and_scene_records() {
    let out = std::env::temp_dir().join(format!("qwen-vl-synth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_qwen-vl"))
        .args(["synth", "--n", "3", "--seed", "11", "--out"])
        .arg(&out)
        .output()
        .expect("running qwen-vl synth");
    assert!(
        run.status.success(),
        "qwen-vl synth failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let read = |name: &str| {
        std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
    };
    let records: Vec<serde_json::Value> = read("scenes.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("scenes.jsonl line is JSON"))
        .collect();
    let turns = read("data.jsonl").lines().count();
    assert_eq!(records.len(), 3, "one record per scene");
    let mut expected_turns = 0;
    for (i, record) in records.iter().enumerate() {
        let scene = synth::scene(11, i as u64);
        let image = scene.render();
        expected_turns += synth::training_items(&scene, &image, 11, i as u64).len();
        assert_eq!(record["scene"], i as u64);
        assert_eq!(record["width"], scene.width);
        assert_eq!(record["height"], scene.height);
        let name = record["image"].as_str().expect("image is a string");
        assert!(out.join(name).exists(), "{name} was not written");
        let shapes = record["shapes"].as_array().expect("shapes is an array");
        assert_eq!(shapes.len(), scene.shapes.len());
        for (got, want) in shapes.iter().zip(&scene.shapes) {
            assert_eq!(got["kind"], want.kind.name());
            assert_eq!(got["colour"], want.colour.name());
            assert_eq!(got["size"], want.size.name());
            let bbox: Vec<f32> = serde_json::from_value(got["bbox"].clone()).expect("bbox");
            assert_eq!(bbox, want.bbox.to_vec());
        }
    }
    assert_eq!(turns, expected_turns, "data.jsonl has every training turn");
    let _ = std::fs::remove_dir_all(&out);
}
