"""The decode stage (DyCoke's KV pruning while decoding): each decoding step attends, from layer K on, to the visual
tokens its own attention at layer K-1 ranks highest. Checked against a hand-driven decoding loop on the stock model;
keep-all exact; batched equals per sample; the cache keeps every entry; bad settings refused by name."""

import pytest
import torch

import vtprune
from helpers import cached_model, make_batch, row
from vtprune.budgets import ratio_keep
from vtprune.patches import get_adapter
from vtprune.testing import FAMILIES

GEN = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    for family in FAMILIES:
        for attn in ("sdpa", "eager"):
            model = cached_model(family, attn)
            if vtprune.is_patched(model):
                vtprune.remove_pruner(model)


@torch.no_grad()
def oracle_decode(model, batch, steps, ratio, layer):
    """Greedy generate() on the unpatched eager model with two plain hooks: the attention module of layer
    ``layer`` - 1 hands its weights (eager attention returns them) to the decoder layers from ``layer`` on, which on
    each decoding step (one query) shut the visual columns outside the step's top ``ratio`` by those weights, mean
    over heads (ties to the earlier token) in the stock mask. Returns the per-step logits."""
    vis = get_adapter(model).visual_mask(batch["input_ids"]) & batch["attention_mask"].bool()
    lm = model.model.language_model
    seen = {}

    def weights(module, args, output):
        seen["att"] = output[1]

    def narrow(module, args, kwargs):
        att = seen["att"]
        if att.shape[2] != 1:  # the prefill
            return None
        score = att[:, :, -1].mean(1)[:, : vis.shape[1]]  # [B, prompt]
        shut = torch.zeros_like(score, dtype=torch.bool)
        for i in range(score.shape[0]):
            idx = vis[i].nonzero().flatten()
            order = torch.sort(score[i, idx], descending=True, stable=True).indices
            shut[i, idx[order[ratio_keep(ratio, len(idx)) :]]] = True
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.shape[-1] >= shut.shape[1], "eager attention builds a 4D mask"
        cols = torch.cat([shut, shut.new_zeros(shut.shape[0], mask.shape[-1] - shut.shape[1])], dim=1)
        cols = cols[:, None, None, :]
        mask = mask & ~cols if mask.dtype == torch.bool else mask.masked_fill(cols, torch.finfo(mask.dtype).min)
        return args, dict(kwargs, attention_mask=mask)

    hooks = [lm.layers[layer - 1].self_attn.register_forward_hook(weights)]
    hooks += [lm.layers[j].register_forward_pre_hook(narrow, with_kwargs=True) for j in range(layer, len(lm.layers))]
    try:
        return model.generate(**batch, max_new_tokens=steps, **GEN).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_stage_equals_the_stock_model_with_narrowed_masks(family):
    model = cached_model(family, "eager")
    batch = make_batch(family, 2)
    assert batch["attention_mask"].min() == 0  # left padding: the choice must skip the pad columns
    want = oracle_decode(model, batch, steps=4, ratio=0.4, layer=2)
    # Every prompt token kept at prefill, so only the decode stage acts.
    vtprune.apply_pruner(model, method="random", keep_ratio=1.0, decode_keep_ratio=0.4, decode_layer=2)
    got = model.generate(**batch, max_new_tokens=4, **GEN)
    steps = vtprune.get_stats(model)[0].decode_steps  # 3 decoding steps after the prefill's token
    counts = get_adapter(model).visual_mask(batch["input_ids"]).sum(1)
    assert steps == [[ratio_keep(0.4, int(n)) for n in counts]] * 3
    full = vtprune.apply_pruner(model, method="random", keep_ratio=1.0, replace=True).generate(
        **batch, max_new_tokens=4, **GEN
    )
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(got.logits[1:], full.logits[1:]))  # it did prune
    for step, (a, b) in enumerate(zip(got.logits, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_keep_all_is_bit_identical(family):
    model = cached_model(family, "sdpa")
    batch = make_batch(family, 2)
    ref = model.generate(**batch, max_new_tokens=3, **GEN)
    vtprune.apply_pruner(model, method="dycoke", keep_ratio=1.0, decode_keep_ratio=1.0, decode_layer=1)
    out = model.generate(**batch, max_new_tokens=3, **GEN)
    vtprune.remove_pruner(model)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl"])
def test_decode_stage_batched_equals_per_sample_and_keeps_the_cache(family):
    """With pruning at prefill (pool, 50 %) and while decoding (30 % from layer 2): each row alone gives the same
    logits; the cache holds the kept prompt plus every fed token (decoding masks, never drops, entries)."""
    model = cached_model(family, "sdpa")
    batch = make_batch(family, 2)
    vtprune.apply_pruner(model, method="pool", keep_ratio=0.5)
    plain = model.generate(**batch, max_new_tokens=4, **GEN)
    vtprune.apply_pruner(model, method="pool", keep_ratio=0.5, decode_keep_ratio=0.3, decode_layer=2, replace=True)
    both = model.generate(**batch, max_new_tokens=4, **GEN)
    assert both.past_key_values.get_seq_length() == plain.past_key_values.get_seq_length()
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(both.logits[1:], plain.logits[1:]))
    for i in range(2):
        alone = model.generate(**row(batch, i), max_new_tokens=4, **GEN)
        assert torch.equal(both.sequences[i, -4:], alone.sequences[0, -4:])
        for a, b in zip(both.logits, alone.logits):
            torch.testing.assert_close(a[i], b[0], rtol=0, atol=1e-5)


def test_decode_stage_settings_are_checked():
    model = cached_model("llava", "sdpa")  # 4 decoder layers
    for kwargs, match in (
        (dict(decode_keep_ratio=0.0), r"decode_keep_ratio must be a number in \(0, 1\]"),
        (dict(decode_keep_ratio=1.5), r"decode_keep_ratio must be a number in \(0, 1\]"),
        (dict(decode_layer=2), "decode_layer=2 was given without decode_keep_ratio"),
        (dict(decode_keep_ratio=0.3, decode_layer=0), "decode_layer must be an integer >= 1"),
        (dict(decode_keep_ratio=0.3, decode_layer=4), r"decode_layer must be in \[1, 3\]"),
        (dict(method="fastv", decode_keep_ratio=0.3, decode_layer=2), r"decode_layer must be in \[3, 3\]"),
    ):
        with pytest.raises(ValueError, match=match):
            vtprune.apply_pruner(model, **{"method": "pool", **kwargs})
        assert not vtprune.is_patched(model)
    with pytest.raises(ValueError, match="one decode stage per pruner"):
        vtprune.apply_pruner(
            model,
            schedule=[
                dict(method="dycoke", layer=0, keep_ratio=0.5),
                dict(method="fastv", layer=2, decode_keep_ratio=0.5),
            ],
        )
    # dycoke brings DyCoke's own decode stage; any method may take one.
    vtprune.apply_pruner(model, method="dycoke", replace=True)
    assert vtprune.get_pruner(model).decode_stage == (0.3, 3)
    vtprune.apply_pruner(model, method="fastv", decode_keep_ratio=0.5, decode_layer=3, replace=True)
    assert vtprune.get_pruner(model).decode_stage == (0.5, 3)


@torch.no_grad()
def test_decode_stage_without_a_cache_warns_and_undo_restores():
    model = cached_model("qwen2_vl", "sdpa")
    batch = make_batch("qwen2_vl", 2)
    attention = get_adapter(model).attention(2)
    config, hooks = attention.config, sum(len(m._forward_pre_hooks) for m in model.modules())
    vtprune.apply_pruner(model, method="dycoke", keep_ratio=0.5)
    assert attention.config is not config  # the layer the decode stage scores with captures its attention
    with pytest.warns(UserWarning, match="use_cache=False runs no decoding steps on a cache"):
        model.generate(**batch, max_new_tokens=2, use_cache=False, **GEN)
    vtprune.remove_pruner(model)
    assert attention.config is config
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert not hasattr(attention, "_vtprune_sink")
