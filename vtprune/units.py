"""Budgets per image and per video: how a stage's setting becomes one token count per selection item.

A sample's visual tokens fall into units (one per image or video, ``vtprune.patches.base.Unit``). ``keep_ratio``
applies to each unit; ``keep_tokens`` is the sample's total, split across its units in proportion to their sizes by
the largest-remainder rule (ties to the earlier unit). Videos use ``video_keep_ratio`` / ``video_keep_tokens`` when
given, else the image setting (then ``keep_tokens`` is split over all the sample's units).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


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
    grid: Optional[tuple] = None
    frames: int = 1


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` (at most sum(sizes)) into integer parts proportional to ``sizes``: floors first, then one
    more to the largest fractional remainders, ties to the earlier part. Each part stays <= its size."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    total = min(total, whole)
    quotas = [total * n / whole for n in sizes]
    parts = [math.floor(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


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
        ratio, tokens = ((stage.video_keep_ratio, stage.video_keep_tokens) if group == "video"
                         else (stage.keep_ratio, stage.keep_tokens))
        if tokens is not None:
            parts = largest_remainder(tokens, [sizes[i] for i in members])
        else:
            parts = [ratio_keep(ratio, sizes[i]) for i in members]
        for i, k in zip(members, parts):
            out[i] = k
    return out
