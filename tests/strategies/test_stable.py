"""Stable diversity selection (divprune_stable, zoo_stable): the knobs against naive versions, and the methods
through the patch layer (determinism, batching, keep-all identity)."""

import pytest
import torch
import torch.nn.functional as F

import vtprune
from helpers import cached_model, make_batch, make_video_batch, row
from vtprune import ops
from vtprune.strategies import stable
from vtprune.strategies.base import SelectionInputs

torch.set_num_threads(1)

SETTINGS = {
    "divprune_stable": dict(smooth=2, cells=2, margin=0.05, quantum=0.01),
    "zoo_stable": dict(m=8, smooth=2, cells=2, cell_pick="greedy"),
}
# Each method with its knobs set, and with the family's default cell layout (Qwen: 3x3 cells, salient tokens).
CASES = [(m, SETTINGS[m]) for m in sorted(SETTINGS)] + [("divprune_stable", {}), ("zoo_stable", dict(m=8))]


def features(b=2, rows=6, cols=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, rows * cols, d, generator=g), (rows, cols)


def test_every_knob_off_is_the_plain_greedy():
    x, grid = features()
    w = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1))
    for k in (1, 7, x.shape[1]):
        assert torch.equal(stable.stable_maxmin(x, k, grid), ops.greedy_maxmin(x, k))
        assert torch.equal(stable.stable_maxmin(x, k, grid, w), ops.greedy_maxmin(x, k, w))


def test_smooth_features_is_the_mean_of_the_right_down_neighbourhood():
    x, (rows, cols) = features(b=1, d=3)
    out = stable.smooth_features(x, (rows, cols), 2)[0].view(rows, cols, 3)
    g = x[0].view(rows, cols, 3)
    for r in range(rows):
        for c in range(cols):
            r2, c2 = min(r + 1, rows - 1), min(c + 1, cols - 1)  # edges replicated
            expect = (g[r, c] + g[r2, c] + g[r, c2] + g[r2, c2]) / 4
            torch.testing.assert_close(out[r, c], expect)


def test_margin_and_quantum_break_near_ties_by_raster_order():
    # Token 0 is the first pick's partner; tokens 1 and 2 are almost equally far from it, token 2 slightly farther.
    dist = torch.tensor([[[0.0, 0.50, 0.51, 0.9], [0.50, 0.0, 0.3, 0.2], [0.51, 0.3, 0.0, 0.2], [0.9, 0.2, 0.2, 0.0]]])
    init = torch.tensor([[0]])
    assert stable.maxmin_tie_band(dist, 2, init=init)[0, 1] == 3
    d = dist.clone()
    d[0, 0, 3] = d[0, 3, 0] = 0.1  # now 1 and 2 compete: 0.50 vs 0.51
    assert stable.maxmin_tie_band(d, 2, init=init)[0, 1] == 2
    assert stable.maxmin_tie_band(d, 2, margin=0.05, init=init)[0, 1] == 1
    assert stable.maxmin_tie_band(d, 2, margin=0.01, init=init)[0, 1] == 2  # 0.50 < 0.99 * 0.51
    assert stable.maxmin_tie_band(torch.floor(d / 0.05) * 0.05, 2, init=init)[0, 1] == 1


@pytest.mark.parametrize("cell_pick", stable.CELL_PICKS)
def test_cells_put_one_pick_in_each_chosen_cell(cell_pick):
    x, grid = features(b=3, rows=6, cols=7)
    cell = stable.cell_index(grid, 2)
    assert int(cell.max()) + 1 == 3 * 4
    for k in (5, 12, 20):
        picks = stable.stable_maxmin(x, k, grid, cells=2, cell_pick=cell_pick)
        assert all(len(set(p.tolist())) == k for p in picks)
        first = cell[picks[:, : min(k, 12)]]
        assert all(len(set(c.tolist())) == first.shape[1] for c in first)  # distinct cells first


def test_cell_pick_central_and_salient_against_naive():
    x, grid = features(b=1, rows=4, cols=4)
    cell = stable.cell_index(grid, 2)
    pooled = stable.pool_cells(x, cell, 4)
    everything = x[0].mean(0)
    for c in range(4):
        members = (cell == c).nonzero().flatten()
        torch.testing.assert_close(pooled[0, c], x[0, members].mean(0))
        near_cell = F.cosine_similarity(x[0, members], pooled[0, c][None], dim=-1)
        far_all = -F.cosine_similarity(x[0, members], everything[None], dim=-1)
        for how, naive in (("central", near_cell), ("salient", far_all)):
            got = stable.best_in_cells(stable.cell_scores(x, pooled, cell, how), cell, torch.tensor([[c]]))
            assert got[0, 0] == members[naive.argmax()]


def test_no_grid_falls_back_to_raster_only_knobs():
    x, grid = features()
    inputs = SelectionInputs(features=x, grid=None)
    assert torch.equal(stable.divprune_stable_select(inputs, 6, smooth=2, cells=2), ops.greedy_maxmin(x, 6))
    assert stable.usable_grid([(6, 5), (5, 6)], 2, 30) is None and stable.usable_grid([grid, grid], 2, 30) == grid


