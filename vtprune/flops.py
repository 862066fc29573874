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
frame, Qwen2.5-VL's window blocks within each window; videos (Qwen video_grid_thw) as t-frame grids. Each
family's ``Cost`` (``vtprune.patches``) knows its tower's and projector's shapes; this module asks it.
"""

from __future__ import annotations

from .strategies.base import TOWER


def _cost(config):
    """The FLOPs model of the model's family, which knows its vision tower and projector."""
    from .patches import cost_model

    return cost_model(config)


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ------------------------------------------------------------------------------------------- vision
def vision_flops(config, pixel_values=None, image_grid_thw=None, image_sizes=None, **videos) -> int:
    """FLOPs of the vision tower (without the projector / patch merger) for one batch of images and videos.

    LLaVA: pixel_values [n, 3, H, W]; LLaVA-NeXT: pixel_values [n, max_crops, 3, H, W] and image_sizes [n, 2]
    (crops counted per image as HF unpads them); Qwen2/2.5-VL: image_grid_thw [n, 3] (patches in t, h, w), and
    ``video_grid_thw`` for videos. Tensors or plain shapes/lists are accepted. The family's adapter counts.
    """
    return _cost(config).vision_flops(
        config, pixel_values=pixel_values, image_grid_thw=image_grid_thw, image_sizes=image_sizes, **videos
    )


def projector_row_flops(config) -> int:
    """FLOPs of the projector (LLaVA) / patch merger (Qwen) for one output token."""
    d_in, d_mid, d_out = _cost(config).projector_dims(config)
    return 2 * (d_in * d_mid + d_mid * d_out)


def projector_flops(config, pixel_values=None, image_grid_thw=None, image_sizes=None, **videos) -> int:
    """FLOPs of the multi-modal projector (LLaVA: every crop's patch tokens, before LLaVA-NeXT unpads) or the Qwen
    patch merger (one row per spatial_merge_size² patches)."""
    rows = _cost(config).projector_rows_run(
        config, pixel_values=pixel_values, image_grid_thw=image_grid_thw, image_sizes=image_sizes, **videos
    )
    return rows * projector_row_flops(config)


# ------------------------------------------------------------------------------------------- language model
def _llm_dims(tc):
    heads, kv = tc.num_attention_heads, getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return tc.hidden_size, tc.intermediate_size, heads, kv, head_dim


def _layer_linear(tc, tokens: int, layer: int = 0) -> tuple[int, int]:
    """(q/k/v/o projections, SwiGLU MLP) FLOPs of decoder layer ``layer`` on ``tokens`` token rows. A sparse
    mixture-of-experts layer (Qwen-MoE config names) runs its router and num_experts_per_tok SwiGLU experts."""
    d, inter, heads, kv, hd = _llm_dims(tc)
    proj = 2 * tokens * d * (heads + 2 * kv) * hd + 2 * tokens * heads * hd * d
    experts = getattr(tc, "num_experts", 0) or 0
    if (
        experts
        and layer not in (getattr(tc, "mlp_only_layers", None) or ())
        and (layer + 1) % getattr(tc, "decoder_sparse_step", 1) == 0
    ):
        return proj, 2 * tokens * d * experts + tc.num_experts_per_tok * 3 * 2 * tokens * d * tc.moe_intermediate_size
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
    for layer, n in enumerate(lens):
        proj, mlp = _layer_linear(tc, batch * n, layer)
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
    for layer, c in enumerate(caches):
        proj, mlp = _layer_linear(tc, batch, layer)
        layers += proj + mlp + 2 * 2 * batch * heads * hd * (c + 1)
    head = 2 * batch * tc.hidden_size * tc.vocab_size
    return {"layers": layers, "lm_head": head, "total": layers + head}


