"""Several images and videos per prompt: each is a unit with its own budget, and the exactness properties hold
with videos as they do with one image."""

import pytest
import torch

import vtprune
from helpers import cached_model, cached_processor, make_video_batch, row
from vtprune.budgets import largest_remainder
from vtprune.patches import FAMILIES as REGISTRY
from vtprune.patches import get_adapter
from vtprune.strategies import SelectionInputs
from vtprune.strategies.baselines import grid_subsample
from vtprune.strategies.temporal import temporal_change, temporal_select
from vtprune.testing import FAMILIES, tiny_images

VIDEO_FAMILIES = [f for f in FAMILIES if REGISTRY[f].tiny.video_tag is not None]


@pytest.fixture(params=VIDEO_FAMILIES)
def vfamily(request):
    return request.param


def vis_mask(model, batch):
    return get_adapter(model).visual_mask(batch["input_ids"])


def unit_counts(stats, r):
    return [(u.kind, u.tokens_before, u.tokens_after) for u in stats["units"][r]]


# --------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "total,sizes,want",
    [
        (10, [16, 18], [5, 5]),
        (7, [1, 1, 1], [1, 1, 1]),
        (2, [5, 5, 5], [1, 1, 0]),
        (100, [3, 4], [3, 4]),
        (5, [10, 0, 10], [3, 0, 2]),
        (0, [4, 4], [0, 0]),
    ],
)
def test_largest_remainder(total, sizes, want):
    got = largest_remainder(total, sizes)
    assert got == want and sum(got) == min(total, sum(sizes)) and all(g <= n for g, n in zip(got, sizes))


@torch.no_grad()
def test_each_unit_keeps_its_own_ratio_and_videos_their_own(vfamily):
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 2)
    vtprune.apply_pruner(model, method="pool", keep_ratio=0.5, video_keep_ratio=0.25)
    try:
        model(**batch)
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.remove_pruner(model)
    for r in range(2):
        (ik, i_n, i_k), (vk, v_n, v_k) = unit_counts(stats, r)
        assert (ik, vk) == ("image", "video") and stats["units"][r][1].frames == 3
        assert i_k == int(i_n * 0.5 + 0.5) and v_k == int(v_n * 0.25 + 0.5)
        assert stats["tokens_before"][r] == i_n + v_n and stats["tokens_after"][r] == i_k + v_k
        kept = stats["kept_indices"][r][stats["kept_indices"][r] >= 0]
        units = stats["units"][r]
        assert torch.equal(kept, torch.cat([units[0].kept_indices, units[1].kept_indices + i_n]))


@torch.no_grad()
def test_keep_tokens_is_split_across_units_by_size(vfamily):
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 1)
    vtprune.apply_pruner(model, method="random", keep_tokens=10)
    try:
        model(**batch)
        units = vtprune.get_stats(model)[0]["units"][0]
    finally:
        vtprune.remove_pruner(model)
    sizes = [u.tokens_before for u in units]
    assert [u.tokens_after for u in units] == largest_remainder(10, sizes)


@torch.no_grad()
def test_joint_units_choose_once_over_the_sample():
    from vtprune import ops

    model = cached_model("qwen2_vl", "sdpa")
    batch = make_video_batch("qwen2_vl", 1)
    lm_in = {}
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_in.update(k), with_kwargs=True, prepend=True
    )
    vtprune.apply_pruner(model, method="divprune", keep_tokens=6, units="joint")
    try:
        model(**batch)
        stats = vtprune.get_stats(model)[0]
    finally:
        h.remove()
        vtprune.remove_pruner(model)
    # One DivPrune selection over the image's and the video's tokens together, owing no token to either.
    feats = lm_in["inputs_embeds"][vis_mask(model, batch)][None]
    assert stats["kept_indices"][0].tolist() == ops.greedy_maxmin_reference(feats, 6)[0].sort().values.tolist()
    assert sum(u.tokens_after for u in stats["units"][0]) == 6


