"""DivPrune (CVPR 2025): keep the most diverse visual tokens by greedy max-min cosine distance."""

from __future__ import annotations

import torch

from .. import ops
from .base import ScoringShape, SelectionInputs, register


def diversity_flops(shape: ScoringShape) -> int:
    """The N×N cosine Gram (2·N²·D) plus k·N running-minimum updates (compares, 1 each)."""
    return 2 * shape.n * shape.n * shape.d + shape.k * shape.n


@register(
    "divprune",
    needs=("newline_mask",),
    flops=lambda shape, **_: diversity_flops(shape),
    description="greedy max-min diversity on cosine distance of the projected tokens",
)
def divprune_select(inputs: SelectionInputs, k: int, keep_newlines: bool = False) -> torch.Tensor:
    """DivPrune: approximate Max-Min Diversity subset of ``k`` of the ``N`` tokens.

    features: [batch, N, D] (projected visual tokens at the LLM input); newline_mask: [batch, N] bool or None.
    Returns [batch, k] indices in pick order: first the token whose nearest other token is farthest, then
    repeatedly the token farthest (cosine distance) from everything already picked.

    keep_newlines: when True and ``newline_mask`` is given (LLaVA-NeXT), the row-separator tokens are always
    kept and count towards ``k``; the remaining ``k - newlines`` tokens are chosen among the others. The
    official code treats newlines as ordinary tokens (the default, False). Newlines come first in the output.
    """
    b, device = inputs.batch, inputs.features.device
    mask = inputs.newline_mask
    if not keep_newlines or mask is None:
        return _greedy(inputs, inputs.features, k)

    mask = mask.to(device=device, dtype=torch.bool)
    counts = mask.sum(dim=1)
    if int(counts.max()) > k:
        raise ValueError(
            f"k={k} is smaller than the {int(counts.max())} newline tokens to keep; "
            f"use k >= {int(counts.max())} or keep_newlines=False"
        )
    if bool((counts == counts[0]).all()):
        return _keep_and_select(inputs, inputs.features, mask, k)
    # Rows with different newline counts cannot share one gathered tensor; rare, so do them one by one.
    return torch.cat([_keep_and_select(inputs, inputs.features[r : r + 1], mask[r : r + 1], k) for r in range(b)])


def _greedy(inputs: SelectionInputs, features: torch.Tensor, k: int, weights=None) -> torch.Tensor:
    """ops.greedy_maxmin, recording which path ran in ``inputs.backends``."""
    picks, inputs.backends["greedy"] = ops.greedy_maxmin(features, k, weights, with_backend=True)
    return picks


def _keep_and_select(inputs: SelectionInputs, features: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """features [B, N, D], mask [B, N] with the same newline count per row -> [B, k] (newlines first)."""
    n = features.shape[1]
    n_free = n - int(mask[0].sum())
    # A stable sort puts the ordinary tokens first, each group in its original order.
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    free, newlines = order[:, :n_free], order[:, n_free:]
    rest = k - newlines.shape[1]
    if rest == 0:
        return newlines
    sub = torch.gather(features, 1, free.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    picked = torch.gather(free, 1, _greedy(inputs, sub, rest))
    return torch.cat([newlines, picked], dim=1)