# ------------------------------------------------------------------------------------------- scoring
def scoring_flops(
    method: str,
    n: int,
    k: int,
    d: int,
    *,
    heads: int = 0,
    head_dim: int = 0,
    seq_len: int = 0,
    projector_row: int = 0,
    projector_dims: tuple | None = None,
    row_n: int | None = None,
    tower_cls: int = 0,
    tower_head_dim: int = 0,
    text_len: int = 0,
    **options,
) -> int:
    """A method's own selection cost for one row: ``n`` visual tokens in, ``k`` kept, feature width ``d``, as the
    method declared it (``register(..., flops=...)``; 0 when it declared none). ``options`` are the method's
    (e.g. zoo's ``m``); missing ones take the method's defaults. At a tower stage ``d``, ``heads``, ``head_dim`` and
    ``seq_len`` are the tower's, ``tower_cls`` its tokens before the patches."""
    from .strategies.base import ENGINE_OPTIONS, ScoringShape, get_method

    spec = get_method(method)
    shape = ScoringShape(
        n, k, d, heads, head_dim, seq_len, projector_row, projector_dims, row_n, tower_cls, tower_head_dim, text_len
    )
    options = {key: v for key, v in options.items() if key not in ENGINE_OPTIONS}
    return int(spec.flops(shape, **{**spec.options, **options}))


# ------------------------------------------------------------------------------------------- main entry
def visual_counts(config, input_ids) -> list[int]:
    """Visual tokens (image and video placeholders) per row of ``input_ids`` [B, L]."""
    from .patches import adapter_class

    return adapter_class(config).placeholder_mask(config, input_ids).sum(1).tolist()


def _stage_options(model) -> dict:
    """{layer: method options} of the pruner patched on ``model`` (empty when it is not patched)."""
    from .api import get_pruner
    from .stage import method_options

    pruner = get_pruner(model) if not isinstance(model, type) and hasattr(model, "config") else None
    return {} if pruner is None else {s.layer: method_options(s) for s in pruner.stages}


def _instruction_lengths(config, batch) -> list[int]:
    """Per row, the text tokens a text-reading method gets: those after the row's last visual token, else all."""
    import torch

    from .patches import adapter_class

    ids = batch["input_ids"]
    vis = adapter_class(config).placeholder_mask(config, ids)
    mask = batch.get("attention_mask")
    text = ~vis & (torch.ones_like(vis) if mask is None else mask.bool())
    last = torch.where(vis, torch.arange(ids.shape[1]), -1).amax(1, keepdim=True)
    after = (text & (torch.arange(ids.shape[1]) > last)).sum(1)
    return torch.where(after > 0, after, text.sum(1)).tolist()


def _tower_layer(st) -> int | None:
    return st["tower_layer"] if "tower_layer" in st else None  # stats saved before it existed lack it


def _tower_capture(config, st, images: dict) -> int:
    """Reading the tower's attention for a stage scored by it (0 for other stages): runs inside the tower."""
    from .strategies.base import get_method

    if _tower_layer(st) is None or "tower_attention" not in get_method(st["method"]).needs:
        return 0
    return _cost(config).tower_capture_flops(config, st["tower_layer"], **images)


def _tower_stage(config, st, calls: list, opts: dict) -> tuple[dict, int]:
    """What a stage inside the vision tower saves ({"vision", "projector"}: its images' later tower layers and
    projector rows on k instead of N patches) and what its scoring costs, per strategy call (one per image)."""
    cost = _cost(config)
    vc = config.vision_config
    heads = vc.num_attention_heads
    prefix, layers, after = cost.tower_cls_tokens, vc.num_hidden_layers, st["tower_layer"]
    saved = {"vision": 0, "projector": 0}
    scoring = 0
    for n, k in (call for row in calls for call in row):
        per_layer = cost.tower_layer_flops(config, prefix + n) - cost.tower_layer_flops(config, prefix + k)
        saved["vision"] += (layers - 1 - after) * per_layer
        saved["projector"] += (n - k) * projector_row_flops(config)
        scoring += scoring_flops(
            st["method"],
            n,
            k,
            vc.hidden_size,
            heads=heads,
            head_dim=vc.hidden_size // heads,
            seq_len=prefix + n,
            tower_cls=prefix,
            tower_head_dim=cost.tower_head_dim(config),
            **opts,
        )
    return saved, scoring


