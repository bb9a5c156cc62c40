//! `qwen-vl bench decode`: decode attention and whole-model decode cost at several contexts, on
//! one adapter in one run, for the WGSL kernels, Burn's own paths and no-cache recompute.
//! Presets rebuild real model shapes with random weights so no download is needed.

use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor};
use web_time::Instant;

use crate::config::ModelConfig;
use crate::device::{AdapterInfo, Limits};
use crate::generate::read_ids;
use crate::kernels::{self, wgsl};
use crate::model::QwenVl;
use crate::Error;

/// Real configs (as their hub config.json states them) for benchmarks without downloads.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "qwen2-vl-2b",
        r#"{"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936, "tie_word_embeddings": true, "max_position_embeddings": 32768,
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4,
        "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}"#,
    ),
    (
        "qwen2.5-vl-3b",
        r#"{"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936, "tie_word_embeddings": true, "max_position_embeddings": 128000,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "out_hidden_size": 2048, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2}}"#,
    ),
    (
        "qwen3-vl-2b",
        r#"{"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "tie_word_embeddings": true,
        "text_config": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0, "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
        "mrope_interleaved": true}, "vocab_size": 151936, "max_position_embeddings": 262144,
        "tie_word_embeddings": true},
        "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
        "out_hidden_size": 2048, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}}"#,
    ),
];

/// A preset's config, optionally cut to `layers` decoder layers and `vision_layers` blocks.
pub fn preset_config(
    name: &str,
    layers: Option<usize>,
    vision_layers: Option<usize>,
) -> Result<ModelConfig, Error> {
    let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        Error::BadInput(format!(
            "unknown preset `{name}`; choose one of {}",
            names.join(", ")
        ))
    })?;
    let mut v: serde_json::Value =
        serde_json::from_str(text).map_err(|_| Error::Internal("preset json"))?;
    if let Some(k) = layers {
        let t = if v.get("text_config").is_some() {
            &mut v["text_config"]
        } else {
            &mut v
        };
        t["num_hidden_layers"] = k.into();
    }
    if let Some(k) = vision_layers {
        let vc = &mut v["vision_config"];
        vc["depth"] = k.into();
        for key in ["fullatt_block_indexes", "deepstack_visual_indexes"] {
            if let Some(list) = vc.get(key).and_then(|l| l.as_array()).cloned() {
                let kept: Vec<serde_json::Value> = list
                    .into_iter()
                    .filter(|i| i.as_u64().is_some_and(|i| (i as usize) < k))
                    .collect();
                vc[key] = kept.into();
            }
        }
    }
    Ok(ModelConfig::from_json_str(
        &v.to_string(),
        &format!("preset {name}"),
    )?)
}

/// One attention measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttentionRow {
    /// Cached positions attended.
    pub context: usize,
    /// `wgsl` or `burn`.
    pub path: &'static str,
    /// Microseconds per call (append + attend).
    pub us: f64,
}

/// One whole-model measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelRow {
    /// Context the token is generated at.
    pub context: usize,
    /// `wgsl`, `burn` or `recompute`.
    pub path: &'static str,
    /// Milliseconds per generated token.
    pub ms_per_token: f64,
}

/// The report `--json` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodeReport {
    /// The adapter everything ran on.
    pub adapter: AdapterInfo,
    /// What was measured (model shape, layers, dtype).
    pub model: serde_json::Value,
    /// Decode attention of one layer.
    pub attention: Vec<AttentionRow>,
    /// Whole-model decode.
    pub rows: Vec<ModelRow>,
    /// Prompt throughput of the WGSL path.
    pub prefill_tokens_per_s: f64,
    /// Prompt length used for `prefill_tokens_per_s`.
    pub prefill_tokens: usize,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct DecodeBench {
    /// Contexts.
    pub contexts: Vec<usize>,
    /// Timed calls per attention measurement.
    pub attention_iters: usize,
    /// Timed tokens per whole-model measurement.
    pub tokens: usize,
    /// Contexts above this skip the (slow) recompute row.
    pub recompute_max: usize,
    /// Prompt length for the prefill measurement.
    pub prefill_tokens: usize,
    /// Also measure Burn's own whole-model path where the WGSL one exists (with quantized
    /// weights it dequantizes every matrix through plain Burn ops per token, slow on software
    /// adapters); on the CPU backend it is the only path and always measured.
    pub burn: bool,
}

