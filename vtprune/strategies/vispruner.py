"""VisPruner (ICCV 2025): keep the important patches (the most [CLS]-attended) and, among the others, diverse ones,
found by removing near-duplicates round after round."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from .base import Range, ScoringShape, SelectionInputs, register, tower_or_input


def important_count(k: int, important_share: float) -> int:
    return min(k, int(k * important_share + 0.5))


def remove_duplicates(features: torch.Tensor, candidates: torch.Tensor, keep: int) -> torch.Tensor:
    """Of ``candidates`` [R] (ascending patch indices of one image), the ``keep`` left once near-duplicates are
    removed in rounds: the candidates are split alternately into two sets, each token of the first is matched to its
    most similar token of the second (cosine of the features [N, C]), and the best-matched half of the first set
    (at most what is still to remove) leaves; repeated until ``keep`` remain. Returns [keep] ascending."""
    left = candidates
    while left.numel() > keep:
        x = F.normalize(features[left].float(), dim=-1)
        a, b = x[0::2], x[1::2]
        best = (a @ b.T).amax(dim=-1) if b.shape[0] else torch.full((a.shape[0],), -1.0, device=x.device)
        remove = min(left.numel() - keep, max(1, a.shape[0] // 2))
        drop = torch.sort(best, descending=True, stable=True).indices[:remove] * 2  # positions in ``left``
        stay = torch.ones(left.numel(), dtype=torch.bool, device=left.device)
        stay[drop] = False
        left = left[stay]
    return left


def _flops(shape: ScoringShape, important_share=0.5, **_) -> int:
    # Each duplicate-removal round's first-set x second-set similarities (reading the tower's attention is counted
    # where it runs, in the tower).
    count = important_count(shape.k, important_share)
    left, keep, total = shape.n - count, shape.k - count, 0
    while left > keep:
        a, b = (left + 1) // 2, left // 2
        total += 2 * a * b * shape.d
        left -= min(left - keep, max(1, a // 2))
    return total


@register(
    "vispruner",
    layer=tower_or_input,
    needs=("tower_attention", "grid"),
    flops=_flops,
    description="tower: [CLS]-attended important patches + diverse ones left by duplicate removal",
)
def vispruner_select(
    inputs: SelectionInputs, k: int, important_share: Annotated[float, Range(ge=0, le=1)] = 0.5
) -> torch.Tensor:
    """VisPruner: ``round(k * important_share)`` patches the [CLS] query attends to most (mean over heads, at the
    tower layer), then the rest of the budget from the other patches by ``remove_duplicates`` on the tower's
    features. features: [batch, N, C]; tower_attention: [batch, N]. Returns [batch, k]."""
    count = important_count(k, important_share)
    rows = []
    for row in range(inputs.batch):
        order = torch.sort(inputs.tower_attention[row].float(), descending=True, stable=True).indices
        important = order[:count]
        rest = torch.ones(inputs.num_tokens, dtype=torch.bool, device=order.device)
        rest[important] = False
        diverse = remove_duplicates(inputs.features[row], rest.nonzero().flatten(), k - count)
        rows.append(torch.cat([important, diverse]))
    return torch.stack(rows)
