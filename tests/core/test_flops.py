"""The analytic FLOPs counter (vtprune.flops) against torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode counts matmuls and convolutions, which is what vtprune.flops counts. On CPU, SDPA runs as
``aten._scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode has no formula for and silently
counts as 0; for the sdpa runs we register the formula it uses for the GPU flash op, 2·B·H·Lq·Lk·(d + dv).
The eager runs need no help: their attention is plain bmm. Mixture-of-experts layers run ``aten._grouped_mm``,
also uncounted: its formula is registered too.
"""

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtprune
from helpers import assert_close, cached_model, cached_processor, check_prefill, measure, measured_parts, require
from vtprune import flops
from vtprune.testing import FAMILIES, NEWLINE_FAMILIES, tiny_batch, tiny_images

torch.set_num_threads(1)


SETUPS = {
    "none": None,
    "pool0": [dict(method="pool", layer=0, keep_ratio=0.5)],
    "random2": [dict(method="random", layer=2, keep_ratio=0.5)],
    "pool0+random2": [dict(method="pool", layer=0, keep_ratio=0.5), dict(method="random", layer=2, keep_ratio=0.5)],
    "divprune0+fastv2": [
        dict(method="divprune", layer=0, keep_ratio=0.5),
        dict(method="fastv", layer=2, keep_ratio=0.5),
    ],
    "entropy1": [dict(method="entropy", layer=1, keep_ratio=0.5)],
    # inside the tower on LLaVA-1.5 (the tower's later layers run on the kept patches), at layer 0 elsewhere
    "visionzip": [dict(method="visionzip", keep_ratio=0.5)],
    "vispruner+dart2": [dict(method="vispruner", keep_ratio=0.5), dict(method="dart", layer=2, keep_ratio=0.5)],
    "cdpruner0": [dict(method="cdpruner", layer=0, keep_ratio=0.5)],
    "pdrop": [dict(method="pdrop", keep_ratio=0.5)],
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_matches_flop_counter(family, attn, setup, patched):
    batch = tiny_batch(family, cached_processor(family), tiny_images(2))
    res, _ = check_prefill(cached_model(family, attn), batch, SETUPS[setup], patched)
    if SETUPS[setup] is not None:
        unpruned = flops.count_prefill(cached_model(family, attn), batch)
        assert res["llm"] < unpruned["llm"]


@pytest.mark.parametrize("setup", ["none", "pool0+random2"])
@pytest.mark.parametrize("family", NEWLINE_FAMILIES)
def test_anyres_uneven_crops(family, setup, patched):
    """Images with 5, 3 and 3 crops: the padded crop slots of pixel_values are not run and not counted."""
    batch = tiny_batch(family, cached_processor(family), tiny_images(3, sizes=[(56, 56), (56, 28), (20, 60)]))
    assert batch["pixel_values"].shape[1] == 5
    check_prefill(cached_model(family, "sdpa"), batch, SETUPS[setup], patched)


@pytest.mark.parametrize("setup", ["none", "pool0+random2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_matches_flop_counter(family, attn, setup, patched):
    model = patched(cached_model(family, attn), SETUPS[setup])
    batch = tiny_batch(family, cached_processor(family), tiny_images(2))
    out, _ = measure(model, **batch, use_cache=True)
    res = flops.count_prefill(model, batch, vtprune.get_stats(model) if SETUPS[setup] else None)
    cache = out.past_key_values
    assert [cache.get_seq_length(i) for i in range(len(res["cache_len_per_layer"]))] == res["cache_len_per_layer"]
    step = {
        "input_ids": out.logits[:, -1].argmax(-1, keepdim=True),
        "cache": cache,
        "use_cache": True,
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(batch["attention_mask"][:, :1])], 1),
    }
    if family.startswith("qwen"):
        # Called by hand with a cache and no position_ids, Qwen builds positions for every mask column (generate
        # passes them); any positions of the right shape do, their values change no FLOPs.
        step["position_ids"] = torch.full((3, 2, 1), out.logits.shape[1], dtype=torch.long)
    _, counts = measure(model, **step)
    got = measured_parts(counts)
    want = flops.decode_step_flops(model.config, res["cache_len_per_layer"], batch=2)
    assert_close(want["layers"], got["language_model"], "decode layers")
    assert_close(want["total"], got["total"], "decode total")


def test_scoring_costs_match_flop_counter():
    """Each method's own cost, measured on the strategy functions directly (the whole-model runs above hide it
    under the tiny models' other FLOPs)."""
    from vtprune import capture
    from vtprune.strategies import SelectionInputs, get_method

    torch.manual_seed(0)
    n, k, d, heads, hd, length = 96, 24, 64, 8, 16, 130
    cases = {
        "divprune": (SelectionInputs(features=torch.randn(1, n, d)), {}),
        "entropy": (SelectionInputs(features=torch.randn(1, n, d), queries=torch.randn(1, n, heads, hd)), {}),
        "random": (SelectionInputs(features=torch.randn(1, n, d)), {}),
        "pool": (SelectionInputs(features=torch.randn(1, n, d), grid=[(8, 12)]), {}),
    }
    # The video methods on one clip of 4 frames of 24 tokens (their Gram matrices and cosines to the means).
    clip = dict(features=torch.randn(1, n, d), grid=[(4, 6)], frames=[4], kinds=["video"])
    cases.update({name: (SelectionInputs(**clip), {}) for name in ("vidcom2", "fastvid", "holitom", "dycoke")})
    for name, (inputs, opts) in cases.items():
        with FlopCounterMode(display=False) as fc:
            get_method(name).fn(inputs, k, **opts)
        assert_close(flops.scoring_flops(name, n, k, d, heads=heads, head_dim=hd), fc.get_total_flops(), name)
    # ZOO-Prune through a real LLaVA projector: 2·m·N projector rows + the diversity terms.
    model = cached_model("llava", "eager")
    proj = model.model.multi_modal_projector
    din = model.config.vision_config.hidden_size
    feats = torch.randn(1, n, model.config.get_text_config().hidden_size)
    inputs = SelectionInputs(features=feats, pre_projector=torch.randn(1, n, din), projector=proj)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        get_method("zoo").fn(inputs, k, m=4)
    from vtprune.patches import cost_model

    dims = cost_model(model.config).projector_dims(model.config)
    want = flops.scoring_flops(
        "zoo", n, k, feats.shape[-1], m=4, projector_row=flops.projector_row_flops(model.config), projector_dims=dims
    )
    assert_close(want, fc.get_total_flops(), "zoo")
    # FastV: the capture's last-query row, for a batch of 2 rows.
    q, key = torch.randn(2, heads, length, hd), torch.randn(2, heads // 2, length, hd)
    with FlopCounterMode(display=False) as fc:
        capture.last_query_attention(q, key, None, 1.0)
    assert_close(
        2 * flops.scoring_flops("fastv", n, k, d, heads=heads, head_dim=hd, seq_len=length),
        fc.get_total_flops(),
        "fastv",
    )


def test_units_are_real_flops():
    """One decode step on an empty cache costs 2 FLOPs per weight of every decoder linear layer (+ attention
    over the one key), and the LM head 2 per weight: real FLOPs, not MACs."""
    model = cached_model("qwen2_vl", "eager")
    tc = model.config.get_text_config()
    weights = sum(
        m.weight.numel() for m in model.model.language_model.layers.modules() if isinstance(m, torch.nn.Linear)
    )
    step = flops.decode_step_flops(tc, 0)
    assert step["layers"] == 2 * weights + tc.num_hidden_layers * 4 * tc.hidden_size
    assert step["lm_head"] == 2 * model.lm_head.weight.numel()
    with pytest.raises(ValueError, match="unknown method"):
        flops.scoring_flops("nope", 4, 2, 8)
    # The causal-halved attention is reported but not in the totals.
    full = flops.llm_prefill_flops(tc, 10)
    assert full["attention_causal"] * 20 == full["attention"] * 11
    assert full["total"] == full["projections"] + full["attention"] + full["mlp"] + full["lm_head"]


def _embedded_names():
    try:
        from vtprune.eval.catalog import EMBEDDED_MODELS
    except ImportError:
        return ["llava-tiny-sortofclevr", "qwen2_5_vl-tiny-sortofclevr"]
    return list(EMBEDDED_MODELS)


@pytest.mark.parametrize("setup", ["none", "pool0+random2", "divprune0+fastv2"])
@pytest.mark.parametrize("name", _embedded_names())
def test_embedded_models_match_flop_counter(name, setup, patched):
    from vtprune.eval.catalog import is_available, model_dir
    from vtprune.eval.data import make_split
    from vtprune.eval.models import build_prompt

    require(is_available(name), f"embedded model {name}'s weights are missing under {model_dir(name)}")
    model, processor = _embedded(name)
    examples = make_split("test", 2, seed=0)
    processor.tokenizer.padding_side = "left"
    batch = processor(
        images=[e.image for e in examples],
        text=[build_prompt(processor, e.question) for e in examples],
        padding=True,
        return_tensors="pt",
    )
    check_prefill(model, batch, SETUPS[setup], patched)


@functools.cache
def _embedded(name):
    from vtprune.eval.models import load_embedded

    return load_embedded(name)
