#!/usr/bin/env python3
"""Writes GGUF files with Qwen2-VL-2B's language-model shapes and random weights, for timing
llama.cpp's decode next to `qwen-vl bench decode --preset qwen2-vl-2b` (tools/peer/run.sh).

The decoder is Qwen2-VL's: llama.cpp's `qwen2` architecture has exactly its shapes (28 layers,
hidden 1536, 12 heads / 2 KV heads of 128, SwiGLU 8960, q/k/v biases, RMSNorm, tied 151936-row
embedding); only M-RoPE differs, which costs the same per token. No tokenizer: `tokenizer.ggml.model
= "none"` with the vocabulary size, which llama-bench accepts (it feeds token ids). Weights are
seeded Gaussian, scaled 1/sqrt(fan_in), so values stay in a realistic range; only their shapes and
storage type matter for speed.

    PYTHONPATH=<llama.cpp>/gguf-py python3 tools/peer/make_gguf.py --out DIR --types f16,q8_0,q4_0
"""

import argparse
import os
import sys

import numpy as np

import gguf

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1536, 8960, 28, 12, 2, 128, 151936

TYPES = {
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}


def matrices(layers):
    """(name, rows, cols) of every matrix, in file order."""
    yield "token_embd.weight", VOCAB, HIDDEN
    for i in range(layers):
        p = f"blk.{i}."
        yield p + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN
        yield p + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN
        yield p + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN
        yield p + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM
        yield p + "ffn_gate.weight", FFN, HIDDEN
        yield p + "ffn_up.weight", FFN, HIDDEN
        yield p + "ffn_down.weight", HIDDEN, FFN


def vectors(layers):
    """(name, length, kind) of every norm weight and bias."""
    for i in range(layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", HIDDEN, "norm"
        yield p + "ffn_norm.weight", HIDDEN, "norm"
        yield p + "attn_q.bias", HEADS * HEAD_DIM, "bias"
        yield p + "attn_k.bias", KV_HEADS * HEAD_DIM, "bias"
        yield p + "attn_v.bias", KV_HEADS * HEAD_DIM, "bias"
    yield "output_norm.weight", HIDDEN, "norm"


def write(path, qtype, layers, seed):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "qwen2", use_temp_file=True)
    w.add_name("qwen2-vl-2b-shapes-random")
    w.add_context_length(32768)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("none")
    w.add_file_type({"f16": 1, "q8_0": 7, "q4_0": 2}[qtype])
    for name, rows, cols in matrices(layers):
        a = (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float32)
        t = TYPES[qtype]
        if t == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        print(f"  {name} [{rows}, {cols}] {qtype}", file=sys.stderr, flush=True)
    for name, n, kind in vectors(layers):
        v = rng.standard_normal(n, dtype=np.float32)
        v = (1.0 + 0.05 * v) if kind == "norm" else 0.02 * v
        w.add_tensor(name, v.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for t in args.types.split(","):
        if t not in TYPES:
            sys.exit(f"--types: unknown type {t!r}; choose from {', '.join(TYPES)}")
        path = os.path.join(args.out, f"qwen2-vl-2b-lm-{t}.gguf")
        if os.path.exists(path):
            print(f"{path} exists, kept", file=sys.stderr)
            continue
        print(f"writing {path}", file=sys.stderr)
        write(path + ".part", t, args.layers, args.seed)
        os.replace(path + ".part", path)


if __name__ == "__main__":
    main()
