#!/usr/bin/env python3
"""Train the bundled micro Qwen2-VL on synthetic shape scenes (issue 8). Run by hand, not in CI.

    cargo run --release -- synth --n 30000 --seed 1 --out /var/tmp/micro-data
    python3 tools/micro/train.py --data /var/tmp/micro-data --out models/micro-qwen2-vl --minutes 60

On a CUDA GPU add `--device cuda --workers N` (N data-loading processes keep it fed) and a larger
--batch; it trains in float32 there (see --bf16). --data takes several synth folders joined by
commas.

The data is what `qwen-vl synth` writes (src/synth.rs): scene/crop PNGs and data.jsonl, one
supervised turn per line (image, prompt, answer, task). Each turn is rendered with the real
Qwen2-VL chat template and image processor from transformers (the reference the Rust runtime
matches), image first in the user turn; the loss covers the answer and its <|im_end|>.

The model is an ordinary Qwen2-VL (hub layout, real tokenizer, full 151936-token vocabulary, tied
embeddings) small enough for the repo. Only the tokens that occur in the data (about a thousand)
are trained: their embedding rows, and the loss is a softmax over them plus one extra logit fixed
at 0 that stands for every other token. Every other embedding row is zero, so its logit is exactly
0 at inference; since training pushes the right token's logit above that 0 column, greedy decoding
over the full vocabulary picks the same tokens as over the trained ones. The script checks this
on held-out turns before saving.

These choices matter at this size beyond the usual ones:
- Rope base (--rope-theta 20, M-RoPE sections 2,7,7). With head_dim 32 and Qwen's base of 1e6, the
  image-row and image-column sections (the last rotary pairs) turn by about 1e-3 radians per
  token, so attention can hardly tell one image token's place from another's; base 20 gives them
  0.06-0.69 radians per token.
- Training-only probes (--aux-weight; linear heads that are not exported). From scenes.jsonl
  (`qwen-vl synth` writes it), every image token of a full scene gets targets: the colour, kind and
  size of the shape under it, read from the vision output and again after --aux-layer decoder
  layers, where the token's grid row and column and its shape's box are also asked for; and
  every position that predicts an answer token about named shapes (colour, shape, grounding,
  a yes-answered yes/no question, and both shapes of a position question) must tell their
  attributes and boxes after --query-layer layers. These dense targets teach binding and
  position far faster than the few answer tokens alone. The loss over answers averages per turn
  (--token-mean: per token), so a one-word colour answer weighs as much as a box or a JSON plan.
- Box answers (--task-weight, --digit-weights, --box-text-weight): a box is about 25 answer
  tokens of which only the hundreds and tens digits decide its IoU; the brackets and the
  object's name are learnt at once and the units digits are close to noise, so in a per-turn
  mean the digits that matter get a small share. Weighting the units and the other tokens down
  and the grounding turns up puts the gradient where the boxes are imprecise.
- Image size (--min-pixels, written to preprocessor_config.json as min_pixels): the scenes are
  112-256 pixels a side, so at Qwen's 56 x 56 minimum a small image gets 4 x 4 merged tokens and
  a small shape in it one or two 14-pixel patches, too few to tell a star from a diamond. Scaling
  every image up to at least 40000 pixels (200 x 200 when square) gives small shapes four times
  the patches.
- Growing (--layers above the --init-from checkpoint's): the new decoder layers are appended as
  the identity (zero output projections) and trained from there.

Writes to --out: config.json, model.safetensors (bf16), tokenizer and template files copied from
tests/fixtures/qwen2_vl_hub, preprocessor_config.json, generation_config.json, and
training_log.json (the loss curve, per-task losses, settings, versions, wall time).

Pinned for reproducibility: torch 2.15.0, transformers 5.23.0 (the versions the bundled model's CPU
runs used; its GPU run used the GPU machine's torch 2.11.0+cu130; others may give slightly
different weights). Seeded (--seed).
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_DIR = os.path.join(REPO, "tests", "fixtures", "qwen2_vl_hub")
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.json"]
ASSISTANT_START = "<|im_start|>assistant\n"
IM_END = "<|im_end|>"

# Image sizes the model sees: at least 2x2 merged tokens (--min-pixels raises it), at most 8x8
# (224 x 224 pixels).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224


def mrope_sections(args):
    head_dim = args.hidden // args.heads
    section = [int(x) for x in args.mrope_section.split(",")]
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise SystemExit(f"--mrope-section {args.mrope_section}: three numbers adding up to head_dim / 2 = {head_dim // 2}")
    return section


def model_config(args):
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": args.hidden,
        "initializer_range": 0.02,
        "intermediate_size": args.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": args.layers,
        "model_type": "qwen2_vl",
        "num_attention_heads": args.heads,
        "num_hidden_layers": args.layers,
        "num_key_value_heads": args.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": args.rope_theta,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": args.vision_layers,
            "embed_dim": args.vision_dim,
            "mlp_ratio": 2,
            "num_heads": args.vision_heads,
            "in_chans": 3,
            "hidden_size": args.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_sections(args)},
        "vocab_size": 151936,
    }


def preprocessor_config(min_pixels):
    return {
        "min_pixels": min_pixels,
        "max_pixels": MAX_PIXELS,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_static_files(out, min_pixels):
    os.makedirs(out, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(out, name))
    write_json(os.path.join(out, "preprocessor_config.json"), preprocessor_config(min_pixels))
    write_json(
        os.path.join(out, "generation_config.json"),
        {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
         "do_sample": False, "transformers_version": transformers.__version__},
    )


def data_dirs(data):
    """--data is one folder `qwen-vl synth` wrote, or several joined by commas."""
    return [d for d in data.split(",") if d]


def load_rows(data):
    """Every turn of every data folder, its image path made absolute and its scene keyed by
    (folder, scene), so both stay unique across folders."""
    rows = []
    for i, d in enumerate(data_dirs(data)):
        with open(os.path.join(d, "data.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                r["image"] = os.path.abspath(os.path.join(d, r["image"]))
                r["scene"] = (i, r["scene"])  # scene numbers restart in every folder
                rows.append(r)
    return rows


def render(processor, row):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + row["answer"] + IM_END


class Batches:
    """Shuffled batches of (input_ids, attention_mask, labels, pixel_values, image_grid_thw)."""

    def __init__(self, rows, processor, batch, seed):
        self.rows, self.processor, self.batch = rows, processor, batch
        self.rng = random.Random(seed)
        self.order = []
        self.assistant = processor.tokenizer(ASSISTANT_START, add_special_tokens=False)["input_ids"]

    def encode(self, chosen):
        texts = [render(self.processor, r) for r in chosen]
        images = [Image.open(r["image"]).convert("RGB") for r in chosen]
        enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = torch.full_like(enc["input_ids"], -100)
        n = len(self.assistant)
        for b in range(len(chosen)):
            ids = enc["input_ids"][b].tolist()
            starts = [i for i in range(len(ids) - n + 1) if ids[i:i + n] == self.assistant]
            start = starts[-1] + n
            valid = int(enc["attention_mask"][b].sum())
            # Padding is on the right: the answer and its <|im_end|> end at `valid`.
            labels[b, start:valid] = enc["input_ids"][b, start:valid]
        enc["labels"] = labels
        return dict(enc)

    def next(self):
        if len(self.order) < self.batch:
            self.order = list(range(len(self.rows)))
            self.rng.shuffle(self.order)
        chosen = [self.rows[self.order.pop()] for _ in range(self.batch)]
        return chosen, self.encode(chosen)


class BatchStream(torch.utils.data.IterableDataset):
    """Endless (turns, encoding, probe targets, answer-token weights) batches; the targets are
    None without probes and the weights None when every one is 1. With DataLoader workers each worker
    draws its own shuffle (seeded by the run's seed and its worker id), so a GPU is not left
    waiting on the image processor; with none it is the single-process order of earlier runs."""

    def __init__(self, rows, processor, batch, seed, scenes, with_targets, box_weights):
        self.rows, self.processor, self.batch, self.seed = rows, processor, batch, seed
        self.scenes, self.with_targets, self.box_weights = scenes, with_targets, box_weights

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = self.seed if info is None else self.seed * 1000 + 1 + info.id
        if info is not None:
            torch.set_num_threads(1)
        batches = Batches(self.rows, self.processor, self.batch, seed)
        while True:
            chosen, enc = batches.next()
            targets = batch_targets(chosen, enc, self.scenes) if self.with_targets else None
            weights = self.box_weights(chosen, enc["labels"]) if self.box_weights.active else None
            yield chosen, enc, targets, weights


def domain_ids(rows, processor):
    """Every token id that occurs in the rendered data (prompts, answers, template, image)."""
    tok = processor.tokenizer
    ids = set()
    texts = {r["prompt"] for r in rows} | {r["answer"] for r in rows}
    for t in texts:
        ids.update(tok(t, add_special_tokens=False)["input_ids"])
    sample = render(processor, rows[0])
    ids.update(tok(sample, add_special_tokens=False)["input_ids"])
    ids.update([151643, 151645, 151652, 151653, 151655, 198])
    return sorted(ids)


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
KINDS = ["circle", "square", "triangle", "star", "diamond"]
SIZES = ["small", "medium", "large"]
IMAGE_TOKEN = 151655
# Per image token: colour, kind and size of the shape under it (class "none" last), its own row
# and column in the merged-token grid, and that shape's box on the 0-1 grid.
AUX_CLASSES = [len(COLOURS) + 1, len(KINDS) + 1, len(SIZES) + 1]
AUX_OUT = sum(AUX_CLASSES) + 2 + 4


def load_scenes(data):
    """absolute image path -> scene record (scenes.jsonl from `qwen-vl synth`), or {} when a
    folder lacks it (older data)."""
    scenes = {}
    for d in data_dirs(data):
        path = os.path.join(d, "scenes.jsonl")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                scenes[os.path.abspath(os.path.join(d, r["image"]))] = r
    return scenes


def shape_classes(shape):
    """[colour, kind, size] class indices of one shape record."""
    return torch.tensor([COLOURS.index(shape["colour"]), KINDS.index(shape["kind"]), SIZES.index(shape["size"])])


def shape_box(shape, scene):
    """The shape's box on the 0-1 grid of its scene."""
    bx = shape["bbox"]
    return torch.tensor([bx[0] / scene["width"], bx[1] / scene["height"],
                         bx[2] / scene["width"], bx[3] / scene["height"]])


def token_targets(scene, grid_h, grid_w):
    """Targets for the grid_h x grid_w merged image tokens of one scene, in raster order.

    A token belongs to the shape whose box covers the largest part of its cell (at least a
    fifth), and every shape gets at least the token it covers most."""
    n = grid_h * grid_w
    cls = torch.tensor([len(COLOURS), len(KINDS), len(SIZES)]).repeat(n, 1)  # "none"
    box = torch.zeros(n, 4)
    in_shape = torch.zeros(n, dtype=torch.bool)
    rc = torch.zeros(n, 2)
    width, height = scene["width"], scene["height"]
    cover = torch.zeros(n, len(scene["shapes"]))
    for t in range(n):
        r, c = divmod(t, grid_w)
        rc[t] = torch.tensor([r / 8.0, c / 8.0])
        x0, x1 = c / grid_w * width, (c + 1) / grid_w * width
        y0, y1 = r / grid_h * height, (r + 1) / grid_h * height
        for k, sh in enumerate(scene["shapes"]):
            bx = sh["bbox"]
            ox = max(0.0, min(x1, bx[2]) - max(x0, bx[0]))
            oy = max(0.0, min(y1, bx[3]) - max(y0, bx[1]))
            cover[t, k] = ox * oy / ((x1 - x0) * (y1 - y0))
    owner = {}
    for t in range(n):
        if len(scene["shapes"]) and float(cover[t].max()) >= 0.2:
            owner[t] = int(cover[t].argmax())
    for k in range(len(scene["shapes"])):
        t = int(cover[:, k].argmax())
        if float(cover[t, k]) > 0 and t not in owner:
            owner[t] = k
    for t, k in owner.items():
        cls[t] = shape_classes(scene["shapes"][k])
        box[t] = shape_box(scene["shapes"][k], scene)
        in_shape[t] = True
    return cls, rc, box, in_shape


def find_shape(name, shapes):
    """Index of the one shape `name` ("the red circle", "the largest shape", ...) means, or None."""
    words = name.split()[1:] if name.startswith("the ") else name.split()
    area = [(s["bbox"][2] - s["bbox"][0]) * (s["bbox"][3] - s["bbox"][1]) for s in shapes]
    if words == ["largest", "shape"] and shapes:
        return max(range(len(shapes)), key=lambda i: area[i])
    if words == ["smallest", "shape"] and shapes:
        return min(range(len(shapes)), key=lambda i: area[i])
    found = [i for i, s in enumerate(shapes)
             if all(w in (s["colour"], s["kind"], s["size"], "shape") for w in words)]
    return found[0] if len(found) == 1 else None


def referenced_shapes(scene, row):
    """The shapes a question is about, in the order it names them: one for a colour, shape,
    grounding (or the pipeline's grounding of a step) or yes-answered yes/no question, two for a
    position question; [] when there is none or a name is ambiguous."""
    task, prompt = row["task"], row["prompt"]
    if task in ("colour", "shape"):
        names = re.findall(r" is (the [a-z ]+)\?$", prompt)
    elif task in ("grounding", "pipeline_grounding"):
        names = re.findall(r"<\|object_ref_start\|>(?:Locate )?(the [a-z ]+)<\|object_ref_end\|>$", prompt)
    elif task == "position":
        m = re.search(r"^Is (the [a-z ]+?) (?:to the left or to the right of|above or below) (the [a-z ]+)\?$", prompt)
        names = list(m.groups()) if m else []
    elif task == "yesno" and row["answer"].strip() == "yes":
        names = re.findall(r"^Is there an? ([a-z ]+)\?$", prompt)
    else:
        return []
    found = [find_shape(n, scene["shapes"]) for n in names]
    return found if found and None not in found else []


def batch_targets(chosen, enc, scenes):
    """Targets for every image token of the batch (row-major, as `input_ids == IMAGE_TOKEN`
    selects them); crops have no scene record and get ignored class targets."""
    cls, rc, box, in_shape, has_scene = [], [], [], [], []
    for b, r in enumerate(chosen):
        _, gh, gw = [int(x) for x in enc["image_grid_thw"][b]]
        h, w = gh // 2, gw // 2
        scene = scenes.get(r["image"])
        if scene is None:
            cls.append(torch.full((h * w, 3), -100, dtype=torch.long))
            rc.append(torch.zeros(h * w, 2))
            box.append(torch.zeros(h * w, 4))
            in_shape.append(torch.zeros(h * w, dtype=torch.bool))
            has_scene.append(torch.zeros(h * w, dtype=torch.bool))
            continue
        c, p, bx, m = token_targets(scene, h, w)
        cls.append(c), rc.append(p), box.append(bx), in_shape.append(m)
        has_scene.append(torch.ones(h * w, dtype=torch.bool))
    # Per row: the shapes the question is about, read at the position that predicts the answer
    # (the second one's box only for position questions).
    q_cls = torch.full((len(chosen), 3), -100, dtype=torch.long)
    q_box = torch.zeros(len(chosen), 8)
    q_has = torch.zeros(len(chosen), 2, dtype=torch.bool)
    for b, r in enumerate(chosen):
        scene = scenes.get(r["image"])
        found = referenced_shapes(scene, r) if scene else []
        if not found:
            continue
        q_cls[b] = shape_classes(scene["shapes"][found[0]])
        for j, k in enumerate(found):
            q_box[b, 4 * j:4 * j + 4] = shape_box(scene["shapes"][k], scene)
            q_has[b, j] = True
    return {"cls": torch.cat(cls), "rc": torch.cat(rc), "box": torch.cat(box),
            "in_shape": torch.cat(in_shape), "has_scene": torch.cat(has_scene),
            "q_cls": q_cls, "q_box": q_box, "q_has": q_has}


def class_losses(out, cls, prefix, parts):
    """Cross-entropy of each class group (colour, kind, size) at the front of `out`; logs each
    into `parts` as `{prefix}_{group}` (a detached tensor: reading it would wait for the GPU).
    Returns the sum and the column after the groups."""
    total, i = 0.0, 0
    for j, n in enumerate(AUX_CLASSES):
        ce = torch.nn.functional.cross_entropy(out[:, i:i + n], cls[:, j], ignore_index=-100)
        total = total + ce
        parts[f"{prefix}_{['colour', 'kind', 'size'][j]}"] = ce.detach()
        i += n
    return total, i


def aux_loss(heads, hidden_states, enc, targets, layer, query_layer):
    """Training-only probes on the image tokens (not exported): the vision output (the language
    model's input) must tell each token's shape colour, kind and size; the states after
    `layer` language-model layers must also tell the token's grid position and its shape's box.
    Dense targets on every image token teach binding and position much faster than the few
    answer tokens do."""
    image = enc["input_ids"] == IMAGE_TOKEN
    total = 0.0
    parts = {}
    for name, states, with_geometry in (("vision", hidden_states[0], False), ("mid", hidden_states[layer], True)):
        out = heads[name](states[image].float())
        ce, i = class_losses(out, targets["cls"], name, parts)
        total = total + ce
        if with_geometry:
            seen = targets["has_scene"]
            if seen.any():
                pos = torch.nn.functional.smooth_l1_loss(out[seen, i:i + 2], targets["rc"][seen], beta=0.05)
                total = total + 4 * pos
                parts["mid_position"] = pos.detach()
            m = targets["in_shape"]
            if m.any():
                bl = torch.nn.functional.smooth_l1_loss(out[m, i + 2:i + 6], targets["box"][m], beta=0.05)
                total = total + 4 * bl
                parts["mid_box"] = bl.detach()
    # Every position that predicts an answer token, after `query_layer` layers: it must have
    # fetched the referenced shapes' attributes and boxes from the image tokens (a box's digits
    # come many tokens after the answer starts, and each needs the box at hand).
    has = targets["q_has"][:, 0]
    if has.any():
        predicts = torch.zeros_like(enc["labels"], dtype=torch.bool)
        predicts[:, :-1] = enc["labels"][:, 1:] != -100
        predicts &= has[:, None]
        rows = predicts.nonzero()[:, 0]
        states = hidden_states[min(query_layer, len(hidden_states) - 1)]
        q = heads["query"](states[predicts].float())
        ce, i = class_losses(q, targets["q_cls"][rows], "query", parts)
        total = total + ce
        box_mask = targets["q_has"][rows].repeat_interleave(4, dim=1)
        err = torch.nn.functional.smooth_l1_loss(q[:, i:i + 8], targets["q_box"][rows], beta=0.05, reduction="none")
        bl = (err * box_mask).sum() / box_mask.sum()
        total = total + 4 * bl
        parts["query_box"] = bl.detach()
    return total, parts


def domain_index(domain, device):
    """The domain token ids, and for every vocabulary id its column in the restricted logits
    (the extra zero column, len(domain), for tokens outside the domain)."""
    ids = torch.tensor(domain, device=device)
    index = torch.full((151936,), len(domain), dtype=torch.long, device=device)
    index[ids] = torch.arange(len(domain), device=device)
    return ids, index


def restricted_loss(model, enc, dom):
    """Cross-entropy over the domain tokens (`dom`: domain_index's pair) plus one zero logit for
    all others; also returns the language model's hidden states (embeddings first) for the
    probes."""
    out = model.model(**{k: v for k, v in enc.items() if k != "labels"}, output_hidden_states=True)
    hidden = out.last_hidden_state[:, :-1]
    labels = enc["labels"][:, 1:]
    mask = labels != -100
    h = hidden[mask]
    target = labels[mask]
    ids, index = dom
    table = model.lm_head.weight[ids]  # tied with the input embeddings
    logits = h @ table.T
    logits = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)
    per_token = torch.nn.functional.cross_entropy(logits, index[target], reduction="none")
    return per_token, mask, out.hidden_states