def test_a_clip_is_smoothed_and_cut_into_cells_frame_by_frame():
    frames, (x, grid) = 3, features(b=2, rows=4, cols=5, d=6)
    clip = torch.cat([x, x.flip(1), x * 2], dim=1)  # [2, 3 * 20, 6]: three frames of the same grid
    per_frame = [stable.smooth_features(clip[:, f * 20 : (f + 1) * 20], grid, 2) for f in range(frames)]
    assert torch.equal(stable.smooth_features(clip, grid, 2), torch.cat(per_frame, dim=1))
    one, cell = stable.cell_index(grid, 2), stable.cell_index(grid, 2, frames=frames)
    assert torch.equal(cell, torch.cat([one + 6 * f for f in range(frames)]))  # 2 x 3 cells per frame, never shared
    assert stable.usable_grid([grid] * 2, 2, 60, frames=[3, 3]) == grid
    assert stable.usable_grid([grid] * 2, 2, 60) is None and stable.usable_grid([grid] * 2, 2, 60, [3, 2]) is None
    picks = stable.divprune_stable_select(SelectionInputs(features=clip, grid=[grid] * 2, frames=[3, 3]), 10)
    assert torch.equal(picks, stable.stable_maxmin(clip, 10, grid, cells=2))
    assert all(len(set(cell[p].tolist())) == 10 for p in picks)  # one pick per cell while cells remain


@torch.no_grad()
def test_a_video_reaches_the_strategy_as_frames_of_a_grid(monkeypatch):
    seen, real = [], stable.stable_maxmin

    def spy(features, k, grid=None, *args):
        seen.append((features.shape[1], grid))
        return real(features, k, grid, *args)

    monkeypatch.setattr(stable, "stable_maxmin", spy)
    model, batch = cached_model("qwen2_5_vl", "sdpa"), make_video_batch("qwen2_5_vl", 1)
    frames = int(batch["video_grid_thw"][0, 0])
    vtprune.apply_pruner(model, method="divprune_stable", keep_ratio=0.5)
    try:
        model(**batch)
    finally:
        vtprune.remove_pruner(model)
    video = [(n, g) for n, g in seen if g is not None and n == frames * g[0] * g[1]]
    assert frames > 1 and len(video) == 1, seen


@torch.no_grad()
@pytest.mark.parametrize(
    "family, given, expected",
    [
        ("llava", {}, (2, "central")),
        ("qwen2_5_vl", {}, (3, "salient")),
        ("qwen3_vl", {}, (3, "salient")),
        ("qwen2_5_vl", {"cells": 2}, (2, "salient")),
        ("llava", {"cell_pick": "salient"}, (2, "salient")),
    ],
)
def test_the_family_sets_the_cells_the_user_did_not(monkeypatch, family, given, expected):
    seen, real = [], stable.stable_maxmin

    def spy(features, k, grid=None, weights=None, smooth=1, quantum=0.0, margin=0.0, cells=1, cell_pick="central"):
        seen.append((cells, cell_pick))
        return real(features, k, grid, weights, smooth, quantum, margin, cells, cell_pick)

    monkeypatch.setattr(stable, "stable_maxmin", spy)
    model = cached_model(family, "sdpa")
    vtprune.apply_pruner(model, method="divprune_stable", keep_ratio=0.5, **given)
    try:
        model(**make_batch(family, 1))
    finally:
        vtprune.remove_pruner(model)
    assert seen == [expected]


def test_bad_options_are_named():
    x, grid = features()
    with pytest.raises(ValueError, match="cell_pick='middle'"):
        stable.divprune_stable_select(SelectionInputs(features=x, grid=[grid] * 2), 4, cell_pick="middle")
    with pytest.raises(ValueError, match="margin=1.5"):
        stable.divprune_stable_select(SelectionInputs(features=x, grid=[grid] * 2), 4, margin=1.5)


@torch.no_grad()
@pytest.mark.parametrize(
    "method, options", CASES, ids=[f"{m}-{'knobs' if o.keys() - {'m'} else 'defaults'}" for m, o in CASES]
)
def test_stable_methods_are_deterministic_batch_consistent_and_keep_all_exact(family, method, options):
    model = cached_model(family, "sdpa")
    batch = make_batch(family, 2)
    plain = model(**batch).logits
    vtprune.apply_pruner(model, method=method, keep_ratio=0.3, **options)
    try:
        first = model(**batch).logits
        stats = vtprune.get_stats(model)[0]
        assert stats["tokens_after"] == [max(1, int(n * 0.3 + 0.5)) for n in stats["tokens_before"]]
        assert torch.equal(first, model(**batch).logits)
        for i in range(2):
            alone = model(**row(batch, i)).logits
            kept = vtprune.get_stats(model)[0]["kept_indices"][0]
            assert torch.equal(stats["kept_indices"][i, : kept.shape[0]], kept)
            torch.testing.assert_close(first[i, -alone.shape[1] :], alone[0], rtol=0, atol=1e-5)
        assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 2
    finally:
        vtprune.remove_pruner(model)
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0, **options)
    try:
        assert torch.equal(model(**batch).logits, plain)
    finally:
        vtprune.remove_pruner(model)
