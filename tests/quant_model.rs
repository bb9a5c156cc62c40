//! Quantized models end to end: q8 keeps HF's greedy tokens wherever the reference is decided
//! by at least half a logit (teacher-forced with the reference tokens, on every fixture and both
//! backends); a folder written by `qwen_vl::quantize` loads without re-quantizing and gives the
//! same numbers as quantizing at load; the weights take the promised share of f16.

mod common;

use std::path::Path;

use burn::tensor::DType;
use common::{checkpoint_dir, wgpu_or_skip, Golden};
use qwen_vl::quant::Scheme;
use qwen_vl::{Backend, LoadOptions, Runtime};

const MARGIN: f32 = 0.5;

fn load(dir: &Path, backend: Backend, dtype: DType, quant: Option<Scheme>) -> Runtime {
    Runtime::load(
        dir,
        &LoadOptions {
            backend,
            dtype,
            quant,
        },
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("loading {} ({quant:?}): {e}", dir.display()))
}

fn q8_keeps_confident_greedy_tokens(name: &str, backend: Backend) {
    let Some(dir) = checkpoint_dir(name) else {
        return;
    };
    if backend == Backend::Wgpu && !wgpu_or_skip(name) {
        return;
    }
    let rt = load(&dir, backend, DType::F32, Some(Scheme::Q8));
    let (mut compared, mut steps) = (0, 0);
    for g in Golden::all(&dir) {
        let what = format!("{name}/{} q8 on {backend:?}", g.tag);
        let want = g.ids("greedy_token_ids");
        let margins: Vec<f32> = g.json["margins"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: golden has no margins"))
            .iter()
            .map(|m| m.as_f64().unwrap_or(0.0) as f32)
            .collect();
        assert_eq!(margins.len(), want.len(), "{what}: one margin per token");
        // Teacher-forced: step k sees the reference tokens before it, so a low-margin step that
        // flips does not decide the steps after it.
        let trace = rt
            .trace(
                &g.ids("input_ids"),
                &g.pixel_values(),
                want.len(),
                Some(&want),
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        for (k, ((&got, &w), &m)) in trace.argmax.iter().zip(&want).zip(&margins).enumerate() {
            steps += 1;
            if m >= MARGIN {
                compared += 1;
                assert_eq!(
                    got, w,
                    "{what}: step {k} (reference margin {m:.3}) chose {got}, HF's f32 model {w}"
                );
            }
        }
    }
    println!("{name} q8 on {backend:?}: {compared} of {steps} greedy steps have margin >= {MARGIN}; all equal HF");
    assert!(
        compared * 2 >= steps,
        "{name}: only {compared} of {steps} steps reach margin {MARGIN}: the test would prove little"
    );
}

macro_rules! q8_tests {
    ($($test:ident => $name:expr, $backend:expr;)*) => {$(
        #[test]
        fn $test() {
            q8_keeps_confident_greedy_tokens($name, $backend);
        }
    )*};
}

q8_tests! {
    q8_greedy_matches_hf_where_confident_qwen2_vl_hub_cpu => "qwen2_vl_hub", Backend::Cpu;
    q8_greedy_matches_hf_where_confident_qwen2_vl_hub_wgpu => "qwen2_vl_hub", Backend::Wgpu;
    q8_greedy_matches_hf_where_confident_qwen2_vl_v5_cpu => "qwen2_vl_v5", Backend::Cpu;
    q8_greedy_matches_hf_where_confident_qwen2_5_vl_cpu => "qwen2_5_vl", Backend::Cpu;
    q8_greedy_matches_hf_where_confident_qwen2_5_vl_wgpu => "qwen2_5_vl", Backend::Wgpu;
    q8_greedy_matches_hf_where_confident_qwen3_vl_cpu => "qwen3_vl", Backend::Cpu;
    q8_greedy_matches_hf_where_confident_qwen3_vl_wgpu => "qwen3_vl", Backend::Wgpu;
    q8_greedy_matches_hf_where_confident_shared_qwen2_vl_cpu => "shared:qwen2_vl", Backend::Cpu;
    q8_greedy_matches_hf_where_confident_shared_qwen2_5_vl_cpu => "shared:qwen2_5_vl", Backend::Cpu;
    q8_greedy_matches_hf_where_confident_shared_qwen3_vl_cpu => "shared:qwen3_vl", Backend::Cpu;
}

#[test]
fn quantized_folder_loads_as_stored_and_equals_quantizing_at_load() {
    let src = common::fixtures().join("qwen2_5_vl");
    let g = Golden::all(&src)
        .into_iter()
        .find(|g| g.tag == "img")
        .expect("golden_img");
    for scheme in [Scheme::Q8, Scheme::Q4] {
        let out = tempfile::tempdir().expect("temp dir");
        let report = qwen_vl::quantize::quantize_dir(&src, out.path(), scheme, &mut |_| {})
            .unwrap_or_else(|e| panic!("quantize {scheme}: {e}"));
        assert!(report.quantized > 0 && report.copied > 0, "{report:?}");
        for f in [
            "tokenizer.json",
            "preprocessor_config.json",
            "tokenizer_config.json",
        ] {
            assert!(out.path().join(f).exists(), "{f} was not copied");
        }
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.path().join("config.json")).expect("config.json"),
        )
        .expect("json");
        assert_eq!(config["quantization_config"]["scheme"], scheme.name());

        for backend in [Backend::Cpu, Backend::Wgpu] {
            if backend == Backend::Wgpu && !wgpu_or_skip("quantized folder on wgpu") {
                continue;
            }
            let stored = load(out.path(), backend, DType::F32, None);
            let at_load = load(&src, backend, DType::F32, Some(scheme));
            assert_eq!(stored.model.quant, Some(scheme));
            assert_eq!(
                stored.model.weight_bytes, at_load.model.weight_bytes,
                "{scheme} on {backend:?}: device bytes differ"
            );
            let ids = g.ids("input_ids");
            let a = stored
                .trace(&ids, &g.pixel_values(), 6, None)
                .expect("trace");
            let b = at_load
                .trace(&ids, &g.pixel_values(), 6, None)
                .expect("trace");
            let d = common::max_abs_diff(&a.prefill_logits, &b.prefill_logits);
            assert_eq!(
                d, 0.0,
                "{scheme} on {backend:?}: logits of the stored folder differ from quantizing at load by {d}"
            );
            assert_eq!(a.argmax, b.argmax, "{scheme} on {backend:?}: tokens differ");
        }
        // Asking for another scheme than the folder's is refused, with the fix.
        let err = Runtime::load(
            out.path(),
            &LoadOptions {
                backend: Backend::Cpu,
                quant: Some(if scheme == Scheme::Q8 {
                    Scheme::Q4
                } else {
                    Scheme::Q8
                }),
                ..Default::default()
            },
            &mut |_| {},
        )
        .err()
        .expect("a scheme mismatch must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("already quantized") && msg.contains(scheme.name()),
            "{msg}"
        );
    }
}

