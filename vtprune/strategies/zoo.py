"""ZOO-Prune (arXiv 2509.24837): zeroth-order sensitivity of each token through the projector, then
sensitivity-weighted greedy max-min diversity on the projected tokens."""
from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from .base import ScoringShape, SelectionInputs, register
from .divprune import _greedy, diversity_flops


def random_directions(m: int, dim: int, seed: int | None) -> torch.Tensor:
    """``m`` random unit directions in R^dim, shared by all tokens. Returns [m, dim] float32 (CPU).

    Drawn as ``torch.randn(m, dim)`` from a CPU generator seeded with ``seed`` (global generator if None),
    then normalised, so the directions do not depend on the device.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    u = torch.randn(m, dim, generator=gen, dtype=torch.float32)
    return u / u.norm(dim=-1, keepdim=True)


@torch.no_grad()
def zoo_sensitivity(pre: torch.Tensor, projector: Callable[[torch.Tensor], torch.Tensor], m: int = 64,
                    h: float = 0.01, seed: int | None = 0, chunk_rows: int = 8192) -> torch.Tensor:
    """Central-difference sensitivity of each token through the projector.

    pre: [batch, N, Din] projector inputs; projector maps [rows, Din] -> [rows, D] and accepts float32.
    Returns S: [batch, N] float32 with S_i = (1/m) sum_j ||P(x_i + h u_j) - P(x_i - h u_j)|| / (2h).

    Computed in float32 whatever ``pre.dtype``: in half precision the difference of two nearby outputs is
    mostly rounding noise. The 2*m*batch*N perturbed rows are streamed so that at most ``chunk_rows`` of
    them exist at once (each (token, direction) pair contributes a +h and a -h row).
    """
    if m < 1 or h <= 0 or chunk_rows < 2:
        raise ValueError(f"need m >= 1, h > 0 and chunk_rows >= 2; got m={m}, h={h}, chunk_rows={chunk_rows}")
    b, n, din = pre.shape
    x = pre.reshape(b * n, din).float()
    u = random_directions(m, din, seed).to(x.device) * h
    total = b * n * m
    # One norm per (token, direction) pair, summed at the end: deterministic, unlike a scattered add on GPU.
    norms = torch.empty(total, dtype=torch.float32, device=x.device)
    step = chunk_rows // 2
    for start in range(0, total, step):
        stop = min(start + step, total)
        pair = torch.arange(start, stop, device=x.device)
        token, direction = pair // m, pair % m
        # One buffer holds the +h and -h rows of this chunk; perturb it in place.
        rows = x[torch.cat([token, token])]
        delta = u[direction]
        rows[: token.numel()] += delta
        rows[token.numel():] -= delta
        plus, minus = projector(rows).float().chunk(2)
        norms[start:stop] = (plus - minus).norm(dim=-1)
    return norms.reshape(b, n, m).sum(dim=-1) / (2 * h * m)


def minmax_normalise(s: torch.Tensor) -> torch.Tensor:
    """Per-row min-max scaling of [batch, N] to [0, 1]; a constant row becomes all ones (no preference)."""
    lo = s.amin(dim=-1, keepdim=True)
    span = s.amax(dim=-1, keepdim=True) - lo
    return torch.where(span > 0, (s - lo) / span.clamp_min(torch.finfo(s.dtype).tiny), torch.ones_like(s))


def _check(m, h, seed, chunk_rows):
    if m < 1 or h <= 0 or chunk_rows < 2:
        raise ValueError(f"zoo needs m >= 1, h > 0 and chunk_rows >= 2; got m={m}, h={h}, chunk_rows={chunk_rows}")


def _flops(shape: ScoringShape, m=64, **_) -> int:
    """2·m·N perturbed projector rows, then the diversity terms on the projected tokens."""
    return 2 * m * shape.n * shape.projector_row + diversity_flops(shape)


@register("zoo", needs=("projector", "newline_mask"), flops=_flops, validate=_check,
          description="zeroth-order projector sensitivity x greedy max-min diversity")
def zoo_select(inputs: SelectionInputs, k: int, m: int = 64, h: float = 0.01, seed: int | None = 0,
               chunk_rows: int = 8192) -> torch.Tensor:
    """ZOO-Prune selection of ``k`` of the ``N`` tokens. Returns [batch, k] in pick order.

    pre_projector: [batch, N, Din] with projector mapping [*, Din] -> [*, D]. The engine groups Qwen's 2x2
    patches beforehand (Din = 4 * D_v); a [batch, G*N, D_v] tensor is grouped here the same way (G
    consecutive rows per token, the merger order). The engine passes a projector that accepts float32.
    features: [batch, N, D] projected tokens, used for the cosine distances.

    First pick = the most sensitive token; each next pick maximises S_j * min_{i picked} (1 - cos(z_j, z_i))
    with S min-max normalised per row. ``seed`` fixes the random directions (None: ``inputs.seed``, then
    torch's global generator).
    """
    if inputs.pre_projector is None or inputs.projector is None:
        raise ValueError("zoo needs inputs.pre_projector and inputs.projector; got None")
    b, n = inputs.batch, inputs.num_tokens
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is out of range; allowed: 0 <= k <= N={n}")
    pre = inputs.pre_projector
    if pre.dim() != 3 or pre.shape[0] != b or pre.shape[1] % n:
        raise ValueError(f"pre_projector has shape {tuple(pre.shape)}; expected [{b}, G*{n}, Din] for features "
                         f"of shape {tuple(inputs.features.shape)}")
    pre = pre.reshape(b, n, -1)
    if k == 0:
        return torch.empty(b, 0, dtype=torch.long, device=inputs.features.device)
    seed = inputs.seed if seed is None else seed
    sens = zoo_sensitivity(pre, inputs.projector, m=m, h=h, seed=seed, chunk_rows=chunk_rows)
    weights = minmax_normalise(sens).to(inputs.features.device)
    if inputs.newline_mask is not None:
        # LLaVA-NeXT row separators are learned vectors with no projector input: least sensitive by definition.
        weights = weights.masked_fill(inputs.newline_mask.to(weights.device), 0.0)
    return _greedy(inputs, inputs.features, k, weights)
