//! Weight-only, group-wise quantization of Linear weights (8-bit and 4-bit): the schemes, the
//! host-side quantizer and packer, and the `quantization_config` of a quantized checkpoint.
//!
//! Layout (what the WGSL kernels read; see README "Quantized checkpoints"): a weight `[out, in]`
//! is cut into groups of [`GROUP`] consecutive inputs of one row (the last group of a row is
//! zero-padded when `in` is not a multiple of 32). Each group has one scale `d` and 32 small
//! integers `q`:
//! - `q8`: `w = d * q`, `q` in `[-127, 127]`, `d = max|w| / 127`; four `q` per u32 word, element
//!   `4k + j` in byte `j` of word `k` (two's complement).
//! - `q4`: `w = d * (q - 8)`, `q` in `[0, 15]`; eight `q` per word, element `8k + j` in the low
//!   nibble of byte `j` and element `8k + 4 + j` in its high nibble. `d` starts from ggml's Q4_0
//!   rule `-m / 8` (`m` the group's value of largest magnitude, which then maps to `q = 0`
//!   exactly) and is replaced by a nearby scale when that has a smaller squared error over the
//!   group (see `search_q4_scale`); the layout does not depend on how `d` was chosen.
//!
//! Words are stored `[out, words_per_row]` (row-major, like the dense weight), scales
//! `[out, groups_per_row]` as f16. Why planar words: WGSL has no 8-bit loads and ggml's 34/18-byte
//! blocks are not 4-byte aligned, so a q4 group is exactly one `vec4<u32>` load (two for q8) and
//! the nibble order makes the low and high nibbles of a word two `vec4` of consecutive inputs.
//! Scales are rounded to f16 before the integers are chosen, so f16 and f32 scale storage give
//! the same numbers.

use half::f16;
use serde_json::Value;

/// Inputs per scale.
pub const GROUP: usize = 32;

/// `quant_method` of the checkpoints [`write`](crate::quantize) produces.
pub const QUANT_METHOD: &str = "qwen_vl_webgpu";

/// Version of the packed layout described above.
pub const FORMAT_VERSION: u64 = 1;

/// A quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Scheme {
    /// 8-bit signed integers, one f16 scale per 32 inputs.
    #[serde(rename = "q8")]
    Q8,
    /// 4-bit integers with offset 8, one f16 scale per 32 inputs.
    #[serde(rename = "q4")]
    Q4,
}

impl Scheme {
    /// The scheme's name as flags and config.json spell it.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Q8 => "q8",
            Scheme::Q4 => "q4",
        }
    }

    /// Parses `q8` / `q4`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "q8" => Some(Scheme::Q8),
            "q4" => Some(Scheme::Q4),
            _ => None,
        }
    }

    /// Integers per u32 word.
    pub fn per_word(self) -> usize {
        match self {
            Scheme::Q8 => 4,
            Scheme::Q4 => 8,
        }
    }

    /// Words per row of a weight with `cols` inputs.
    pub fn words_per_row(self, cols: usize) -> usize {
        groups_per_row(cols) * GROUP / self.per_word()
    }

    /// Device bytes of a `[rows, cols]` weight: words plus scales of `scale_bytes` each.
    pub fn bytes(self, rows: usize, cols: usize, scale_bytes: usize) -> usize {
        rows * (4 * self.words_per_row(cols) + scale_bytes * groups_per_row(cols))
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Groups (scales) per row of a weight with `cols` inputs.
pub fn groups_per_row(cols: usize) -> usize {
    cols.div_ceil(GROUP)
}

/// Whether a tensor is stored quantized by `--quant` / `qwen-vl quantize`: every matrix the
/// model multiplies by (decoder and vision Linears, the patch embedding, the merger, the
/// embedding table and lm_head). Norms and biases (1-D) and Qwen3-VL's vision position table
/// (interpolated, not multiplied) stay as they are. `name` is canonical (see
/// [`canonical_name`](crate::weights::canonical_name)).
pub fn quantizable(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && name.ends_with(".weight") && name != "visual.pos_embed.weight"
}

/// A quantized `[rows, cols]` weight on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The scheme.
    pub scheme: Scheme,
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs) before padding.
    pub cols: usize,
    /// `[rows, words_per_row]`.
    pub words: Vec<u32>,
    /// `[rows, groups_per_row]`.
    pub scales: Vec<f16>,
}