def count_prefill(model, batch, stats=None, logits_to_keep: int = 0) -> dict:
    """FLOPs of one ``model(**batch)`` prefill (``model`` may also be just its config), pruned as ``stats``
    (``vtprune.get_stats(model)`` of that run) says, or unpruned when ``stats`` is None.

    batch: the processor output (input_ids [B, L], pixel_values, image_grid_thw / image_sizes).
    Returns {"vision", "projector", "llm" (decoder layers), "lm_head", "scoring", "scoring_in_tower" (the part of
    "scoring" that runs inside the vision tower: reading its attention, and a tower stage's choice), "total",
    "attention_causal_saving" (what a causal-skipping kernel would not compute, not subtracted),
    "cache_len_per_layer" (prefill KV length per decoder layer, for ``decode_step_flops``),
    "tokens_per_stage" (list: the input, then one entry per stage with seq_len and per-row token counts)}.
    All numbers are real FLOPs (2 per multiply-add).
    """
    config = getattr(model, "config", model)  # a model, or just its config (e.g. for a checkpoint not loaded)
    tc = _text(config)
    input_ids = batch["input_ids"]
    b, length = input_ids.shape
    from .patches.base import CALL_KEYS

    images = {k: batch.get(k) for k in CALL_KEYS}
    vision = vision_flops(config, **images)
    projector = projector_flops(config, **images)
    _, _, heads, _, hd = _llm_dims(tc)

    options = _stage_options(model)
    tokens = [{"layer": 0, "method": None, "seq_len": length, "visual": visual_counts(config, input_ids)}]
    seq_lens = {0: length}
    scoring, cur, in_tower = 0, length, 0
    text_lens = _instruction_lengths(config, batch)
    for st in sorted(stats or [], key=lambda s: s["layer"]):
        capture = _tower_capture(config, st, images)
        scoring, in_tower = scoring + capture, in_tower + capture
        before, after = list(st["tokens_before"]), list(st["tokens_after"])
        opts = options.get(st["layer"], {})
        proj = dict(projector_row=projector_row_flops(config), projector_dims=_cost(config).projector_dims(config))
        if _tower_layer(st) is not None:
            proj["tower_head_dim"] = _cost(config).tower_head_dim(config)
        # Scoring runs once per strategy call: per image/video (or frame), not over the row's tokens at once.
        calls = st["selections"] if "selections" in st.keys() else [[(n, k)] for n, k in zip(before, after)]
        if st["layer"] == TOWER:
            saved, tower_scoring = _tower_stage(config, st, calls, opts)
            vision, projector = vision - saved["vision"], projector - saved["projector"]
            scoring, in_tower, calls = scoring + tower_scoring, in_tower + tower_scoring, []
        for row, row_n, text_len in zip(calls, before, text_lens):
            for n, k in row:
                scoring += scoring_flops(
                    st["method"],
                    n,
                    k,
                    tc.hidden_size,
                    heads=heads,
                    head_dim=hd,
                    seq_len=cur,
                    row_n=row_n,
                    text_len=text_len,
                    **proj,
                    **opts,
                )
        # Each row keeps its non-visual slots (text, padding, earlier dummies) and its kept visual tokens;
        # rows are then right-aligned to the longest one.
        cur = max(cur - n + k for n, k in zip(before, after))
        seq_lens[max(st["layer"], 0)] = cur  # a tower stage shortens what the language model starts from
        tokens.append(
            {
                "layer": st["layer"],
                "method": st["method"],
                "seq_len": cur,
                "tokens_before": before,
                "tokens_after": after,
            }
        )
    llm = llm_prefill_flops(tc, seq_lens, batch=b, logits_to_keep=logits_to_keep)
    total = vision + projector + llm["layers"] + llm["lm_head"] + scoring
    return {
        "vision": vision,
        "projector": projector,
        "llm": llm["layers"],
        "lm_head": llm["lm_head"],
        "scoring": scoring,
        "scoring_in_tower": in_tower,
        "total": total,
        "attention_causal_saving": llm["attention"] - llm["attention_causal"],
        "cache_len_per_layer": lengths_per_layer(tc.num_hidden_layers, seq_lens),
        "tokens_per_stage": tokens,
    }
