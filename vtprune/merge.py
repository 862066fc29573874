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