BOX_TASKS = ("grounding", "pipeline_grounding")


def parse_task_weights(spec):
    """`grounding=2,pipeline_grounding=2` -> {"grounding": 2.0, ...}."""
    out = {}
    for part in filter(None, (spec or "").split(",")):
        name, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"--task-weight: expected TASK=WEIGHT, got {part!r}")
        out[name.strip()] = float(value)
    return out


class BoxWeights:
    """Per answer-token loss weights for box answers (--digit-weights, --box-text-weight): a
    digit weighs by its place in its number (hundreds-and-up, tens, units) and every other
    token of a box answer by `text`; elsewhere 1. A box's units digit hardly moves its IoU but
    is nearly unpredictable (about ln 10 each), and the easy bracket and name tokens dilute the
    few digits that matter in a per-turn mean. Computed beside the labels (in the data-loading
    workers when there are any), and not at all when every weight is 1."""

    def __init__(self, digit_ids, digit_weights, text):
        self.digit_ids = digit_ids
        self.high, self.tens, self.units = digit_weights
        self.text = text

    @property
    def active(self):
        return (self.high, self.tens, self.units, self.text) != (1.0, 1.0, 1.0, 1.0)

    def __call__(self, chosen, labels):
        """Weights in the layout of `labels` (a batch of label rows, -100 outside answers)."""
        w = torch.ones(labels.shape, dtype=torch.float32)
        is_digit = torch.isin(labels, self.digit_ids)
        for b, row in enumerate(chosen):
            if row["task"] not in BOX_TASKS:
                continue
            w[b, labels[b] != -100] = self.text
            digits = is_digit[b].tolist()
            i, n = 0, len(digits)
            while i < n:
                if not digits[i]:
                    i += 1
                    continue
                j = i
                while j < n and digits[j]:
                    j += 1
                for k in range(i, j):
                    place = j - 1 - k
                    w[b, k] = self.units if place == 0 else self.tens if place == 1 else self.high
                i = j
        return w