#[test]
fn quantized_weights_take_the_promised_share_of_f16() {
    let dir = common::fixtures().join("qwen2_vl_hub");
    let f16 = load(&dir, Backend::Cpu, DType::F16, None)
        .model
        .weight_bytes;
    let q8 = load(&dir, Backend::Cpu, DType::F16, Some(Scheme::Q8))
        .model
        .weight_bytes;
    let q4 = load(&dir, Backend::Cpu, DType::F16, Some(Scheme::Q4))
        .model
        .weight_bytes;
    let (r8, r4) = (q8 as f64 / f16 as f64, q4 as f64 / f16 as f64);
    println!("device bytes: f16 {f16}, q8 {q8} ({r8:.3}), q4 {q4} ({r4:.3})");
    assert!(r8 <= 0.55, "q8 weights are {r8:.3} of f16 (> 0.55)");
    assert!(r4 <= 0.30, "q4 weights are {r4:.3} of f16 (> 0.30)");
}

#[test]
fn quantized_vision_tower_stays_close_to_f32() {
    // `--quant` covers the vision tower: its output (the merged image embeddings) moves, by a
    // bounded share of its size. Relative RMS error, ||q - f32|| / ||f32||, over all tokens;
    // measured on these random-weight fixtures: q8 0.012-0.029, q4 0.18-0.29 (bounds ~1.5x).
    for name in ["qwen2_vl_hub", "qwen2_5_vl", "qwen3_vl"] {
        let dir = common::fixtures().join(name);
        let g = Golden::all(&dir)
            .into_iter()
            .find(|g| g.tag == "img")
            .expect("golden_img");
        let embeds = |quant| {
            let rt = load(&dir, Backend::Cpu, DType::F32, quant);
            let v = rt
                .encode_pixels(&g.pixel_values())
                .expect("vision")
                .expect("an image");
            pollster::block_on(qwen_vl::generate::read_f32(v.embeds)).expect("readback")
        };
        let dense = embeds(None);
        let norm = dense.iter().map(|v| v * v).sum::<f32>().sqrt();
        for (scheme, bound) in [(Scheme::Q8, 0.05), (Scheme::Q4, 0.45)] {
            let q = embeds(Some(scheme));
            let err = q
                .iter()
                .zip(&dense)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            let rel = err / norm;
            let worst = common::max_abs_diff(&q, &dense);
            println!("{name} vision output, {scheme}: relative RMS error {rel:.4} (max |diff| {worst:.4})");
            assert!(
                rel > 0.0,
                "{name}: {scheme} left the vision output unchanged: the vision tower was not quantized"
            );
            assert!(
                rel <= bound,
                "{name}: {scheme} vision output moved by {rel:.4} of its norm (> {bound})"
            );
        }
    }
}
