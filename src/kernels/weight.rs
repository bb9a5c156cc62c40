//! A matrix the model multiplies by: dense (an f32/f16 tensor) or quantized (packed words plus
//! scales, see [`crate::quant`]), chosen at load. Linear layers, the embedding lookup and lm_head
//! all go through [`Weight::matmul_t`] and [`Weight::rows`], which pick the WGSL kernels on wgpu
//! and the plain-Burn path elsewhere; a quantized weight is never dequantized as a whole except
//! into a temporary for one multiplication of several rows (prefill, the vision tower).

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use half::f16;

use super::wgsl;
use crate::device::Limits;
use crate::quant::{groups_per_row, Packed, Scheme, GROUP};

/// A quantized `[rows, cols]` weight on a device.
#[derive(Clone)]
pub struct QuantWeight {
    /// The scheme.
    pub scheme: Scheme,
    /// `[rows, words_per_row]`, the packed u32 words reinterpreted as i32.
    pub words: Tensor<2, Int>,
    /// `[rows * groups_per_row]` (plus one f16 of padding when that count is odd, so the buffer
    /// is whole u32s), f16 or f32.
    pub scales: Tensor<1>,
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs) before padding.
    pub cols: usize,
}

/// A matrix `[out, in]` in HF's Linear layout.
#[derive(Clone)]
pub enum Weight {
    /// Full precision (the model's dtype).
    Dense(Tensor<2>),
    /// Group-quantized.
    Quant(QuantWeight),
}

impl Weight {
    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Weight::Dense(w) => w.dims(),
            Weight::Quant(q) => [q.rows, q.cols],
        }
    }

    /// Device bytes it occupies.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(w) => w.shape().num_elements() * w.dtype().size(),
            Weight::Quant(q) => {
                q.words.shape().num_elements() * 4
                    + q.scales.shape().num_elements() * q.scales.dtype().size()
            }
        }
    }

    /// The scheme, or `None` when dense.
    pub fn scheme(&self) -> Option<Scheme> {
        match self {
            Weight::Dense(_) => None,
            Weight::Quant(q) => Some(q.scheme),
        }
    }

    /// `x @ w^T`: `[n, in] -> [n, out]`. One row (decode) goes through a WGSL matvec on wgpu
    /// (the dequantizing one for a quantized weight); several rows through Burn's matmul, after
    /// dequantizing a quantized weight into a temporary. On the CPU backend a quantized weight
    /// goes through the row-by-row kernel of [`super::cpu`]; the plain-Burn dequantization is
    /// what remains for wgpu with the WGSL kernels switched off.
    pub fn matmul_t(&self, x: Tensor<2>, limits: &Limits) -> Tensor<2> {
        let one_row = x.dims()[0] == 1;
        match self {
            Weight::Dense(w) => {
                if limits.wgsl_kernels && one_row {
                    if let Some(y) = wgsl::matvec(&x, w, limits) {
                        return y;
                    }
                }
                x.matmul(w.clone().transpose())
            }
            Weight::Quant(q) => {
                if limits.wgsl_kernels && one_row {
                    if let Some(y) = wgsl::qmatvec(&x, q, limits) {
                        return y;
                    }
                }
                #[cfg(not(target_arch = "wasm32"))]
                if let Some(y) = super::cpu::matmul_t(&x, q) {
                    return y;
                }
                let w = q.dequantize(x.dtype(), limits);
                x.matmul(w.transpose())
            }
        }
    }

    /// Rows `ids` (each `< out`, checked by the caller): `[n, in]` in `dtype`.
    pub fn rows(&self, ids: &[u32], dtype: DType, limits: &Limits) -> Tensor<2> {
        match self {
            Weight::Dense(w) => w.clone().select(0, index(ids, &w.device())),
            Weight::Quant(q) => q.rows(ids, dtype, limits),
        }
    }

    /// The whole matrix in `dtype` (tests, tools; the model never calls it on a whole table).
    pub fn to_dense(&self, dtype: DType, limits: &Limits) -> Tensor<2> {
        match self {
            Weight::Dense(w) => w.clone(),
            Weight::Quant(q) => q.dequantize(dtype, limits),
        }
    }
}

