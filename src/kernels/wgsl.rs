//! Launching the hand-written WGSL kernels of `shaders/` on burn-wgpu tensors (burn's `template`
//! feature): same device queue as every other op, buffers bound in order at `@group(0)`.
//!
//! Each function returns `None` when a tensor is not on a WGSL runtime (the caller then uses the
//! plain-Burn path), so nothing here is reached on the CPU backend.

use burn::backend::wgpu::{
    into_contiguous, CubeTensor, KernelSource, SourceKernel, SourceTemplate,
};
use burn::backend::Cube;
use burn::cubecl::prelude::KernelId;
use burn::cubecl::server::KernelArguments;
use burn::cubecl::{CubeCount, CubeDim};
use burn::tensor::{DType, Shape, Tensor};

use crate::device::Limits;

const KV_APPEND: &str = include_str!("../../shaders/kv_append.wgsl");
const DECODE: &str = include_str!("../../shaders/attention_decode.wgsl");
const DECODE_REDUCE: &str = include_str!("../../shaders/attention_decode_reduce.wgsl");
const PREFILL: &str = include_str!("../../shaders/attention_prefill.wgsl");

/// A WGSL template with its placeholder values; the values are part of the kernel id, so each
/// configuration compiles once.
struct Wgsl {
    name: &'static str,
    text: &'static str,
    values: Vec<(&'static str, String)>,
}

impl KernelSource for Wgsl {
    fn source(&self) -> SourceTemplate {
        self.values
            .iter()
            .fold(SourceTemplate::new(self.text), |t, (k, v)| {
                t.register(*k, v.clone())
            })
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.name, self.values.clone()))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// A float tensor's wgpu primitive, contiguous; `None` off wgpu.
fn cube<const D: usize>(t: &Tensor<D>) -> Option<CubeTensor> {
    let c = t.clone().try_into_primitive::<Cube>().ok()?;
    Some(if c.is_contiguous() {
        c
    } else {
        into_contiguous(c)
    })
}

fn float<const D: usize>(c: CubeTensor) -> Tensor<D> {
    Tensor::from_primitive::<Cube>(c)
}

/// Element type name and the `enable` line it needs.
fn elem(dtype: DType) -> Option<(&'static str, &'static str)> {
    match dtype {
        DType::F32 => Some(("f32", "")),
        DType::F16 => Some(("f16", "enable f16;")),
        _ => None,
    }
}

/// A small parameter block (8 x u32) as a storage buffer.
fn params(like: &CubeTensor, words: [u32; 8]) -> burn::cubecl::server::Handle {
    like.client.create_from_slice(bytemuck::cast_slice(&words))
}

fn empty_like(like: &CubeTensor, shape: &[usize], dtype: DType) -> CubeTensor {
    let bytes = shape.iter().product::<usize>() * dtype.size();
    let handle = like.client.empty(bytes.max(4));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape.to_vec()),
        handle,
        dtype,
    )
}

fn launch(
    like: &CubeTensor,
    kernel: Wgsl,
    wg: u32,
    count: (u32, u32),
    buffers: Vec<burn::cubecl::server::BufferBinding>,
) {
    like.client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(wg))),
        CubeCount::Static(count.0, count.1, 1),
        KernelArguments::new().with_buffers(buffers),
    );
}