def non_finite_report(chosen, enc, per_token, mask, hidden_states):
    """Which turns of a batch went non-finite, and from where (the vision output that enters the
    language model, or a later layer): to tell a numerics problem from a data one."""
    losses = per_row_loss(per_token.detach(), mask)
    image = enc["input_ids"] == IMAGE_TOKEN
    bad = []
    for b, (r, l) in enumerate(zip(chosen, losses)):
        if math.isfinite(l):
            continue
        first = next((i for i, h in enumerate(hidden_states) if not torch.isfinite(h[b].float()).all()), None)
        bad.append({"task": r["task"], "tokens": int(enc["attention_mask"][b].sum()), "image_tokens": int(image[b].sum()),
                    "first_non_finite_hidden_state": first})
    return f"{len(bad)} of {len(chosen)} turns: {json.dumps(bad)}"


def per_row_loss(per_token, mask):
    per_token, counts = per_token.cpu(), mask.sum(1).tolist()
    out, i = [], 0
    for c in counts:
        out.append(float(per_token[i:i + c].mean()) if c else 0.0)
        i += c
    return out


@torch.no_grad()
def greedy_check(model, processor, rows, dom, n, device, max_new=48):
    """Greedy answers of held-out turns: exact-match rate, and whether full-vocabulary argmax
    ever differs from the domain argmax (`dom`: the domain token ids on `device`)."""
    model.eval()
    exact, differ = 0, 0
    for r in rows[:n]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image = Image.open(r["image"]).convert("RGB")
        enc = processor(text=[prompt], images=[image], return_tensors="pt").to(device)
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        for s in out.scores:
            full = int(s[0].argmax())
            restricted = int(dom[s[0, dom].argmax()])
            differ += int(full != restricted)
        text = processor.tokenizer.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
        exact += int(text.replace(IM_END, "").strip() == r["answer"].strip())
    model.train()
    return exact / max(n, 1), differ