fn index(ids: &[u32], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let n = v.len();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

impl QuantWeight {
    /// Uploads a packed weight; scales become `scale_dtype` (f16 or f32).
    pub fn upload(p: &Packed, device: &Device, scale_dtype: DType) -> Self {
        let wpr = p.scheme.words_per_row(p.cols);
        let words: Vec<i32> = p.words.iter().map(|&w| w as i32).collect();
        let words = Tensor::<2, Int>::from_data(
            TensorData::new(words, [p.rows, wpr]),
            (device, DType::I32),
        );
        let scales = if scale_dtype == DType::F16 {
            let mut s = p.scales.clone();
            if s.len() % 2 == 1 {
                s.push(f16::ZERO);
            }
            let n = s.len();
            Tensor::<1>::from_data(TensorData::new(s, [n]), (device, DType::F16))
        } else {
            let s: Vec<f32> = p.scales.iter().map(|s| s.to_f32()).collect();
            let n = s.len();
            Tensor::<1>::from_data(TensorData::new(s, [n]), (device, DType::F32))
        };
        QuantWeight {
            scheme: p.scheme,
            words,
            scales,
            rows: p.rows,
            cols: p.cols,
        }
    }

    /// Dequantized `[rows, cols]` in `dtype`: the WGSL kernel on wgpu, plain Burn elsewhere.
    pub fn dequantize(&self, dtype: DType, limits: &Limits) -> Tensor<2> {
        if limits.wgsl_kernels {
            if let Some(w) = wgsl::dequantize(self, None, dtype, limits) {
                return w;
            }
        }
        self.dequantize_burn(self.words.clone(), 0..self.rows, dtype)
    }

    /// Dequantized rows `ids`: `[n, cols]` in `dtype`.
    pub fn rows(&self, ids: &[u32], dtype: DType, limits: &Limits) -> Tensor<2> {
        if limits.wgsl_kernels {
            if let Some(w) = wgsl::dequantize(self, Some(ids), dtype, limits) {
                return w;
            }
        }
        let device = self.words.device();
        let words = self.words.clone().select(0, index(ids, &device));
        // The scales of the selected rows, gathered the same way.
        let groups = groups_per_row(self.cols);
        let scales = self.scale_matrix().select(0, index(ids, &device));
        dequantize_parts(self.scheme, words, scales, groups, self.cols, dtype)
    }

    /// Scales as `[rows, groups]`.
    fn scale_matrix(&self) -> Tensor<2> {
        let groups = groups_per_row(self.cols);
        self.scales
            .clone()
            .slice(0..self.rows * groups)
            .reshape([self.rows, groups])
    }

    fn dequantize_burn(
        &self,
        words: Tensor<2, Int>,
        rows: std::ops::Range<usize>,
        dtype: DType,
    ) -> Tensor<2> {
        let groups = groups_per_row(self.cols);
        let scales = self.scale_matrix().slice([rows, 0..groups]);
        dequantize_parts(self.scheme, words, scales, groups, self.cols, dtype)
    }
}

/// Plain-Burn dequantization of `words` (`[n, words_per_row]`) with `scales` (`[n, groups]`).
fn dequantize_parts(
    scheme: Scheme,
    words: Tensor<2, Int>,
    scales: Tensor<2>,
    groups: usize,
    cols: usize,
    dtype: DType,
) -> Tensor<2> {
    let [n, wpr] = words.dims();
    let byte = |k: usize| {
        words
            .clone()
            .bitwise_right_shift_scalar(8 * k as i64)
            .bitwise_and_scalar(0xff)
    };
    // [n, wpr, per_word] integers with the offset removed, element order as documented.
    let ints: Tensor<3, Int> = match scheme {
        Scheme::Q8 => {
            let parts = (0..4)
                .map(|k| {
                    let b = byte(k);
                    // Two's complement: bytes >= 128 are negative.
                    b.clone() - b.bitwise_right_shift_scalar(7).mul_scalar(256)
                })
                .collect();
            Tensor::stack(parts, 2)
        }
        Scheme::Q4 => {
            let lo = (0..4).map(|j| byte(j).bitwise_and_scalar(15));
            let hi = (0..4).map(|j| byte(j).bitwise_right_shift_scalar(4));
            Tensor::stack(lo.chain(hi).map(|t| t.sub_scalar(8)).collect(), 2)
        }
    };
    let per_word = scheme.per_word();
    let values = ints.reshape([n, groups, GROUP]).float().cast(DType::F32);
    debug_assert_eq!(wpr * per_word, groups * GROUP);
    let scales = scales.cast(DType::F32).reshape([n, groups, 1]);
    let w = (values * scales).reshape([n, groups * GROUP]);
    let w = if groups * GROUP == cols {
        w
    } else {
        w.slice([0..n, 0..cols])
    };
    if dtype == DType::F32 {
        w
    } else {
        w.cast(dtype)
    }
}
