"""Merging, an engine operation any stage can ask for (``merge=True``): every pruned token is averaged into its most
similar kept token, weighted by how many original tokens each stands for (ToMe's size-weighted averages)."""

from __future__ import annotations

import torch

from . import ops


def assign_to_kept(features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept slot each token joins: its most cosine-similar kept token.

    features: [batch, N, D]; keep: [batch, k] indices into N. Returns target [batch, N] in [0, k); kept tokens
    map to their own slot (even when a duplicate of them is also kept). Ties go to the lower slot.
    """
    if keep.shape[1] == 0:
        raise ValueError("keep is empty; at least one kept token is needed to merge into")
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    kept = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    target = (x @ kept.transpose(1, 2)).argmax(dim=-1)  # [batch, N]
    slots = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return target.scatter(1, keep, slots)


def merge_pruned(
    features: torch.Tensor, keep: torch.Tensor, sizes: torch.Tensor | None = None, *, with_backend: bool = False
):
    """Size-weighted average of every token into its most similar kept token.

    features: [batch, N, D]; keep: [batch, k] sorted ascending (slot s of the output is token keep[:, s]);
    sizes: [batch, N] how many original tokens each token already stands for (default ones).
    Returns (merged [batch, k, D] in features' dtype, sizes [batch, k] float32), and the backend when asked.
    """
    return ops.merge_tokens(features, keep, assign_to_kept(features, keep), sizes, with_backend=with_backend)


MERGE_RULES = ("mean", "add_mean")


def apply_plan(
    features: torch.Tensor,
    keep: torch.Tensor,
    target: torch.Tensor,
    rule: str,
    sizes: torch.Tensor | None = None,
    *,
    with_backend: bool = False,
):
    """A strategy's own merge plan (``strategies.Merged``): token i joins kept slot ``target[i]`` (-1: dropped).

    features: [batch, N, D]; keep: [batch, k] ascending; target: [batch, N] in [-1, k), each kept token in its own
    slot; sizes: [batch, N] original tokens each token stands for (default ones). ``rule``: "mean", the
    size-weighted average of a slot's tokens (ToMe's); "add_mean", the kept token plus the plain mean of the other
    tokens in its slot (VisionZip's contextual tokens; a slot nobody joins stays the kept token).
    Returns (merged [batch, k, D] in features' dtype, sizes [batch, k] float32), and the backend when asked.
    """
    if sizes is None:
        sizes = torch.ones(features.shape[:2], dtype=torch.float32, device=features.device)
    joined = target >= 0
    slot = target.clamp_min(0)
    if rule == "mean":  # dropped tokens weigh nothing
        return ops.merge_tokens(features, keep, slot, sizes.float() * joined, with_backend=with_backend)
    others = joined.clone()
    others.scatter_(1, keep, False)  # the tokens merged into a slot, without the slot's own token
    b, n, d = features.shape
    acc = torch.zeros(b, keep.shape[1], d, dtype=torch.float32, device=features.device)
    acc.scatter_add_(1, slot.unsqueeze(-1).expand(-1, -1, d), features.float() * others.unsqueeze(-1))
    count = torch.zeros(b, keep.shape[1], dtype=torch.float32, device=features.device)
    count.scatter_add_(1, slot, others.float())
    kept = torch.gather(features.float(), 1, keep.unsqueeze(-1).expand(-1, -1, d))
    merged = (kept + acc / count.clamp_min(1).unsqueeze(-1)).to(features.dtype)
    total = torch.zeros_like(count).scatter_add_(1, slot, sizes.float() * joined)
    return (merged, total, "torch") if with_backend else (merged, total)
