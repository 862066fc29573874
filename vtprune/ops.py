"""The one dispatch point for the token-level operations the patch layer and strategies use.

Each op has a PyTorch reference here (``*_reference``, the specification). The Triton kernels of ``vtprune.cuda``
are used for CUDA tensors when Triton is importable, unless ``set_backend("torch")`` forces the references;
``set_backend("triton")`` forces the kernels, on CPU tensors too (which needs Triton's interpreter,
``TRITON_INTERPRET=1``). Called with ``with_backend=True``, each op also returns the path it ran ("torch" or
"triton") as the last element of its result, so concurrent calls never share that record.

| op               | reference                    | kernel                                   |
| ---------------- | ---------------------------- | ---------------------------------------- |
| gather_tokens    | gather_tokens_reference      | cuda/compact.py (hidden only)            |
| compact          | compact_reference            | cuda/compact.py                          |
| merge_tokens     | merge_tokens_reference       | cuda/merge.py                            |
| greedy_maxmin    | greedy_maxmin_reference      | cuda/greedy.py (on the distance matrix)  |

``greedy_maxmin``'s ``torch`` path is ``vtprune/greedy.py`` (same picks as the reference, without the N x N matrix
when it does not fit a memory limit, and a cheaper loop).
"""

from __future__ import annotations

import torch

_FORCED: str | None = None


def set_backend(name: str | None) -> None:
    """Force ``"torch"`` (the references) or ``"triton"``; ``None`` restores automatic choice."""
    global _FORCED
    if name not in (None, "torch", "triton"):
        raise ValueError(f"unknown backend {name!r}; allowed: None, 'torch', 'triton'")
    if name == "triton" and not _triton_available():
        raise RuntimeError("set_backend('triton'): triton is not importable (pip install 'vtprune[triton]')")
    _FORCED = name


def _triton_available() -> bool:
    try:
        from vtprune.cuda import triton_available
    except ImportError:  # a source tree used without installing (vtprune.cuda lives in cuda/)
        return False
    return triton_available()


def _use_kernel(t: torch.Tensor) -> bool:
    """Kernel for CUDA tensors when Triton is importable; forced ``"triton"`` means any device."""
    if _FORCED == "torch":
        return False
    if _FORCED == "triton":
        return True
    return t.is_cuda and _triton_available()


def _out(result, backend: str, with_backend: bool):
    if not with_backend:
        return result
    return (*result, backend) if isinstance(result, tuple) else (result, backend)


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor, *, with_backend: bool = False):
    """Keep tokens along the sequence dim.

    hidden: [B, L, D]; index: [B, L'] (long, into L). Returns [B, L', D] (and the backend, see the module doc).
    """
    if _use_kernel(hidden):
        from vtprune.cuda.compact import compact as _kernel

        return _out(_kernel(hidden, index)[0], "triton", with_backend)
    return _out(gather_tokens_reference(hidden, index), "torch", with_backend)


