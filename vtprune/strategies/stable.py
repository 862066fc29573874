"""Stable diversity selection: DivPrune / ZOO-Prune picks that small pixel changes do not reshuffle.

The greedy max-min selection follows the argmax of a score at every step, so two near-tied tokens swap under
invisible noise and every later pick follows the swap; a noisy or high-contrast corner patch also has far-apart
tokens that the greedy then keeps. The knobs here (in ``stable_maxmin`` each is off by default, which is the plain
greedy; the registered ``divprune_stable`` and ``zoo_stable`` use cells, with the layout measured for the model
family, ``CELL_LAYOUTS``: 2x2 cells and their central tokens for LLaVA-type models, 3x3 cells and their
most salient tokens for Qwen-VL):

* ``smooth``:  select on features averaged over the ``smooth x smooth`` neighbourhood on the token grid, which
  averages out per-token noise (the kept tokens are the original, unsmoothed ones);
* ``quantum``: round the cosine distances down to multiples of ``quantum``, so near-ties become exact ties, which
  ``argmax`` breaks by a fixed spatial order (raster order: the lowest index);
* ``margin``:  at each step take, among the tokens scoring at least ``(1 - margin) x`` the best, the first in
  raster order (a tie band that moves with the score instead of fixed buckets);
* ``cells``:   choose the diverse ``cells x cells`` cells first (features pooled per cell), then one token of each
  chosen cell (``cell_pick``: the most central, closest in cosine to the cell mean; the most salient, farthest
  from the mean of all tokens; or the token greedy restricted to the chosen cells); picks beyond the number of
  cells continue the greedy on single tokens.
"""

from __future__ import annotations

import math
import typing
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from .. import ops
from .base import Range, SelectionInputs, register
from .divprune import diversity_flops
from .zoo import Directions, Step, minmax_normalise, zoo_sensitivity
from .zoo import _flops as zoo_flops


def usable_grid(grid, batch: int, n: int, frames=None):
    """The common (rows, cols) of all rows when every row has one and the N tokens are ``frames`` such grids (one
    common frame count per row, 1 when ``frames`` is None), else None."""
    if not grid or len(grid) != batch or any(g is None for g in grid) or len(set(map(tuple, grid))) != 1:
        return None
    if frames is not None and (len(frames) != batch or len(set(frames)) != 1):
        return None
    rows, cols = grid[0]
    return (rows, cols) if rows * cols * (frames[0] if frames else 1) == n else None


def smooth_features(features: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Mean over each token's ``size x size`` neighbourhood in its own frame (itself and right/down, edges
    replicated).

    features: [B, N, D], N = frames * rows * cols, each frame in raster order of ``grid`` = (rows, cols).
    Returns [B, N, D] float32.
    """
    b, n, d = features.shape
    rows, cols = grid
    f = n // (rows * cols)
    x = features.float().reshape(b * f, rows * cols, d).transpose(1, 2).reshape(b * f, d, rows, cols)
    x = F.pad(x, (0, size - 1, 0, size - 1), mode="replicate")
    return F.avg_pool2d(x, size, stride=1).reshape(b * f, d, rows * cols).transpose(1, 2).reshape(b, n, d)


def cell_index(grid: tuple[int, int], size: int, device=None, frames: int = 1) -> torch.Tensor:
    """[frames * rows * cols] long: each token's ``size x size`` cell, numbered in raster order over
    ceil(rows/size) x ceil(cols/size) within a frame, frame after frame (a cell never spans two frames)."""
    rows, cols = grid
    r = torch.arange(rows, device=device) // size
    c = torch.arange(cols, device=device) // size
    per_frame = -(-rows // size) * -(-cols // size)
    one = (r[:, None] * -(-cols // size) + c[None, :]).flatten()
    return (one[None, :] + per_frame * torch.arange(frames, device=device)[:, None]).flatten()


def pool_cells(x: torch.Tensor, cell: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Mean of x [B, N, ...] over the tokens of each cell (cell [N] long) -> [B, n_cells, ...] float32."""
    flat = x.float().reshape(x.shape[0], x.shape[1], -1)
    total = flat.new_zeros(x.shape[0], n_cells, flat.shape[-1]).index_add_(1, cell, flat)
    count = torch.bincount(cell, minlength=n_cells).to(flat)
    return (total / count[None, :, None]).reshape(x.shape[0], n_cells, *x.shape[2:])


