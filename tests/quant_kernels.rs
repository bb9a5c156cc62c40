//! Conformance of the quantized-weight paths against the host reference (`Packed::dequantize`
//! then f64 dot products): the WGSL dequantizing matvec and dequant/gather kernels on wgpu
//! (lavapipe), and the plain-Burn path on the CPU backend, for both schemes, both scale dtypes,
//! shapes that are not multiples of the group (32), the vec4 width or the rows per workgroup,
//! and browser-like limits.

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use qwen_vl::device::{DeviceHandle, Limits};
use qwen_vl::generate::read_f32;
use qwen_vl::kernels::weight::{QuantWeight, Weight};
use qwen_vl::quant::{quantize, Packed, Scheme};

struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}

fn read(t: Tensor<2>) -> Vec<f32> {
    pollster::block_on(read_f32(t)).expect("readback")
}

fn row(x: &[f32], device: &Device, dtype: DType) -> Tensor<2> {
    let t = Tensor::<2>::from_data(
        TensorData::new(x.to_vec(), [1, x.len()]),
        (device, DType::F32),
    );
    if dtype == DType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}

/// `y = W x` over the dequantized weight, in f64, and the scale of the error allowed for each
/// output (sum of |w x|: f32 summation in another order).
fn reference(p: &Packed, x: &[f32], rows: usize) -> (Vec<f32>, Vec<f32>) {
    let w = p.dequantize();
    let (n, k) = (p.rows, p.cols);
    let mut y = Vec::new();
    let mut mag = Vec::new();
    for r in 0..rows {
        for o in 0..n {
            let (mut s, mut m) = (0f64, 0f64);
            for i in 0..k {
                let t = f64::from(w[o * k + i]) * f64::from(x[r * k + i]);
                s += t;
                m += t.abs();
            }
            y.push(s as f32);
            mag.push(m as f32);
        }
    }
    (y, mag)
}

/// Worst |got - want| / (sum |w x| + 1); fails when it exceeds `tol`.
fn check(what: &str, got: &[f32], want: &[f32], mag: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    let mut worst = 0f32;
    for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let e = (g - w).abs() / (m + 1.0);
        assert!(
            e <= tol && g.is_finite(),
            "{what}: output {i} is {g}, reference {w} (|diff| {} over sum|wx| {m}: {e:.2e} > {tol:.1e})",
            (g - w).abs()
        );
        worst = worst.max(e);
    }
    worst
}

fn browser_like(limits: &Limits) -> Limits {
    Limits {
        max_invocations: limits.max_invocations.min(256),
        max_shared: limits.max_shared.min(16 << 10),
        matvec_wg: limits.matvec_wg.min(32),
        ..limits.clone()
    }
}

const SHAPES: &[(usize, usize)] = &[
    (1, 4),
    (7, 28),
    (8, 32),
    (9, 36),
    (63, 100),
    (17, 1176),
    (300, 64),
    (5, 1540),
];

#[test]
fn quantized_matvec_matches_the_dequantized_reference_on_wgpu() {
    if !common::wgpu_or_skip("quantized matvec") {
        return;
    }
    let gpu = DeviceHandle::wgpu().expect("adapter");
    let mut rng = Rng(7);
    let mut worst = 0f32;
    let mut cases = 0;
    let mut dtypes = vec![DType::F32];
    if gpu.adapter.shader_f16 {
        dtypes.push(DType::F16);
    }
    for scheme in [Scheme::Q8, Scheme::Q4] {
        for &(out, d_in) in SHAPES {
            let p = quantize(scheme, &rng.vec(out * d_in), out, d_in).expect("finite");
            let x = rng.vec(d_in);
            let (want, mag) = reference(&p, &x, 1);
            for scales in [DType::F16, DType::F32] {
                let w = Weight::Quant(QuantWeight::upload(&p, &gpu.device, scales));
                for limits in [gpu.limits.clone(), browser_like(&gpu.limits)] {
                    for &dtype in &dtypes {
                        let what = format!(
                            "{scheme} [{out}, {d_in}] scales {scales:?} x {dtype:?} wg {}",
                            limits.matvec_wg
                        );
                        let got = read(
                            w.matmul_t(row(&x, &gpu.device, dtype), &limits)
                                .cast(DType::F32),
                        );
                        // f16 activations: x and y rounded to f16 (relative 2^-11 each).
                        let tol = if dtype == DType::F16 { 2e-3 } else { 2e-6 };
                        let x16: Vec<f32> = if dtype == DType::F16 {
                            x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
                        } else {
                            x.clone()
                        };
                        let (want16, _) = reference(&p, &x16, 1);
                        let e = check(
                            &what,
                            &got,
                            if dtype == DType::F16 { &want16 } else { &want },
                            &mag,
                            tol,
                        );
                        if dtype == DType::F32 {
                            worst = worst.max(e);
                        }
                        cases += 1;
                    }
                }
            }
        }
    }
    println!(
        "{cases} quantized matvec cases on {}: worst f32 error {worst:.2e} of sum|wx|",
        gpu.adapter.name
    );
}

