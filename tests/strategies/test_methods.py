"""Every registered method through the patch layer, on every family: budget, determinism, batching, generate()."""

import pytest
import torch

import vtprune
from helpers import cached_model, cached_processor, first_ratio, make_batch, row
from vtprune.testing import tiny_model

METHODS = vtprune.list_methods()  # the registry: a new method is covered without editing this file


@torch.no_grad()
@pytest.mark.parametrize("method", METHODS)
def test_method_budget_determinism_batching_generate(family, method):
    model = cached_model(family, "sdpa")
    batch = make_batch(family, 2)
    vtprune.apply_pruner(model, method=method, keep_ratio=0.3)  # each with its own defaults
    try:
        first = model(**batch).logits
        stats = vtprune.get_stats(model)[0]
        ratio = first_ratio(model)  # 0.3, or a PyramidDrop drop's own share
        assert stats["tokens_after"] == [max(1, int(n * ratio + 0.5)) for n in stats["tokens_before"]]
        again = model(**batch).logits
        assert torch.equal(first, again)
        assert torch.equal(vtprune.get_stats(model)[0]["kept_indices"], stats["kept_indices"])
        for i in range(2):
            alone = model(**row(batch, i)).logits
            kept = vtprune.get_stats(model)[0]["kept_indices"][0]
            assert torch.equal(stats["kept_indices"][i, : kept.shape[0]], kept)
            torch.testing.assert_close(first[i, -alone.shape[1] :], alone[0], rtol=0, atol=1e-5)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    finally:
        vtprune.remove_pruner(model)


