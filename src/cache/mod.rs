//! Caches: the per-layer KV cache and the vision-embedding cache.

pub mod kv;
pub mod vision;
