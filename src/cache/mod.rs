//! Caches: the per-layer KV cache and (later) the vision-embedding cache.

pub mod kv;