/// Quantization failures (the weight itself cannot be represented).
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A value is NaN or infinite, or so large that its scale overflows f16.
    #[error("row {row} has a value ({value}) that cannot be quantized: f16 scales hold magnitudes up to {max}; the tensor is corrupt or not a weight")]
    Unrepresentable {
        /// Row of the weight.
        row: usize,
        /// The value.
        value: f32,
        /// Largest magnitude a group may have.
        max: f32,
    },
}

/// Quantizes row-major `data` (`[rows, cols]`) with `scheme`; rows run in parallel on native
/// targets (a 2B model's q4 scale search is minutes on one core).
pub fn quantize(
    scheme: Scheme,
    data: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Packed, QuantError> {
    debug_assert_eq!(data.len(), rows * cols);
    let groups = groups_per_row(cols);
    let wpr = scheme.words_per_row(cols);
    let mut words = vec![0u32; rows * wpr];
    let mut scales = vec![f16::ZERO; rows * groups];
    if cols > 0 {
        let row_job = |(r, ((w, s), row)): (usize, ((&mut [u32], &mut [f16]), &[f32]))| {
            quantize_row(scheme, row, w, s).map_err(|v| unrepresentable(scheme, r, v))
        };
        #[cfg(not(target_arch = "wasm32"))]
        {
            use rayon::prelude::*;
            words
                .par_chunks_mut(wpr)
                .zip(scales.par_chunks_mut(groups))
                .zip(data.par_chunks(cols))
                .enumerate()
                .try_for_each(row_job)?;
        }
        #[cfg(target_arch = "wasm32")]
        words
            .chunks_mut(wpr)
            .zip(scales.chunks_mut(groups))
            .zip(data.chunks(cols))
            .enumerate()
            .try_for_each(row_job)?;
    }
    Ok(Packed {
        scheme,
        rows,
        cols,
        words,
        scales,
    })
}

/// Quantizes one row into its words and scales; `Err` carries a value that cannot be
/// represented (not finite, or a group whose scale overflows f16).
fn quantize_row(
    scheme: Scheme,
    row: &[f32],
    words: &mut [u32],
    scales: &mut [f16],
) -> Result<(), f32> {
    let mut q = [0u8; GROUP];
    for (g, (chunk, scale)) in row.chunks(GROUP).zip(scales.iter_mut()).enumerate() {
        // The value of largest magnitude (first one on ties), with its sign.
        let mut m = 0f32;
        for &v in chunk {
            if !v.is_finite() {
                return Err(v);
            }
            if v.abs() > m.abs() {
                m = v;
            }
        }
        let d = match scheme {
            Scheme::Q8 => f16::from_f32(m.abs() / 127.0),
            Scheme::Q4 => f16::from_f32(-m / 8.0),
        };
        if !d.is_finite() {
            return Err(m);
        }
        let d = match scheme {
            Scheme::Q8 => d,
            Scheme::Q4 => search_q4_scale(chunk, m, d),
        };
        *scale = d;
        let d = d.to_f32();
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        q.fill(match scheme {
            Scheme::Q8 => 0,
            Scheme::Q4 => 8,
        });
        for (j, &v) in chunk.iter().enumerate() {
            q[j] = match scheme {
                Scheme::Q8 => (round(v * inv).clamp(-127.0, 127.0) as i8) as u8,
                Scheme::Q4 => (round(v * inv) + 8.0).clamp(0.0, 15.0) as u8,
            };
        }
        let out = &mut words[g * GROUP / scheme.per_word()..];
        match scheme {
            Scheme::Q8 => {
                for (k, w) in out.iter_mut().take(GROUP / 4).enumerate() {
                    *w = u32::from_le_bytes([q[4 * k], q[4 * k + 1], q[4 * k + 2], q[4 * k + 3]]);
                }
            }
            Scheme::Q4 => {
                for (k, w) in out.iter_mut().take(GROUP / 8).enumerate() {
                    let e = &q[8 * k..8 * k + 8];
                    *w = (0..4).fold(0u32, |acc, j| {
                        acc | (u32::from(e[j]) << (8 * j)) | (u32::from(e[4 + j]) << (8 * j + 4))
                    });
                }
            }
        }
    }
    Ok(())
}

/// `x.round()` (half away from zero), exactly, for |x| < 2^31 (larger magnitudes come out
/// larger than any clamp bound, with their sign). On x86-64's baseline `f32::round` is a libm
/// call, and rounding is most of the q4 scale search's time.
fn round(x: f32) -> f32 {
    let a = x.abs();
    let t = a as i32 as f32;
    let r = t + f32::from(u8::from(a - t >= 0.5));
    r.copysign(x)
}

/// Squared error of a q4 group quantized with scale `d` (the integers chosen by rounding).
fn q4_error(chunk: &[f32], d: f32) -> f32 {
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    chunk
        .iter()
        .map(|&v| {
            let q = round(v * inv).clamp(-8.0, 7.0);
            (v - d * q).powi(2)
        })
        .sum()
}

/// Candidate divisors of the q4 scale search: `8 + 0.1 k` for `k = -10..=10`, padded to a
/// multiple of 8 lanes (the padding is never chosen).
const CANDIDATES: usize = 21;
const LANES: usize = 24;

/// The q4 scale of least squared error among the rule's `d0 = -m / 8` and nearby candidates
/// (divisors 7 to 9 in steps of 0.1, each also refitted by least squares to its integers), all
/// rounded to f16 as stored. `d0` wins ties, so values it represents exactly stay exact. The
/// format is unchanged (ggml's Q4_0 layout); only the choice of `d` is better, as in ggml's
/// `make_qx_quants`. Measured on the micro model (200 scenes): see the README.
///
/// Every candidate's sums run over the group in element order, all candidates in one pass (so
/// the work vectorizes across candidates instead of waiting on one sum's additions); the winner
/// is the first strictly smaller error in the order d0, then per divisor its own scale and its
/// refit.
fn search_q4_scale(chunk: &[f32], m: f32, d0: f16) -> f16 {
    let e0 = q4_error(chunk, d0.to_f32());
    if e0 == 0.0 {
        return d0;
    }
    let mut d = [f16::ZERO; LANES];
    let (mut dr, mut inv_d, mut inv_raw) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for i in 0..CANDIDATES {
        let raw = -m / (8.0 + 0.1 * (i as i32 - 10) as f32);
        d[i] = f16::from_f32(raw);
        if d[i].is_finite() {
            dr[i] = d[i].to_f32();
            inv_d[i] = if dr[i] == 0.0 { 0.0 } else { 1.0 / dr[i] };
        }
        inv_raw[i] = 1.0 / raw;
    }
    // Each candidate's error, and the sums of its least-squares refit.
    let (mut e, mut xl, mut ll) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for &v in chunk {
        for i in 0..LANES {
            let q = round(v * inv_d[i]).clamp(-8.0, 7.0);
            e[i] += (v - dr[i] * q).powi(2);
            let l = round(v * inv_raw[i]).clamp(-8.0, 7.0);
            xl[i] += v * l;
            ll[i] += l * l;
        }
    }
    let mut refit = [None; LANES];
    let (mut rr, mut inv_r) = ([0f32; LANES], [0f32; LANES]);
    for i in 0..CANDIDATES {
        if ll[i] > 0.0 {
            let r = f16::from_f32(xl[i] / ll[i]);
            if r.is_finite() {
                refit[i] = Some(r);
                rr[i] = r.to_f32();
                inv_r[i] = if rr[i] == 0.0 { 0.0 } else { 1.0 / rr[i] };
            }
        }
    }
    let mut er = [0f32; LANES];
    for &v in chunk {
        for i in 0..LANES {
            let q = round(v * inv_r[i]).clamp(-8.0, 7.0);
            er[i] += (v - rr[i] * q).powi(2);
        }
    }
    let mut best = (e0, d0);
    for i in 0..CANDIDATES {
        if d[i].is_finite() && e[i] < best.0 {
            best = (e[i], d[i]);
        }
        if let Some(r) = refit[i] {
            if er[i] < best.0 {
                best = (er[i], r);
            }
        }
    }
    best.1
}

fn unrepresentable(scheme: Scheme, row: usize, value: f32) -> QuantError {
    let max = match scheme {
        Scheme::Q8 => f16::MAX.to_f32() * 127.0,
        Scheme::Q4 => f16::MAX.to_f32() * 8.0,
    };
    QuantError::Unrepresentable { row, value, max }
}

/// The integer of element `e` of a row's words, with the scheme's offset removed.
pub fn element(scheme: Scheme, row_words: &[u32], e: usize) -> i32 {
    let w = row_words[e / scheme.per_word()];
    match scheme {
        Scheme::Q8 => i32::from((w >> (8 * (e % 4))) as u8 as i8),
        Scheme::Q4 => {
            let j = e % 8;
            let shift = 8 * (j % 4) + 4 * (j / 4);
            ((w >> shift) & 15) as i32 - 8
        }
    }
}

impl Packed {
    /// Row-major f32 values `[rows, cols]` (the reference the kernels are tested against).
    pub fn dequantize(&self) -> Vec<f32> {
        let (wpr, groups) = (
            self.scheme.words_per_row(self.cols),
            groups_per_row(self.cols),
        );
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            let words = &self.words[r * wpr..(r + 1) * wpr];
            for c in 0..self.cols {
                let d = self.scales[r * groups + c / GROUP].to_f32();
                out.push(d * element(self.scheme, words, c) as f32);
            }
        }
        out
    }
}