def gather_tokens_reference(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gather_tokens`` in PyTorch."""
    return torch.gather(hidden, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def gather_last(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the last dim of position ids or masks: t [..., B, L], index [B, L'] -> [..., B, L']."""
    return torch.gather(t, -1, index.expand(*t.shape[:-2], *index.shape))


def compact(
    hidden: torch.Tensor,
    index: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    with_backend: bool = False,
):
    """Keep tokens of the hidden states and, with them, of the position ids and attention mask (one launch).

    hidden: [B, L, D]; index: [B, L'] (into L); position_ids: [B, L] or [R, B, L] (Qwen's M-RoPE: R = 3, or 4 with
    the text row) or None; attention_mask: [B, L] or None.
    Returns (hidden [B, L', D], position_ids [..., B, L'] or None, attention_mask [B, L'] or None).
    """
    if _use_kernel(hidden):
        from vtprune.cuda.compact import compact as _kernel

        return _out(_kernel(hidden, index, position_ids, attention_mask), "triton", with_backend)
    return _out(compact_reference(hidden, index, position_ids, attention_mask), "torch", with_backend)


def compact_reference(
    hidden: torch.Tensor,
    index: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
):
    """``compact`` in PyTorch: ``gather_tokens`` on the hidden states, ``gather_last`` on the others."""
    pos = None if position_ids is None else gather_last(position_ids, index)
    mask = None if attention_mask is None else gather_last(attention_mask, index)
    return gather_tokens_reference(hidden, index), pos, mask


def pairwise_cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """x: [B, N, D] -> [B, N, N] with 1 - cos(x_i, x_j), computed in float32."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    # In place: (-g) + 1 rounds exactly as 1 - g, and only one N x N matrix exists at a time.
    return (x @ x.transpose(1, 2)).neg_().add_(1.0)


def greedy_maxmin(
    features: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    max_matrix_bytes: int | None = None,
    *,
    with_backend: bool = False,
):
    """Greedy max-min diversity selection on cosine distance, in pick order.

    features: [B, N, D]; weights: [B, N] or None. Returns [B, k] (long), the order tokens were picked.
    Without weights (DivPrune): first pick = the token whose nearest other token is farthest, then the token
    farthest from the picked set. With weights (ZOO-Prune): first pick = argmax weight, then
    argmax of weight * distance-to-picked-set. A running minimum makes it O(kN) after the distance matrix.

    max_matrix_bytes: the largest float32 distance matrix (``4 * N * N`` bytes, one sample) to build (default
    ``vtprune.greedy.DEFAULT_MATRIX_BYTES``, 1 GiB). Larger N never builds it: the ``torch`` path then computes the
    nearest-neighbour distances block by block and one distance row per pick, O(N * D) memory (``vtprune.greedy``).
    The kernel path (CUDA, N <= ``cuda.greedy.MAX_N``, matrix within the limit) takes the same float32 distance
    matrix and returns the same picks; the ``torch`` path is ``vtprune.greedy.maxmin_torch``, checked against
    ``greedy_maxmin_reference`` (bit-identical picks on the matrix path; see that module for the rows path's ties).
    """
    from vtprune import greedy

    if _use_kernel(features) and greedy.choose_path(features.shape[1], max_matrix_bytes) == "matrix":
        from vtprune.cuda.greedy import MAX_N
        from vtprune.cuda.greedy import maxmin_kernel as _kernel

        if features.shape[1] <= MAX_N:
            return _out(_kernel(pairwise_cosine_distance(features), k, weights), "triton", with_backend)
    return _out(greedy.maxmin_torch(features, k, weights, max_matrix_bytes=max_matrix_bytes), "torch", with_backend)


def greedy_maxmin_reference(features: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``greedy_maxmin`` in PyTorch."""
    return maxmin_on_distances(pairwise_cosine_distance(features), k, weights)


def maxmin_on_distances(dist: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The selection loop of ``greedy_maxmin_reference`` on a given distance matrix [B, N, N]."""
    b, n, _ = dist.shape
    rows = torch.arange(b, device=dist.device)
    picks = torch.empty(b, k, dtype=torch.long, device=dist.device)
    if weights is None:
        eye = torch.eye(n, dtype=torch.bool, device=dist.device)
        first = dist.masked_fill(eye, float("inf")).amin(dim=-1).argmax(dim=-1)
    else:
        weights = weights.float()
        first = weights.argmax(dim=-1)
    picks[:, 0] = first
    nearest = dist[rows, first].clone()  # [B, N] distance to the nearest picked token
    taken = torch.zeros(b, n, dtype=torch.bool, device=dist.device)
    taken[rows, first] = True
    for step in range(1, k):
        score = nearest if weights is None else weights * nearest
        nxt = score.masked_fill(taken, float("-inf")).argmax(dim=-1)
        picks[:, step] = nxt
        taken[rows, nxt] = True
        nearest = torch.minimum(nearest, dist[rows, nxt])
    return picks


def merge_tokens(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    target: torch.Tensor,
    sizes: torch.Tensor | None = None,
    *,
    with_backend: bool = False,
):
    """Size-weighted average of every token into its assigned kept token.

    hidden: [B, N, D]; keep: [B, k] indices of kept tokens; target: [B, N] in [0, k), the kept slot each token
    joins (a kept token's target is its own slot); sizes: [B, N] token sizes (default ones).
    Returns (merged [B, k, D], merged sizes [B, k]).
    """
    if _use_kernel(hidden):
        from vtprune.cuda.merge import merge as _kernel

        return _out(_kernel(hidden, keep, target, sizes), "triton", with_backend)
    return _out(merge_tokens_reference(hidden, keep, target, sizes), "torch", with_backend)


def merge_tokens_reference(
    hidden: torch.Tensor, keep: torch.Tensor, target: torch.Tensor, sizes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_tokens`` in PyTorch."""
    b, n, d = hidden.shape
    if sizes is None:
        sizes = torch.ones(b, n, dtype=torch.float32, device=hidden.device)
    w = sizes.float()
    acc = torch.zeros(b, keep.shape[1], d, dtype=torch.float32, device=hidden.device)
    acc.scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, d), hidden.float() * w.unsqueeze(-1))
    tot = torch.zeros(b, keep.shape[1], dtype=torch.float32, device=hidden.device)
    tot.scatter_add_(1, target, w)
    return (acc / tot.unsqueeze(-1)).to(hidden.dtype), tot