def lm_layer(key):
    """The decoder layer a training-side parameter name belongs to, or None."""
    prefix = "model.language_model.layers."
    return int(key[len(prefix):].split(".")[0]) if key.startswith(prefix) else None


def load_hub_weights(model, folder):
    """Starts from a checkpoint this script saved (hub names, bf16), to continue training."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(folder, "model.safetensors"))
    mapped = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            mapped["model.visual." + k[len("visual."):]] = v.float()
        elif k.startswith("model."):
            mapped["model.language_model." + k[len("model."):]] = v.float()
        else:
            raise ValueError(f"{folder}: unexpected tensor {k}")
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied
    # Growing: language-model layers beyond the checkpoint's start as the identity (their
    # output projections zero), so the grown model computes what the checkpoint did.
    old_layers = 1 + max(lm_layer(k) for k in mapped if lm_layer(k) is not None)
    grown = sorted({lm_layer(m) for m in missing if (lm_layer(m) or 0) >= old_layers})
    missing = [m for m in missing if lm_layer(m) not in grown]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for i in grown:
            layer = model.model.language_model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    print(f"continuing from {folder}" + (f"; new layers {grown} start as the identity" if grown else ""), flush=True)


def save(model, domain, out, log):
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied
        if k.startswith("model.language_model."):
            name = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            name = "visual." + k[len("model.visual."):]
        else:
            raise ValueError(k)
        sd[name] = v.detach().to("cpu", torch.bfloat16).contiguous().clone()
    tmp = os.path.join(out, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    write_json(os.path.join(out, "config.json"), log["config"])
    write_json(os.path.join(out, "training_log.json"), log)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device to train on: cpu, cuda")
    ap.add_argument("--workers", type=int, default=0,
                    help="data-loading processes (0: in the training process, the order of the bundled model's runs)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vision-dim", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--vision-heads", type=int, default=4)
    ap.add_argument("--min-pixels", type=int,
                    help=f"images smaller than this many pixels are scaled up to it (preprocessor_config.json's "
                         f"min_pixels; default {MIN_PIXELS}, or the --init-from checkpoint's). Small shapes in "
                         "small images get more patches")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--init-from", help="a folder this script saved: continue from its weights")
    ap.add_argument("--rope-theta", type=float, default=20.0,
                    help="language-model rope base; with head_dim 32 a large base leaves the image rows and columns "
                         "(the last M-RoPE sections) almost no rotation")
    ap.add_argument("--mrope-section", default="2,7,7", help="t,h,w rotary pairs (sum head_dim / 2)")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the image-token probes (0: off)")
    ap.add_argument("--token-mean", dest="row_mean", action="store_false",
                    help="average the loss over answer tokens (default: over turns)")
    ap.add_argument("--task-weight", default="",
                    help="loss weight per task, e.g. grounding=2,pipeline_grounding=2 (others 1)")
    ap.add_argument("--digit-weights", default="1,1,1",
                    help="weights of a box answer's digits by place: hundreds-and-up,tens,units")
    ap.add_argument("--box-text-weight", type=float, default=1.0,
                    help="weight of a box answer's other tokens (brackets, commas, the object's name)")
    ap.add_argument("--aux-layer", type=int, default=2, help="language-model layer whose output the geometry probe reads")
    ap.add_argument("--query-layer", type=int, help="language-model layer whose output the query probe reads "
                    "(default: --aux-layer + 1)")
    ap.add_argument("--head-warmup", type=int,
                    help="steps that train only the probe heads first (default: 200 with --init-from, else 0)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                    help="bf16 autocast over float32 weights (default: on for the CPU, off for CUDA, where it went "
                         "non-finite at the vision output within 3 steps on an H200 with torch 2.11)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], help="transformers attention implementation (default: its own)")
    args = ap.parse_args()
    if args.query_layer is None:
        args.query_layer = args.aux_layer + 1
    task_weights = parse_task_weights(args.task_weight)
    try:
        args.digit_weights = [float(x) for x in args.digit_weights.split(",")]
    except ValueError:
        args.digit_weights = []
    if len(args.digit_weights) != 3:
        raise SystemExit("--digit-weights: expected three numbers, hundreds-and-up,tens,units (e.g. 1,1,0.25)")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked
    if args.min_pixels is None:
        args.min_pixels = MIN_PIXELS
        if args.init_from:
            # Continuing: the images keep the size the run before saw, unless asked otherwise.
            with open(os.path.join(args.init_from, "preprocessor_config.json")) as f:
                args.min_pixels = json.load(f).get("min_pixels", MIN_PIXELS)
    if not MIN_PIXELS <= args.min_pixels <= MAX_PIXELS:
        raise SystemExit(f"--min-pixels: expected {MIN_PIXELS} to {MAX_PIXELS} (the max_pixels), got {args.min_pixels}")
    write_static_files(args.out, args.min_pixels)
    processor = AutoProcessor.from_pretrained(args.out)

    rows = load_rows(args.data)
    scene_meta = load_scenes(args.data)
    if args.aux_weight > 0 and not scene_meta:
        raise SystemExit(f"{args.data}/scenes.jsonl is missing (regenerate with `qwen-vl synth`) or pass --aux-weight 0")
    scenes = sorted({r["scene"] for r in rows})
    held = set(scenes[-max(1, args.holdout // 10):])
    train_rows = [r for r in rows if r["scene"] not in held]
    held_rows = [r for r in rows if r["scene"] in held]
    random.Random(1).shuffle(held_rows)
    domain = domain_ids(rows, processor)
    print(f"{len(train_rows)} training turns, {len(held_rows)} held out, {len(domain)} domain tokens", flush=True)
    unknown = set(task_weights) - {r["task"] for r in rows}
    if unknown:
        raise SystemExit(f"--task-weight names tasks the data does not have: {sorted(unknown)}")
    digit_ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
    box_weights = BoxWeights(digit_ids, args.digit_weights, args.box_text_weight)
    if not args.row_mean and (task_weights or box_weights.active):
        raise SystemExit("--task-weight, --digit-weights and --box-text-weight weigh the per-turn loss mean; "
                         "they have no effect with --token-mean: drop one or the other")

    cfg = model_config(args)
    # Trained in float32 (config.json says bfloat16, the dtype of the saved weights; left in
    # the training config, transformers would run the forward pass in it).
    extra = {"attn_implementation": args.attn} if args.attn else {}
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(dict(cfg, torch_dtype="float32", dtype="float32"), **extra))
    model.float()
    if args.init_from:
        load_hub_weights(model, args.init_from)
    device = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = device.type == "cpu"
    model.to(device)
    model.train()
    dom = domain_index(domain, device)
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    print(f"rope base {args.rope_theta}: inverse frequencies {[round(float(f), 4) for f in inv_freq]}", flush=True)
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens.weight
        keep = torch.zeros(emb.shape[0], dtype=torch.bool, device=device)
        keep[dom[0]] = True
        emb[~keep] = 0.0
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f} M parameters ({params * 2 / 1e6:.1f} MB in bf16)", flush=True)

    heads = torch.nn.ModuleDict({"vision": torch.nn.Linear(args.hidden, sum(AUX_CLASSES)),
                                 "mid": torch.nn.Linear(args.hidden, AUX_OUT),
                                 "query": torch.nn.Linear(args.hidden, sum(AUX_CLASSES) + 8)}).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0},
                             {"params": list(heads.parameters()), "weight_decay": 0.01}],
                            lr=args.lr, betas=(0.9, 0.98))
    # The probe heads are not saved: continuing, they start untrained, and their first gradients
    # would wreck the trained model. They train alone for the first --head-warmup steps.
    head_warmup = args.head_warmup if args.head_warmup is not None else (200 if args.init_from else 0)
    budget = args.minutes * 60.0
    stream = BatchStream(train_rows, processor, args.batch, args.seed, scene_meta, args.aux_weight > 0, box_weights)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                               prefetch_factor=4 if args.workers else None))
    log = {
        "config": cfg, "args": vars(args), "domain_tokens": len(domain), "parameters": params,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "curve": [], "checks": [],
    }
    if args.init_from:
        # The lineage: the run this one continues, with its own lineage inside.
        previous = os.path.join(args.init_from, "training_log.json")
        if os.path.exists(previous):
            with open(previous) as f:
                log["init_from"] = {"folder": args.init_from, "log": json.load(f)}
    start = time.time()
    window, task_window, aux_window = [], {}, {}
    data_time = 0.0
    step = 0
    while step < args.max_steps:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        # Warmup, then cosine to 10 % over the time budget.
        frac = min(1.0, elapsed / budget)
        lr = args.lr * min(1.0, max(0, step + 1 - head_warmup) / args.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups[:2]:
            g["lr"] = lr
        opt.param_groups[2]["lr"] = args.lr if step < head_warmup else lr
        t0 = time.time()
        chosen, enc, targets, tok_w = next(batches)
        enc = {k: v.to(device) for k, v in enc.items()}
        if targets is not None:
            targets = {k: v.to(device) for k, v in targets.items()}
        data_time += time.time() - t0
        # Mixed precision: float32 weights and optimizer, bfloat16 matmuls (about 4x faster on
        # CPUs with AVX512-BF16 / AMX, such as the one this was trained on).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            per_token, mask, hidden_states = restricted_loss(model, enc, dom)
        if args.row_mean:
            # Every turn weighs the same (times its --task-weight), however long its answer: a
            # one-word colour answer counts as much as a 20-token box or a JSON plan.
            rows_of = mask.nonzero()[:, 0]
            # Weights of the predicted tokens: labels[:, 1:], as in restricted_loss.
            tok_w = torch.ones_like(per_token) if tok_w is None else tok_w[:, 1:].to(device)[mask]
            counts = torch.zeros(mask.shape[0], dtype=per_token.dtype, device=device).index_add(0, rows_of, tok_w)
            sums = torch.zeros(mask.shape[0], dtype=per_token.dtype, device=device).index_add(0, rows_of, per_token * tok_w)
            row_w = torch.tensor([task_weights.get(r["task"], 1.0) for r in chosen], dtype=per_token.dtype, device=device)
            seen = counts > 0
            loss = (row_w[seen] * sums[seen] / counts[seen]).sum() / row_w[seen].sum()
        else:
            loss = per_token.mean()
        aux_parts = {}
        if args.aux_weight > 0:
            aux, aux_parts = aux_loss(heads, hidden_states, enc, targets, args.aux_layer, args.query_layer)
            total = loss + args.aux_weight * aux
        else:
            total = loss
        if not torch.isfinite(total):
            raise SystemExit(f"step {step + 1}: non-finite loss; {non_finite_report(chosen, enc, per_token, mask, hidden_states)}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        opt.step()
        with torch.no_grad():  # keep the untrained rows exactly zero (weight decay is off for them)
            model.model.language_model.embed_tokens.weight[~keep] = 0.0
        step += 1
        window.append(loss.detach())
        for k, v in aux_parts.items():
            aux_window.setdefault(k, []).append(v)
        for r, l in zip(chosen, per_row_loss(per_token.detach(), mask)):
            task_window.setdefault(r["task"], []).append(l)
        if step % args.log_every == 0:
            entry = {"step": step, "minutes": round((time.time() - start) / 60, 2), "lr": lr,
                     "data_share": round(data_time / (time.time() - start), 3),
                     "loss": float(torch.stack(window).mean()),
                     "tasks": {k: round(sum(v) / len(v), 4) for k, v in sorted(task_window.items())},
                     "probes": {k: round(float(torch.stack(v).mean()), 4) for k, v in sorted(aux_window.items())}}
            log["curve"].append(entry)
            print(json.dumps(entry), flush=True)
            window, task_window, aux_window = [], {}, {}
        if step % args.save_every == 0:
            save(model, domain, args.out, log)
    log["steps"] = step
    log["train_minutes"] = round((time.time() - start) / 60, 2)
    exact, differ = greedy_check(model, processor, held_rows, dom[0], args.holdout, device)
    log["checks"].append({"step": step, "heldout_exact_match": exact, "full_vs_domain_argmax_differences": differ,
                          "heldout_turns": min(args.holdout, len(held_rows))})
    print(json.dumps(log["checks"][-1]), flush=True)
    save(model, domain, args.out, log)
    if differ:
        print(f"WARNING: full-vocabulary greedy differed from domain greedy {differ} times", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
