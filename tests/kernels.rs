//! Conformance of the WGSL kernels (on wgpu/lavapipe) against the plain-Burn reference (on the
//! CPU backend) over head sizes, GQA ratios, lengths that are not multiples of the workgroup or
//! tile sizes, and prefix offsets; also with browser-like limits (256 invocations, 16 KiB shared).

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use qwen_vl::device::{DeviceHandle, Limits};
use qwen_vl::generate::read_f32;
use qwen_vl::kernels::{self, wgsl};

const TOL: f32 = 2e-4;

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

fn tensor(data: &[f32], shape: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), (device, DType::F32))
}

fn read(t: Tensor<3>) -> Vec<f32> {
    pollster::block_on(read_f32(t)).expect("readback")
}

fn gpu() -> Option<DeviceHandle> {
    common::wgpu_or_skip("kernel conformance").then(|| DeviceHandle::wgpu().expect("adapter"))
}

/// Browser-like limits (SwiftShader) on the same adapter, to exercise the tile choices.
fn small(limits: &Limits) -> Limits {
    Limits {
        max_invocations: limits.max_invocations.min(256),
        max_shared: limits.max_shared.min(16 << 10),
        ..limits.clone()
    }
}

/// Scales random keys so scores spread like a real model's (softmax not flat).
fn inputs(
    rng: &mut Rng,
    heads: usize,
    kv: usize,
    n: usize,
    cap: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let q: Vec<f32> = rng
        .vec(heads * n * hd)
        .into_iter()
        .map(|x| 3.0 * x)
        .collect();
    (q, rng.vec(kv * cap * hd), rng.vec(kv * cap * hd))
}

#[test]
fn decode_attention_matches_burn_reference() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::flex();
    let mut rng = Rng(1);
    let mut worst = 0f32;
    let mut cases = 0;
    for hd in [64, 80, 128] {
        for (heads, kv) in [(2, 2), (4, 2), (12, 2), (14, 2)] {
            for len in [1, 7, 128, 129, 1000, 4097] {
                for limits in [gpu.limits.clone(), small(&gpu.limits)] {
                    let cap = len + 3;
                    let (q, k, v) = inputs(&mut rng, heads, kv, 1, cap, hd);
                    let want = read(kernels::attention(
                        tensor(&q, [heads, 1, hd], &cpu),
                        tensor(&k, [kv, cap, hd], &cpu),
                        tensor(&v, [kv, cap, hd], &cpu),
                        len - 1,
                        &Limits::unbounded(),
                    ));
                    let (qg, kg, vg) = (
                        tensor(&q, [heads, 1, hd], &gpu.device),
                        tensor(&k, [kv, cap, hd], &gpu.device),
                        tensor(&v, [kv, cap, hd], &gpu.device),
                    );
                    let got = wgsl::attention_decode(&qg, &kg, &vg, len, &limits)
                        .expect("the decode kernel takes this shape");
                    let d = common::max_abs_diff(&read(got), &want);
                    assert!(
                        d <= TOL,
                        "decode hd {hd} heads {heads}/{kv} len {len} (shared {}): max |diff| {d}",
                        limits.max_shared
                    );
                    worst = worst.max(d);
                    cases += 1;
                }
            }
        }
    }
    println!("decode attention: {cases} cases, worst max |wgsl - burn| = {worst:.2e}");
}

#[test]
fn prefill_attention_matches_burn_reference() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::flex();
    let mut rng = Rng(2);
    let mut worst = 0f32;
    let mut cases = 0;
    for hd in [64, 80, 128] {
        for (heads, kv) in [(2, 2), (4, 2), (12, 2), (7, 1)] {
            for (p0, n) in [(0, 2), (0, 65), (5, 64), (100, 129), (31, 300), (4000, 97)] {
                for limits in [gpu.limits.clone(), small(&gpu.limits)] {
                    let cap = p0 + n + 5;
                    let (q, k, v) = inputs(&mut rng, heads, kv, n, cap, hd);
                    let want = read(kernels::attention(
                        tensor(&q, [heads, n, hd], &cpu),
                        tensor(&k, [kv, cap, hd], &cpu),
                        tensor(&v, [kv, cap, hd], &cpu),
                        p0,
                        &Limits::unbounded(),
                    ));
                    let (qg, kg, vg) = (
                        tensor(&q, [heads, n, hd], &gpu.device),
                        tensor(&k, [kv, cap, hd], &gpu.device),
                        tensor(&v, [kv, cap, hd], &gpu.device),
                    );
                    let got = wgsl::attention_prefill(&qg, &kg, &vg, p0, &limits)
                        .expect("the prefill kernel takes this shape");
                    let d = common::max_abs_diff(&read(got), &want);
                    assert!(d <= TOL, "prefill hd {hd} heads {heads}/{kv} p0 {p0} n {n} (shared {}): max |diff| {d}", limits.max_shared);
                    worst = worst.max(d);
                    cases += 1;
                }
            }
        }
    }
    println!("prefill attention: {cases} cases, worst max |wgsl - burn| = {worst:.2e}");
}