fn sync(model: &QwenVl) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = model.device.device.sync();
    }
    #[cfg(target_arch = "wasm32")]
    let _ = model;
}

fn time<T>(
    model: &QwenVl,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<T, Error>,
) -> Result<f64, Error> {
    for _ in 0..warmup {
        f()?;
    }
    sync(model);
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    sync(model);
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Runs the decode benchmark on a loaded model.
pub fn run_decode(
    model: &QwenVl,
    bench: &DecodeBench,
    progress: &mut dyn FnMut(&str),
) -> Result<DecodeReport, Error> {
    let t = &model.config.text;
    let device = &model.device.device;
    let dtype = model.dtype;
    let (heads, kv, hd) = (t.num_heads, t.num_kv_heads, t.head_dim);
    let wgsl_limits = model.device.limits.clone();
    let burn_limits = Limits {
        wgsl_kernels: false,
        ..wgsl_limits.clone()
    };
    let mut attention = Vec::new();
    for &n in &bench.contexts {
        progress(&format!("attention at context {n}"));
        let cap = n + 1;
        let rand = |shape: [usize; 3]| {
            Tensor::<3>::random(shape, Distribution::Uniform(-1.0, 1.0), (device, dtype))
        };
        let (mut ck, mut cv) = (rand([kv, cap, hd]), rand([kv, cap, hd]));
        let (q, nk, nv) = (rand([heads, 1, hd]), rand([kv, 1, hd]), rand([kv, 1, hd]));
        if wgsl_limits.wgsl_kernels {
            let us = time(model, 3, bench.attention_iters, || {
                if !wgsl::kv_append(&ck, &cv, &nk, &nv, n - 1, &wgsl_limits) {
                    return Err(Error::Internal("kv_append kernel unavailable"));
                }
                wgsl::attention_decode(&q, &ck, &cv, n, &wgsl_limits)
                    .ok_or(Error::Internal("decode kernel unavailable"))
            })? * 1e6;
            attention.push(AttentionRow {
                context: n,
                path: "wgsl",
                us,
            });
        }
        // The same cache through Burn: slice_assign append, GQA by repeating kv heads, and
        // burn::tensor::module::attention.
        let group = heads / kv;
        let us = time(model, 3, bench.attention_iters, || {
            let (k2, v2) = kernels::kv_append(
                ck.clone(),
                cv.clone(),
                nk.clone(),
                nv.clone(),
                n - 1,
                &burn_limits,
            );
            ck = k2;
            cv = v2;
            let expand = |c: &Tensor<3>| {
                c.clone()
                    .slice([0..kv, 0..n, 0..hd])
                    .unsqueeze_dim::<4>(1)
                    .expand([kv, group, n, hd])
                    .reshape([1, heads, n, hd])
            };
            let out = burn_attention(
                q.clone().reshape([1, heads, 1, hd]),
                expand(&ck),
                expand(&cv),
                None,
                None,
                AttentionModuleOptions::default(),
            );
            Ok(out)
        })? * 1e6;
        attention.push(AttentionRow {
            context: n,
            path: "burn",
            us,
        });
    }

    let mut rows = Vec::new();
    let token = 0u32;
    for &n in &bench.contexts {
        for (path, limits) in [("wgsl", &wgsl_limits), ("burn", &burn_limits)] {
            // Without the WGSL kernels (the CPU backend) Burn's path is the only one: keep it.
            let skip_burn = path == "burn" && !bench.burn && wgsl_limits.wgsl_kernels;
            if (path == "wgsl" && !limits.wgsl_kernels) || skip_burn {
                continue;
            }
            progress(&format!("{path} decode at context {n}"));
            let mut cache = model.new_cache_with(n + bench.tokens + 3, limits.clone());
            cache.fill_zeros(n)?;
            let secs = time(model, 2, bench.tokens, || {
                let hidden = model.decode_step(token, 0, &mut cache)?;
                pollster::block_on(read_ids(
                    model.text.logits(hidden, cache.limits()).argmax(1),
                ))
            })?;
            rows.push(ModelRow {
                context: n,
                path,
                ms_per_token: secs * 1e3,
            });
        }
        if n <= bench.recompute_max {
            progress(&format!("recompute at context {n}"));
            let ids = vec![token; n];
            let positions = model.positions(&ids, &[]);
            let secs = time(model, 1, 1, || {
                let mut cache = model.new_cache(n);
                let hidden = model.prefill(&ids, None, &positions, &mut cache)?;
                pollster::block_on(read_ids(model.last_logits(hidden).argmax(1)))
            })?;
            rows.push(ModelRow {
                context: n,
                path: "recompute",
                ms_per_token: secs * 1e3,
            });
        }
    }

    progress("prefill throughput");
    let p = bench.prefill_tokens;
    let ids = vec![token; p];
    let positions = model.positions(&ids, &[]);
    let secs = time(model, 1, 1, || {
        let mut cache = model.new_cache(p);
        let hidden = model.prefill(&ids, None, &positions, &mut cache)?;
        pollster::block_on(read_ids(model.last_logits(hidden).argmax(1)))
    })?;
    Ok(DecodeReport {
        adapter: model.device.adapter.clone(),
        model: serde_json::json!({
            "family": model.config.family,
            "layers": t.num_layers,
            "hidden_size": t.hidden_size,
            "heads": heads,
            "kv_heads": kv,
            "head_dim": hd,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "quant": model.quant.map(|q| q.name()),
            "weight_bytes": model.weight_bytes,
        }),
        attention,
        rows,
        prefill_tokens_per_s: p as f64 / secs,
        prefill_tokens: p,
    })
}

/// One matrix-vector measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatvecRow {
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// `f32`, `f16`, `q8` or `q4`.
    pub storage: &'static str,
    /// Microseconds per `x W^T` (one row).
    pub us: f64,
    /// Weight bytes read per call divided by the time.
    pub gb_per_s: f64,
}