@torch.no_grad()
def test_projector_rows_reproduce_the_visual_embeddings(family):
    """ZOO perturbs the projector at its inputs: the captured rows, through the float32 projector copy, must
    give back each visual token's embedding, in the order the tokens sit in the sequence."""
    model = cached_model(family, "sdpa")
    batch = make_batch(family, 2)
    vtprune.apply_pruner(model, method="zoo", keep_ratio=0.5, m=2)
    pruner = model._vtprune_pruner
    lm_in, seen = {}, []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_in.update(k), with_kwargs=True, prepend=True
    )
    h2 = pruner.adapter.projector_module().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(**batch)
    h.remove(), h2.remove()
    rows = pruner.adapter.projector_rows(seen[:1], pruner.state.call)["image"]
    vis = batch["input_ids"] == model.config.image_token_id
    embeds = lm_in["inputs_embeds"][vis]
    newline = pruner.adapter.newline_mask(lm_in["inputs_embeds"], vis)
    if newline is not None:
        assert newline.any()
        embeds = lm_in["inputs_embeds"][vis & ~newline]
    vtprune.remove_pruner(model)
    torch.testing.assert_close(pruner.projector()(rows), embeds.float(), rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_merge_averages_pruned_tokens_into_kept():
    model = tiny_model("llava")
    batch = make_batch("llava", 1)
    lm_in = {}
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_in.update(k), with_kwargs=True, prepend=True
    )
    vtprune.apply_pruner(model, method="pool", keep_tokens=4, merge=True)
    seen = {}
    h2 = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(hidden=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    model(**batch)
    h.remove(), h2.remove()
    stats = vtprune.get_stats(model)[0]
    assert stats["merged"]
    vis = batch["input_ids"][0] == model.config.image_token_id
    feats = lm_in["inputs_embeds"][0, vis]
    kept = stats["kept_indices"][0]
    # Independent: each token to its most cosine-similar kept token, plain mean per group.
    x = torch.nn.functional.normalize(feats, dim=-1)
    target = (x @ x[kept].T).argmax(-1)
    target[kept] = torch.arange(4)
    expected = torch.stack([feats[target == s].mean(0) for s in range(4)])
    first_vis = int(vis.nonzero()[0])
    got = seen["hidden"][0, first_vis : first_vis + 4]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The check has teeth: tokens were really averaged in (plain pruning would hand on the kept rows unchanged).
    assert max(int((target == s).sum()) for s in range(4)) > 1
    assert not torch.allclose(got, feats[kept], atol=1e-3)


@torch.no_grad()
def test_layer_average_budget_and_default_layers():
    model = tiny_model("llava")  # 4 decoder layers
    batch = make_batch("llava", 1)
    vtprune.apply_pruner(model, method="entropy", keep_tokens=8, budget="layer_average")
    model(**batch)
    s = vtprune.get_stats(model)[0]
    # default entropy layer for llava is 2; (L*T - K*N)/(L-K) = (4*8 - 2*16)/2 = 0 -> at least 1
    assert s["layer"] == 2 and s["budget"] == "layer_average" and s["tokens_after"] == [1]
    vtprune.apply_pruner(model, method="entropy", keep_tokens=12, budget="layer_average", replace=True)
    model(**batch)
    assert vtprune.get_stats(model)[0]["tokens_after"] == [(4 * 12 - 2 * 16) // 2]
    vtprune.apply_pruner(model, method="fastv", replace=True)
    model(**batch)
    assert vtprune.get_stats(model)[0]["layer"] == 2
    model._vtprune_collapse_layer = 3
    vtprune.apply_pruner(model, method="entropy", replace=True)
    model(**batch)
    assert vtprune.get_stats(model)[0]["layer"] == 3
    with pytest.raises(ValueError, match="budget must be one of \\['plain', 'layer_average'\\], got 'avg'"):
        vtprune.apply_pruner(model, method="entropy", budget="avg", replace=True)


@torch.no_grad()
def test_padding_patches_are_found_and_capped():
    model = tiny_model("llava")
    proc = cached_processor("llava")
    from vtprune.testing import tiny_batch, tiny_images

    # 56x28 (wide) image: pad-to-square adds a 14 px band above and below -> of 4x4 patches the
    # top and bottom rows (7 px each) are entirely padding.
    batch = tiny_batch("llava", proc, tiny_images(1, sizes=[(56, 28)]))
    vtprune.apply_pruner(model, method="fastv", layer=1, keep_tokens=16, debias="sink")
    model(**batch)
    pruner = model._vtprune_pruner
    vis = batch["input_ids"] == model.config.image_token_id
    pad = pruner.adapter.pad_mask({"pixel_values": batch["pixel_values"]}, vis)[vis].view(4, 4)
    assert pad[0].all() and pad[3].all() and not pad[1:3].any()
    stats = vtprune.get_stats(model)[0]
    assert stats["tokens_after"] == [8]  # budget capped at the non-padding count
    assert set((stats["kept_indices"][0] // 4).tolist()) == {1, 2}
    # Plain FastV reads no padding flags, so the engine does not compute them (they cost more than its choosing).
    vtprune.apply_pruner(model, method="fastv", layer=1, keep_tokens=16, replace=True)
    assert "pad_mask" not in model._vtprune_pruner._needs
    model(**batch)
    assert model._vtprune_pruner.state.flags.pad is None and vtprune.get_stats(model)[0]["tokens_after"] == [16]
    vtprune.remove_pruner(model)


@torch.no_grad()
@pytest.mark.parametrize("method", ["divprune", "zoo"])
def test_kernel_path_matches_reference_end_to_end(method):
    """The patch layer reaches the kernels only through vtprune.ops; forcing them (Triton's interpreter on a
    CPU) must give the same kept tokens and logits as the PyTorch references, and the stats must say so."""
    from vtprune import ops

    model = cached_model("qwen2_5_vl", "sdpa")
    batch = make_batch("qwen2_5_vl", 2)
    vtprune.apply_pruner(model, method=method, keep_ratio=0.4, merge=True, **({"m": 4} if method == "zoo" else {}))
    try:
        ops.set_backend("torch")
        ref = model(**batch).logits
        ref_stats = vtprune.get_stats(model)[0]
        ops.set_backend("triton")
        out = model(**batch).logits
        stats = vtprune.get_stats(model)[0]
    finally:
        ops.set_backend(None)
        vtprune.remove_pruner(model)
    assert ref_stats["backend"] == {"greedy": "torch", "merge": "torch", "compact": "torch"}
    assert stats["backend"] == {"greedy": "triton", "merge": "triton", "compact": "triton"}
    assert torch.equal(stats["kept_indices"], ref_stats["kept_indices"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