@torch.no_grad()
def test_temporal_frame_budget_splits_each_video_by_frame(vfamily):
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 1, frames=4)
    vtprune.apply_pruner(model, method="divprune", keep_ratio=0.3, temporal="frame")
    try:
        model(**batch)
        video = vtprune.get_stats(model)[0]["units"][0][1]
    finally:
        vtprune.remove_pruner(model)
    tail = video.tokens_before % video.frames  # OneVision's newline after the frames is a part of its own
    per_frame = video.tokens_before // video.frames
    parts = [per_frame] * video.frames + ([tail] if tail else [])
    counts = torch.bincount(video.kept_indices // per_frame, minlength=len(parts)).tolist()
    assert counts == largest_remainder(video.tokens_after, parts)


# --------------------------------------------------------------------------------------------- exactness with videos


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_video_keep_all_is_bit_identical(vfamily, attn, layer):
    model = cached_model(vfamily, attn)
    batch = make_video_batch(vfamily, 2)
    ref = model(**batch).logits
    vtprune.apply_pruner(model, method="random" if layer == 0 else "fastv", keep_ratio=1.0, layer=layer)
    try:
        out = model(**batch).logits
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.remove_pruner(model)
    assert stats["tokens_after"] == vis_mask(model, batch).sum(1).tolist()
    assert torch.equal(out, ref)


@torch.no_grad()
@pytest.mark.parametrize(
    "method", ["pool", "divprune", "temporal", "visionzip", "vispruner", "vidcom2", "fastvid", "holitom"]
)
def test_video_cached_equals_uncached(vfamily, method):
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 2)
    gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    vtprune.apply_pruner(model, method=method, keep_ratio=0.4)
    try:
        cached = model.generate(**batch, use_cache=True, **gen)
        uncached = model.generate(**batch, use_cache=False, **gen)
    finally:
        vtprune.remove_pruner(model)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(
    "method,layer",
    [
        ("pool", 0),
        ("divprune", 0),
        ("zoo", 0),
        ("fastv", 2),
        ("visionzip", 0),
        ("dart", 2),
        ("vidcom2", 0),
        ("fastvid", 0),
        ("holitom", 0),
        ("dycoke", 0),
    ],
)
def test_video_batched_equals_per_sample(vfamily, method, layer):
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 2)
    assert batch["attention_mask"].min() == 0
    # Qwen2.5-VL's windowed tower itself is not batch-invariant on videos (~7e-5 here, unpatched): allow that.
    ref = model(**batch).logits
    slack = max(
        (ref[i, -a.shape[1] :] - a[0]).abs().max().item()
        for i, a in ((i, model(**row(batch, i)).logits) for i in range(2))
    )
    opts = {"m": 4} if method == "zoo" else {}
    vtprune.apply_pruner(model, method=method, keep_ratio=0.5, layer=layer, **opts)
    try:
        both = model(**batch).logits
        kept_both = vtprune.get_stats(model)[0]["kept_indices"]
        for i in range(2):
            alone = model(**row(batch, i)).logits
            kept = vtprune.get_stats(model)[0]["kept_indices"]
            if slack > 1e-6 and method != "pool":
                # Scores from features that differ by the tower's noise may break near-ties differently: only
                # the budgets must agree then.
                assert (kept_both[i] >= 0).sum() == kept.shape[1]
                continue
            assert torch.equal(kept_both[i, : kept.shape[1]], kept[0])
            torch.testing.assert_close(both[i, -alone.shape[1] :], alone[0], rtol=0, atol=1e-5 + 2 * slack)
    finally:
        vtprune.remove_pruner(model)


