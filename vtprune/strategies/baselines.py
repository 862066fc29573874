"""Baselines: seeded random selection, uniform spatial pooling, and FastV's last-token attention."""

from __future__ import annotations

import functools
import math
import os
from typing import Literal

import numpy as np
import torch

from .base import SelectionInputs, register
from .debias import padding_cap


@register("random", description="uniformly random subset, seeded")
def random_select(inputs: SelectionInputs, k: int, seed: int | None = 0) -> torch.Tensor:
    """Random subset of ``k`` of the ``N`` tokens per row. Returns [batch, k] (ascending).

    Each row draws from its own generator seeded with ``seed`` so a row's choice does not depend on its
    batch neighbours (batched equals per-sample).
    """
    b, n = inputs.batch, inputs.num_tokens
    out = []
    for _ in range(b):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out.append(torch.randperm(n, generator=gen)[:k].sort().values)
    return torch.stack(out).to(inputs.features.device)


@functools.lru_cache(maxsize=256)
def _grid_subsample(height: int, width: int, k: int) -> torch.Tensor:
    return _grid_subsample_uncached(height, width, k)


def grid_subsample(height: int, width: int, k: int) -> torch.Tensor:
    """Exactly ``k`` raster indices spread uniformly over a ``height x width`` grid. Returns [k] (ascending).
    The same few shapes come back on every call, so the result is cached (a copy is returned)."""
    return _grid_subsample(height, width, k).clone()


def _grid_subsample_uncached(height: int, width: int, k: int) -> torch.Tensor:
    """``grid_subsample`` without the cache.

    Takes an evenly spaced sub-grid of at most ``k`` tokens (about the grid's aspect ratio), then fills the remainder
    with evenly spaced tokens among those not yet taken, so exactly ``k`` distinct indices come back for any grid
    and any 0 <= k <= height * width.
    """
    n = height * width
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    # gh <= k keeps the sub-grid within the budget on tall grids (k // gh >= 1 columns then fit).
    gh = max(1, min(height, k, round(height * math.sqrt(k / n))))
    gw = max(1, min(width, k // gh))
    chosen = (_spread(gh, height)[:, None] * width + _spread(gw, width)[None, :]).ravel()
    rest = k - chosen.size
    if rest > 0:
        free = np.ones(n, dtype=bool)
        free[chosen] = False
        candidates = np.flatnonzero(free)
        chosen = np.concatenate([chosen, candidates[_spread(rest, candidates.size)]])
    return torch.from_numpy(np.sort(chosen))


def _spread(count: int, length: int) -> np.ndarray:
    """``count`` evenly spaced indices into ``length``: the centres of equal bins, in float32 (the arithmetic the
    recorded pool results were made with), truncated."""
    f32 = np.float32
    return ((np.arange(count, dtype=f32) + f32(0.5)) * f32(length) / f32(count)).astype(np.int64)


def spread(count: int, length: int, device=None) -> torch.Tensor:
    """``count`` evenly spaced positions along ``length`` tokens (the centres of equal bins, truncated): [count]
    ascending long. The sequence counterpart of ``grid_subsample``."""
    return ((torch.arange(count, device=device) + 0.5) * length / count).long()


@register("pool", needs=("grid",), description="uniform spatial subsampling of the token grid")
def pool_select(inputs: SelectionInputs, k: int) -> torch.Tensor:
    """Uniform spatial subsampling. Uses each row's (height, width) grid when it covers all ``N`` tokens (a
    video's frames stacked, so the picks spread over time too), otherwise evenly spaced positions along the token
    sequence. Returns [batch, k] (ascending)."""
    n = inputs.num_tokens
    out = []
    for row in range(inputs.batch):
        hw = inputs.grid[row] if inputs.grid is not None else None
        t = inputs.frames[row] if inputs.frames is not None else 1
        if hw is not None and t * hw[0] * hw[1] == n:
            out.append(grid_subsample(t * hw[0], hw[1], k))
        else:
            out.append(spread(k, n))
    return torch.stack(out).to(inputs.features.device)


def _check_curve(debias_curve=None, **_):
    # A bad curve or path is refused when the pruner is applied, not at the first forward.
    if debias_curve is not None:
        from .debias import as_curve

        as_curve(debias_curve)


def _fastv_cap(k: int, pad_mask, debias=None, **_) -> int:
    # The paper caps the budget at the non-padding patches when padding is suppressed.
    return padding_cap(pad_mask[None], k) if debias in ("sink", "both") and pad_mask is not None else k


@register(
    "fastv",
    needs=("attention", "pad_mask"),
    layer=2,
    min_layer=1,
    budget_cap=_fastv_cap,
    validate=_check_curve,
    needs_if={"pad_mask": lambda debias=None, **_: debias in ("sink", "both")},
    flops=lambda s, **_: 2 * s.heads * s.seq_len * s.head_dim * s.n // (s.row_n or s.n),
    description="top-k by last-token attention at layer K-1",
)
def fastv_select(
    inputs: SelectionInputs,
    k: int,
    debias: Literal[None, "position", "sink", "both"] = None,
    debias_curve: torch.Tensor | str | os.PathLike | None = None,
) -> torch.Tensor:
    """FastV: the ``k`` tokens with the highest last-token attention (head mean) at layer K-1.

    attention: [batch, N]; pad_mask: [batch, N] or None. Returns [batch, k] (ascending). Ties break towards
    the earlier token. debias (arXiv 2508.17807): None, "position" (divide out the recency trend, per sample
    or by the curve saved at ``debias_curve``), "sink" (padding patches to 0, attention sinks to the median)
    or "both". The budget cap for padding is the engine's job (``debias.padding_cap``).
    """
    from .debias import debias_scores  # local: this function is the only part of the file that uses it

    scores = debias_scores(inputs.attention, debias, curve=debias_curve, pad_mask=inputs.pad_mask)
    # A stable sort makes ties deterministic across batch layouts.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values
