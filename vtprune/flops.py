"""Analytic FLOPs of a VLM prefill and of one decode step, from the model config and the actual batch.

Units: **real FLOPs, 2 per multiply-add** (a [m, k] x [k, n] matmul is 2·m·k·n). Papers often quote MACs;
``macs = flops / 2``.

What is counted: the matmuls and convolutions, i.e. what ``torch.utils.flop_counter.FlopCounterMode`` counts,
so the two agree (tests/test_flops.py): patch-embedding convolutions, every linear layer (biases not counted),
the attention products QKᵀ and AV, the LM head, and each pruning method's own scoring. Not counted: norms,
activations, softmax, RoPE, the SwiGLU gate product, embedding look-ups (all O(L·D), well under 1 % at real
sizes) and eigensolvers. The one non-matmul term kept is DivPrune/ZOO's k·N greedy updates (1 per compare).

Attention convention: eager and SDPA compute the full L×L score matrix and mask it, and FlopCounterMode scores
the flash/efficient SDPA ops as full L×L too, so the default counts 4·H·L²·d_head per decoder layer. Kernels
that skip the causal half do about half of that: ``llm_prefill_flops`` also returns ``attention_causal``
(L(L+1)/2 instead of L²), and ``count_prefill`` the difference. (On CPU, FlopCounterMode has no formula for
``_scaled_dot_product_flash_attention_for_cpu`` and counts it as 0; the tests register one.)
Padding slots of a batch are computed tokens and are counted: a pruned batch stays rectangular with
length = the longest row.

Grouped-query attention: k/v projections have num_key_value_heads·d_head outputs; the attention products run
over all num_attention_heads query heads (k/v are repeated, not shared in the arithmetic).

Vision towers, as Hugging Face runs them: CLIP runs every layer (even when vision_feature_layer picks an
earlier one) over patches + CLS, once per image or LLaVA-NeXT crop; Qwen2/2.5-VL attend within each image
frame, Qwen2.5-VL's window blocks within each window. Videos (Qwen video_grid_thw) are not counted.
"""
from __future__ import annotations

from typing import Optional

import torch

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
SCORING_METHODS = ("random", "pool", "divprune", "zoo", "fastv", "entropy")


def _family(config) -> str:
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(f"no FLOPs model for model_type {kind!r}; supported: {list(FAMILIES)}")
    return kind


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _shape(x):
    return tuple(x.shape) if torch.is_tensor(x) else tuple(x)


def _rows(x) -> list:
    return x.tolist() if torch.is_tensor(x) else [list(r) for r in x]


