"""Train the embedded small VLMs (real HF classes) on the procedural Sort-of-CLEVR set of ``eval/data/image.py``.

    python -m training.train --model llava --recipe --out eval/models/llava-tiny-sortofclevr
    python -m training.train --model qwen  --recipe --out eval/models/qwen2_5_vl-tiny-sortofclevr
    (from the root of a clone, with vtprune installed: training/ is not part of the installed package)

Recipe (see the shared note on training such a model on a CPU):

* Stage A -- dense per-token pretraining of the visual side alone (vision tower + projector, i.e. exactly the vectors
  that replace the image placeholders in the LLM).  Throw-away linear probes read, from every visual token: its region
  (background / padding / object), and on object tokens the object's colour, shape, side and the colour of its
  nearest neighbour; the count of each shape in the scene; the object's centre, the token's own position and whether
  it holds the object's centre.  Every answer of the benchmark thus becomes a linearly readable attribute of the
  object's tokens, and each question the same "find the token by one attribute, read another" lookup for the LLM.
  An RMS penalty keeps the visual vectors at unit scale (the scale of the text embeddings, initialised with unit
  variance).
* Stage B -- visual side frozen; the LLM learns from ``image, Q1 A1, Q2 A2, ..., "describe the scene" caption``
  (12 question turns drawn in shuffled rounds of ``DEFAULT_QA_TYPES``, caption last; every answer and caption token
  supervised).  The first turn of every sequence is exactly the evaluation prompt.  Captions list the objects left to
  right with side, top/bottom and nearest neighbour, then the count of each shape.  Options: blank-canvas sequences
  (``--b-blank-every``) and a trainable projector (``--b-projector-lr-scale``, not used by the shipped models).
* ``--recipe`` replays the recorded runs that produced the shipped models (``RECIPES``).
* Evaluation on the test split (full images and blank images) with ``embedded.evaluate_accuracy``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vtprune.eval.catalog import model_dir
from vtprune.eval.data.image import (
    CAPTION_QUESTION,
    COLOUR_NAMES,
    HEIGHT,
    OBJECT_SIZE,
    QUESTION_TYPES,
    SHAPES,
    WIDTH,
    answer_prior,
    ask,
    caption,
    example_seed,
    make_split,
    plural,
    random_scene,
    render,
    turn_text,
)
from vtprune.eval.harness.predict import evaluate_accuracy
from vtprune.eval.models import build_prompt

# One round of question turns in a training sequence: colour, nearest and count questions are the slowest to learn.
DEFAULT_QA_TYPES = "shape,colour,side,count,nearest,colour,nearest,count"
NAMES = {"llava": "llava-tiny-sortofclevr", "qwen": "qwen2_5_vl-tiny-sortofclevr"}

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and processors (built locally)

SPECIALS_COMMON = ["<pad>", "<s>", "</s>", "<unk>"]
SPECIALS = {
    "llava": ["<image>"],
    "qwen": ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
}
IMAGE_TEXT = {"llava": "<image>", "qwen": "<|vision_start|><|image_pad|><|vision_end|>"}


def word_list() -> list[str]:
    words = set(
        "what shape is the object ? colour how many are there nearest to on left or right question answer : "
        "describe scene . , near top bottom".split()
    )
    words |= set(COLOUR_NAMES) | set(SHAPES) | {plural(s) for s in SHAPES} | {str(i) for i in range(10)}
    return sorted(words)


def build_tokenizer(kind: str, extra_words=()):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS_COMMON + SPECIALS[kind]
    # extra words go last, so a model trained on the base vocabulary keeps its token ids
    vocab = {t: i for i, t in enumerate(specials + word_list() + [w for w in extra_words if w not in word_list()])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    extra = {"image_token": SPECIALS[kind][0]}
    if kind == "qwen":
        extra.update(
            {
                "vision_start_token": "<|vision_start|>",
                "vision_end_token": "<|vision_end|>",
                "video_token": "<|video_pad|>",
            }
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=512,
    )
    return tok


def chat_template(kind: str, video: bool = False) -> str:
    img = IMAGE_TEXT[kind]
    vid = "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>" if video else ""
    return (
        "{% for message in messages %}{% if message['content'] is string %} question : {{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}" + img + vid + "{% endif %}"
        "{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %} question : {{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} answer :{% endif %}"
    )


# Geometry of the visual tokens
LLAVA_IMAGE, LLAVA_PATCH = 96, 8  # (120x80 padded to 120x120) -> 96x96 -> 12x12 = 144 tokens
QWEN_PATCH, QWEN_MERGE = 4, 2  # 120x80 kept -> 30x20 patches -> 15x10 = 150 merged tokens


def build_processor(kind: str, extra_words=(), video: bool = False):
    """``video=True`` (Qwen): a chat template with a video entry, and video frames kept at the benchmark's size (the
    image processor's) instead of the video processor's default upscaling to >= 100k pixels."""
    tok = build_tokenizer(kind, extra_words)
    if kind == "llava":
        from transformers import LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        ip = LlavaImageProcessorPil(
            do_pad=True,
            size={"shortest_edge": LLAVA_IMAGE},
            crop_size={"height": LLAVA_IMAGE, "width": LLAVA_IMAGE},
        )
        return LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=LLAVA_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=chat_template(kind),
        )
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    npix = WIDTH * HEIGHT
    ip = Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        size={"shortest_edge": npix, "longest_edge": npix},
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vsize = {"size": {"shortest_edge": npix, "longest_edge": npix}} if video else {}
    vp = Qwen2VLVideoProcessor(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=2, **vsize)
    return Qwen2_5_VLProcessor(
        image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=chat_template(kind, video)
    )


def build_model(kind: str, tok, seed: int):
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    V = len(tok)
    if kind == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        vc = CLIPVisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=LLAVA_IMAGE,
            patch_size=LLAVA_PATCH,
            projection_dim=128,
        )
        tc = LlamaConfig(
            vocab_size=V,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
        cfg = LlavaConfig(
            vision_config=vc,
            text_config=tc,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=(LLAVA_IMAGE // LLAVA_PATCH) ** 2,
            tie_word_embeddings=False,
        )
        model = LlavaForConditionalGeneration(cfg)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tc = dict(
            vocab_size=V,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            **ids,
        )
        # 600 patches per image: keep the tower narrow, windowed (4x4 merged tokens) except the last block
        vc = dict(
            depth=3,
            hidden_size=64,
            intermediate_size=192,
            num_heads=4,
            patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=2,
            window_size=32,
            fullatt_block_indexes=[2],
            out_hidden_size=128,
            in_channels=3,
        )
        cfg = Qwen2_5_VLConfig(
            text_config=tc,
            vision_config=vc,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    # unit-variance text embeddings: the same scale as the (RMS-normalised) visual tokens
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Visual side: features exactly as the LLM receives them, and dense targets


def visual_parts(model, kind):
    if kind == "llava":
        return [model.model.vision_tower, model.model.multi_modal_projector]
    return [model.model.visual]


def visual_features(model, kind, inputs) -> torch.Tensor:
    """[B, T, D] visual vectors that replace the placeholders (LLaVA: CLIP last layer minus CLS, projected;
    Qwen: the PatchMerger output, row-major over the merged grid)."""
    if kind == "llava":
        out = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        h = out.hidden_states[-1][:, 1:]
        return model.model.multi_modal_projector(h)
    out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    B = inputs["image_grid_thw"].shape[0]
    return feats.reshape(B, -1, feats.shape[-1])


def label_map(scene) -> np.ndarray:
    img = Image.new("L", (WIDTH, HEIGHT), 0)
    d = ImageDraw.Draw(img)
    h = OBJECT_SIZE / 2
    for i, o in enumerate(scene.objects):
        box = (o.x - h, o.y - h, o.x + h - 1, o.y + h - 1)
        if o.shape == "circle":
            d.ellipse(box, fill=i + 1)
        elif o.shape == "square":
            d.rectangle(box, fill=i + 1)
        else:
            d.polygon([(o.x, o.y - h), (o.x - h, o.y + h - 1), (o.x + h - 1, o.y + h - 1)], fill=i + 1)
    return np.asarray(img)


def token_grid(kind):
    """(rows, cols, cell size in scene pixels, padding rows on top in scene pixels)."""
    if kind == "llava":  # 120x80 padded to 120x120 (20 px on top and bottom), 12x12 cells of 10 px
        return 12, 12, 10, (WIDTH - HEIGHT) // 2
    cell = QWEN_PATCH * QWEN_MERGE
    return HEIGHT // cell, WIDTH // cell, cell, 0


PAD_LABEL = 255
REGIONS = ("background", "padding", "object")
# Categorical targets of a token covering an object: every answer of the benchmark is one of these, read at the
# object's tokens.  Making each one a crisp, linearly readable feature of the token turns every question into the
# same "find the token by one attribute, read another" lookup, which the small LLM learns quickly (the joint
# colour x shape class alone left shape and position weakly encoded; see docs/models.md).
OBJECT_HEADS = {"colour": len(COLOUR_NAMES), "shape": len(SHAPES), "side": 2, "nearest": len(COLOUR_NAMES)}
# Counts of each shape are a property of the whole scene: every token predicts them (as a ViT's tokens carry
# global context), so a count is readable wherever the LLM looks.
COUNT_CLASSES = 7


def dense_targets(scene, kind):
    """Per-token targets for the ``T = rows * cols`` visual tokens of one scene (row-major):

    region [T] (REGIONS), object attributes [T, 4] (OBJECT_HEADS order, -100 off objects), counts [T, 3]
    (circles / squares / triangles), object centre xy [T, 2], is-object [T], holds-the-centre [T], own xy [T, 2]."""
    R, C, cell, top = token_grid(kind)
    canvas = np.full((R * cell, C * cell), PAD_LABEL, dtype=np.int64)
    canvas[top : top + HEIGHT, :WIDTH] = label_map(scene)
    cells = canvas.reshape(R, cell, C, cell).transpose(0, 2, 1, 3).reshape(R, C, cell * cell)
    n_obj = len(scene.objects)
    region = np.zeros((R, C), dtype=np.int64)
    attrs = np.full((R, C, len(OBJECT_HEADS)), -100, dtype=np.int64)
    obj_xy = np.zeros((R, C, 2), dtype=np.float32)
    is_obj = np.zeros((R, C), dtype=np.float32)
    anchor = np.zeros((R, C), dtype=np.float32)
    thr = max(1, cell * cell // 6)
    per_object = [
        (
            COLOUR_NAMES.index(o.colour),
            SHAPES.index(o.shape),
            int(o.side == "right"),
            COLOUR_NAMES.index(scene.nearest(o.colour).colour),
        )
        for o in scene.objects
    ]
    for r in range(R):
        for c in range(C):
            v = cells[r, c]
            if (v == PAD_LABEL).all():
                region[r, c] = 1
                continue
            counts = np.bincount(v[v != PAD_LABEL], minlength=n_obj + 1)
            k = int(counts[1:].argmax()) + 1 if n_obj else 0
            if n_obj and counts[k] >= thr:
                o = scene.objects[k - 1]
                region[r, c] = 2
                attrs[r, c] = per_object[k - 1]
                obj_xy[r, c] = (o.x / WIDTH, o.y / HEIGHT)
                is_obj[r, c] = 1
    for o in scene.objects:
        r, c = int((o.y + top) // cell), int(o.x // cell)
        anchor[r, c] = 1
    count = np.broadcast_to(np.array([scene.count(s) for s in SHAPES], dtype=np.int64), (R, C, len(SHAPES)))
    rr, cc = np.meshgrid((np.arange(R) + 0.5) / R, (np.arange(C) + 0.5) / C, indexing="ij")
    own = np.stack([cc, rr], -1).astype(np.float32)
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).reshape(R * C, *a.shape[2:])  # noqa: E731
    return f(region), f(attrs), f(count), f(obj_xy), f(is_obj), f(anchor), f(own)


class DenseHead(torch.nn.Module):
    """Throw-away linear probes on the visual vectors (linear, so what they read is linearly readable by the LLM)."""

    def __init__(self, d):
        super().__init__()
        self.region = torch.nn.Linear(d, len(REGIONS))
        self.attrs = torch.nn.ModuleList(torch.nn.Linear(d, n) for n in OBJECT_HEADS.values())
        self.count = torch.nn.Linear(d, len(SHAPES) * COUNT_CLASSES)
        self.reg = torch.nn.Linear(d, 4)  # object centre xy, own xy
        self.anchor = torch.nn.Linear(d, 1)

    def loss(self, feats, targets):
        """Total loss and a dict of per-target accuracies (attributes measured on object tokens only)."""
        region, attrs, count, obj_xy, is_obj, anchor, own = targets
        logits = self.region(feats)
        loss = F.cross_entropy(logits.flatten(0, 1), region.flatten())
        accs = {"region": (logits.argmax(-1) == region).float().mean().item()}
        for j, (name, head) in enumerate(zip(OBJECT_HEADS, self.attrs)):
            logits, tgt = head(feats), attrs[..., j]
            loss = loss + 2.0 * F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
            on = tgt != -100
            accs[name] = (logits.argmax(-1) == tgt)[on].float().mean().item()
        lc = self.count(feats).unflatten(-1, (len(SHAPES), COUNT_CLASSES))
        loss = loss + 0.5 * F.cross_entropy(lc.flatten(0, 2), count.flatten())
        accs["count"] = (lc.argmax(-1) == count).float().mean().item()
        reg = self.reg(feats)
        l_obj = ((reg[..., :2] - obj_xy) ** 2).sum(-1).mul(is_obj).sum() / is_obj.sum().clamp(min=1)
        l_own = ((reg[..., 2:] - own) ** 2).sum(-1).mean()
        l_anc = F.binary_cross_entropy_with_logits(self.anchor(feats).squeeze(-1), anchor, pos_weight=torch.tensor(5.0))
        rms = feats.pow(2).mean(-1)
        loss = loss + 20 * l_obj + 20 * l_own + 0.5 * l_anc + 0.1 * (rms - 1.0).pow(2).mean()
        accs["rms"] = rms.mean().item()
        return loss, accs


def dense_batch(scenes, kind):
    return tuple(torch.stack(x) for x in zip(*(dense_targets(s, kind) for s in scenes)))


def scenes_for_step(seed, step, batch, stream):
    out = []
    for j in range(batch):
        rng = random.Random(example_seed("train", seed, (stream << 40) + step * batch + j))
        out.append((random_scene(rng), rng))
    return out


def stage_a(model, kind, processor, seed, steps, batch, lr, log):
    if steps <= 0:
        return 0.0
    parts = visual_parts(model, kind)
    params = [p for m in parts for p in m.parameters()]
    D = model.config.text_config.hidden_size
    torch.manual_seed(seed + 1)
    head = DenseHead(D)
    opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    for m in parts:
        m.train()
    t0 = time.time()
    for step in range(steps):
        sc = scenes_for_step(seed, step, batch, stream=1)
        images = [render(s) for s, _ in sc]
        inputs = processor.image_processor(images=images, return_tensors="pt")
        feats = visual_features(model, kind, inputs)
        loss, accs = head.loss(feats, dense_batch([s for s, _ in sc], kind))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(
                f"[A {step:5d}] loss {loss.item():.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in accs.items())
                + f" {time.time() - t0:.0f}s"
            )
    return time.time() - t0


# ----------------------------------------------------------------------------------------------------------------------
# Stage B: question answering + captions with the visual side frozen


def sequence_text(
    processor,
    scene,
    rng,
    qa_turns: int = len(QUESTION_TYPES),
    qa_types=QUESTION_TYPES,
    with_caption: bool = True,
    ask_fn=ask,
    prompt_fn=build_prompt,
    caption_fn=caption,
    caption_question: str = CAPTION_QUESTION,
) -> str:
    """``qa_turns`` question turns (rounds of ``qa_types`` -- every question type once by default -- shuffled
    within the round, no question repeated), then the caption turn.  ``ask_fn`` / ``prompt_fn`` / ``caption_fn`` /
    ``caption_question`` swap in another benchmark's questions, first-turn prompt and caption (the video clips of
    ``eval/train_video.py``)."""
    turns = []
    seen = set()
    rounds = -(-qa_turns // len(qa_types))
    types = []
    for _ in range(rounds):
        r = list(qa_types)
        rng.shuffle(r)
        types += r
    for t in types[:qa_turns]:
        for _ in range(4):
            qa = ask_fn(scene, t, rng)
            if qa is not None and qa[0] not in seen:
                seen.add(qa[0])
                turns.append(qa)
                break
    if with_caption:
        turns.append((caption_question, caption_fn(scene)))
    q0, a0 = turns[0]
    text = prompt_fn(processor, q0) + f" {a0} </s>"
    for q, a in turns[1:]:
        text += turn_text(q) + f" {a} </s>"
    return text


def supervise_mask(ids: torch.Tensor, tok) -> torch.Tensor:
    """True on the tokens after every 'answer :' up to and including the next '</s>'."""
    ans, colon, eos = (tok.convert_tokens_to_ids(x) for x in ("answer", ":", "</s>"))
    m = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        on = False
        for i in range(1, len(row)):
            if on:
                m[b, i] = True
                if row[i] == eos:
                    on = False
            elif row[i] == colon and row[i - 1] == ans:
                on = True
    return m


def make_batch(processor, seed, step, batch, stream=2, qa_turns=None, qa_types=QUESTION_TYPES, blank_every: int = 0):
    """One stage-B batch.  With ``blank_every = n``, every n-th sequence shows a blank canvas instead of its scene
    and has no caption: its answers, those of the unseen scene, follow the answer distribution given the question,
    so the model learns to fall back on that prior when the image shows nothing (instead of leaving the answer
    format, which a blank or heavily pruned image otherwise provokes)."""
    sc = scenes_for_step(seed, step, batch, stream)
    blank = [blank_every > 0 and (step * batch + j) % blank_every == 0 for j in range(batch)]
    qa_turns = len(QUESTION_TYPES) if qa_turns is None else qa_turns
    texts = [sequence_text(processor, s, rng, qa_turns, qa_types, with_caption=not b) for (s, rng), b in zip(sc, blank)]
    images = [render(None) if b else render(s) for (s, _), b in zip(sc, blank)]
    return supervised_inputs(processor, texts, images=images)


def supervised_inputs(processor, texts, **media):
    """Right-padded model inputs of training sequences, labels on the answer tokens only."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    inputs = processor(text=texts, padding=True, return_tensors="pt", **media)
    tok.padding_side = "left"
    labels = inputs["input_ids"].clone()
    labels[~supervise_mask(inputs["input_ids"], tok)] = -100
    inputs["labels"] = labels
    return inputs


