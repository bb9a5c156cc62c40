#!/usr/bin/env python3
"""Re-run `qwen-vl eval`'s direct questions with HF transformers and compare (issue 8: the Rust
runtime's scores must equal those of transformers, from the same greedy outputs). Run by hand.

    target/release/qwen-vl eval --model models/micro-qwen2-vl --synthetic 200 --seed 99 \\
        --device cpu --items /var/tmp/eval/items.json --json
    python3 tools/micro/eval_hf.py --items /var/tmp/eval/items.json

Scenes are generated in Rust only (src/synth.rs), so the Rust run writes every item: the scene
PNG (in ITEMS_STEM_scenes/ next to the items file), the prompt, the expected answer, the target
box, and the runtime's output and generated token ids. This script asks each direct question of
that file with `Qwen2VLForConditionalGeneration` + `AutoProcessor` from the same checkpoint:
f32, eager attention, the chat template with the image first in the user turn (as the Rust
runtime and tools/micro/train.py build it), greedy (`do_sample=False`), the same
max_new_tokens, and the checkpoint's own end-of-sequence ids. It then

- counts, per kind, how many outputs differ from the Rust ones (token ids compared; texts too);
- writes the HF outputs as an items file (`--out`, default ITEMS_STEM_hf.json next to it);
- scores both files with the Rust scorer (`qwen-vl eval --score-items`, one scorer for both, so
  normalisation and IoU cannot drift) and prints the two score tables side by side.

Exit status 1 if any output differs (or scoring fails), else 0.

Not compared: the pipeline questions. Reproducing the whole multi-phase pipeline (its prompts,
crops, cache layout) in Python is out of scope; those items are left out of the HF file, so its
`pipeline.answer_accuracy` is null. The pipeline is built from the same generate step that is
compared here.
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, GenerationConfig, Qwen2VLForConditionalGeneration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ["colour", "shape", "count", "position", "yesno", "grounding"]


def load_items(path):
    with open(path) as f:
        data = json.load(f)
    for key in ["model", "family", "seed", "n", "max_new_tokens", "items"]:
        if key not in data:
            sys.exit(f"error: {path} has no `{key}`; write it with `qwen-vl eval ... --items FILE`")
    if data["family"] != "qwen2_vl":
        sys.exit(f"error: {path} is from a {data['family']} model; this script runs Qwen2-VL only")
    return data


def eos_ids(model):
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@torch.inference_mode()
def answer(model, processor, gen_config, eos, image, prompt):
    """Greedy generated ids (the stop token included, as the Rust items hold them) and the text
    with special tokens kept and the stop token dropped (as `output` is written in Rust)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**enc, generation_config=gen_config)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    shown = ids[:-1] if ids and ids[-1] in eos else ids
    return ids, processor.tokenizer.decode(shown, skip_special_tokens=False)


def score(qwen_vl, path):
    """The Rust scorer's report of an items file, or None (with the reason on stderr)."""
    cmd = [qwen_vl, "eval", "--score-items", path, "--json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        print(f"cannot run {qwen_vl} ({e}); build it with `cargo build --release` or pass --qwen-vl",
              file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(done.stdout)


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", required=True, help="items file written by `qwen-vl eval --items`")
    ap.add_argument("--model", help="checkpoint folder (default: the one named in the items file)")
    ap.add_argument("--out", help="where to write the HF outputs (default: ITEMS_STEM_hf.json)")
    ap.add_argument("--qwen-vl", default=os.path.join(REPO, "target", "release", "qwen-vl"),
                    help="the qwen-vl binary that scores both files")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    data = load_items(args.items)
    model_dir = args.model or data["model"]
    base = os.path.dirname(os.path.abspath(args.items))
    stem = os.path.splitext(os.path.basename(args.items))[0]
    out_path = args.out or os.path.join(base, f"{stem}_hf.json")

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                            attn_implementation="eager")
    model.eval()
    eos = eos_ids(model)
    pad = model.generation_config.pad_token_id
    gen_config = GenerationConfig(max_new_tokens=data["max_new_tokens"], do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos[0] if pad is None else pad)

    direct = [it for it in data["items"] if not it["pipeline"]]
    asked = {k: 0 for k in KINDS}
    differ_ids = {k: 0 for k in KINDS}
    differ_text = 0
    hf_items = []
    for i, it in enumerate(direct):
        if not it.get("image"):
            sys.exit(f"error: item {i} has no image; write the items file with `qwen-vl eval --items`")
        image = Image.open(os.path.join(base, it["image"])).convert("RGB")
        ids, text = answer(model, processor, gen_config, eos, image, it["prompt"])
        kind = it["kind"]
        asked[kind] += 1
        if ids != it["token_ids"]:
            differ_ids[kind] += 1
            n = next((j for j, (a, b) in enumerate(zip(ids, it["token_ids"])) if a != b),
                     min(len(ids), len(it["token_ids"])))
            print(f"differs: scene {it['scene']} {kind} {it['prompt']!r}: from token {n}\n"
                  f"  rust: {it['output']!r}\n  hf:   {text!r}", flush=True)
        elif text != it["output"]:
            differ_text += 1
            print(f"same ids, different text: scene {it['scene']} {kind}: rust {it['output']!r}, hf {text!r}",
                  flush=True)
        hf_items.append(dict(it, output=text, token_ids=ids))
        print(f"\r{i + 1}/{len(direct)} items", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    with open(out_path, "w") as f:
        json.dump(dict(data, model=model_dir, items=hf_items), f, indent=1)
        f.write("\n")
    print(f"HF outputs -> {out_path}")

    rust = score(args.qwen_vl, os.path.abspath(args.items))
    hf = score(args.qwen_vl, out_path)
    print(f"\n{'kind':<10} {'asked':>6} {'differ':>7} {'rust':>7} {'hf':>7}")
    for k in KINDS:
        if k == "grounding":
            r = rust and rust["grounding"]["mean_iou"]
            h = hf and hf["grounding"]["mean_iou"]
            label = "grounding"
        else:
            r = rust and rust["accuracy"][k]
            h = hf and hf["accuracy"][k]
            label = k
        print(f"{label:<10} {asked[k]:>6} {differ_ids[k]:>7} {fmt(r):>7} {fmt(h):>7}")
    if rust and hf:
        print(f"{'IoU>=0.5':<10} {asked['grounding']:>6} {'':>7} "
              f"{fmt(rust['grounding']['iou_ge_0_5']):>7} {fmt(hf['grounding']['iou_ge_0_5']):>7}")
    total = sum(differ_ids.values())
    print(f"\n{total} of {len(direct)} outputs differ in token ids, {differ_text} more in text only "
          "(pipeline items not compared)")
    same_scores = bool(rust and hf) and rust["accuracy"] == hf["accuracy"] and rust["grounding"] == hf["grounding"]
    print("scores equal" if same_scores else "scores DIFFER or could not be computed")
    sys.exit(0 if total == 0 and differ_text == 0 and same_scores else 1)


if __name__ == "__main__":
    main()
