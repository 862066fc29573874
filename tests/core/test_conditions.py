"""Every registered method on every family under the conditions users meet beyond a plain batched prefill:
autograd on (train mode), generate() without a cache, bfloat16 weights, packed (padding-free) samples, generation
continued from a returned cache, and grids with one side much longer than the budget.

The table is the registry itself, so a new method is covered without editing this file. Keep-all runs equal the
stock model bit for bit; pruned runs keep exactly their budget, as the stats say and as the KV cache shows.
"""

import copy
import functools

import pytest
import torch

import vtprune
from helpers import cached_model, cached_processor, continuation, first_ratio, make_batch, packed_pair, refusal
from vtprune.budgets import ratio_keep
from vtprune.strategies import get_method
from vtprune.testing import FAMILIES, tiny_batch, tiny_images

METHODS = vtprune.list_methods()
RATIO = 0.5
GEN = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)


# Every (family, method) pair the method applies to; the others are refused by name (test_refused_pairs_say_why).
PAIRS = [(f, m) for f in FAMILIES for m in METHODS if refusal(cached_model(f, "sdpa"), m) is None]
REFUSED = [(f, m) for f in FAMILIES for m in METHODS if (f, m) not in PAIRS]
each_pair = pytest.mark.parametrize("family,method", PAIRS)


def keep_all(method):
    """apply_pruner's options that keep every token of ``method``: with a decode stage (DyCoke's), every step's too."""
    return {"decode_keep_ratio": 1.0} if get_method(method).decode else {}


@pytest.mark.parametrize("family,method", REFUSED)
def test_refused_pairs_say_why(family, method):
    model = cached_model(family, "sdpa")
    with pytest.raises(NotImplementedError, match=f"{type(model).__name__}.*is not: its"):
        vtprune.apply_pruner(model, method=method)
    assert not vtprune.is_patched(model)


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    for model in list(_MODELS):
        if vtprune.is_patched(model):
            vtprune.remove_pruner(model)


_MODELS = []


def _use(model):
    _MODELS.append(model)
    return model


@functools.cache
def _bf16(family):
    return copy.deepcopy(cached_model(family, "sdpa")).to(torch.bfloat16)


def stage_layer(model) -> int:
    return vtprune.get_pruner(model).stages[0].layer


def check_budget(model, batch, cache=None, fed=0):
    """The first stage kept ratio_keep(its keep ratio, n) tokens of every unit, as distinct valid indices; the cache
    (when given) holds, from each stage's layer on, the text, padding and tokens that stage kept, and the ``fed``
    tokens since."""
    all_stats = vtprune.get_stats(model)
    stats, ratio = all_stats[0], first_ratio(model)
    for r, units in enumerate(stats.units):
        want = [ratio_keep(ratio, u.tokens_before) for u in units]
        assert [u.tokens_after for u in units] == want, (r, stats.tokens_before)
        assert stats.tokens_after[r] == sum(want)
        kept = stats.kept_indices[r][: sum(want)]
        assert len(set(kept.tolist())) == sum(want) and int(kept.max()) < stats.tokens_before[r]
    if cache is not None:
        lengths, cur = {}, batch["input_ids"].shape[1]
        for st in all_stats:  # rows are right-aligned to the longest after each stage
            cur = max(cur - n + k for n, k in zip(st.tokens_before, st.tokens_after))
            lengths[max(st.layer, 0)] = cur
        for i, layer in enumerate(cache.layers):
            at = [length for first, length in sorted(lengths.items()) if first <= i]
            assert layer.keys.shape[-2] == (at[-1] if at else batch["input_ids"].shape[1]) + fed, i


# ------------------------------------------------------------------------------------------- autograd, train mode


@each_pair
def test_autograd_and_train_mode(family, method):
    model = _use(cached_model(family, "sdpa"))
    batch = make_batch(family, 2)
    model.train()
    try:
        ref = model(**batch).logits
        vtprune.apply_pruner(model, method=method, keep_ratio=1.0)
        assert torch.equal(model(**batch).logits, ref)
        vtprune.apply_pruner(model, method=method, keep_ratio=RATIO, replace=True)
        out = model(**batch, use_cache=True)
        out.logits.float().sum().backward()  # the loss of the kept tokens reaches the weights
        assert model.lm_head.weight.grad is not None
        check_budget(model, batch, cache=out.cache)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------- no KV cache


