//! wasm-bindgen surface (placeholder while the build warms up).
