#!/usr/bin/env bash
# Decode speed side by side with the peer, on this machine, in one run: llama.cpp's llama-bench
# (built from the source vendored in the PyPI sdist of llama-cpp-python; CPU, and Vulkan where
# glslc and the Vulkan headers are installed) on GGUF files with Qwen2-VL-2B's language-model
# shapes and random weights (f16, Q8_0, Q4_0, written by tools/peer/make_gguf.py with the
# vendored gguf-py), next to `qwen-vl bench decode --preset qwen2-vl-2b` with the same shapes and
# the matching storage (f16 / q8 / q4) on the same adapters. Both decode one token at a time at
# context 128 and report tokens/s. Nothing of llama.cpp is committed; it lives under $PEER_DIR.
#
#   tools/peer/run.sh                 # everything: CPU and (if available) Vulkan/lavapipe
#   PEER_TYPES=q4_0 tools/peer/run.sh # one storage type
#   PEER_DEVICES=cpu tools/peer/run.sh
#
# Needs: cmake, a C++ compiler, python3 with numpy (pip install numpy); for Vulkan: glslc,
# libvulkan-dev and a Vulkan driver (mesa-vulkan-drivers gives lavapipe). Prints a Markdown table
# and writes $PEER_DIR/results.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

PEER_DIR="${PEER_DIR:-/var/tmp/qwen-vl-peer}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TYPES="${PEER_TYPES:-f16,q8_0,q4_0}"
DEVICES="${PEER_DEVICES:-cpu,vulkan}"
TOKENS="${PEER_TOKENS:-16}"
DEPTH="${PEER_DEPTH:-128}"
THREADS="${PEER_THREADS:-$(nproc)}"
JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"
mkdir -p "$PEER_DIR"

src="$PEER_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -d "$src" ]; then
  echo "== pip download llama-cpp-python==$VERSION (sdist)" >&2
  python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$PEER_DIR" >&2
  tar xzf "$PEER_DIR/llama_cpp_python-$VERSION.tar.gz" -C "$PEER_DIR"
fi

build() { # build DIR CMAKE_FLAGS...
  local dir=$1; shift
  if [ ! -x "$dir/bin/llama-bench" ]; then
    echo "== building llama-bench in $dir ($*)" >&2
    cmake -S "$src" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON "$@" >&2
    cmake --build "$dir" --target llama-bench -j "$JOBS" >&2
  fi
}

want_vulkan=0
if [[ ",$DEVICES," == *",vulkan,"* ]]; then
  if command -v glslc >/dev/null && [ -e /usr/include/vulkan/vulkan.h ]; then
    want_vulkan=1
  else
    echo "note: no glslc or Vulkan headers (apt-get install glslc libvulkan-dev): llama.cpp's Vulkan build skipped" >&2
  fi
fi
if [[ ",$DEVICES," == *",cpu,"* ]]; then build "$PEER_DIR/build-cpu" -DGGML_VULKAN=OFF; fi
if [ "$want_vulkan" = 1 ]; then build "$PEER_DIR/build-vulkan" -DGGML_VULKAN=ON; fi

echo "== GGUF files ($TYPES)" >&2
PYTHONPATH="$src/gguf-py" python3 tools/peer/make_gguf.py --out "$PEER_DIR/gguf" --types "$TYPES" >&2

echo "== qwen-vl (release)" >&2
cargo build --release --bin qwen-vl >&2
QWEN="${CARGO_TARGET_DIR:-target}/release/qwen-vl"

results="$PEER_DIR/results.jsonl"
: > "$results"
ours() { # ours DEVICE TYPE
  local device=$1 t=$2 flags=()
  case $t in
    f16) flags=(--dtype f16) ;;
    q8_0) flags=(--quant q8) ;;
    q4_0) flags=(--quant q4) ;;
  esac
  local dev=cpu
  [ "$device" = vulkan ] && dev=wgpu
  echo "== qwen-vl bench decode on $dev, $t" >&2
  "$QWEN" bench decode --preset qwen2-vl-2b --device "$dev" "${flags[@]}" --contexts "$DEPTH" \
    --tokens "$TOKENS" --iters 3 --recompute-max 0 --prefill-tokens 8 --no-burn --json |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
row = [x for x in r["rows"] if x["path"] == "wgsl" or (x["path"] == "burn" and r["adapter"]["backend"] == "cpu")][0]
print(json.dumps({"engine": "qwen-vl", "device": sys.argv[1], "type": sys.argv[2], "adapter": r["adapter"]["name"],
  "tokens_per_s": 1000.0 / row["ms_per_token"], "weight_bytes": r["model"]["weight_bytes"]}))' "$device" "$t" >> "$results"
}
theirs() { # theirs DEVICE TYPE
  local device=$1 t=$2 dir=$PEER_DIR/build-cpu ngl=0
  [ "$device" = vulkan ] && { dir=$PEER_DIR/build-vulkan; ngl=99; }
  echo "== llama-bench on $device, $t" >&2
  "$dir/bin/llama-bench" -m "$PEER_DIR/gguf/qwen2-vl-2b-lm-$t.gguf" -p 0 -n "$TOKENS" -d "$DEPTH" \
    -ngl "$ngl" -t "$THREADS" -r 2 -o json 2>/dev/null |
    python3 -c '
import json, sys
r = json.load(sys.stdin)[0]
print(json.dumps({"engine": "llama.cpp", "device": sys.argv[1], "type": sys.argv[2],
  "adapter": r.get("gpu_info") or r.get("cpu_info"), "tokens_per_s": r["avg_ts"], "weight_bytes": r["model_size"]}))' "$device" "$t" >> "$results"
}
for device in ${DEVICES//,/ }; do
  [ "$device" = vulkan ] && [ "$want_vulkan" = 0 ] && continue
  for t in ${TYPES//,/ }; do
    theirs "$device" "$t"
    ours "$device" "$t"
  done
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
json.dump(rows, open(sys.argv[1].replace(".jsonl", ".json"), "w"), indent=1)
print("| device | storage | llama.cpp tok/s | qwen-vl tok/s | qwen-vl / llama.cpp | llama.cpp MiB | qwen-vl MiB |")
print("|---|---|---|---|---|---|---|")
keys = sorted({(r["device"], r["type"]) for r in rows}, key=lambda k: (k[0], ["f16", "q8_0", "q4_0"].index(k[1])))
for d, t in keys:
    l = next((r for r in rows if r["engine"] == "llama.cpp" and (r["device"], r["type"]) == (d, t)), None)
    q = next((r for r in rows if r["engine"] == "qwen-vl" and (r["device"], r["type"]) == (d, t)), None)
    f = lambda r, k, s=1: f"{r[k] / s:.2f}" if r else "-"
    ratio = f"{q['tokens_per_s'] / l['tokens_per_s']:.2f}" if l and q else "-"
    print(f"| {d} | {t} | {f(l, 'tokens_per_s')} | {f(q, 'tokens_per_s')} | {ratio} | {f(l, 'weight_bytes', 2**20)} | {f(q, 'weight_bytes', 2**20)} |")
for r in rows:
    print(f"{r['engine']} on {r['device']}: {r['adapter']}", file=sys.stderr)
PY