#[test]
fn dequantize_and_gather_equal_the_host_reference_bit_for_bit() {
    let mut devices = vec![("cpu", DeviceHandle::cpu())];
    if common::wgpu_or_skip("dequantize on wgpu") {
        devices.push(("wgpu", DeviceHandle::wgpu().expect("adapter")));
    }
    let mut rng = Rng(11);
    for (name, dev) in &devices {
        for scheme in [Scheme::Q8, Scheme::Q4] {
            for &(out, d_in) in SHAPES {
                let p = quantize(scheme, &rng.vec(out * d_in), out, d_in).expect("finite");
                let want = p.dequantize();
                for scales in [DType::F16, DType::F32] {
                    let q = QuantWeight::upload(&p, &dev.device, scales);
                    for limits in [dev.limits.clone(), browser_like(&dev.limits)] {
                        let what = format!("{name}: {scheme} [{out}, {d_in}] scales {scales:?}");
                        let got = read(q.dequantize(DType::F32, &limits));
                        assert_eq!(got.len(), want.len(), "{what}: dequantized length");
                        let bad = got
                            .iter()
                            .zip(&want)
                            .position(|(a, b)| a.to_bits() != b.to_bits());
                        assert_eq!(
                            bad,
                            None,
                            "{what}: dequantized element differs (got {:?}, want {:?})",
                            bad.map(|i| got[i]),
                            bad.map(|i| want[i])
                        );
                        // Rows out of order and repeated, as an embedding lookup asks for them.
                        let ids: Vec<u32> = [out - 1, 0, out / 2, out - 1]
                            .iter()
                            .map(|&i| i as u32)
                            .collect();
                        let got = read(q.rows(&ids, DType::F32, &limits));
                        let want_rows: Vec<f32> = ids
                            .iter()
                            .flat_map(|&i| {
                                want[i as usize * d_in..(i as usize + 1) * d_in].to_vec()
                            })
                            .collect();
                        let bad = got
                            .iter()
                            .zip(&want_rows)
                            .position(|(a, b)| a.to_bits() != b.to_bits());
                        assert_eq!(got.len(), want_rows.len(), "{what}: gathered length");
                        assert_eq!(
                            bad, None,
                            "{what}: gathered rows {ids:?} differ at element {bad:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn multi_row_and_cpu_products_match_the_reference() {
    let mut devices = vec![("cpu", DeviceHandle::cpu())];
    if common::wgpu_or_skip("multi-row quantized products on wgpu") {
        devices.push(("wgpu", DeviceHandle::wgpu().expect("adapter")));
    }
    let mut rng = Rng(23);
    for (name, dev) in &devices {
        for scheme in [Scheme::Q8, Scheme::Q4] {
            for &(out, d_in) in SHAPES {
                let p = quantize(scheme, &rng.vec(out * d_in), out, d_in).expect("finite");
                let w = Weight::Quant(QuantWeight::upload(&p, &dev.device, DType::F16));
                for rows in [1usize, 3] {
                    let x = rng.vec(rows * d_in);
                    let (want, mag) = reference(&p, &x, rows);
                    let xt = Tensor::<2>::from_data(
                        TensorData::new(x.clone(), [rows, d_in]),
                        (&dev.device, DType::F32),
                    );
                    let got = read(w.matmul_t(xt, &dev.limits));
                    check(
                        &format!("{name}: {scheme} [{out}, {d_in}] x {rows} rows"),
                        &got,
                        &want,
                        &mag,
                        2e-6,
                    );
                }
            }
        }
    }
}