#[test]
fn kv_append_writes_rows_in_place() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::flex();
    let mut rng = Rng(3);
    for (kv, hd, cap, len, n) in [
        (2, 128, 300, 0, 37),
        (2, 128, 300, 37, 1),
        (1, 80, 4100, 4000, 97),
        (4, 64, 9, 8, 1),
    ] {
        let base = rng.vec(kv * cap * hd);
        let (nk, nv) = (rng.vec(kv * n * hd), rng.vec(kv * n * hd));
        let (wk, wv) = kernels::kv_append(
            tensor(&base, [kv, cap, hd], &cpu),
            tensor(&base, [kv, cap, hd], &cpu),
            tensor(&nk, [kv, n, hd], &cpu),
            tensor(&nv, [kv, n, hd], &cpu),
            len,
            &Limits::unbounded(),
        );
        let (ck, cv) = (
            tensor(&base, [kv, cap, hd], &gpu.device),
            tensor(&base, [kv, cap, hd], &gpu.device),
        );
        assert!(
            wgsl::kv_append(
                &ck,
                &cv,
                &tensor(&nk, [kv, n, hd], &gpu.device),
                &tensor(&nv, [kv, n, hd], &gpu.device),
                len,
                &gpu.limits
            ),
            "the kv_append kernel must run on wgpu"
        );
        assert_eq!(
            read(ck),
            read(wk),
            "K cache differs after appending {n} rows at {len}"
        );
        assert_eq!(
            read(cv),
            read(wv),
            "V cache differs after appending {n} rows at {len}"
        );
    }
}

#[test]
fn kv_cache_rejects_appends_past_capacity() {
    let cpu = DeviceHandle::cpu();
    let mut cache =
        qwen_vl::cache::kv::KvCache::new(1, 1, 4, 5, DType::F32, &cpu.device, cpu.limits.clone());
    let rows = |n| Tensor::<3>::zeros([1, n, 4], &cpu.device);
    cache
        .append(0, rows(4), rows(4))
        .expect("4 of 5 positions fit");
    cache.commit(4);
    let err = cache
        .append(0, rows(2), rows(2))
        .expect_err("6 > 5 must be refused")
        .to_string();
    assert!(
        err.contains("needs 6 positions") && err.contains("holds 5"),
        "{err}"
    );
}

#[test]
fn matvec_matches_burn_matmul() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::flex();
    let mut rng = Rng(4);
    let mut worst = 0f32;
    for (d_in, out) in [
        (24, 7),
        (64, 1),
        (1536, 8960),
        (8960, 1536),
        (1536, 151_936 / 8 + 3),
    ] {
        for limits in [
            gpu.limits.clone(),
            small(&gpu.limits),
            Limits {
                matvec_wg: 64,
                ..gpu.limits.clone()
            },
        ] {
            let (x, w) = (rng.vec(d_in), rng.vec(out * d_in));
            let want =
                Tensor::<2>::from_data(TensorData::new(x.clone(), [1, d_in]), (&cpu, DType::F32))
                    .matmul(
                        Tensor::<2>::from_data(
                            TensorData::new(w.clone(), [out, d_in]),
                            (&cpu, DType::F32),
                        )
                        .transpose(),
                    );
            let xg =
                Tensor::<2>::from_data(TensorData::new(x, [1, d_in]), (&gpu.device, DType::F32));
            let wg =
                Tensor::<2>::from_data(TensorData::new(w, [out, d_in]), (&gpu.device, DType::F32));
            let got = wgsl::matvec(&xg, &wg, &limits).expect("the matvec kernel takes this shape");
            let got = pollster::block_on(read_f32(got)).expect("readback");
            let want = pollster::block_on(read_f32(want)).expect("readback");
            let d = common::max_abs_diff(&got, &want);
            // Sums of d_in products of values in [-1, 1]: allow for f32 reordering.
            let tol = 1e-6 * d_in as f32;
            assert!(
                d <= tol,
                "matvec {d_in} -> {out} (wg {}): max |diff| {d} > {tol}",
                limits.matvec_wg
            );
            worst = worst.max(d / d_in as f32);
        }
    }
    println!("matvec: worst max |wgsl - burn| / in = {worst:.2e}");
}