@torch.no_grad()
@pytest.mark.parametrize("method", ["random", "temporal"])
def test_video_pruned_equals_oracle_on_kept_tokens(vfamily, method):
    """The kept video tokens keep their 3-D (t, h, w) position ids: a layer-0 stage equals the unpatched language
    model given only the text and the kept tokens at their original M-RoPE positions."""
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 2)
    lm = model.model.language_model
    seen = {}
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        model(**batch)
        full = dict(seen)
        handle.remove()
        if full.get("deepstack_visual_embeds") is not None:
            pytest.skip(
                "the oracle needs the kept tokens' DeepStack features: tests/adapters/test_qwen3_vl.py builds it"
            )
        vtprune.apply_pruner(model, method=method, keep_ratio=0.4)
        # Registered after the pruner's hook, so it sees what the language model really gets.
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
        pruned = model(**batch).logits
        kept = vtprune.get_stats(model)[0]["kept_indices"]
        pruned_pos = seen["position_ids"]
    finally:
        handle.remove()
        if vtprune.is_patched(model):
            vtprune.remove_pruner(model)
    vis = vis_mask(model, batch)
    pos = full["position_ids"]
    if pos is None:  # 1-D RoPE families build arange positions themselves
        pos = torch.arange(vis.shape[1]).expand(2, -1)
    for i in range(2):
        keep = batch["attention_mask"][i].bool() & ~vis[i]
        keep[vis[i].nonzero().flatten()[kept[i][kept[i] >= 0]]] = True
        oracle = lm(
            inputs_embeds=full["inputs_embeds"][i : i + 1, keep],
            position_ids=pos[..., i : i + 1, keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        )
        logits = model.lm_head(oracle.last_hidden_state)
        torch.testing.assert_close(pruned[i, -logits.shape[1] :], logits[0], rtol=0, atol=1e-5)
        n = int(keep.sum())
        assert torch.equal(pruned_pos[..., i, -n:], pos[..., i, keep])


@torch.no_grad()
@pytest.mark.parametrize("method", ["fastvid", "holitom"])
@pytest.mark.parametrize("family", [f for f in VIDEO_FAMILIES if f.startswith("qwen")])
def test_merged_video_tokens_take_their_kept_tokens_mrope_ids(family, method):
    """A merged video token takes the (t, h, w) M-RoPE id of the token it was merged into (the segment's density
    peak, which the plan keeps); its embedding is the plan's mean over the tokens joined to it. The plan is
    recomputed here from the video's own embeddings, so a stage that merged something else would fail."""
    from vtprune.strategies import get_method

    model = cached_model(family, "sdpa")
    batch = make_video_batch(family, 2, frames=4)
    lm = model.model.language_model
    seen = {}
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        model(**batch)
        full = dict(seen)
        handle.remove()
        vtprune.apply_pruner(model, method=method, keep_ratio=1.0, video_keep_ratio=0.3)
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
        model(**batch)
        stats = vtprune.get_stats(model)[0]
        pruned = dict(seen)
    finally:
        handle.remove()
        if vtprune.is_patched(model):
            vtprune.remove_pruner(model)
    vis = vis_mask(model, batch)
    video_id = get_adapter(model).visual_token_ids(model.config)["video"]
    for i in range(2):
        image, video = stats["units"][i]
        assert (image.kind, video.kind) == ("image", "video") and video.tokens_after < video.tokens_before
        at = (batch["input_ids"][i] == video_id).nonzero().flatten()  # the video's tokens in the prompt
        assert len(at) == video.tokens_before
        feats = full["inputs_embeds"][i, at][None]
        per = video.tokens_before // video.frames
        sel = SelectionInputs(features=feats, grid=[(1, per)], frames=[video.frames], kinds=["video"])
        plan = get_method(method).select(sel, video.tokens_after)
        assert torch.equal(plan.keep[0], video.kept_indices)
        target = plan.target[0]
        want = torch.stack([feats[0, target == s].mean(0) for s in range(video.tokens_after)])
        keep = batch["attention_mask"][i].bool() & ~vis[i]
        keep[vis[i].nonzero().flatten()] = True  # the image keeps all its tokens
        keep[at] = False
        keep[at[plan.keep[0]]] = True
        n = int(keep.sum())
        got = pruned["inputs_embeds"][i, -n:][(batch["input_ids"][i] == video_id)[keep]]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert torch.equal(pruned["position_ids"][..., i, -n:], full["position_ids"][..., i, keep])


@torch.no_grad()
def test_holitom_inside_the_llm_is_a_second_merging_stage(vfamily):
    """``inner_layer``: HoliTom's merging inside the LLM follows its merging before it, as FastV-scored merging into
    the most similar kept token at that layer; each row of a padded batch equals the row alone."""
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 2, frames=4)
    ref = model(**batch).logits
    # Qwen2.5-VL's windowed tower is not batch-invariant on videos (see above): merge plans may then differ.
    slack = max(
        (ref[i, -a.shape[1] :] - a[0]).abs().max().item()
        for i, a in ((i, model(**row(batch, i)).logits) for i in range(2))
    )
    vtprune.apply_pruner(model, method="holitom", keep_ratio=0.5, inner_layer=2, inner_keep=0.5)
    try:
        stages = [(s.method, s.layer, s.keep_ratio, s.options["merge"]) for s in vtprune.get_pruner(model).stages]
        both = model(**batch).logits
        stats = vtprune.get_stats(model)
        for i in range(2 if slack <= 1e-6 else 0):
            alone = model(**row(batch, i)).logits
            torch.testing.assert_close(both[i, -alone.shape[1] :], alone[0], rtol=0, atol=2e-5)
    finally:
        vtprune.remove_pruner(model)
    assert stages == [("holitom", 0, 0.5, False), ("fastv", 2, 0.5, True)]
    assert [s.merged for s in stats] == [True, True]
    assert stats[1].tokens_before == stats[0].tokens_after
    for units in stats[1].units:  # each image and video keeps its own half
        assert [u.tokens_after for u in units] == [int(u.tokens_before * 0.5 + 0.5) for u in units]
    with pytest.raises(ValueError, match="leave layer unset, or write the two stages as a schedule"):
        vtprune.apply_pruner(model, method="holitom", layer=2, inner_layer=3)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_video_cache_holds_text_plus_kept(vfamily, layer):
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 2)
    length = batch["input_ids"].shape[1]
    n_vis = vis_mask(model, batch).sum(1)
    vtprune.apply_pruner(model, method="random", keep_ratio=0.5, layer=layer)
    try:
        out = model(**batch, use_cache=True)
        kept = torch.tensor(vtprune.get_stats(model)[0]["tokens_after"])
    finally:
        vtprune.remove_pruner(model)
    expected = int((length - n_vis + kept).max())
    for i, cached_layer in enumerate(out.cache.layers):
        assert cached_layer.keys.shape[-2] == (expected if i >= layer else length), i