/// What config.json's `quantization_config` says about a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    /// The scheme its packed tensors use.
    pub scheme: Scheme,
}

impl QuantConfig {
    /// The `quantization_config` object written into config.json.
    pub fn to_json(self) -> Value {
        serde_json::json!({
            "quant_method": QUANT_METHOD,
            "scheme": self.scheme.name(),
            "group_size": GROUP,
            "format_version": FORMAT_VERSION,
            "scale_dtype": "float16",
        })
    }

    /// Reads a `quantization_config` value; `Err` carries the field and what is wrong with it.
    pub fn from_json(v: &Value) -> Result<Self, (String, String)> {
        let field = |k: &str| format!("quantization_config.{k}");
        let obj = v.as_object().ok_or_else(|| {
            (
                "quantization_config".to_string(),
                "must be an object".to_string(),
            )
        })?;
        let method = obj
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("");
        if method != QUANT_METHOD {
            return Err((
                field("quant_method"),
                format!(
                    "is {}; this runtime reads only its own quantized checkpoints ({QUANT_METHOD:?}, written by `qwen-vl quantize`): load the unquantized checkpoint, optionally with --quant q8|q4",
                    obj.get("quant_method").cloned().unwrap_or(Value::Null)
                ),
            ));
        }
        let version = obj.get("format_version").and_then(Value::as_u64);
        if version != Some(FORMAT_VERSION) {
            return Err((
                field("format_version"),
                format!(
                    "is {}; this runtime reads format {FORMAT_VERSION}: quantize the checkpoint again with this version of `qwen-vl quantize`",
                    obj.get("format_version").cloned().unwrap_or(Value::Null)
                ),
            ));
        }
        let scheme = obj.get("scheme").and_then(Value::as_str).unwrap_or("");
        let scheme = Scheme::parse(scheme).ok_or_else(|| {
            (
                field("scheme"),
                format!(
                    "is {}; known schemes are \"q8\" and \"q4\"",
                    obj.get("scheme").cloned().unwrap_or(Value::Null)
                ),
            )
        })?;
        if obj.get("group_size").and_then(Value::as_u64) != Some(GROUP as u64) {
            return Err((
                field("group_size"),
                format!(
                    "is {}; this runtime's packed layout uses groups of {GROUP}",
                    obj.get("group_size").cloned().unwrap_or(Value::Null)
                ),
            ));
        }
        if let Some(s) = obj.get("scale_dtype") {
            if s.as_str() != Some("float16") {
                return Err((
                    field("scale_dtype"),
                    format!("is {s}; scales are stored as \"float16\""),
                ));
            }
        }
        Ok(QuantConfig { scheme })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn fast_round_equals_f32_round() {
        let mut xs = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            7.5,
            -8.5,
            126.5,
            0.49999997,
            -0.49999997,
        ];
        xs.extend((-40_000..40_000).map(|i| i as f32 * 0.003_7));
        xs.extend([1e9f32, -1e9, 3e9, -3e9, f32::MAX, f32::MIN]);
        for x in xs {
            let (got, want) = (round(x), x.round());
            let same = if want.abs() < 2_147_483_520.0 {
                got == want && got.is_sign_negative() == want.is_sign_negative()
            } else {
                // Past i32's range only the clamp's side matters.
                got.signum() == want.signum() && got.abs() >= 127.0
            };
            assert!(same, "round({x}) = {got}, f32::round gives {want}");
        }
    }

