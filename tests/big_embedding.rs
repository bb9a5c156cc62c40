//! A vocabulary table larger than the adapter's max storage binding (lavapipe: 128 MiB) still
//! works: a random checkpoint with a 151936 x 256 embedding (155 MB in f32) is built on disk, then
//! its logits on wgpu are compared with the CPU backend's.

mod common;

use std::path::Path;

use qwen_vl::{Backend, LoadOptions, Runtime};
use safetensors::tensor::TensorView;

const VOCAB: usize = 151_936;
const HIDDEN: usize = 256;

/// Deterministic pseudo-random bf16 bytes, values uniform in [-scale, scale] (+ offset).
fn bf16_bytes(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(n * 2);
    for _ in 0..n {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = ((state >> 40) as f32) / (1u64 << 24) as f32; // [0, 1)
        let v = offset + scale * (2.0 * u - 1.0);
        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    out
}

fn write_checkpoint(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl_hub");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "generation_config.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixture.join(f), dir.join(f)).expect("copy tokenizer files");
    }
    let config = serde_json::json!({
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": HIDDEN, "intermediate_size": 256, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": VOCAB, "tie_word_embeddings": true, "max_position_embeddings": 4096,
        "eos_token_id": 151645,
        "vision_config": {"depth": 1, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
            "hidden_size": HIDDEN, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");

    let h = HIDDEN;
    let mut specs: Vec<(String, Vec<usize>, f32, f32)> = vec![
        ("model.embed_tokens.weight".into(), vec![VOCAB, h], 0.5, 0.0),
        ("model.norm.weight".into(), vec![h], 0.1, 3.0),
        (
            "visual.patch_embed.proj.weight".into(),
            vec![32, 3, 2, 14, 14],
            0.05,
            0.0,
        ),
        ("visual.merger.ln_q.weight".into(), vec![32], 0.1, 1.0),
        ("visual.merger.ln_q.bias".into(), vec![32], 0.1, 0.0),
        (
            "visual.merger.mlp.0.weight".into(),
            vec![128, 128],
            0.1,
            0.0,
        ),
        ("visual.merger.mlp.0.bias".into(), vec![128], 0.1, 0.0),
        ("visual.merger.mlp.2.weight".into(), vec![h, 128], 0.1, 0.0),
        ("visual.merger.mlp.2.bias".into(), vec![h], 0.1, 0.0),
    ];
    for (name, shape) in [
        ("norm1.weight", vec![32]),
        ("norm1.bias", vec![32]),
        ("norm2.weight", vec![32]),
        ("norm2.bias", vec![32]),
        ("attn.qkv.weight", vec![96, 32]),
        ("attn.qkv.bias", vec![96]),
        ("attn.proj.weight", vec![32, 32]),
        ("attn.proj.bias", vec![32]),
        ("mlp.fc1.weight", vec![64, 32]),
        ("mlp.fc1.bias", vec![64]),
        ("mlp.fc2.weight", vec![32, 64]),
        ("mlp.fc2.bias", vec![32]),
    ] {
        let offset = if name.starts_with("norm") && name.ends_with("weight") {
            1.0
        } else {
            0.0
        };
        specs.push((format!("visual.blocks.0.{name}"), shape, 0.1, offset));
    }
    for (name, shape, offset) in [
        ("input_layernorm.weight", vec![h], 1.0),
        ("post_attention_layernorm.weight", vec![h], 1.0),
        ("self_attn.q_proj.weight", vec![h, h], 0.0),
        ("self_attn.q_proj.bias", vec![h], 0.0),
        ("self_attn.k_proj.weight", vec![128, h], 0.0),
        ("self_attn.k_proj.bias", vec![128], 0.0),
        ("self_attn.v_proj.weight", vec![128, h], 0.0),
        ("self_attn.v_proj.bias", vec![128], 0.0),
        ("self_attn.o_proj.weight", vec![h, h], 0.0),
        ("mlp.gate_proj.weight", vec![256, h], 0.0),
        ("mlp.up_proj.weight", vec![256, h], 0.0),
        ("mlp.down_proj.weight", vec![h, 256], 0.0),
    ] {
        specs.push((format!("model.layers.0.{name}"), shape, 0.06, offset));
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .into_iter()
        .enumerate()
        .map(|(i, (n, s, scale, offset))| {
            let count = s.iter().product();
            (n, s, bf16_bytes(count, i as u64 + 7, scale, offset))
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                TensorView::new(safetensors::Dtype::BF16, s.clone(), d).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .expect("write weights");
}

#[test]
fn embedding_larger_than_max_binding_matches_cpu_on_wgpu() {
    if !common::wgpu_or_skip("big embedding") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    write_checkpoint(dir.path());
    let load = |backend| {
        Runtime::load(
            dir.path(),
            &LoadOptions {
                backend,
                ..Default::default()
            },
            &mut |_| {},
        )
        .expect("load")
    };
    let gpu = load(Backend::Wgpu);
    let table_bytes = VOCAB * HIDDEN * 4;
    let max_binding = gpu.model.device.limits.max_binding;
    println!(
        "adapter {}: max storage binding {} MiB, table {} MiB, {} chunks",
        gpu.model.device.adapter.name,
        max_binding >> 20,
        table_bytes >> 20,
        gpu.model.text.embed.chunks.len()
    );
    if table_bytes > max_binding {
        assert!(
            gpu.model.text.embed.chunks.len() > 1,
            "the table must be split to fit the binding limit"
        );
    }
    let cpu = load(Backend::Cpu);
    let ids = gpu
        .tokenizer
        .encode_text("Large vocabularies must still work on small bindings.")
        .expect("encode");
    // Ids from both ends of the vocabulary, so several chunks are read.
    let ids: Vec<u32> = ids
        .into_iter()
        .chain([5, 151_000, 90_000, 151_643])
        .collect();
    let a = cpu.trace(&ids, &[], 4, None).expect("cpu trace");
    let b = gpu.trace(&ids, &[], 4, None).expect("wgpu trace");
    let d = common::max_abs_diff(&a.prefill_logits, &b.prefill_logits);
    let spread = a.prefill_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    println!("prefill logits: max |cpu - wgpu| = {d:.3e} (max |logit| {spread:.2})");
    assert!(d <= 1e-3, "wgpu logits differ from the CPU backend by {d}");
    assert_eq!(
        a.argmax, b.argmax,
        "greedy tokens differ between CPU and wgpu"
    );
}