@each_pair
@torch.no_grad()
def test_generate_without_cache(family, method):
    model = _use(cached_model(family, "sdpa"))
    batch = make_batch(family, 2)
    ref = model.generate(**batch, use_cache=False, max_new_tokens=2, **GEN)
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0)
    out = model.generate(**batch, use_cache=False, max_new_tokens=2, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    vtprune.apply_pruner(model, method=method, keep_ratio=RATIO, replace=True)
    uncached = model.generate(**batch, use_cache=False, max_new_tokens=2, **GEN)
    check_budget(model, batch)  # the last step's prefill
    if stage_layer(model) == 0:  # an in-LLM stage re-chooses from each step's last token without a cache
        cached = model.generate(**batch, use_cache=True, max_new_tokens=2, **GEN)
        assert torch.equal(cached.sequences, uncached.sequences)


# ------------------------------------------------------------------------------------------- bfloat16


@each_pair
@torch.no_grad()
def test_bfloat16_weights(family, method):
    model = _use(_bf16(family))
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in make_batch(family, 2).items()}
    ref = model(**batch).logits
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0)
    assert torch.equal(model(**batch).logits, ref)
    vtprune.apply_pruner(model, method=method, keep_ratio=RATIO, replace=True)
    check_budget(model, batch, cache=model(**batch, use_cache=True).cache)


# ------------------------------------------------------------------------------------------- packed samples


@each_pair
@torch.no_grad()
def test_packed_samples_stay_apart(family, method):
    """Two samples in one row, no mask, positions restarting: keep-all is the stock model's packed forward; pruned,
    the first sample keeps the same tokens and gives the same logits whatever the second sample shows."""
    model = _use(cached_model(family, "sdpa"))
    first, other = packed_pair(model, family), packed_pair(model, family, second_seed=1)
    ref = model(**first, use_cache=False).logits
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0)
    assert torch.equal(model(**first, use_cache=False).logits, ref)
    vtprune.apply_pruner(model, method=method, keep_ratio=RATIO, replace=True)
    logits, stats = [], []
    for batch in (first, other):
        logits.append(model(**batch, use_cache=False).logits)
        stats.append(vtprune.get_stats(model))
        check_budget(model, batch)
    n = make_batch(family, 2)["attention_mask"][0].sum()
    for mine, theirs in zip(*stats, strict=True):  # every stage: unit 0 is the first sample's image
        (a, _), (b, _) = mine.units[0], theirs.units[0]
        assert a.kind == b.kind == "image" and torch.equal(a.kept_indices, b.kept_indices)
        n -= a.tokens_before - a.tokens_after  # the first sample's kept length after the last stage
    torch.testing.assert_close(logits[0][:, :n], logits[1][:, :n], rtol=0, atol=1e-5)
    assert not torch.allclose(logits[0][:, n:], logits[1][:, n:])  # the second samples did differ


# ------------------------------------------------------------------------------------------- continued generation


@each_pair
@torch.no_grad()
def test_generation_continued_from_the_returned_cache(family, method):
    """generate() for 2 tokens, then generate(past_key_values=that cache) on the prompt + those tokens for 2 more,
    equals generating 4 at once; keep-all equals the stock continuation."""
    model = _use(cached_model(family, "sdpa"))
    batch = make_batch(family, 2)

    def two_then_two():
        head = model.generate(**batch, max_new_tokens=2, **GEN)
        return model.generate(
            **continuation(batch, head.sequences), cache=head.past_key_values, max_new_tokens=2, **GEN
        )

    ref = two_then_two()
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0, **keep_all(method))
    out = two_then_two()
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    vtprune.apply_pruner(model, method=method, keep_ratio=RATIO, replace=True)
    whole = model.generate(**batch, max_new_tokens=4, **GEN)
    out = two_then_two()
    assert torch.equal(out.sequences, whole.sequences)
    for a, b in zip(out.logits, whole.logits[2:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    check_budget(model, batch, cache=out.past_key_values, fed=3)  # 4 generated, the last one never fed


# ------------------------------------------------------------------------------------------- long thin grids


@each_pair
@torch.no_grad()
def test_long_thin_grids_keep_exact_budgets(family, method):
    """A tall and a wide image in one batch (Qwen: 14 x 1 and 1 x 14 merged tokens), a budget far below the long
    side: every unit keeps exactly its budget, and the batch of mixed grid shapes runs."""
    model = _use(cached_model(family, "sdpa"))
    batch = tiny_batch(family, cached_processor(family), tiny_images(2, sizes=[(14, 196), (196, 14)]))
    ref = model(**batch).logits
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0)
    assert torch.equal(model(**batch).logits, ref)
    # PyramidDrop's keep_ratio is a layer average (at least 1/4 here, the first layer keeping all): its drops' own
    # share is the tight budget.
    budget = dict(ratio=0.15) if method == "pdrop" else dict(keep_ratio=0.15)
    vtprune.apply_pruner(model, method=method, replace=True, **budget)
    check_budget(model, batch, cache=model(**batch, use_cache=True).cache)