/// Largest power of two `<= n` (at least 1).
fn pow2_floor(n: u32) -> u32 {
    if n == 0 {
        1
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// Writes `k`, `v` (`[kv_heads, n, hd]`) into the caches (`[kv_heads, capacity, hd]`) at `len`,
/// in place. Returns `false` (having done nothing) when the tensors are not on wgpu.
pub fn kv_append(
    cache_k: &Tensor<3>,
    cache_v: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    len: usize,
    limits: &Limits,
) -> bool {
    let (Some(ck), Some(cv), Some(nk), Some(nv)) = (cube(cache_k), cube(cache_v), cube(k), cube(v))
    else {
        return false;
    };
    let Some((elem, enable)) = elem(ck.dtype) else {
        return false;
    };
    if nk.dtype != ck.dtype || nv.dtype != ck.dtype || cv.dtype != ck.dtype {
        return false;
    }
    let [kv_heads, capacity, hd] = cache_k.dims();
    let [_, n, _] = k.dims();
    let wg = 256u32.min(pow2_floor(limits.max_invocations));
    let total = (kv_heads * n * hd) as u32;
    let groups = total.div_ceil(wg).max(1);
    let x = groups.min(65_535);
    let y = groups.div_ceil(x);
    let p = params(
        &ck,
        [
            kv_heads as u32,
            capacity as u32,
            hd as u32,
            n as u32,
            len as u32,
            0,
            0,
            0,
        ],
    );
    let kernel = Wgsl {
        name: "kv_append",
        text: KV_APPEND,
        values: vec![
            ("wg", wg.to_string()),
            ("elem", elem.into()),
            ("enable", enable.into()),
        ],
    };
    launch(
        &ck,
        kernel,
        wg,
        (x, y),
        vec![
            ck.handle.clone().binding(),
            cv.handle.clone().binding(),
            nk.handle.binding(),
            nv.handle.binding(),
            p.binding(),
        ],
    );
    true
}

/// Tile sizes for the decode kernel, chosen from the device limits.
struct DecodeTiles {
    wg: u32,
    chunk: u32,
}

fn decode_tiles(group: u32, d: u32, limits: &Limits) -> Option<DecodeTiles> {
    let mut wg = 128u32.min(pow2_floor(limits.max_invocations));
    let mut chunk = 128u32;
    // q (G*D) + scores (G*C) + reduction (G*WG) + stats (2G) floats in workgroup memory.
    let bytes = |wg: u32, chunk: u32| 4 * (group * d + group * chunk + group * wg + 2 * group);
    while bytes(wg, chunk) > limits.max_shared && chunk > 16 {
        chunk /= 2;
    }
    while bytes(wg, chunk) > limits.max_shared && wg > 16 {
        wg /= 2;
    }
    (bytes(wg, chunk) <= limits.max_shared).then_some(DecodeTiles { wg, chunk })
}

/// One-token attention: `q` `[heads, 1, hd]` against `cache[.., 0..len, ..]`; `None` off wgpu
/// or when the shape does not fit the kernel (then the caller uses plain Burn).
pub fn attention_decode(
    q: &Tensor<3>,
    cache_k: &Tensor<3>,
    cache_v: &Tensor<3>,
    len: usize,
    limits: &Limits,
) -> Option<Tensor<3>> {
    let [heads, one, hd] = q.dims();
    let [kv_heads, capacity, _] = cache_k.dims();
    if one != 1 || hd % 4 != 0 || heads % kv_heads != 0 || len == 0 || len > capacity {
        return None;
    }
    let (cq, ck, cv) = (cube(q)?, cube(cache_k)?, cube(cache_v)?);
    let (elem, enable) = elem(cq.dtype)?;
    if ck.dtype != cq.dtype || cv.dtype != cq.dtype {
        return None;
    }
    let group = (heads / kv_heads) as u32;
    let tiles = decode_tiles(group, hd as u32, limits)?;
    let chunks = (len as u32).div_ceil(tiles.chunk);
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let p = params(
        &cq,
        [
            heads as u32,
            kv_heads as u32,
            capacity as u32,
            len as u32,
            chunks,
            scale.to_bits(),
            0,
            0,
        ],
    );
    let part_o = empty_like(&cq, &[heads, chunks as usize, hd], DType::F32);
    let part_ml = empty_like(&cq, &[heads, chunks as usize, 2], DType::F32);
    let d4 = (hd / 4) as u32;
    let common = |extra: Vec<(&'static str, String)>| {
        let mut v = vec![
            ("elem", elem.to_string()),
            ("enable", enable.to_string()),
            ("d4", d4.to_string()),
        ];
        v.extend(extra);
        v
    };
    let pass1 = Wgsl {
        name: "attention_decode",
        text: DECODE,
        values: common(vec![
            ("wg", tiles.wg.to_string()),
            ("group", group.to_string()),
            ("chunk", tiles.chunk.to_string()),
            ("gd4", (group * d4).to_string()),
            ("gc", (group * tiles.chunk).to_string()),
            ("gwg", (group * tiles.wg).to_string()),
            ("g2", (2 * group).to_string()),
        ]),
    };
    launch(
        &cq,
        pass1,
        tiles.wg,
        (chunks, kv_heads as u32),
        vec![
            cq.handle.clone().binding(),
            ck.handle.clone().binding(),
            cv.handle.clone().binding(),
            part_o.handle.clone().binding(),
            part_ml.handle.clone().binding(),
            p.clone().binding(),
        ],
    );
    let out = empty_like(&cq, &[heads, 1, hd], cq.dtype);
    let wg2 = 64u32.min(pow2_floor(limits.max_invocations));
    let pass2 = Wgsl {
        name: "attention_decode_reduce",
        text: DECODE_REDUCE,
        values: common(vec![("wg", wg2.to_string())]),
    };
    launch(
        &cq,
        pass2,
        wg2,
        (heads as u32, 1),
        vec![
            part_o.handle.binding(),
            part_ml.handle.binding(),
            out.handle.clone().binding(),
            p.binding(),
        ],
    );
    Some(float(out))
}

/// Causal attention of `q` (`[heads, n, hd]`, positions `[p0, p0 + n)`) over
/// `cache[.., 0..p0 + n, ..]`; `None` off wgpu or when the shape does not fit the kernel.
pub fn attention_prefill(
    q: &Tensor<3>,
    cache_k: &Tensor<3>,
    cache_v: &Tensor<3>,
    p0: usize,
    limits: &Limits,
) -> Option<Tensor<3>> {
    let [heads, n, hd] = q.dims();
    let [kv_heads, capacity, _] = cache_k.dims();
    if hd % 4 != 0 || heads % kv_heads != 0 || n == 0 || p0 + n > capacity {
        return None;
    }
    let (cq, ck, cv) = (cube(q)?, cube(cache_k)?, cube(cache_v)?);
    let (elem, enable) = elem(cq.dtype)?;
    if ck.dtype != cq.dtype || cv.dtype != cq.dtype {
        return None;
    }
    let rows = 64u32.min(limits.max_invocations).max(1);
    // K and V tiles of `cols` keys each in workgroup memory, plus the 4-byte `wg_blocks`
    // (GL drivers refuse a pipeline even 4 bytes over the limit; found by `qwen-vl selftest`).
    let room = limits.max_shared.saturating_sub(4);
    let cols = (room / (2 * 4 * hd as u32)).clamp(1, 32);
    if 2 * 4 * cols * hd as u32 > room {
        return None;
    }
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let p = params(
        &cq,
        [
            heads as u32,
            kv_heads as u32,
            capacity as u32,
            n as u32,
            p0 as u32,
            scale.to_bits(),
            0,
            0,
        ],
    );
    let out = empty_like(&cq, &[heads, n, hd], cq.dtype);
    let d4 = (hd / 4) as u32;
    let kernel = Wgsl {
        name: "attention_prefill",
        text: PREFILL,
        values: vec![
            ("elem", elem.to_string()),
            ("enable", enable.to_string()),
            ("d4", d4.to_string()),
            ("rows", rows.to_string()),
            ("cols", cols.to_string()),
            ("tile", (cols * d4).to_string()),
        ],
    };
    launch(
        &cq,
        kernel,
        rows,
        ((n as u32).div_ceil(rows), heads as u32),
        vec![
            cq.handle.clone().binding(),
            ck.handle.binding(),
            cv.handle.binding(),
            out.handle.clone().binding(),
            p.binding(),
        ],
    );
    Some(float(out))
}

const MATVEC: &str = include_str!("../../shaders/matvec.wgsl");

/// `x` (`[1, in]`) times `w^T` (`w`: `[out, in]`, HF's Linear layout) -> `[1, out]`; `None` off
/// wgpu or when `in` is not a multiple of 4.
pub fn matvec(x: &Tensor<2>, w: &Tensor<2>, limits: &Limits) -> Option<Tensor<2>> {
    let [one, d_in] = x.dims();
    let [out, w_in] = w.dims();
    if one != 1 || d_in != w_in || d_in % 4 != 0 || out == 0 {
        return None;
    }
    let (cx, cw) = (cube(x)?, cube(w)?);
    let (elem, enable) = elem(cx.dtype)?;
    if cw.dtype != cx.dtype {
        return None;
    }
    let wg = pow2_floor(limits.matvec_wg.min(limits.max_invocations)).max(1);
    let rows = 8u32;
    let groups = (out as u32).div_ceil(rows);
    let gx = groups.min(65_535);
    let gy = groups.div_ceil(gx);
    let p = params(&cx, [out as u32, (d_in / 4) as u32, gx, 0, 0, 0, 0, 0]);
    let y = empty_like(&cx, &[1, out], cx.dtype);
    let kernel = Wgsl {
        name: "matvec",
        text: MATVEC,
        values: vec![
            ("elem", elem.to_string()),
            ("enable", enable.to_string()),
            ("wg", wg.to_string()),
            ("rows", rows.to_string()),
            ("rwg", (rows * wg).to_string()),
        ],
    };
    launch(
        &cx,
        kernel,
        wg,
        (gx, gy),
        vec![
            cx.handle.clone().binding(),
            cw.handle.clone().binding(),
            y.handle.clone().binding(),
            p.binding(),
        ],
    );
    Some(float(y))
}

const QMATVEC: &str = include_str!("../../shaders/qmatvec.wgsl");
const DEQUANT: &str = include_str!("../../shaders/dequant.wgsl");

/// Launches with the kernel's scalars in the launch's info uniform (bound after the buffers),
/// which cubecl caches by content: no host write, so no queue submission, per launch.
fn launch_info(
    like: &CubeTensor,
    kernel: Wgsl,
    wg: u32,
    count: (u32, u32),
    buffers: Vec<burn::cubecl::server::BufferBinding>,
    info: &[u32],
) {
    let mut words: Vec<u64> = info
        .chunks(2)
        .map(|p| u64::from(p[0]) | (u64::from(p.get(1).copied().unwrap_or(0)) << 32))
        .collect();
    // A uniform block is read in 16-byte rows.
    while words.len() % 2 != 0 {
        words.push(0);
    }
    like.client.launch(
        Box::new(SourceKernel::new(kernel, CubeDim::new_1d(wg))),
        CubeCount::Static(count.0, count.1, 1),
        KernelArguments::new()
            .with_buffers(buffers)
            .with_info(burn::cubecl::server::MetadataBindingInfo::custom(words)),
    );
}

/// An int tensor's wgpu primitive, contiguous; `None` off wgpu.
fn cube_int<const D: usize>(t: &Tensor<D, burn::tensor::Int>) -> Option<CubeTensor> {
    let c = t.clone().try_into_primitive::<Cube>().ok()?;
    Some(if c.is_contiguous() {
        c
    } else {
        into_contiguous(c)
    })
}

/// Template values for reading a quantized weight's scales (f16 pairs or f32).
fn scale_values(dtype: DType) -> Option<Vec<(&'static str, String)>> {
    let (elem, decl, read, check) = match dtype {
        DType::F16 => (
            "u32",
            "f16 pairs in u32 words, read with unpack2x16float (no shader-f16 needed)",
            "let p = unpack2x16float(s[i / 2u]); return select(p.x, p.y, (i & 1u) == 1u);",
            "si / 2u < s_len",
        ),
        DType::F32 => ("f32", "f32", "return s[i];", "si < s_len"),
        _ => return None,
    };
    Some(vec![
        ("scale_elem", elem.into()),
        ("scale_decl", decl.into()),
        ("scale_read", read.into()),
        ("s_index_check", check.into()),
    ])
}

/// `x` (`[1, in]`) times the dequantized `w^T` -> `[1, out]`; `None` off wgpu or when `in` is
/// not a multiple of 4 (then the caller dequantizes and multiplies with Burn).
pub fn qmatvec(
    x: &Tensor<2>,
    w: &super::weight::QuantWeight,
    limits: &Limits,
) -> Option<Tensor<2>> {
    use crate::quant::{groups_per_row, Scheme};
    let [one, d_in] = x.dims();
    if one != 1 || d_in != w.cols || d_in % 4 != 0 || w.rows == 0 {
        return None;
    }
    let (cx, cq, cs) = (cube(x)?, cube_int(&w.words)?, cube(&w.scales)?);
    let (elem, enable) = elem(cx.dtype)?;
    let mut values = scale_values(cs.dtype)?;
    let wg = pow2_floor(limits.matvec_wg.min(limits.max_invocations)).max(1);
    // Workgroup memory holds rows x wg partial sums.
    let mut rows = limits.qmatvec_rows.max(1);
    while rows > 1 && rows * wg * 4 > limits.max_shared {
        rows /= 2;
    }
    let groups = groups_per_row(d_in) as u32;
    let count = (w.rows as u32).div_ceil(rows);
    let gx = count.min(65_535);
    let gy = count.div_ceil(gx);
    let (vpg, prologue, dot) = match w.scheme {
        Scheme::Q4 => (
            1,
            "var xsum = 0.0;\n        for (var i = 0u; i < 8u; i++) { xsum += dot(xs[i], vec4<f32>(1.0)); }",
            "let w = q[qi];\n                let d = dot_q4(w.x, xs[0], xs[1]) + dot_q4(w.y, xs[2], xs[3]) + dot_q4(w.z, xs[4], xs[5]) + dot_q4(w.w, xs[6], xs[7]);\n                acc[r] += scale(si) * (d - 8.0 * xsum);",
        ),
        Scheme::Q8 => (
            2,
            "",
            "let w0 = q[qi];\n                let w1 = q[qi + 1u];\n                let d = dot_q8(w0.x, xs[0]) + dot_q8(w0.y, xs[1]) + dot_q8(w0.z, xs[2]) + dot_q8(w0.w, xs[3]) + dot_q8(w1.x, xs[4]) + dot_q8(w1.y, xs[5]) + dot_q8(w1.z, xs[6]) + dot_q8(w1.w, xs[7]);\n                acc[r] += scale(si) * d;",
        ),
    };
    values.extend([
        ("elem", elem.to_string()),
        ("enable", enable.to_string()),
        ("wg", wg.to_string()),
        ("rows", rows.to_string()),
        ("rwg", (rows * wg).to_string()),
        ("vpg", vpg.to_string()),
        ("group_prologue", prologue.to_string()),
        ("group_dot", dot.to_string()),
    ]);
    let y = empty_like(&cx, &[1, w.rows], cx.dtype);
    let kernel = Wgsl {
        name: "qmatvec",
        text: QMATVEC,
        values,
    };
    launch_info(
        &cx,
        kernel,
        wg,
        (gx, gy),
        vec![
            cx.handle.clone().binding(),
            cq.handle.clone().binding(),
            cs.handle.clone().binding(),
            y.handle.clone().binding(),
        ],
        &[w.rows as u32, (d_in / 4) as u32, groups, gx],
    );
    Some(float(y))
}

/// Dequantizes rows of `w` into a `[n, cols]` tensor of `dtype`: every row (`ids` `None`) or
/// the rows `ids` (an embedding lookup). `None` off wgpu.
pub fn dequantize(
    w: &super::weight::QuantWeight,
    ids: Option<&[u32]>,
    dtype: DType,
    limits: &Limits,
) -> Option<Tensor<2>> {
    use crate::quant::{groups_per_row, Scheme};
    let (cq, cs) = (cube_int(&w.words)?, cube(&w.scales)?);
    let (elem, enable) = elem(dtype)?;
    let mut values = scale_values(cs.dtype)?;
    let n = ids.map_or(w.rows, |i| i.len());
    if n == 0 || w.cols == 0 {
        return None;
    }
    let words = w.scheme.words_per_row(w.cols);
    let per_word = w.scheme.per_word();
    let element = match w.scheme {
        Scheme::Q4 => {
            "let sh = 8u * (j & 3u) + 4u * (j >> 2u);\n    return f32((w >> sh) & 15u) - 8.0;"
        }
        Scheme::Q8 => "return f32(bitcast<i32>(w << (24u - 8u * j)) >> 24u);",
    };
    let ids_tensor = ids.map(|ids| {
        let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        Tensor::<1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(v, [ids.len()]),
            (&w.words.device(), DType::I32),
        )
    });
    let cids = match &ids_tensor {
        Some(t) => Some(cube_int(t)?),
        None => None,
    };
    let (ids_decl, info_binding) = if cids.is_some() {
        (
            "@group(0) @binding(3) var<storage, read_write> ids: array<u32>;\nfn src_of(r: u32) -> u32 {\n    if (r < arrayLength(&ids)) {\n        return ids[r];\n    }\n    return 0xffffffffu;\n}",
            4,
        )
    } else {
        ("fn src_of(r: u32) -> u32 {\n    return r;\n}", 3)
    };
    let wg = 64u32.min(pow2_floor(limits.max_invocations));
    let total = (n * words) as u32;
    let count = total.div_ceil(wg).max(1);
    let gx = count.min(65_535);
    let gy = count.div_ceil(gx);
    values.extend([
        ("elem", elem.to_string()),
        ("enable", enable.to_string()),
        ("wg", wg.to_string()),
        ("per_word", per_word.to_string()),
        ("element", element.to_string()),
        ("gather", cids.is_some().to_string()),
        ("ids_decl", ids_decl.to_string()),
        ("info_binding", info_binding.to_string()),
    ]);
    let out = empty_like(&cq, &[n, w.cols], dtype);
    let mut buffers = vec![
        cq.handle.clone().binding(),
        cs.handle.clone().binding(),
        out.handle.clone().binding(),
    ];
    if let Some(c) = &cids {
        buffers.push(c.handle.clone().binding());
    }
    launch_info(
        &cq,
        Wgsl {
            name: "dequant",
            text: DEQUANT,
            values,
        },
        wg,
        (gx, gy),
        buffers,
        &[
            n as u32,
            w.cols as u32,
            words as u32,
            groups_per_row(w.cols) as u32,
            w.rows as u32,
            gx,
            0,
            0,
        ],
    );
    Some(float(out))
}