def maxmin_tie_band(
    dist: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    margin: float = 0.0,
    init: torch.Tensor | None = None,
    cell: torch.Tensor | None = None,
    open_cells: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy max-min (``ops.maxmin_on_distances``) with a relative tie band and optional first picks.

    dist: [B, N, N]; weights: [B, N] or None (ZOO: score = weight x distance to the picked set); init: [B, j]
    picks to continue from (j <= k) or None. Returns [B, k] in pick order (``init`` first). Each step takes the
    lowest index whose score is at least ``(1 - margin)`` times the best; ``margin=0`` is the plain greedy.
    cell: [N] long and open_cells: [B, C] bool: while a row has open cells, it picks only tokens of an open cell
    and each pick closes its cell (one token per chosen cell first).
    """
    b, n, _ = dist.shape
    rows = torch.arange(b, device=dist.device)
    picks = torch.empty(b, k, dtype=torch.long, device=dist.device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    nearest = torch.full((b, n), float("inf"), device=dist.device)
    w = None if weights is None else weights.float()
    start = 0 if init is None else init.shape[1]
    for step in range(start):
        picks[:, step] = init[:, step]
        taken[rows, init[:, step]] = True
        nearest = torch.minimum(nearest, dist[rows, init[:, step]])
    for step in range(start, k):
        if step == 0:  # DivPrune's first pick: the token whose nearest other token is farthest
            eye = torch.eye(n, dtype=torch.bool, device=dist.device)
            score = dist.masked_fill(eye, float("inf")).amin(dim=-1) if w is None else w
        else:
            score = nearest if w is None else w * nearest
        blocked = taken
        if open_cells is not None:
            shut = ~open_cells[:, cell] & open_cells.any(dim=-1, keepdim=True)  # [B, N]
            blocked = blocked | shut
        score = score.masked_fill(blocked, float("-inf"))
        best = score.amax(dim=-1, keepdim=True)
        # The first True of the band; argmax over bool-as-uint8 returns the first maximum.
        nxt = (score >= best - margin * best.abs()).to(torch.uint8).argmax(dim=-1)
        picks[:, step] = nxt
        taken[rows, nxt] = True
        nearest = torch.minimum(nearest, dist[rows, nxt])
        if open_cells is not None:
            open_cells[rows, cell[nxt]] = False
    return picks


def stable_maxmin(
    features: torch.Tensor,
    k: int,
    grid=None,
    weights: torch.Tensor | None = None,
    smooth: int = 1,
    quantum: float = 0.0,
    margin: float = 0.0,
    cells: int = 1,
    cell_pick: str = "central",
) -> torch.Tensor:
    """Stable greedy max-min selection of ``k`` of ``N`` tokens (see the module docstring for the knobs).

    features: [B, N, D]; grid: (rows, cols) of each frame, N = frames * rows * cols (a video's frames one after
    another), or None (then ``smooth`` and ``cells`` are ignored: no neighbourhood is known); weights: [B, N] or
    None. Returns [B, k] long in pick order.
    With every knob off (smooth=1, quantum=0, margin=0, cells=1) the picks are ``ops.greedy_maxmin``'s.
    """
    if smooth < 1 or cells < 1 or not 0 <= quantum < math.inf or not 0 <= margin < 1 or cell_pick not in CELL_PICKS:
        # (the registered strategies' options are checked when applied; this is for direct calls)
        raise ValueError(
            f"need smooth >= 1, cells >= 1, finite quantum >= 0, 0 <= margin < 1 and cell_pick in "
            f"{CELL_PICKS}; got smooth={smooth}, cells={cells}, quantum={quantum}, margin={margin}, "
            f"cell_pick={cell_pick!r}"
        )
    if grid is not None and smooth > 1:
        features = smooth_features(features, grid, smooth)
    dist = ops.pairwise_cosine_distance(features)
    if quantum > 0:
        dist = torch.floor(dist / quantum) * quantum
    init = cell = open_cells = None
    if grid is not None and cells > 1:
        cell = cell_index(grid, cells, features.device, frames=features.shape[1] // (grid[0] * grid[1]))
        n_cells = int(cell.max()) + 1
        pooled = pool_cells(features, cell, n_cells)
        cdist = ops.pairwise_cosine_distance(pooled)
        if quantum > 0:
            cdist = torch.floor(cdist / quantum) * quantum
        cw = None if weights is None else pool_cells(weights.unsqueeze(-1), cell, n_cells).squeeze(-1)
        chosen = maxmin_tie_band(cdist, min(k, n_cells), cw, margin)  # [B, c]
        if cell_pick != "greedy":
            init = best_in_cells(cell_scores(features, pooled, cell, cell_pick), cell, chosen)
        else:  # "greedy": the token greedy chooses within the chosen cells, one per cell
            open_cells = torch.zeros(chosen.shape[0], n_cells, dtype=torch.bool, device=features.device)
            open_cells.scatter_(1, chosen, True)
    return maxmin_tie_band(dist, k, weights, margin, init, cell, open_cells)


def cell_scores(features: torch.Tensor, pooled: torch.Tensor, cell: torch.Tensor, how: str) -> torch.Tensor:
    """How well each token represents its cell. features: [B, N, D]; pooled: [B, C, D]; cell: [N]. -> [B, N].

    ``"central"``: cosine similarity to its own cell's mean; ``"salient"``: cosine distance to the mean of all
    tokens (the background-dominated average), so an object's token beats the background beside it.
    """
    x = F.normalize(features.float(), dim=-1)
    if how == "central":
        return (x * F.normalize(pooled[:, cell], dim=-1)).sum(-1)
    return 1 - (x * F.normalize(features.float().mean(1, keepdim=True), dim=-1)).sum(-1)


def best_in_cells(score: torch.Tensor, cell: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """score [B, N], cell [N], chosen [B, c] cell ids -> [B, c]: each chosen cell's highest-scoring token
    (ties: the lowest index)."""
    member = cell[None, :, None] == chosen[:, None, :]  # [B, N, c]
    return score.unsqueeze(-1).expand_as(member).masked_fill(~member, float("-inf")).argmax(dim=1)


CellPick = Literal["central", "salient", "greedy"]
CELL_PICKS = typing.get_args(CellPick)
# The signatures' cells=2, cell_pick="central" hold without a model; through apply_pruner the model family's
# measured layout (CELL_LAYOUTS) replaces whichever of the two the user leaves out.
Size = Annotated[int, Range(ge=1)]
Quantum = Annotated[float, Range(ge=0)]
Margin = Annotated[float, Range(ge=0, lt=1)]


# The cell layout per model family where the user gives none, measured on the embedded models
# (docs/robustness/criterion): CLIP tokens mix their neighbours, so a 2x2 cell's central token works; Qwen's merged
# 2x2-patch tokens stay local (a central token is the background beside a small object), so Qwen-VL families choose
# among 3x3 cells and keep each cell's most salient token.
CELL_LAYOUTS = {
    family: {"cells": 3, "cell_pick": "salient"} for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
}
DEFAULT_CELL_LAYOUT = {"cells": 2, "cell_pick": "central"}


def _family_cells(adapter) -> dict:
    return dict(CELL_LAYOUTS.get(adapter.family, DEFAULT_CELL_LAYOUT))


@register(
    "divprune_stable",
    needs=("grid",),
    family_options=_family_cells,
    flops=lambda shape, **_: diversity_flops(shape),  # + the cells' Gram, (N / cells²)² x D: not counted
    description="DivPrune with selection that small pixel changes do not reshuffle",
)
def divprune_stable_select(
    inputs: SelectionInputs,
    k: int,
    smooth: Size = 1,
    quantum: Quantum = 0.0,
    margin: Margin = 0.0,
    cells: Size = 2,
    cell_pick: CellPick = "central",
) -> torch.Tensor:
    """DivPrune through ``stable_maxmin``. features: [batch, N, D]. Returns [batch, k] in pick order."""
    grid = usable_grid(inputs.grid, inputs.batch, inputs.num_tokens, inputs.frames)
    return stable_maxmin(inputs.features, k, grid, None, smooth, quantum, margin, cells, cell_pick)


@register(
    "zoo_stable",
    needs=("grid", "projector", "newline_mask"),
    flops=zoo_flops,
    family_options=_family_cells,
    description="ZOO-Prune with selection that small pixel changes do not reshuffle",
)
def zoo_stable_select(
    inputs: SelectionInputs,
    k: int,
    m: Directions = 64,
    h: Step = 0.01,
    seed: int | None = 0,
    smooth: Size = 1,
    quantum: Quantum = 0.0,
    margin: Margin = 0.0,
    cells: Size = 2,
    cell_pick: CellPick = "central",
) -> torch.Tensor:
    """ZOO-Prune through ``stable_maxmin``: sensitivity weights (``zoo_sensitivity``, min-max normalised, also
    smoothed over the grid when ``smooth > 1``) times the distance to the picked set.

    features: [batch, N, D]; pre_projector: [batch, G*N, Din]. Returns [batch, k] in pick order.
    """
    grid = usable_grid(inputs.grid, inputs.batch, inputs.num_tokens, inputs.frames)
    if inputs.pre_projector is None or inputs.projector is None:
        raise ValueError("zoo_stable needs inputs.pre_projector and inputs.projector; got None")
    b = inputs.batch
    pre = inputs.pre_projector.reshape(b, inputs.num_tokens, -1)
    sens = zoo_sensitivity(pre, inputs.projector, m=m, h=h, seed=seed)
    if grid is not None and smooth > 1:
        sens = smooth_features(sens.unsqueeze(-1), grid, smooth).squeeze(-1)
    weights = minmax_normalise(sens).to(inputs.features.device)
    if inputs.newline_mask is not None:  # LLaVA-NeXT separators have no projector input (as in zoo)
        weights = weights.masked_fill(inputs.newline_mask.to(weights.device), 0.0)
    return stable_maxmin(inputs.features, k, grid, weights, smooth, quantum, margin, cells, cell_pick)