# ------------------------------------------------------------------------------------------- vision
def _clip_per_image(vc, height: int, width: int) -> int:
    """One CLIP forward on a height×width crop: conv patch embed + every encoder layer (HF runs all of them
    even when vision_feature_layer selects an earlier hidden state), over T = patches + 1 (CLS) tokens."""
    e, inter, p = vc.hidden_size, vc.intermediate_size, vc.patch_size
    patches = (height // p) * (width // p)
    t = patches + 1
    conv = 2 * patches * vc.num_channels * p * p * e
    layer = 2 * t * e * 4 * e + 4 * t * t * e + 2 * 2 * t * e * inter  # q,k,v,o; QKᵀ+AV; fc1+fc2
    return conv + vc.num_hidden_layers * layer


def _llava_crops(config, pixel_values, image_sizes) -> tuple[int, int, int]:
    """(crops run through the tower, crop height, crop width). pixel_values: [n, 3, H, W] (LLaVA) or
    [n, max_crops, 3, H, W] (LLaVA-NeXT, padded; the real count per image comes from image_sizes)."""
    shape = _shape(pixel_values)
    h, w = shape[-2:]
    if config.model_type == "llava":
        return shape[0], h, w
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    if image_sizes is None:
        return shape[0] * shape[1], h, w
    crops = sum(image_size_to_num_patches(list(s), config.image_grid_pinpoints, config.vision_config.image_size)
                for s in _rows(image_sizes))
    return crops, h, w


def _qwen_dims(vc, family: str):
    """(vision width E, merger output dim): Qwen2-VL names them embed_dim / hidden_size, Qwen2.5-VL
    hidden_size / out_hidden_size."""
    if family == "qwen2_vl":
        return vc.embed_dim, vc.hidden_size
    return vc.hidden_size, vc.out_hidden_size


def _qwen_windows(t: int, h: int, w: int, vc) -> list[int]:
    """Patch counts of the attention windows of one image (Qwen2.5-VL window blocks), as HF tiles them:
    windows of ws×ws merged units from the top-left corner, partial at the bottom/right edges."""
    ms = vc.spatial_merge_size
    ws = vc.window_size // ms // vc.patch_size
    gh, gw = h // ms, w // ms
    sizes = []
    for i in range(0, gh, ws):
        for j in range(0, gw, ws):
            sizes.append(min(ws, gh - i) * min(ws, gw - j) * ms * ms)
    return sizes * t


def vision_flops(config, pixel_values=None, image_grid_thw=None, image_sizes=None) -> int:
    """FLOPs of the vision tower (without the projector / patch merger) for one batch of images.

    LLaVA: pixel_values [n, 3, H, W]; LLaVA-NeXT: pixel_values [n, max_crops, 3, H, W] and image_sizes [n, 2]
    (crops counted per image as HF unpads them); Qwen2/2.5-VL: image_grid_thw [n, 3] (patches in t, h, w).
    Tensors or plain shapes/lists are accepted.
    """
    family = _family(config)
    vc = config.vision_config
    if family in ("llava", "llava_next"):
        if pixel_values is None:
            return 0
        crops, h, w = _llava_crops(config, pixel_values, image_sizes)
        return crops * _clip_per_image(vc, h, w)
    if image_grid_thw is None:
        return 0
    e, _ = _qwen_dims(vc, family)
    full_blocks = set(vc.fullatt_block_indexes) if family == "qwen2_5_vl" else set(range(vc.depth))
    total = 0
    for t, h, w in _rows(image_grid_thw):
        n = t * h * w
        total += 2 * n * vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2 * e  # Conv3d patch embed
        if family == "qwen2_vl":
            mlp = 2 * 2 * n * e * int(e * vc.mlp_ratio)  # fc1, fc2
        else:
            mlp = 3 * 2 * n * e * vc.intermediate_size  # gate, up, down
        full = 4 * e * t * (h * w) ** 2  # attention within each frame
        window = 4 * e * sum(s * s for s in _qwen_windows(t, h, w, vc)) if family == "qwen2_5_vl" else full
        for block in range(vc.depth):
            total += 2 * n * e * 4 * e + mlp + (full if block in full_blocks else window)
    return total


def projector_row_flops(config) -> int:
    """FLOPs of the projector (LLaVA) / patch merger (Qwen) for one output token."""
    family = _family(config)
    vc, tc = config.vision_config, _text(config)
    if family in ("llava", "llava_next"):
        layers = config.vision_feature_layer
        d_in = vc.hidden_size * (1 if isinstance(layers, int) else len(layers))
        return 2 * (d_in * tc.hidden_size + tc.hidden_size * tc.hidden_size)
    e, d_out = _qwen_dims(vc, family)
    q = e * vc.spatial_merge_size ** 2
    return 2 * (q * q + q * d_out)


def projector_flops(config, pixel_values=None, image_grid_thw=None, image_sizes=None) -> int:
    """FLOPs of the multi-modal projector (LLaVA: linear_1, linear_2 on every crop's patch tokens, before
    LLaVA-NeXT unpads) or the Qwen patch merger (one row per spatial_merge_size² patches)."""
    family = _family(config)
    if family in ("llava", "llava_next"):
        if pixel_values is None:
            return 0
        crops, h, w = _llava_crops(config, pixel_values, image_sizes)
        p = config.vision_config.patch_size
        per_crop = (h // p) * (w // p) + (0 if config.vision_feature_select_strategy == "default" else 1)
        return crops * per_crop * projector_row_flops(config)
    if image_grid_thw is None:
        return 0
    merged = sum(t * h * w for t, h, w in _rows(image_grid_thw)) // config.vision_config.spatial_merge_size ** 2
    return merged * projector_row_flops(config)


# ------------------------------------------------------------------------------------------- language model
def _llm_dims(tc):
    heads, kv = tc.num_attention_heads, getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return tc.hidden_size, tc.intermediate_size, heads, kv, head_dim


def _layer_linear(tc, tokens: int) -> tuple[int, int]:
    """(q/k/v/o projections, SwiGLU MLP) FLOPs of one decoder layer on ``tokens`` token rows."""
    d, inter, heads, kv, hd = _llm_dims(tc)
    proj = 2 * tokens * d * (heads + 2 * kv) * hd + 2 * tokens * heads * hd * d
    return proj, 3 * 2 * tokens * d * inter


def lengths_per_layer(num_layers: int, seq_lens_per_stage) -> list[int]:
    """Sequence length each decoder layer runs at. seq_lens_per_stage: {first_layer: length} or a list of
    (first_layer, length); layer 0 must be given; from a stage's layer K on its length applies."""
    stages = sorted(dict(seq_lens_per_stage).items())
    if not stages or stages[0][0] != 0:
        raise ValueError(f"seq_lens_per_stage must give the length at layer 0, got {seq_lens_per_stage!r}")
    return [next(n for k, n in reversed(stages) if k <= i) for i in range(num_layers)]


def llm_prefill_flops(text_config, seq_lens_per_stage, batch: int = 1, logits_to_keep: int = 0) -> dict:
    """Prefill FLOPs of the decoder stack and LM head for ``batch`` rows.

    seq_lens_per_stage: see ``lengths_per_layer`` (an int means one length for all layers). The LM head runs on
    every position of the final length unless ``logits_to_keep`` > 0 (``generate`` passes 1).
    Returns {"projections", "attention", "attention_causal", "mlp", "layers" (= projections + attention + mlp),
    "lm_head", "total", "per_layer" (list)}; "attention_causal" is the lower-triangle count, not in the totals.
    """
    tc = _text(text_config)
    if isinstance(seq_lens_per_stage, int):
        seq_lens_per_stage = {0: seq_lens_per_stage}
    lens = lengths_per_layer(tc.num_hidden_layers, seq_lens_per_stage)
    _, _, heads, _, hd = _llm_dims(tc)
    out = dict(projections=0, attention=0, attention_causal=0, mlp=0, per_layer=[])
    for n in lens:
        proj, mlp = _layer_linear(tc, batch * n)
        attn = 2 * 2 * batch * heads * hd * n * n  # QKᵀ and AV over the full n×n matrix
        out["projections"] += proj
        out["mlp"] += mlp
        out["attention"] += attn
        out["attention_causal"] += 2 * 2 * batch * heads * hd * n * (n + 1) // 2
        out["per_layer"].append(proj + mlp + attn)
    positions = lens[-1] if not logits_to_keep else min(logits_to_keep, lens[-1])
    out["layers"] = out["projections"] + out["attention"] + out["mlp"]
    out["lm_head"] = 2 * batch * positions * tc.hidden_size * tc.vocab_size
    out["total"] = out["layers"] + out["lm_head"]
    return out


def decode_step_flops(text_config, cache_len_per_layer, batch: int = 1) -> dict:
    """FLOPs of generating one token for ``batch`` rows.

    cache_len_per_layer: tokens already in each layer's KV cache (an int for all layers, or a list; pruned
    layers hold fewer). The new token attends to cache + 1 keys. Returns {"layers", "lm_head", "total"}.
    """
    tc = _text(text_config)
    caches = cache_len_per_layer
    if isinstance(caches, int):
        caches = [caches] * tc.num_hidden_layers
    if len(caches) != tc.num_hidden_layers:
        raise ValueError(f"need one cache length per layer ({tc.num_hidden_layers}), got {len(caches)}")
    _, _, heads, _, hd = _llm_dims(tc)
    layers = 0
    for c in caches:
        proj, mlp = _layer_linear(tc, batch)
        layers += proj + mlp + 2 * 2 * batch * heads * hd * (c + 1)
    head = 2 * batch * tc.hidden_size * tc.vocab_size
    return {"layers": layers, "lm_head": head, "total": layers + head}


# ------------------------------------------------------------------------------------------- scoring
def scoring_flops(method: str, n: int, k: int, d: int, *, heads: Optional[int] = None,
                  head_dim: Optional[int] = None, seq_len: Optional[int] = None, m: int = 64,
                  projector_row: Optional[int] = None) -> int:
    """A method's own selection cost for one row: ``n`` visual tokens in, ``k`` kept, feature width ``d``.

    divprune: N×N cosine Gram 2N²D, plus k·N running-minimum updates (compares, counted as 1 each).
    zoo: 2·m·N perturbed projector rows (``projector_row`` FLOPs each) + the divprune terms on the outputs.
    fastv: last query row against ``seq_len`` keys at layer K-1, 2·H·L·d_head.
    entropy: per token the H×H Gram of the centred per-head queries, 2·H²·d_head (the H×H eigensolver,
    O(H³) per token, is not counted, as FlopCounterMode does not count it).
    random / pool: 0.
    """
    diverse = 2 * n * n * d + k * n
    if method in ("random", "pool"):
        return 0
    if method == "divprune":
        return diverse
    if method == "zoo":
        if projector_row is None:
            raise ValueError("zoo scoring needs projector_row (FLOPs of one projector row)")
        return 2 * m * n * projector_row + diverse
    if method == "fastv":
        if heads is None or head_dim is None or seq_len is None:
            raise ValueError("fastv scoring needs heads, head_dim and seq_len")
        return 2 * heads * seq_len * head_dim
    if method == "entropy":
        if heads is None or head_dim is None:
            raise ValueError("entropy scoring needs heads and head_dim")
        return n * 2 * heads * heads * head_dim
    raise ValueError(f"no scoring cost known for method {method!r}; known: {list(SCORING_METHODS)}")


# ------------------------------------------------------------------------------------------- main entry
def _visual_counts(config, input_ids) -> list[int]:
    return (input_ids == config.image_token_id).sum(1).tolist()


def _stage_options(model) -> dict:
    """{layer: options} of the pruner patched on ``model`` (empty when it is not patched)."""
    from .api import _ATTR

    pruner = getattr(model, _ATTR, None)
    return {} if pruner is None else {s.layer: dict(s.options) for s in pruner.stages}


def count_prefill(model, batch, stats=None, logits_to_keep: int = 0) -> dict:
    """FLOPs of one ``model(**batch)`` prefill (``model`` may also be just its config), pruned as ``stats``
    (``vtprune.get_stats(model)`` of that run) says, or unpruned when ``stats`` is None.

    batch: the processor output (input_ids [B, L], pixel_values, image_grid_thw / image_sizes).
    Returns {"vision", "projector", "llm" (decoder layers), "lm_head", "scoring", "total",
    "attention_causal_saving" (what a causal-skipping kernel would not compute, not subtracted),
    "cache_len_per_layer" (prefill KV length per decoder layer, for ``decode_step_flops``),
    "tokens_per_stage" (list: the input, then one entry per stage with seq_len and per-row token counts)}.
    All numbers are real FLOPs (2 per multiply-add).
    """
    config = getattr(model, "config", model)  # a model, or just its config (e.g. for a checkpoint not loaded)
    tc = _text(config)
    input_ids = batch["input_ids"]
    b, length = input_ids.shape
    images = {k: batch.get(k) for k in ("pixel_values", "image_grid_thw", "image_sizes")}
    vision = vision_flops(config, **images)
    projector = projector_flops(config, **images)
    _, _, heads, _, hd = _llm_dims(tc)

    options = _stage_options(model)
    tokens = [{"layer": 0, "method": None, "seq_len": length, "visual": _visual_counts(config, input_ids)}]
    seq_lens = {0: length}
    scoring, cur = 0, length
    for st in sorted(stats or [], key=lambda s: s["layer"]):
        before, after = list(st["tokens_before"]), list(st["tokens_after"])
        opts = options.get(st["layer"], {})
        for n, k in zip(before, after):
            scoring += scoring_flops(st["method"], n, k, tc.hidden_size, heads=heads, head_dim=hd, seq_len=cur,
                                     m=opts.get("m", 64), projector_row=projector_row_flops(config))
        # Each row keeps its non-visual slots (text, padding, earlier dummies) and its kept visual tokens;
        # rows are then right-aligned to the longest one.
        cur = max(cur - n + k for n, k in zip(before, after))
        seq_lens[st["layer"]] = cur
        tokens.append({"layer": st["layer"], "method": st["method"], "seq_len": cur, "tokens_before": before,
                       "tokens_after": after})
    llm = llm_prefill_flops(tc, seq_lens, batch=b, logits_to_keep=logits_to_keep)
    total = vision + projector + llm["layers"] + llm["lm_head"] + scoring
    return {"vision": vision, "projector": projector, "llm": llm["layers"], "lm_head": llm["lm_head"],
            "scoring": scoring, "total": total,
            "attention_causal_saving": llm["attention"] - llm["attention_causal"],
            "cache_len_per_layer": lengths_per_layer(tc.num_hidden_layers, seq_lens), "tokens_per_stage": tokens}
