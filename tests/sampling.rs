//! Device-side sampling: HF semantics (temperature, top-k, top-p), seeded and reproducible,
//! identical on the CPU backend and on wgpu.

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use qwen_vl::generate::{Sampler, Sampling};
use qwen_vl::DeviceHandle;

/// Probabilities 0.5, 0.3, 0.15, 0.05 over a 6-token vocabulary (two impossible tokens).
fn logits(device: &Device) -> Tensor<2> {
    let p = [0.15f32, 0.5, 0.0, 0.3, 0.05, 0.0];
    let v: Vec<f32> = p
        .iter()
        .map(|x| if *x > 0.0 { x.ln() } else { -1e9 })
        .collect();
    Tensor::from_data(TensorData::new(v, [1, 6]), (device, DType::F32))
}

fn draws(device: &Device, sampling: Sampling, n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(sampling);
    (0..n)
        .map(|_| pollster::block_on(sampler.sample(logits(device))).expect("sample"))
        .collect()
}

fn freq(draws: &[u32], id: u32) -> f64 {
    draws.iter().filter(|&&d| d == id).count() as f64 / draws.len() as f64
}

fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampling {
    Sampling {
        temperature,
        top_k,
        top_p,
        seed,
    }
}

#[test]
fn temperature_one_follows_the_softmax() {
    let d = draws(&Device::flex(), sampling(1.0, 0, 1.0, 7), 4000);
    for (id, p) in [(1, 0.5), (3, 0.3), (0, 0.15), (4, 0.05), (2, 0.0), (5, 0.0)] {
        let f = freq(&d, id);
        assert!(
            (f - p).abs() < 0.03,
            "token {id}: frequency {f:.3}, expected {p}"
        );
    }
}

#[test]
fn top_k_and_top_p_restrict_the_candidates() {
    let cpu = Device::flex();
    assert!(
        draws(&cpu, sampling(1.0, 1, 1.0, 1), 200)
            .iter()
            .all(|&t| t == 1),
        "top-k 1 is argmax"
    );
    let d = draws(&cpu, sampling(1.0, 2, 1.0, 2), 2000);
    assert!(
        d.iter().all(|&t| t == 1 || t == 3),
        "top-k 2 keeps tokens 1 and 3"
    );
    assert!(
        (freq(&d, 1) - 0.625).abs() < 0.04,
        "top-k renormalises: {}",
        freq(&d, 1)
    );
    // 0.5 alone reaches top_p = 0.5; 0.5 + 0.3 reaches 0.7.
    assert!(
        draws(&cpu, sampling(1.0, 0, 0.5, 3), 200)
            .iter()
            .all(|&t| t == 1),
        "top-p 0.5 keeps one token"
    );
    let d = draws(&cpu, sampling(1.0, 0, 0.7, 4), 1000);
    assert!(
        d.iter().all(|&t| t == 1 || t == 3),
        "top-p 0.7 keeps two tokens"
    );
}

#[test]
fn same_seed_same_tokens_on_cpu_and_wgpu() {
    let s = sampling(0.9, 0, 0.95, 42);
    let a = draws(&Device::flex(), s.clone(), 64);
    assert_eq!(
        a,
        draws(&Device::flex(), s.clone(), 64),
        "same seed must repeat"
    );
    assert_ne!(
        a,
        draws(&Device::flex(), sampling(0.9, 0, 0.95, 43), 64),
        "another seed differs"
    );
    if common::wgpu_or_skip("sampling on wgpu") {
        let gpu = DeviceHandle::wgpu().expect("adapter");
        assert_eq!(
            a,
            draws(&gpu.device, s, 64),
            "wgpu draws differ from the CPU backend's"
        );
    }
}
