"""Baselines: seeded random selection, uniform spatial pooling, and FastV's last-token attention."""
from __future__ import annotations

import functools
import math
from typing import Any, Literal, Optional

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

    Takes the evenly spaced sub-grid whose size is closest to ``k`` without exceeding it, then fills the
    remainder with evenly spaced tokens among those not yet taken.
    """
    n = height * width
    gh = max(1, min(height, round(height * math.sqrt(k / n))))
    gw = max(1, min(width, k // gh))
    rows = ((torch.arange(gh) + 0.5) * height / gh).long()
    cols = ((torch.arange(gw) + 0.5) * width / gw).long()
    chosen = (rows[:, None] * width + cols[None, :]).flatten()
    rest = k - chosen.numel()
    if rest > 0:
        free = torch.ones(n, dtype=torch.bool)
        free[chosen] = False
        candidates = free.nonzero().flatten()
        pick = ((torch.arange(rest) + 0.5) * candidates.numel() / rest).long()
        chosen = torch.cat([chosen, candidates[pick]])
    return chosen.sort().values


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
            out.append(((torch.arange(k) + 0.5) * n / k).long())
    return torch.stack(out).to(inputs.features.device)


def _fastv_cap(k: int, pad_mask, debias=None, **_) -> int:
    # The paper caps the budget at the non-padding patches when padding is suppressed.
    return padding_cap(pad_mask[None], k) if debias in ("sink", "both") and pad_mask is not None else k


@register("fastv", needs=("attention", "pad_mask"), layer=2, min_layer=1, budget_cap=_fastv_cap,
          needs_if={"pad_mask": lambda debias=None, **_: debias in ("sink", "both")},
          flops=lambda s, **_: 2 * s.heads * s.seq_len * s.head_dim * s.n // (s.row_n or s.n),
          description="top-k by last-token attention at layer K-1")
def fastv_select(inputs: SelectionInputs, k: int, debias: Literal[None, "position", "sink", "both"] = None,
                 debias_curve: Optional[Any] = None) -> torch.Tensor:
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
