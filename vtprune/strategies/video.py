"""What the video methods share: cutting a clip into segments of similar frames, density peaks among tokens, and
joining tokens to their nearest kept one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import shares


def video_rows(inputs, row: int) -> tuple[int, int] | None:
    """(frames, tokens per frame) when row ``row`` is an unpruned video grid of several frames, else None."""
    hw = inputs.grid[row] if inputs.grid is not None else None
    t = inputs.frames[row] if inputs.frames is not None else 1
    if hw is None or t < 2 or t * hw[0] * hw[1] != inputs.num_tokens:
        return None
    return t, hw[0] * hw[1]


def segments(frames: torch.Tensor, threshold: float, cuts: int) -> list[tuple[int, int]]:
    """FastVID's dynamic segmentation: consecutive frames split where the cosine of their mean tokens falls below
    ``threshold``, and at the ``cuts`` least similar transitions whatever their value. frames: [T, P, D]. Returns
    [(first frame, end frame)] covering 0..T in order."""
    t = frames.shape[0]
    means = F.normalize(frames.float().mean(1), dim=-1)
    sim = (means[:-1] * means[1:]).sum(-1)  # [T - 1]: frame f to f + 1
    order = torch.sort(sim, stable=True).indices[: max(0, min(cuts, t - 1))].tolist()
    bounds = sorted({f + 1 for f in order} | {f + 1 for f in (sim < threshold).nonzero().flatten().tolist()})
    edges = [0] + bounds + [t]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


def distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of x [n, D], over sqrt(D), in float64 from one Gram matrix (the one
    matmul the density methods pay: 2 n² D FLOPs): [n, n]."""
    xd = x.double()
    sq = (xd * xd).sum(-1)
    return (sq[:, None] + sq[None, :] - 2.0 * (xd @ xd.T)).clamp_min(0).sqrt() / x.shape[-1] ** 0.5


def density_peaks(dist: torch.Tensor, k: int, neighbours: int = 5) -> torch.Tensor:
    """The ``k`` density peaks among n tokens given their distances dist [n, n] (DPC-kNN, as FastVID and HoliTom
    choose cluster centres): density exp(-mean squared distance to the ``neighbours`` nearest), separation the
    distance to the nearest denser token (the densest: its largest distance), score their product; the top k (ties
    to the earlier token). Returns [k] ascending."""
    n = dist.shape[0]
    if k >= n:
        return torch.arange(n, device=dist.device)
    m = max(1, min(neighbours, n - 1))
    near = torch.sort(dist, dim=-1).values[:, 1 : m + 1]
    density = torch.exp(-(near**2).mean(-1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    separation = dist.masked_fill(~denser, float("inf")).amin(-1)
    top = torch.isinf(separation)
    separation[top] = dist[top].amax(-1)
    score = density * separation
    return torch.sort(score, descending=True, stable=True).indices[:k].sort().values


def nearest(dist: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each token's nearest centre (ties to the lower slot), from the distances dist [n, n'] of the tokens to the
    tokens ``centres`` [k] index: a slot in ``centres`` per token."""
    return dist[:, centres].argmin(-1)


def merge_into_peaks(dist: torch.Tensor, pools: list, k: int, neighbours: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVID's and HoliTom's merging: each pool (an ascending index tensor into the n tokens of dist [n, n]) gets
    its ``shares`` of ``k`` by size, keeps its ``density_peaks`` and joins its other tokens to the nearest; a pool
    whose share is 0 joins the nearest peak of all. Returns (kept [k] ascending when the pools are in order, target
    [n]: each token's slot in kept, -1 for tokens in no pool)."""
    n, device = dist.shape[0], dist.device
    target = torch.full((n,), -1, dtype=torch.long, device=device)
    kept: list[int] = []
    for pool, budget in zip(pools, shares(k, [len(p) for p in pools])):
        if budget == 0:
            continue
        block = dist[pool][:, pool]
        centres = density_peaks(block, budget, neighbours)
        target[pool] = len(kept) + nearest(block, centres)
        target[pool[centres]] = len(kept) + torch.arange(budget, device=device)  # each peak its own slot
        kept += pool[centres].tolist()
    kept_t = torch.tensor(kept, dtype=torch.long, device=device)
    pooled = torch.cat(list(pools)) if pools else target[:0]
    orphans = pooled[target[pooled] < 0]
    if orphans.numel():
        target[orphans] = nearest(dist[orphans], kept_t)
    return kept_t, target
