//! Attention and KV-append for the decoder and the vision tower, and the matrix products of
//! dense and quantized weights ([`weight`]).
//!
//! This module is the one place that knows which implementation runs: on wgpu (when
//! `Limits::wgsl_kernels`) the hand-written WGSL kernels of `shaders/`, elsewhere (and for shapes
//! a kernel does not take) the plain-Burn path below. Tests compare the two.

#[cfg(not(target_arch = "wasm32"))]
pub mod cpu;
pub mod weight;
pub mod wgsl;

use burn::tensor::{activation, Int, Tensor};

use crate::device::Limits;

/// Writes `k`, `v` (`[kv_heads, n, hd]`) into the caches (`[kv_heads, capacity, hd]`) at
/// position `len` and returns the caches. The caller checked `len + n <= capacity`.
pub fn kv_append(
    cache_k: Tensor<3>,
    cache_v: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    len: usize,
    limits: &Limits,
) -> (Tensor<3>, Tensor<3>) {
    if limits.wgsl_kernels && wgsl::kv_append(&cache_k, &cache_v, &k, &v, len, limits) {
        return (cache_k, cache_v);
    }
    let [kv_heads, n, hd] = k.dims();
    let range = [0..kv_heads, len..len + n, 0..hd];
    (
        cache_k.slice_assign(range.clone(), k),
        cache_v.slice_assign(range, v),
    )
}

/// Causal GQA attention of `q` (`[heads, n, hd]`, positions `[p0, p0 + n)`) over the cached keys
/// and values `[0, p0 + n)` of `cache_k`, `cache_v` (`[kv_heads, capacity, hd]`).
pub fn attention(
    q: Tensor<3>,
    cache_k: Tensor<3>,
    cache_v: Tensor<3>,
    p0: usize,
    limits: &Limits,
) -> Tensor<3> {
    let [_, n, hd] = q.dims();
    let [kv_heads, _, _] = cache_k.dims();
    if limits.wgsl_kernels {
        let out = if n == 1 {
            wgsl::attention_decode(&q, &cache_k, &cache_v, p0 + 1, limits)
        } else {
            wgsl::attention_prefill(&q, &cache_k, &cache_v, p0, limits)
        };
        if let Some(out) = out {
            return out;
        }
    }
    let valid = [0..kv_heads, 0..p0 + n, 0..hd];
    attention_causal(
        q,
        cache_k.slice(valid.clone()),
        cache_v.slice(valid),
        p0,
        limits,
    )
}

/// Bytes of f32 scores `[batch, rows, cols]` per query chunk the plain path allows itself.
fn rows_per_chunk(batch: usize, rows: usize, cols: usize, limits: &Limits) -> usize {
    let per_row = (batch * cols * 4).max(1);
    (limits.score_budget / per_row).clamp(1, rows.max(1))
}

/// Causal GQA attention of queries at positions `[p0, p0 + seq)` over keys `[0, p0 + seq)`.
///
/// `q`: `[heads, seq, d]`; `k`, `v`: `[kv_heads, p0 + seq, d]`; returns `[heads, seq, d]`.
/// Query head `i` reads kv head `i / (heads / kv_heads)`.
pub fn attention_causal(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    p0: usize,
    limits: &Limits,
) -> Tensor<3> {
    let [heads, seq, d] = q.dims();
    let [kv_heads, total, _] = k.dims();
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let device = q.device();
    let q = q.reshape([kv_heads, group, seq, d]);
    let kt = k.unsqueeze_dim::<4>(1).swap_dims(2, 3); // [kv_heads, 1, d, total]
    let v = v.unsqueeze_dim::<4>(1); // [kv_heads, 1, total, d]
    let chunk = rows_per_chunk(heads, seq, total, limits);
    let mut outs = Vec::new();
    let mut start = 0;
    while start < seq {
        let end = (start + chunk).min(seq);
        let qc = q.clone().slice([0..kv_heads, 0..group, start..end, 0..d]);
        let scores = qc.matmul(kt.clone()).mul_scalar(scale); // [kv_heads, group, rows, total]
        let scores = if p0 + start + 1 < total {
            // Key j is visible to query row r (absolute position p0 + start + r) iff j <= p0 + start + r.
            let rows = end - start;
            let key = Tensor::<1, Int>::arange(0..total as i64, &device)
                .reshape([1, total])
                .repeat_dim(0, rows);
            let pos = Tensor::<1, Int>::arange((p0 + start) as i64..(p0 + end) as i64, &device)
                .reshape([rows, 1])
                .repeat_dim(1, total);
            let hidden = key.greater(pos); // [rows, total]
            let bias =
                Tensor::<2>::zeros([rows, total], &device).mask_fill(hidden, f32::NEG_INFINITY);
            scores + bias.unsqueeze::<4>()
        } else {
            scores
        };
        let probs = activation::softmax(scores, 3);
        outs.push(probs.matmul(v.clone())); // [kv_heads, group, rows, d]
        start = end;
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(outs, 2)
    };
    out.reshape([heads, seq, d])
}

/// Bidirectional attention inside consecutive segments of the sequence (one image, or one
/// window of an image): `q`, `k`, `v`: `[heads, n, d]`, `segments` sum to `n`.
pub fn attention_segments(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    segments: &[usize],
    limits: &Limits,
) -> Tensor<3> {
    let [heads, n, d] = q.dims();
    let scale = 1.0 / (d as f64).sqrt();
    let mut outs = Vec::new();
    let mut offset = 0;
    let mut i = 0;
    while i < segments.len() {
        // A run of equal-length segments is one batched attention.
        let len = segments[i];
        let mut m = 1;
        while i + m < segments.len() && segments[i + m] == len {
            m += 1;
        }
        i += m;
        if len == 0 {
            continue;
        }
        let range = |t: &Tensor<3>| {
            t.clone()
                .slice([0..heads, offset..offset + m * len, 0..d])
                .reshape([heads, m, len, d])
        };
        let (qs, ks, vs) = (range(&q), range(&k), range(&v));
        let kt = ks.swap_dims(2, 3); // [heads, m, d, len]
        let chunk = rows_per_chunk(heads * m, len, len, limits);
        let mut parts = Vec::new();
        let mut start = 0;
        while start < len {
            let end = (start + chunk).min(len);
            let qc = qs.clone().slice([0..heads, 0..m, start..end, 0..d]);
            let probs = activation::softmax(qc.matmul(kt.clone()).mul_scalar(scale), 3);
            parts.push(probs.matmul(vs.clone())); // [heads, m, rows, d]
            start = end;
        }
        let o = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(parts, 2)
        };
        outs.push(o.reshape([heads, m * len, d]));
        offset += m * len;
    }
    debug_assert_eq!(offset, n);
    if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(outs, 1)
    }
}
