"""Budget arithmetic, the engine's: how a stage's setting becomes one token count per selection item.

A sample's visual tokens fall into units (one per image or video, ``vtprune.patches.base.Unit``). ``keep_ratio``
applies to each unit; ``keep_tokens`` is the sample's total, split across its units in proportion to their sizes by
the largest-remainder rule (ties to the earlier unit). Videos use ``video_keep_ratio`` / ``video_keep_tokens`` when
given, else the image setting (then ``keep_tokens`` is split over all the sample's units).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .strategies.base import ENGINE_OPTIONS, shares

if TYPE_CHECKING:  # annotations only
    from .config import StageConfig
    from .stage import TokenFlags
    from .strategies.base import Method


@dataclass(frozen=True)
class Item:
    """One strategy call's worth of tokens for one row: a unit, a frame of a video, or a whole row (joint).

    start: offset into the row's current visual tokens; n tokens; k to keep; grid (h, w) per frame and frames
    when the tokens are an unpruned raster grid, else None / 1; unit: index of the unit in the row.
    """

    row: int
    unit: int
    kind: str
    start: int
    n: int
    k: int
    grid: tuple | None = None
    frames: int = 1


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` (at most sum(sizes)) into integer parts proportional to ``sizes``: floors first, then one
    more to the largest fractional remainders, ties to the earlier part. Each part stays <= its size."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    return shares(min(total, whole), sizes)


def ratio_keep(ratio: float, n: int) -> int:
    """round(ratio * n), at least 1, at most n (0 for an empty unit)."""
    return 0 if n == 0 else min(n, max(1, int(math.floor(ratio * n + 0.5))))


def unit_budgets(stage, kinds: list[str], sizes: list[int]) -> list[int]:
    """Tokens each unit of one row keeps under ``stage`` (a StageConfig)."""
    separate = stage.video_keep_ratio is not None or stage.video_keep_tokens is not None
    groups: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind if separate and kind == "video" else "all", []).append(i)
    out = [0] * len(sizes)
    for group, members in groups.items():
        ratio, tokens = (
            (stage.video_keep_ratio, stage.video_keep_tokens)
            if group == "video"
            else (stage.keep_ratio, stage.keep_tokens)
        )
        if tokens is not None:
            parts = largest_remainder(tokens, [sizes[i] for i in members])
        else:
            parts = [ratio_keep(ratio, sizes[i]) for i in members]
        for i, k in zip(members, parts):
            out[i] = k
    return out


def layer_average_keep(num_layers: int, layer: int, n_visual: int, target_avg: float) -> int:
    """Tokens to keep from layer ``layer`` on so that the average over all layers is ``target_avg``.

    With N tokens in layers [0, K) and k in [K, L): (K*N + (L-K)*k) / L = T gives
    k = floor((L*T - K*N) / (L - K)), clamped to [1, N]. E.g. L=32, K=2, N=576, T=128 -> 98.
    """
    if num_layers < 1 or not 0 <= layer < num_layers:
        raise ValueError(
            f"need num_layers >= 1 and 0 <= layer < num_layers; got num_layers={num_layers}, layer={layer}"
        )
    if n_visual < 1 or not 0 < target_avg <= n_visual:
        raise ValueError(
            f"need n_visual >= 1 and 0 < target_avg <= n_visual; got n_visual={n_visual}, target_avg={target_avg}"
        )
    num = num_layers * target_avg - layer * n_visual
    den = num_layers - layer
    keep = num // den if isinstance(num, int) else math.floor(num / den)  # exact for integers
    return int(min(max(keep, 1), n_visual))


def plan_items(
    stage: StageConfig, method: Method, flags: TokenFlags, units: list, num_layers: int, counts: list | None = None
) -> list[Item]:
    """The selection items of this stage: one per unit (or per frame, or per row), each with its budget.

    units: per row, the ``Unit``s of its prefill (``flags.unit`` maps the current tokens to them); counts: each
    row's visual tokens, when the caller has them.
    """
    options = {k: v for k, v in stage.options.items() if k not in ENGINE_OPTIONS}
    items = []
    counts = flags.vis.sum(1).tolist() if counts is None else counts
    for r, row_units in enumerate(units):
        if counts[r] == 0:
            continue
        vis = flags.vis[r]
        if len(row_units) == 1:
            sizes = [counts[r]]
        else:
            sizes = torch.bincount(flags.unit[r][vis], minlength=len(row_units)).tolist()
        ks = unit_budgets(stage, [u.kind for u in row_units], sizes)
        if stage.options["budget"] == "layer_average":
            # EntropyPrune's convention: the budget is the average over all layers, layers before K keep all.
            ks = [0 if n == 0 else layer_average_keep(num_layers, stage.layer, n, k) for n, k in zip(sizes, ks)]
        starts = [sum(sizes[:u]) for u in range(len(sizes))]
        if method.budget_cap is not None:
            pad = None if flags.pad is None else flags.pad[r][vis]
            ks = [
                k if n == 0 else method.budget_cap(k, None if pad is None else pad[s : s + n], **options)
                for s, n, k in zip(starts, sizes, ks)
            ]
        if stage.options["units"] == "joint":
            kinds = {u.kind for u in row_units}
            items.append(Item(r, -1, kinds.pop() if len(kinds) == 1 else "mixed", 0, sum(sizes), sum(ks)))
            continue
        for u, (unit, start, n, k) in enumerate(zip(row_units, starts, sizes, ks)):
            items.extend(_unit_items(Item(r, u, unit.kind, start, n, k), unit, stage.options["temporal"]))
    return [it for it in items if it.k > 0]  # a part keeping nothing needs no strategy call


def _unit_items(item: Item, unit, temporal: str) -> list[Item]:
    """One unit's items: the whole unit, or its grid's frames (``temporal="frame"``), and its tail tokens apart
    from the grid, each with its largest-remainder share of the unit's budget. A pruned unit is no grid."""
    if item.n == 0 or unit.grid is None or item.n != unit.length:
        return [replace(item)]
    t, h, w = unit.grid
    frames = t if temporal == "frame" else 1
    parts = [h * w * t // frames] * frames + ([unit.tail] if unit.tail else [])
    if len(parts) == 1:
        return [replace(item, grid=(h, w), frames=t)]
    out, start = [], item.start
    for i, (n, k) in enumerate(zip(parts, largest_remainder(item.k, parts))):
        grid = ((h, w), t // frames) if i < frames else (None, 1)
        out.append(replace(item, start=start, n=n, k=k, grid=grid[0], frames=grid[1]))
        start += n
    return out
