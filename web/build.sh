#!/usr/bin/env bash
# Builds the browser build of the crate into web/pkg/ (ignored by git): the wasm module and its
# JS bindings, for web/index.html. Installs the wasm32 target and the wasm-bindgen CLI pinned to
# the wasm-bindgen version in Cargo.lock when they are missing. Prints the wasm size.
#
#   web/build.sh            # then serve the repo root, e.g. python3 -m http.server -d . 8080
#
# The wasm target dir defaults to /var/tmp/qwen-vl-webgpu-wasm-target (set CARGO_TARGET_DIR to
# change it), apart from the native one so the two builds do not invalidate each other.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/qwen-vl-webgpu-wasm-target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  echo "== rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

# The CLI must match the wasm-bindgen crate exactly, or the generated glue refuses the module.
want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [ -z "$want" ]; then
  echo "error: no wasm-bindgen entry in Cargo.lock" >&2
  exit 1
fi
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "== cargo install wasm-bindgen-cli --version $want --locked (found: ${have:-none})"
  # --locked first (the CLI's own lockfile); a registry mirror that lacks one of those exact
  # versions makes that fail, and then the newest compatible dependencies are used instead.
  cargo install wasm-bindgen-cli --version "$want" --locked ||
    cargo install wasm-bindgen-cli --version "$want"
fi

echo "== cargo build --release --target wasm32-unknown-unknown --no-default-features --features web"
cargo build --release --target wasm32-unknown-unknown --no-default-features --features web

wasm="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/qwen_vl.wasm"
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-dir web/pkg "$wasm"

size=$(stat -c %s web/pkg/qwen_vl_bg.wasm)
gz=$(gzip -9 -c web/pkg/qwen_vl_bg.wasm | wc -c)
awk -v s="$size" -v g="$gz" 'BEGIN { printf "== web/pkg/qwen_vl_bg.wasm: %d bytes (%.1f MiB; %.1f MiB gzipped)\n", s, s / 1048576, g / 1048576 }'