@torch.no_grad()
def test_zoo_reads_each_units_own_projector_rows(vfamily):
    """With an image and a video in one prompt, the projector rows of each kind, through the projector, give
    back the embeddings at that kind's tokens (the video's rows never stand in for the image's)."""
    model = cached_model(vfamily, "sdpa")
    batch = make_video_batch(vfamily, 2)
    vtprune.apply_pruner(model, method="zoo", keep_ratio=0.5, m=2)
    pruner = vtprune.get_pruner(model)
    lm_in, seen = {}, []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_in.update(k), with_kwargs=True, prepend=True
    )
    h2 = pruner.adapter.projector_module().register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(**batch)
    finally:
        h.remove(), h2.remove()
        vtprune.remove_pruner(model)
    rows = pruner.adapter.projector_rows(seen[:2], pruner.state.call)
    assert sorted(rows) == ["image", "video"]
    ids = pruner.adapter.visual_token_ids(model.config)
    newline = pruner.adapter.newline_mask(lm_in["inputs_embeds"], vis_mask(model, batch))
    for kind, kind_rows in rows.items():
        mine = batch["input_ids"] == ids[kind]
        want = lm_in["inputs_embeds"][mine if newline is None else mine & ~newline]
        if vfamily == "llava_onevision" and kind == "video":
            # Its tokens are pooled projector outputs: the rows are interpolated inputs, an approximation.
            assert kind_rows.shape[0] == want.shape[0]
            continue
        torch.testing.assert_close(pruner.projector()(kind_rows), want.float(), rtol=1e-5, atol=1e-4)