/// `qwen-vl bench matvec`: the decode-time `x W^T` of each representation on one device, for
/// the given shapes, random weights, one row of input; isolates the kernels from the rest of a
/// decode step.
pub fn run_matvec(
    device: &crate::device::DeviceHandle,
    shapes: &[[usize; 2]],
    iters: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<MatvecRow>, Error> {
    use crate::kernels::weight::{QuantWeight, Weight};
    use crate::quant::{quantize, Scheme};
    use burn::tensor::{DType, TensorData};
    let dev = &device.device;
    let sync = || {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = dev.sync();
        }
    };
    let scale_dtype =
        if device.backend == crate::device::Backend::Wgpu && !device.adapter.shader_f16 {
            DType::F32
        } else {
            DType::F16
        };
    let mut out = Vec::new();
    for &[rows, cols] in shapes {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
            .collect();
        let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let mut variants: Vec<(&'static str, Weight, DType)> = vec![(
            "f32",
            Weight::Dense(Tensor::from_data(
                TensorData::new(data.clone(), [rows, cols]),
                (dev, DType::F32),
            )),
            DType::F32,
        )];
        if device.backend == crate::device::Backend::Cpu || device.adapter.shader_f16 {
            variants.push((
                "f16",
                Weight::Dense(crate::weights::upload(
                    data.clone(),
                    [rows, cols],
                    dev,
                    DType::F16,
                )),
                DType::F16,
            ));
        }
        for (name, scheme) in [("q8", Scheme::Q8), ("q4", Scheme::Q4)] {
            let p =
                quantize(scheme, &data, rows, cols).map_err(|e| Error::BadInput(e.to_string()))?;
            variants.push((
                name,
                Weight::Quant(QuantWeight::upload(&p, dev, scale_dtype)),
                DType::F32,
            ));
        }
        drop(data);
        for (storage, w, dtype) in variants {
            progress(&format!("{storage} [{rows}, {cols}]"));
            let xt = crate::weights::upload(x.clone(), [1, cols], dev, dtype);
            for _ in 0..3 {
                let _ = w.matmul_t(xt.clone(), &device.limits);
            }
            sync();
            let t = Instant::now();
            for _ in 0..iters.max(1) {
                let _ = w.matmul_t(xt.clone(), &device.limits);
            }
            sync();
            let secs = t.elapsed().as_secs_f64() / iters.max(1) as f64;
            out.push(MatvecRow {
                shape: [rows, cols],
                storage,
                us: secs * 1e6,
                gb_per_s: w.bytes() as f64 / secs / 1e9,
            });
        }
    }
    Ok(out)
}