@torch.no_grad()
def quick_eval(model, processor, examples, kind):
    from vtprune.eval.harness.predict import predict

    model.eval()
    preds = predict(model, processor, examples, batch_size=32)
    model.train()
    res = {}
    for t in QUESTION_TYPES:
        h = [float(p == e.answer) for p, e in zip(preds, examples) if e.qtype == t]
        res[t] = round(sum(h) / max(1, len(h)), 3)
    res["overall"] = round(sum(float(p == e.answer) for p, e in zip(preds, examples)) / len(examples), 3)
    return res


def projector(model, kind):
    """The module mapping vision features to LLM inputs: LLaVA's projector MLP, Qwen's patch merger."""
    return model.model.multi_modal_projector if kind == "llava" else model.model.visual.merger


def stage_b(
    model,
    kind,
    processor,
    seed,
    steps,
    batch,
    lr,
    log,
    val,
    eval_every,
    out_dir,
    qa_turns,
    stream=2,
    qa_types=QUESTION_TYPES,
    projector_lr_scale=0.0,
    blank_every=0,
    batch_fn=None,
    eval_fn=None,
    loss_fn=None,
    extra_params=(),
):
    """Question answering + captions.  The vision tower stays frozen; the projector trains at
    ``projector_lr_scale * lr`` (0: frozen), as in LLaVA's own second stage, which lets the answers' loss amplify
    the feature directions the questions key on.  ``batch_fn(step)`` / ``eval_fn(model)`` replace the image
    benchmark's batches and validation, ``loss_fn(inputs)`` the LM loss (``extra_params``: its own trainable heads;
    the video recipe uses this loop unchanged otherwise)."""
    loss_fn = loss_fn or (lambda inputs: model(**inputs).loss)
    batch_fn = batch_fn or (
        lambda step: make_batch(
            processor, seed, step, batch, stream=stream, qa_turns=qa_turns, qa_types=qa_types, blank_every=blank_every
        )
    )
    eval_fn = eval_fn or (lambda m: quick_eval(m, processor, val, kind))
    if steps <= 0:
        return 0.0, None
    for m in visual_parts(model, kind):
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
    proj = list(projector(model, kind).parameters()) if projector_lr_scale > 0 else []
    for p in proj:
        p.requires_grad_(True)
    proj_ids = {id(p) for p in proj}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in proj_ids] + list(extra_params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    if proj:
        groups.append({"params": proj, "weight_decay": 0.0, "lr": lr * projector_lr_scale})
    params = params + proj
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    model.model.language_model.train()
    t0 = time.time()
    torch.manual_seed(seed + 2)
    best = None
    for step in range(steps):
        loss = loss_fn(batch_fn(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            log(f"[B {step:5d}] loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
        if eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            res = eval_fn(model)
            log(f"[B {step:5d}] val {res} {time.time() - t0:.0f}s")
            if out_dir is not None:  # keep a usable snapshot in case the run is cut short
                save(model, processor, out_dir)
            best = res
    return time.time() - t0, best


def save(model, processor, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.tokenizer.padding_side = "left"
    processor.save_pretrained(out_dir)


def results_record(threads, n_test, previous, full, blank, blank_key, prior, val_res) -> dict:
    """The part of a run's training.json shared by the image and video recipes."""
    return {
        "threads": threads,
        "test_split": {"name": "test", "seed": 0, "n": n_test},
        "previous_run": previous,
        "test_accuracy": full,
        blank_key: blank,
        "answer_prior": prior,
        "last_validation": val_res,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }


def _previous_time(previous) -> float:
    if not previous:
        return 0.0
    return previous.get("train_time_s_including_previous_runs") or previous.get("time_s", {}).get("train_total", 0.0)


# The runs that produced the shipped models, in order; each run after the first continues the previous one
# (``--init-from``).  ``--recipe`` replays them.  The second LLaVA run re-weights the question mix towards colour and
# side questions, which the first had not yet learned; Qwen's short second run adds blank-canvas sequences
# (``--b-blank-every``) so that on an image showing nothing it answers from the prior instead of leaving the format.
_FIRST = (
    "--a-steps 1500 --a-batch 32 --b-steps 2500 --b-batch 16 --qa-turns 12 "
    "--qa-types shape,colour,side,count,nearest,colour,nearest,count --eval-every 250"
)
RECIPES = {
    "llava": [
        _FIRST,
        "--a-steps 0 --b-steps 2500 --b-batch 16 --qa-turns 12 "
        "--qa-types shape,colour,side,count,nearest,colour,side,nearest,colour,side --b-stream 3 "
        "--eval-every 250",
    ],
    "qwen": [
        _FIRST,
        "--a-steps 0 --b-steps 600 --b-batch 16 --b-lr 5e-4 --qa-turns 12 --b-blank-every 8 "
        "--b-stream 3 --eval-every 200",
    ],
}


def run_recipe(kind: str, seed: int, out: Path, threads: int) -> dict:
    """Replay ``RECIPES[kind]``: intermediate runs go to ``out/run<i>``, the last one to ``out``."""
    info, previous = None, None
    runs = RECIPES[kind]
    for i, extra in enumerate(runs):
        target = out if i == len(runs) - 1 else out / f"run{i + 1}"
        argv = ["--model", kind, "--seed", str(seed), "--threads", str(threads), *extra.split(), "--out", str(target)]
        if previous is not None:
            argv += ["--init-from", str(previous)]
        info = main(argv)
        previous = target
    return info


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llava", "qwen"], required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--a-steps", type=int, default=1500)
    ap.add_argument("--a-batch", type=int, default=32)
    ap.add_argument("--a-lr", type=float, default=2e-3)
    ap.add_argument("--b-steps", type=int, default=2500)
    ap.add_argument("--b-batch", type=int, default=16)
    ap.add_argument("--b-lr", type=float, default=1.5e-3)
    ap.add_argument("--qa-turns", type=int, default=12, help="question turns per training sequence")
    ap.add_argument(
        "--qa-types",
        default=DEFAULT_QA_TYPES,
        help="comma list of question types making one round of turns (repeats weight a type)",
    )
    ap.add_argument(
        "--b-projector-lr-scale",
        type=float,
        default=0.0,
        help="stage-B learning rate of the projector / patch merger relative to the LLM's (0: frozen)",
    )
    ap.add_argument(
        "--b-blank-every",
        type=int,
        default=0,
        help="every n-th stage-B sequence shows a blank canvas, answers kept, no caption (0: never)",
    )
    ap.add_argument("--b-stream", type=int, default=2, help="seed stream of the stage-B scenes")
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a saved model folder (use with --a-steps 0 to continue stage B)",
    )
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-size", type=int, default=250)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument(
        "--recipe",
        action="store_true",
        help="replay the runs that produced the shipped model (RECIPES); other stage flags are ignored",
    )
    return ap


def main(argv=None):
    args = parser().parse_args(argv)

    name = NAMES[args.model]
    out_dir = args.out or model_dir(name)
    if args.recipe:
        return run_recipe(args.model, args.seed, out_dir, args.threads)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg):
        print(f"{time.time() - t_start:7.0f}s {msg}", flush=True)

    processor = build_processor(args.model)
    previous = None
    if args.init_from is not None:  # continue a saved run (its visual side is the stage-A result of that run)
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.init_from, local_files_only=True, dtype=torch.float32)
        pj = args.init_from / "training.json"
        previous = json.loads(pj.read_text()) if pj.exists() else None
        log(f"initialised from {args.init_from}")
    else:
        model = build_model(args.model, processor.tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {name}: {n_params / 1e6:.2f} M parameters")

    t_a = stage_a(model, args.model, processor, args.seed, args.a_steps, args.a_batch, args.a_lr, log)
    log(f"stage A done in {t_a:.0f}s")
    qa_types = tuple(args.qa_types.split(",")) if args.qa_types else QUESTION_TYPES
    assert all(t in QUESTION_TYPES for t in qa_types), qa_types
    val = make_split("validation", args.val_size, seed=args.seed)
    t_b, val_res = stage_b(
        model,
        args.model,
        processor,
        args.seed,
        args.b_steps,
        args.b_batch,
        args.b_lr,
        log,
        val,
        args.eval_every,
        out_dir,
        args.qa_turns,
        args.b_stream,
        qa_types,
        args.b_projector_lr_scale,
        args.b_blank_every,
    )
    log(f"stage B done in {t_b:.0f}s")
    train_time = time.time() - t_start

    model.eval()
    if args.dtype == "float16":
        model = model.to(torch.float16)
    save(model, processor, out_dir)
    model = model.float()
    t0 = time.time()
    test = make_split("test", args.test_size, seed=0)
    full = evaluate_accuracy(model, processor, test, batch_size=32)
    blank = evaluate_accuracy(model, processor, test, batch_size=32, blank=True)
    prior = answer_prior(test)
    t_eval = time.time() - t0
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    log(f"test accuracy (full images):  {json.dumps({k: round(v, 4) for k, v in full.items()})}")
    log(f"test accuracy (blank images): {json.dumps({k: round(v, 4) for k, v in blank.items()})}")
    log(f"answer prior (majority per type): {json.dumps({k: round(v, 4) for k, v in prior.items()})}")
    log(
        f"training time {train_time:.0f}s (stage A {t_a:.0f}s, stage B {t_b:.0f}s), eval {t_eval:.0f}s, "
        f"saved {size / 1e6:.2f} MB to {out_dir}"
    )
    info = {
        "name": name,
        "model_class": type(model).__name__,
        "seed": args.seed,
        "command": "python -m training.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params,
        "size_bytes": size,
        "dtype": args.dtype,
        "visual_tokens_per_image": int(token_grid(args.model)[0] * token_grid(args.model)[1]),
        "time_s": {
            "stage_a": round(t_a, 1),
            "stage_b": round(t_b, 1),
            "train_total": round(train_time, 1),
            "eval": round(t_eval, 1),
        },
        "train_time_s_including_previous_runs": round(train_time + _previous_time(previous), 1),
        "init_from": str(args.init_from) if args.init_from else None,
        **results_record(args.threads, len(test), previous, full, blank, "blank_image_accuracy", prior, val_res),
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
