"""VisionZip (CVPR 2025): inside the vision tower, keep the dominant patches (the most [CLS]-attended) and merge the
rest into a few contextual tokens by the similarity of their keys."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from .base import Merged, Range, ScoringShape, SelectionInputs, register, tower_or_input


def split_budget(k: int, contextual_share: float) -> tuple[int, int]:
    """(dominant, contextual) tokens for a budget of k: the released settings 54 + 10, 108 + 20, 162 + 30 are
    k * 5/32 contextual tokens, rounded."""
    contextual = min(k, int(k * contextual_share + 0.5))
    return k - contextual, contextual


def contextual_plan(keys: torch.Tensor, remaining: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens among the ``remaining`` patches [R] (ascending) of one image: every
    max(1, R // count)-th of them is a target, and each other one joins the target whose key is most similar
    (cosine; ties to the earlier target). keys: [N, d]. Returns (targets [count] patch indices, slot [R - count] of
    each other remaining patch, in order)."""
    r = remaining.numel()
    step = max(1, r // count)
    pick = torch.arange(0, r, step, device=remaining.device)[:count]
    is_target = torch.zeros(r, dtype=torch.bool, device=remaining.device)
    is_target[pick] = True
    metric = F.normalize(keys[remaining].float(), dim=-1)
    similarity = metric[~is_target] @ metric[pick].T
    return remaining[pick], similarity.argmax(dim=-1)


def _flops(shape: ScoringShape, contextual_share=5 / 32, **_) -> int:
    # The contextual tokens' key similarities (tokens to merge x targets x the keys' width, the tower's head_dim;
    # reading the tower's attention is counted where it runs, in the tower).
    dominant, contextual = split_budget(shape.k, contextual_share)
    rest = shape.n - dominant - contextual
    return 2 * rest * contextual * shape.tower_head_dim


@register(
    "visionzip",
    layer=tower_or_input,
    needs=("tower_attention", "grid"),
    merges=True,
    flops=_flops,
    description="tower: [CLS]-attended dominant patches + contextual tokens merged by key similarity",
)
def visionzip_select(
    inputs: SelectionInputs, k: int, contextual_share: Annotated[float, Range(ge=0, lt=1)] = 5 / 32
) -> Merged:
    """VisionZip: the ``k - c`` patches the [CLS] query attends to most (mean over heads, at the tower layer) are
    kept as they are; the other patches make ``c = round(k * contextual_share)`` contextual tokens, each a target
    patch (evenly spaced among them) plus the mean of the patches whose keys are closest to it.

    features: [batch, N, C] the tower's hidden states of the patches; tower_attention: [batch, N]; tower_keys:
    [batch, N, d]. Returns a ``Merged`` plan (rule "add_mean"): keep = dominant then targets, every patch joined to a
    slot.
    """
    dominant_count, contextual_count = split_budget(k, contextual_share)
    b, n = inputs.batch, inputs.num_tokens
    keeps, targets = [], []
    for row in range(b):
        order = torch.sort(inputs.tower_attention[row].float(), descending=True, stable=True).indices
        dominant = order[:dominant_count]
        rest = torch.ones(n, dtype=torch.bool, device=order.device)
        rest[dominant] = False
        remaining = rest.nonzero().flatten()
        target = torch.full((n,), -1, dtype=torch.long, device=order.device)
        target[dominant] = torch.arange(dominant_count, device=order.device)
        keep = dominant
        if contextual_count:
            centres, slot = contextual_plan(inputs.tower_keys[row], remaining, contextual_count)
            others = remaining[~torch.isin(remaining, centres)]
            target[centres] = dominant_count + torch.arange(contextual_count, device=order.device)
            target[others] = dominant_count + slot
            keep = torch.cat([dominant, centres])
        keeps.append(keep)
        targets.append(target)
    return Merged(torch.stack(keeps), torch.stack(targets), rule="add_mean")
