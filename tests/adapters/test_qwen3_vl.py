"""Qwen3-VL: the DeepStack features follow the kept tokens, at the LLM input and inside the LLM.

The oracles are built by hand from the unpatched model's own language-model inputs: the kept tokens' embeddings,
positions and DeepStack rows, run through the unpatched language model (layer 0) or its decoder layers (layer K).
"""

import copy

import pytest
import torch

import vtprune
from helpers import cached_model, make_batch, make_video_batch, row
from vtprune.testing import tiny_model

FAMILY = "qwen3_vl"
BOTH = ["qwen3_vl", "qwen3_vl_moe"]  # the MoE class: same body and DeepStack, sparse decoder MLPs


def lm_inputs(model, batch):
    """The unpatched language model's keyword inputs for ``batch`` (DeepStack rows and mask included)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen


def kept_positions(batch, i, kept, vis):
    """[L] bool over sample i's sequence: its text tokens and the visual tokens (``vis`` [L]) a stage kept."""
    keep = batch["attention_mask"][i].bool() & ~vis
    keep[vis.nonzero().flatten()[kept[kept >= 0]]] = True
    return keep


def sample_rows(full, i):
    """Sample i's DeepStack rows (one [n_i, D] per DeepStack layer): rows are placed row-major over the batch."""
    vis = full["visual_pos_masks"]
    start = int(vis[:i].sum())
    return [e[start : start + int(vis[i].sum())] for e in full["deepstack_visual_embeds"]]


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["random", "pool", "divprune"])
@pytest.mark.parametrize("family", BOTH)
@pytest.mark.parametrize("video", [False, True])  # one image, or one image and one video (joint DeepStack rows)
def test_layer0_equals_oracle_with_kept_deepstack_rows(family, attn, method, video):
    model = cached_model(family, attn)
    batch = (make_video_batch if video else make_batch)(family, 2)
    full = lm_inputs(model, batch)
    vtprune.apply_pruner(model, method=method, keep_ratio=0.5)
    try:
        pruned = model(**batch).logits
        kept = vtprune.get_stats(model)[0]["kept_indices"]
    finally:
        vtprune.remove_pruner(model)
    lm = model.model.language_model
    for i in range(2):
        keep = kept_positions(batch, i, kept[i], full["visual_pos_masks"][i])
        vis = full["visual_pos_masks"][i][keep][None]
        rows = [r[kept[i][kept[i] >= 0]] for r in sample_rows(full, i)]
        args = dict(
            inputs_embeds=full["inputs_embeds"][i : i + 1, keep],
            position_ids=full["position_ids"][..., i : i + 1, keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        )
        oracle = model.lm_head(lm(**args, visual_pos_masks=vis, deepstack_visual_embeds=rows).last_hidden_state)
        torch.testing.assert_close(pruned[i, -oracle.shape[1] :], oracle[0], rtol=0, atol=1e-5)
        # The DeepStack rows matter: without them the oracle is another model.
        plain = model.lm_head(lm(**args).last_hidden_state)
        assert (plain - oracle).abs().max() > 1e-3


def manual_loop(model, batch, stages):
    """Decoder layers run by hand from the first stage's layer on, with the DeepStack rows of the tokens still
    present added after each DeepStack layer. ``stages``: {layer: kept positions [L_cur] bool} (one sample, no
    padding). Returns the logits."""
    lm = model.model.language_model
    full, entering = lm_inputs(model, batch), {}
    first = min(stages)
    handle = lm.layers[first].register_forward_pre_hook(
        lambda m, a, k: entering.update(k, hidden=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    model(**batch)
    handle.remove()
    hidden, (cos, sin) = entering["hidden"], entering["position_embeddings"]
    pos = entering.get("position_ids")
    vis, rows = full["visual_pos_masks"][0], full["deepstack_visual_embeds"]
    for j in range(first, len(lm.layers)):
        if j in stages:
            keep = stages[j]
            hidden, cos, sin = hidden[:, keep], cos[:, keep], sin[:, keep]
            pos = None if pos is None else pos[..., keep]
            rows = [r[keep[vis]] for r in rows]
            vis = vis[keep]
        hidden = lm.layers[j](hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
        if j < len(rows):
            hidden = hidden.clone()
            hidden[0, vis] += rows[j]
    return model.lm_head(lm.norm(hidden))


def stage_keeps(model, batch, stats):
    """Per stage, the kept positions of the sequence entering it (one unpadded sample)."""
    vis = batch["input_ids"][0] == model.config.image_token_id
    out = {}
    for s in stats:
        keep = ~vis
        keep[vis.nonzero().flatten()[s["kept_indices"][0]]] = True
        out[s["layer"]], vis = keep, vis[keep]
    return out


@torch.no_grad()
@pytest.mark.parametrize("family", BOTH)
def test_in_llm_stage_gathers_deepstack_rows(family):
    """A stage at layer 1 (DeepStack is added after layers 0 and 1): the layer-1 rows of the kept tokens only."""
    model = cached_model(family, "sdpa")
    batch = row(make_batch(family, 2), 1)
    vtprune.apply_pruner(model, method="random", keep_ratio=0.4, layer=1, seed=5)
    try:
        pruned = model(**batch).logits
        stats = vtprune.get_stats(model)
    finally:
        vtprune.remove_pruner(model)
    torch.testing.assert_close(pruned, manual_loop(model, batch, stage_keeps(model, batch, stats)), rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("first", [0, 1])
def test_two_stages_before_the_last_deepstack_layer_compose(first):
    """Three DeepStack layers; stages at (0 or 1) and 2: the second gathers the rows the first left."""
    cfg = type(cached_model(FAMILY, "sdpa")).config_class.from_dict(cached_model(FAMILY, "sdpa").config.to_dict())
    cfg.vision_config.depth, cfg.vision_config.deepstack_visual_indexes = 3, [0, 1, 2]
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    model = type(cached_model(FAMILY, "sdpa"))(cfg).eval()
    batch = row(make_batch(FAMILY, 2), 0)
    vtprune.apply_pruner(
        model,
        schedule=[
            dict(method="random", layer=first, keep_ratio=0.6, seed=1),
            dict(method="random", layer=2, keep_ratio=0.5, seed=2),
        ],
    )
    try:
        pruned = model(**batch).logits
        stats = vtprune.get_stats(model)
    finally:
        vtprune.remove_pruner(model)
    keeps = stage_keeps(model, batch, stats)
    if first == 0:
        # The layer-0 stage is the oracle's input; the loop starts at the layer-2 stage on the pruned model.
        vtprune.apply_pruner(model, method="random", layer=0, keep_ratio=0.6, seed=1)
        try:
            ref = manual_loop(model, batch, {2: keeps[2]})
            assert torch.equal(vtprune.get_stats(model)[0]["kept_indices"], stats[0]["kept_indices"])
        finally:
            vtprune.remove_pruner(model)
    else:
        ref = manual_loop(model, batch, keeps)
    torch.testing.assert_close(pruned, ref, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 1])
def test_batched_in_llm_deepstack_equals_per_sample_and_generation(layer):
    """Padded rows keep different token sets at layer 1; cached greedy equals uncached (random with a seed
    chooses the same tokens at every uncached step)."""
    model = cached_model(FAMILY, "eager")
    batch = make_batch(FAMILY, 2)
    vtprune.apply_pruner(model, method="random", keep_ratio=0.5, layer=layer, seed=3)
    try:
        both = model(**batch).logits
        for i in range(2):
            alone = model(**row(batch, i)).logits
            torch.testing.assert_close(both[i, -alone.shape[1] :], alone[0], rtol=0, atol=1e-5)
        gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        cached, uncached = model.generate(**batch, **gen), model.generate(**batch, use_cache=False, **gen)
    finally:
        vtprune.remove_pruner(model)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_moe_family_is_the_moe_class():
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = cached_model("qwen3_vl_moe", "sdpa")
    assert isinstance(model, Qwen3VLMoeForConditionalGeneration)
    kinds = {type(layer.mlp).__name__ for layer in model.model.language_model.layers}
    assert any("Sparse" in k for k in kinds) and len(kinds) == 2  # sparse and dense (mlp_only_layers) layers


@torch.no_grad()
def test_wrapper_is_per_instance_and_restored_exactly():
    a, b = tiny_model(FAMILY, seed=2), tiny_model(FAMILY, seed=2)
    lm_cls = type(a.model.language_model)
    original = lm_cls.__dict__["_deepstack_process"]
    batch = make_batch(FAMILY, 2)
    ref = a(**batch).logits
    theirs = a.model.language_model._deepstack_process  # someone else's instance-level wrapper, kept on remove
    a.model.language_model._deepstack_process = theirs
    vtprune.apply_pruner(a, method="random", keep_ratio=0.5, layer=1)
    assert a.model.language_model._deepstack_process is not theirs
    assert "_deepstack_process" not in vars(b.model.language_model)
    assert lm_cls.__dict__["_deepstack_process"] is original
    assert torch.equal(b(**batch).logits, ref)
    assert a(**batch).logits.shape[1] < ref.shape[1]  # the layer-1 stage ran and left its gather index
    with vtprune.paused(a):  # which an unpruned call in this thread must not use
        assert torch.equal(a(**batch).logits, ref)
    vtprune.remove_pruner(a)
    assert a.model.language_model.__dict__["_deepstack_process"] is theirs
    del a.model.language_model._deepstack_process
    vtprune.apply_pruner(a, method="random", keep_ratio=0.5, layer=1)
    vtprune.remove_pruner(a)
    assert "_deepstack_process" not in vars(a.model.language_model)
    assert torch.equal(a(**batch).logits, ref)


@torch.no_grad()
def test_deepcopy_wrapper_runs_the_copy():
    model = tiny_model(FAMILY, seed=4)
    batch = make_batch(FAMILY, 2)
    vtprune.apply_pruner(model, method="random", keep_ratio=0.5, layer=1, seed=0)
    ref = model(**batch).logits
    twin = copy.deepcopy(model)
    wrapper = twin.model.language_model._deepstack_process
    assert wrapper.__self__._current_extra.__self__ is vtprune.get_pruner(twin)
    assert wrapper.__self__.model is twin
    assert torch.equal(twin(**batch).logits, ref)
    vtprune.remove_pruner(twin)
    assert "_deepstack_process" not in vars(twin.model.language_model)
    assert torch.equal(model(**batch).logits, ref)  # the original is still patched
