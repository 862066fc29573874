"""CDPruner (NeurIPS 2025): a determinantal point process over the visual tokens, conditioned on the instruction:
tokens that are diverse among themselves and relevant to the question are kept together, by greedy MAP inference."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from .base import Range, ScoringShape, SelectionInputs, register


def relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Each visual token's relevance to the instruction: its mean cosine similarity to the instruction tokens,
    min-max normalised to [0, 1] (a constant row is all ones). visual: [N, D]; text: [T, D] -> [N] float32."""
    sim = (F.normalize(visual.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T).mean(-1)
    span = sim.max() - sim.min()
    return (sim - sim.min()) / span if span > 0 else torch.ones_like(sim)


def conditional_kernel(visual: torch.Tensor, rel: torch.Tensor, theta: float) -> torch.Tensor:
    """L = diag(q) S diag(q): S the cosine similarities of the visual tokens (a Gram matrix, so positive
    semi-definite), q = exp(theta * relevance) the instruction's weight on each token. [N, N] float64."""
    x = F.normalize(visual.double(), dim=-1)
    q = torch.exp(theta * rel.double())
    return q[:, None] * (x @ x.T) * q[None, :]


def greedy_map(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> torch.Tensor:
    """Greedy MAP inference of a DPP (the incremental-Cholesky algorithm of Chen et al., NeurIPS 2018): each step
    adds the item with the largest marginal gain in log det, the squared norm ``d2`` of its residual against the
    items already chosen. kernel: [N, N] PSD. Returns [k] indices in pick order; once every residual is below
    ``eps`` (the chosen items span the rest) the remaining picks take the largest residual left, lowest index first.
    """
    n = kernel.shape[0]
    cis = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)
    d2 = kernel.diagonal().clone()
    picks = torch.empty(k, dtype=torch.long, device=kernel.device)
    taken = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    for step in range(k):
        j = int(d2.masked_fill(taken, float("-inf")).argmax())
        picks[step], taken[j] = j, True
        if step == k - 1:
            break
        dj = d2[j].clamp_min(eps).sqrt()
        e = (kernel[j] - cis[:step].T @ cis[:step, j]) / dj
        cis[step] = e
        d2 = d2 - e * e
    return picks


def _flops(shape: ScoringShape, **_) -> int:
    # The relevance (N x T x D), the similarity Gram (N x N x D) and the greedy's steps, step s projecting every
    # residual on the s rows chosen before (N x s).
    n, k = shape.n, shape.k
    return 2 * n * shape.text_len * shape.d + 2 * n * n * shape.d + n * max(k - 1, 0) * max(k - 2, 0)


@register(
    "cdpruner",
    needs=("text",),
    layer=0,
    flops=_flops,
    description="DPP over the visual tokens conditioned on the instruction (greedy MAP)",
)
def cdpruner_select(inputs: SelectionInputs, k: int, theta: Annotated[float, Range(ge=0)] = 1.0) -> torch.Tensor:
    """CDPruner: the k visual tokens a DPP with kernel diag(q) S diag(q) prefers, S their cosine similarities and
    q = exp(theta * relevance to the instruction). theta = 0 is the unconditional DPP (diversity alone).

    features: [batch, N, D] (projected visual tokens at the LLM input); text: [batch, T, D] the instruction's token
    embeddings in the same space (text_mask marks the real ones). Returns [batch, k] in pick order.
    """
    rows = []
    for b in range(inputs.batch):
        text = inputs.text[b][inputs.text_mask[b]] if inputs.text_mask is not None else inputs.text[b]
        rel = relevance(inputs.features[b], text) if text.shape[0] else torch.ones(inputs.num_tokens)
        rows.append(greedy_map(conditional_kernel(inputs.features[b], rel.to(inputs.features.device), theta), k))
    return torch.stack(rows)
