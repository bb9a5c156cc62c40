//! Decoding allocates nothing per token: the device memory pool is the same after 21 and after
//! 60 decode steps. Alone in its test binary so no other test shares the device meanwhile.

mod common;

use qwen_vl::Backend;

#[test]
fn decode_does_not_grow_device_memory() {
    if !common::wgpu_or_skip("decode memory") {
        return;
    }
    let rt = common::runtime(&common::fixtures().join("qwen2_vl_hub"), Backend::Wgpu);
    let model = &rt.model;
    let ids = rt
        .tokenizer
        .encode_text("Memory must stay flat while decoding.")
        .expect("ids");
    let mut cache = model.new_cache(256);
    let positions = model.positions(&ids, &[]);
    let hidden = model
        .prefill(&ids, None, &positions, &mut cache)
        .expect("prefill");
    let mut sampler = qwen_vl::generate::Sampler::new(Default::default());
    let mut token = pollster::block_on(sampler.sample(model.last_logits(hidden))).expect("sample");
    let mut reserved = Vec::new();
    for step in 0..60 {
        let hidden = model
            .decode_step(token, positions.rope_delta, &mut cache)
            .expect("decode");
        token = pollster::block_on(sampler.sample(model.text.logits(hidden, cache.limits())))
            .expect("sample");
        if step == 20 || step == 59 {
            let usage = model
                .device
                .device
                .memory_pool_usage()
                .expect("wgpu reports memory usage");
            reserved.push((usage.bytes_reserved, usage.bytes_in_use));
        }
    }
    println!("device memory after 21 and 60 decode steps (reserved, in use): {reserved:?}");
    assert_eq!(
        reserved[0].0, reserved[1].0,
        "reserved device memory grew while decoding"
    );
    assert!(
        reserved[1].1 <= reserved[0].1,
        "memory in use grew while decoding: {reserved:?}"
    );
}
