"""DART (EMNLP 2025): inside the LLM, keep the visual tokens least duplicated by a few pivot tokens, chosen by the
norm of their key states. No attention weights are read, so the stage stays on the fast attention path."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from .base import Range, ScoringShape, SelectionInputs, register, shares


def pivots(keys: torch.Tensor, count: int, norm: str) -> torch.Tensor:
    """The ``count`` rows of keys [N, Dk] with the largest L1 / L2 norm, ascending: [count] indices (norm ties go to
    the lower index)."""
    score = keys.float().abs().sum(-1) if norm == "l1" else keys.float().norm(dim=-1)
    return torch.sort(score, descending=True, stable=True).indices[:count].sort().values


def least_duplicated(visual: torch.Tensor, pivot_rows: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """DART's selection: after the ``kept`` visual pivots, each pivot in turn takes its share of the rest of the
    budget: the tokens not yet taken that are least cosine-similar to it (ties to the lower index).

    visual: [N, D] hidden states; pivot_rows: [P, D] the pivots' hidden states, in turn order; kept: [F] the visual
    pivots' indices. Returns [k] indices, unordered."""
    x = F.normalize(visual.float(), dim=-1)
    sim = F.normalize(pivot_rows.float(), dim=-1) @ x.T  # [P, N]
    taken = torch.zeros(visual.shape[0], dtype=torch.bool, device=visual.device)
    taken[kept] = True
    chosen = [kept]
    # as evenly as integers allow, the larger shares first
    for p, share in enumerate(shares(k - kept.numel(), [1.0] * pivot_rows.shape[0])):
        if share == 0:
            continue
        order = torch.sort(sim[p].masked_fill(taken, float("inf")), stable=True).indices[:share]
        taken[order] = True
        chosen.append(order)
    return torch.cat(chosen)


def _flops(shape: ScoringShape, image_pivots=4, text_pivots=4, **_) -> int:
    # The pivots' cosine similarities to every visual token (norms and sorts are not matmuls).
    return 2 * (image_pivots + text_pivots) * shape.n * shape.d


@register(
    "dart",
    needs=("keys", "text"),
    layer=2,
    min_layer=1,
    flops=_flops,
    description="in-LLM: keep the tokens least duplicated by a few pivot tokens of large key norm",
)
def dart_select(
    inputs: SelectionInputs,
    k: int,
    image_pivots: Annotated[int, Range(ge=0)] = 4,
    text_pivots: Annotated[int, Range(ge=0)] = 4,
    norm: Literal["l1", "l2"] = "l1",
) -> torch.Tensor:
    """DART: the pivots are the ``image_pivots`` visual tokens and the ``text_pivots`` instruction tokens whose key
    states at layer K-1 have the largest norm; the visual pivots are kept and every pivot (visual ones first, each
    group in sequence order) takes an equal share of the rest of the budget, the tokens least similar to it.

    features: [batch, N, D] hidden states entering layer K; keys: [batch, N, Dk]; text / text_keys: [batch, T, *] the
    instruction's (text_mask marks the real ones). Returns [batch, k].
    """
    rows = []
    for b in range(inputs.batch):
        x = inputs.features[b]
        visual_pivots = pivots(inputs.keys[b], min(image_pivots, k), norm)
        pivot_rows = [x[visual_pivots]]
        if text_pivots and inputs.text is not None:
            real = inputs.text_mask[b] if inputs.text_mask is not None else slice(None)
            text, text_keys = inputs.text[b][real], inputs.text_keys[b][real]
            pivot_rows.append(text[pivots(text_keys, min(text_pivots, text.shape[0]), norm)])
        pivot_rows = torch.cat(pivot_rows)
        if pivot_rows.shape[0] == 0:  # no pivot at all: keep the first k (there is nothing to compare with)
            rows.append(torch.arange(k, device=x.device))
            continue
        rows.append(least_duplicated(x, pivot_rows, visual_pivots, k))
    return torch.stack(rows)
