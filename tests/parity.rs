//! Numerical parity with HF transformers on tiny random checkpoints, on both backends:
//! vision tower output, prefill logits (f32, max abs diff <= 1e-3) and 16 greedy tokens.
//! Inputs are the golden `input_ids` and `pixel_values`, so the model is tested on its own;
//! tokenizer and preprocessing parity have their own tests.

mod common;

use common::{checkpoint_dir, max_abs_diff, runtime, wgpu_or_skip, Golden};
use qwen_vl::generate::read_f32;
use qwen_vl::Backend;

const LOGIT_TOL: f32 = 1e-3;
const VISION_TOL: f32 = 1e-3;

fn check_checkpoint(name: &str, backend: Backend) {
    let Some(dir) = checkpoint_dir(name) else {
        return;
    };
    if backend == Backend::Wgpu && !wgpu_or_skip(name) {
        return;
    }
    let rt = runtime(&dir, backend);
    for g in Golden::all(&dir) {
        let what = format!("{name}/{} on {backend:?}", g.tag);
        let ids = g.ids("input_ids");
        let pixels = g.pixel_values();
        if let Some(vision) = rt.encode_pixels(&pixels).expect("vision tower") {
            let embeds = pollster::block_on(read_f32(vision.embeds)).expect("readback");
            let (want, _) = g.f32("image_embeds");
            let d = max_abs_diff(&embeds, &want);
            println!("{what}: image_embeds max |diff| = {d:.3e}");
            assert!(
                d <= VISION_TOL,
                "{what}: vision output differs from HF by {d} (> {VISION_TOL})"
            );
            if g.has("deepstack_features") {
                let (want, shape) = g.f32("deepstack_features");
                let per = shape[1] * shape[2];
                assert_eq!(
                    vision.deepstack.len(),
                    shape[0],
                    "{what}: deepstack tap count"
                );
                for (k, f) in vision.deepstack.into_iter().enumerate() {
                    let got = pollster::block_on(read_f32(f)).expect("readback");
                    let d = max_abs_diff(&got, &want[k * per..(k + 1) * per]);
                    println!("{what}: deepstack[{k}] max |diff| = {d:.3e}");
                    assert!(
                        d <= VISION_TOL,
                        "{what}: deepstack feature {k} differs by {d}"
                    );
                }
            }
        }
        let want_tokens = g.ids("greedy_token_ids");
        let trace = rt
            .trace(&ids, &pixels, want_tokens.len(), None)
            .expect("trace");
        let (want_logits, _) = g.f32("prefill_logits");
        let d = max_abs_diff(&trace.prefill_logits, &want_logits);
        println!("{what}: prefill logits max |diff| = {d:.3e}");
        assert!(
            d <= LOGIT_TOL,
            "{what}: prefill logits differ from HF by {d} (> {LOGIT_TOL})"
        );
        assert_eq!(
            trace.argmax,
            want_tokens,
            "{what}: greedy tokens differ from HF (first mismatch at step {:?})",
            trace
                .argmax
                .iter()
                .zip(&want_tokens)
                .position(|(a, b)| a != b)
        );
    }
}

macro_rules! parity_tests {
    ($($test:ident => $name:expr, $backend:expr;)*) => {$(
        #[test]
        fn $test() {
            check_checkpoint($name, $backend);
        }
    )*};
}

parity_tests! {
    vision_logits_and_greedy_match_hf_qwen2_vl_hub_cpu => "qwen2_vl_hub", Backend::Cpu;
    vision_logits_and_greedy_match_hf_qwen2_vl_hub_wgpu => "qwen2_vl_hub", Backend::Wgpu;
    vision_logits_and_greedy_match_hf_qwen2_vl_v5_cpu => "qwen2_vl_v5", Backend::Cpu;
    vision_logits_and_greedy_match_hf_qwen2_vl_v5_wgpu => "qwen2_vl_v5", Backend::Wgpu;
    vision_logits_and_greedy_match_hf_shared_qwen2_vl_cpu => "shared:qwen2_vl", Backend::Cpu;
    vision_logits_and_greedy_match_hf_shared_qwen2_vl_wgpu => "shared:qwen2_vl", Backend::Wgpu;
    vision_logits_and_greedy_match_hf_qwen2_5_vl_cpu => "qwen2_5_vl", Backend::Cpu;
    vision_logits_and_greedy_match_hf_qwen2_5_vl_wgpu => "qwen2_5_vl", Backend::Wgpu;
    vision_logits_and_greedy_match_hf_shared_qwen2_5_vl_cpu => "shared:qwen2_5_vl", Backend::Cpu;
    vision_logits_and_greedy_match_hf_shared_qwen2_5_vl_wgpu => "shared:qwen2_5_vl", Backend::Wgpu;
    vision_logits_and_greedy_match_hf_qwen3_vl_cpu => "qwen3_vl", Backend::Cpu;
    vision_logits_and_greedy_match_hf_qwen3_vl_wgpu => "qwen3_vl", Backend::Wgpu;
    vision_logits_and_greedy_match_hf_shared_qwen3_vl_cpu => "shared:qwen3_vl", Backend::Cpu;
    vision_logits_and_greedy_match_hf_shared_qwen3_vl_wgpu => "shared:qwen3_vl", Backend::Wgpu;
}
