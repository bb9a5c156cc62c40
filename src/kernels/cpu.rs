//! The quantized matrix product on Burn's CPU backend (`flex`): the CPU's counterpart of
//! `shaders/qmatvec.wgsl`. It reads the packed words and scales in place (the flex tensor's
//! host memory), dequantizes one weight row at a time into a small buffer and multiplies it by
//! every input row, in parallel over weight rows. The plain-Burn path it replaces dequantized
//! the whole matrix through a dozen tensor ops per call (27x slower than f32 on the micro model's
//! eval); this reads each weight once per call, like the dense matmul.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use half::f16;
use rayon::prelude::*;

use super::weight::QuantWeight;
use crate::quant::{groups_per_row, Scheme, GROUP};

/// A contiguous flex tensor's storage as `E`; `None` if the tensor is not on flex or has
/// another dtype or layout.
fn storage<E: burn::tensor::Element + bytemuck::Pod>(t: &FlexTensor) -> Option<&[E]> {
    if t.dtype() != E::dtype() {
        return None;
    }
    let (start, end) = t.layout().contiguous_offsets()?;
    t.storage::<E>().get(start..end)
}

/// `x @ dequant(w)^T`: `[n, in] -> [n, out]` in `x`'s dtype; `None` off the CPU backend.
pub fn matmul_t(x: &Tensor<2>, w: &QuantWeight) -> Option<Tensor<2>> {
    let [n, cols] = x.dims();
    if cols != w.cols {
        return None;
    }
    let words_t = w.words.clone().try_into_primitive::<Flex>().ok()?;
    let scales_t = w.scales.clone().try_into_primitive::<Flex>().ok()?;
    let words = storage::<i32>(&words_t)?;
    let scales = match scales_t.dtype() {
        DType::F16 => Scales::F16(storage::<f16>(&scales_t)?),
        DType::F32 => Scales::F32(storage::<f32>(&scales_t)?),
        _ => return None,
    };
    let device = x.device();
    let dtype = x.dtype();
    let xs: Vec<f32> = x
        .clone()
        .cast(DType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .ok()?;
    let (wpr, groups) = (w.scheme.words_per_row(cols), groups_per_row(cols));
    if words.len() < w.rows * wpr || scales.len() < w.rows * groups || xs.len() != n * cols {
        return None;
    }
    // yt: [out, n], one weight row per task.
    let mut yt = vec![0f32; w.rows * n];
    yt.par_chunks_mut(n.max(1)).enumerate().for_each_init(
        || (vec![0f32; groups * GROUP], vec![0f32; groups]),
        |(row, d), (o, out)| {
            scales.row(o * groups, d);
            dequantize_row(w.scheme, &words[o * wpr..(o + 1) * wpr], d, row);
            for (i, y) in out.iter_mut().enumerate() {
                *y = dot(&row[..cols], &xs[i * cols..(i + 1) * cols]);
            }
        },
    );
    let mut y = vec![0f32; n * w.rows];
    for (o, col) in yt.chunks(n.max(1)).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * w.rows + o] = *v;
        }
    }
    let y = Tensor::<2>::from_data(TensorData::new(y, [n, w.rows]), (&device, DType::F32));
    Some(if dtype == DType::F32 {
        y
    } else {
        y.cast(dtype)
    })
}

/// A quantized weight's scales as stored, read as f32 one row at a time (converting every scale
/// of a large table on each call would cost more than the product).
enum Scales<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl Scales<'_> {
    fn len(&self) -> usize {
        match self {
            Scales::F16(s) => s.len(),
            Scales::F32(s) => s.len(),
        }
    }

    /// Scales `[start, start + out.len())` into `out`.
    fn row(&self, start: usize, out: &mut [f32]) {
        let range = start..start + out.len();
        match self {
            Scales::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[range]) {
                    *o = v.to_f32();
                }
            }
            Scales::F32(s) => out.copy_from_slice(&s[range]),
        }
    }
}

/// One row's values (`[groups * 32]`, the padded tail zero), exactly as [`Packed::dequantize`]
/// computes them (`d * q` in f32).
///
/// [`Packed::dequantize`]: crate::quant::Packed::dequantize
fn dequantize_row(scheme: Scheme, words: &[i32], scales: &[f32], out: &mut [f32]) {
    match scheme {
        Scheme::Q8 => {
            for (k, (&w, o)) in words.iter().zip(out.chunks_exact_mut(4)).enumerate() {
                let d = scales[k * 4 / GROUP];
                for (j, v) in o.iter_mut().enumerate() {
                    *v = d * f32::from((w >> (8 * j)) as i8);
                }
            }
        }
        Scheme::Q4 => {
            for (k, (&w, o)) in words.iter().zip(out.chunks_exact_mut(8)).enumerate() {
                let d = scales[k * 8 / GROUP];
                let w = w as u32;
                for j in 0..4 {
                    o[j] = d * (((w >> (8 * j)) & 15) as i32 - 8) as f32;
                    o[4 + j] = d * (((w >> (8 * j + 4)) & 15) as i32 - 8) as f32;
                }
            }
        }
    }
}

/// Dot product with eight independent accumulators (vectorisable).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}