    #[test]
    fn q8_error_is_within_half_a_step_and_q4_beats_the_plain_rule() {
        for scheme in [Scheme::Q8, Scheme::Q4] {
            for cols in [1, 31, 32, 33, 100] {
                let rows = 3;
                let data = ramp(rows * cols, cols as u32);
                let p = quantize(scheme, &data, rows, cols).expect("finite");
                let back = p.dequantize();
                for r in 0..rows {
                    for g in 0..groups_per_row(cols) {
                        let range = g * GROUP..((g + 1) * GROUP).min(cols);
                        let d = p.scales[r * groups_per_row(cols) + g].to_f32().abs();
                        let err: f32 = range
                            .clone()
                            .map(|c| (back[r * cols + c] - data[r * cols + c]).powi(2))
                            .sum();
                        let chunk = &data[r * cols + range.start..r * cols + range.end];
                        match scheme {
                            Scheme::Q8 => {
                                // Half a step per value, plus the f16 rounding of the scale.
                                let bound = (0.5 * d + 128.0 * d * 1e-3 + 1e-7).powi(2)
                                    * chunk.len() as f32;
                                assert!(
                                    err <= bound,
                                    "q8 cols {cols} row {r} group {g}: {err} > {bound}"
                                );
                            }
                            Scheme::Q4 => {
                                let m =
                                    chunk
                                        .iter()
                                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                                let plain = q4_error(chunk, f16::from_f32(-m / 8.0).to_f32());
                                assert!(
                                    err <= plain * (1.0 + 1e-5) + 1e-12,
                                    "q4 cols {cols} row {r} group {g}: searched scale error {err} > plain rule's {plain}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q4_maps_the_largest_magnitude_exactly_and_packs_nibbles_in_documented_order() {
        let mut data = vec![0f32; 32];
        data[0] = -2.0; // m: d = 0.25, q = 0
        data[1] = 0.25; // q = 9
        data[4] = 1.0; // q = 12, high nibble of byte 0
        let p = quantize(Scheme::Q4, &data, 1, 32).expect("finite");
        assert_eq!(p.scales[0].to_f32(), 0.25);
        assert_eq!(
            p.words[0] & 0xff,
            0x0 | (12 << 4),
            "byte 0: element 0 low, element 4 high"
        );
        assert_eq!((p.words[0] >> 8) & 0xf, 9, "byte 1 low nibble: element 1");
        let back = p.dequantize();
        assert_eq!(&back[..5], &[-2.0, 0.25, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn q8_is_symmetric_and_little_endian() {
        let mut data = vec![0f32; 32];
        data[0] = 1.27;
        data[1] = -1.27;
        data[5] = 0.01;
        let p = quantize(Scheme::Q8, &data, 1, 32).expect("finite");
        assert_eq!(p.words[0] & 0xff, 127);
        assert_eq!((p.words[0] >> 8) & 0xff, (-127i8) as u8 as u32);
        assert_eq!(element(Scheme::Q8, &p.words, 5), 1);
    }

    #[test]
    fn non_finite_values_are_refused() {
        let data = [1.0, f32::NAN, 0.0];
        let e = quantize(Scheme::Q8, &data, 1, 3).expect_err("NaN");
        assert!(e.to_string().contains("row 0"), "{e}");
        let e = quantize(Scheme::Q4, &[1e30], 1, 1).expect_err("overflow");
        assert!(e.to_string().contains("f16 scales"), "{e}");
    }

    #[test]
    fn config_round_trips_and_foreign_methods_are_named() {
        for scheme in [Scheme::Q8, Scheme::Q4] {
            let c = QuantConfig { scheme };
            assert_eq!(QuantConfig::from_json(&c.to_json()), Ok(c));
        }
        let awq = serde_json::json!({"quant_method": "awq", "bits": 4});
        let (field, msg) = QuantConfig::from_json(&awq).expect_err("awq");
        assert_eq!(field, "quantization_config.quant_method");
        assert!(msg.contains("awq"), "{msg}");
        let mut odd = QuantConfig { scheme: Scheme::Q4 }.to_json();
        odd["scheme"] = "q3".into();
        assert_eq!(
            QuantConfig::from_json(&odd).expect_err("q3").0,
            "quantization_config.scheme"
        );
    }
}