def test_video_flops_match_the_flop_counter(vfamily):
    from helpers import check_prefill

    batch = make_video_batch(vfamily, 2)
    model = cached_model(vfamily, "eager")

    def patched(model, schedule):
        if schedule is not None:
            vtprune.apply_pruner(model, schedule=schedule, replace=True)
        return model

    try:
        # divprune's N×N cost is per unit (the sum of squares, not the square of the sum); fastv's is per row.
        for schedule in (
            None,
            [dict(method="pool", layer=0, keep_ratio=0.5)],
            [dict(method="divprune", layer=0, keep_ratio=0.5), dict(method="fastv", layer=2, keep_ratio=0.5)],
            # The video methods' Gram matrices are per unit too; a later stage sees no grid and falls back.
            [dict(method="vidcom2", layer=0, keep_ratio=0.5), dict(method="fastvid", layer=2, keep_ratio=0.5)],
            [dict(method="holitom", layer=0, keep_ratio=0.3)],
            [dict(method="dycoke", layer=0, keep_ratio=0.6)],
        ):
            check_prefill(model, batch, schedule, patched)
    finally:
        if vtprune.is_patched(model):
            vtprune.remove_pruner(model)


# --------------------------------------------------------------------------------------------- several images


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_two_images_in_one_prompt_are_two_units(family):
    model = cached_model(family, "sdpa")
    proc = cached_processor(family)
    tag = REGISTRY[family].tiny.prompt_tag
    text = [f"USER: {tag} {tag} which is red ? ASSISTANT:", f"USER: {tag} {tag} what ? ASSISTANT:"]
    images = tiny_images(4, seed=7)
    if family == "qwen2_vl" or family == "llava_next":
        batch = proc(images=[images[:2], images[2:]], text=text, return_tensors="pt", padding=True)
    else:
        batch = proc(images=images, text=text, return_tensors="pt", padding=True)
    ref = model(**batch).logits
    vtprune.apply_pruner(model, method="pool", keep_ratio=1.0)
    try:
        assert torch.equal(model(**batch).logits, ref)
        vtprune.apply_pruner(model, method="pool", keep_ratio=0.5, replace=True)
        model(**batch)
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.remove_pruner(model)
    counts = vis_mask(model, batch).sum(1).tolist()
    for r in range(2):
        units = stats["units"][r]
        assert [u.kind for u in units] == ["image", "image"]
        assert sum(u.tokens_before for u in units) == counts[r]
        assert [u.tokens_after for u in units] == [int(u.tokens_before * 0.5 + 0.5) for u in units]


# --------------------------------------------------------------------------------------------- temporal method


def test_temporal_change_ranks_moving_tokens_first():
    g = torch.Generator().manual_seed(0)
    frames, h, w, d = 3, 2, 3, 8
    base = torch.randn(1, 1, h * w, d, generator=g).expand(1, frames, h * w, d).clone()
    base[0, 2, 4] = torch.randn(d, generator=g)  # position 4 changes in the last frame
    base[0, 1, 0] = -base[0, 0, 0]  # position 0 flips in the middle frame
    feats = base.reshape(1, frames * h * w, d)
    change = temporal_change(feats, frames)
    assert torch.isinf(change[0, : h * w]).all()
    assert change[0, h * w :].argmax() == 0  # the flip: cosine -1, the largest change
    inputs = SelectionInputs(features=feats, grid=[(h, w)], frames=[frames])
    # After the first frame: the flip (index 6) and the flip back (12), then the changed token (16).
    assert temporal_select(inputs, h * w + 3)[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 12, 16]
    # A budget within the first frame thins it over its grid, not its top rows in raster order.
    assert temporal_select(inputs, 2)[0].tolist() == grid_subsample(h, w, 2).tolist() == [3, 5]
    # An image (one frame) has nothing to compare with: uniform spatial subsampling.
    img = SelectionInputs(features=torch.randn(1, 16, d, generator=g), grid=[(4, 4)], frames=[1])
    assert temporal_select(img, 4)[0].tolist() == [5, 7, 13, 15]


def test_text_only_prompt_with_video_settings_is_a_no_op():
    model = cached_model("qwen2_vl", "sdpa")
    batch = cached_processor("qwen2_vl")(text=["USER: what ? ASSISTANT:"], return_tensors="pt")
    ref = model(**batch).logits
    vtprune.apply_pruner(model, method="divprune", video_keep_ratio=0.2)
    try:
        assert torch.equal(model(**batch).logits, ref) and vtprune.get_stats(model) == []
    finally:
        vtprune.remove_pruner(model)
