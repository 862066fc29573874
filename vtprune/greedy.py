"""Greedy max-min selection (DivPrune; ZOO-Prune's weighted form) at any N, with the picks of the reference.

The specification is ``vtprune.ops.greedy_maxmin_reference``; ``vtprune.ops.greedy_maxmin`` dispatches here
(``maxmin_torch``). Two paths, chosen per call by the size of the float32 distance matrix (``4 * N * N`` bytes for
one sample):

- ``matrix`` (it fits ``max_matrix_bytes``; the faster path, since every later pick reads one row of it): the
  reference's own matrix (``ops.pairwise_cosine_distance``), one sample at a time, so the picks are bit-identical.
- ``rows`` (it does not fit): no N x N matrix. The unweighted first pick needs each token's distance to its nearest
  other token, taken block of rows by block of rows (``block_bytes`` of distances at a time); every later pick
  needs only the newest pick's distances to all tokens, one matrix-vector product, O(N * D). Peak extra memory:
  the normalised features (``4 * N * D`` bytes), one block and a few N-vectors.

The loop: picked tokens get ``-inf`` in the running minimum (and ``+inf`` weight) instead of a separate mask, and
``minimum`` keeps them there, so a step is one (weighted) argmax, one row and one in-place minimum. On CPU it runs
on NumPy views of the same memory: a NumPy call costs about a microsecond, a small tensor op several. Elsewhere
(CUDA without Triton) it runs on tensors without a host sync per step. Features are assumed finite.

Ties: exact ties break to the lowest index, as ``argmax`` does in the reference, on both paths. The ``rows`` path
computes the same dot products as the reference's matrix, but in other BLAS calls (row blocks, matrix-vector),
which may round the last bit differently; then two candidates whose scores are within about 1e-7 of each other
can swap. Exact duplicates of a token still tie exactly (their dot products are the same computation).
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_MATRIX_BYTES = 1 << 30  # 1 GiB of float32 distances: the matrix path up to N = 16384 per sample
DEFAULT_BLOCK_BYTES = 64 << 20  # distances held at once by the rows path's first pick


def maxmin_torch(
    features: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    max_matrix_bytes: int | None = None,
    block_bytes: int | None = None,
) -> torch.Tensor:
    """Greedy max-min selection, in pick order; same contract and picks as ``ops.greedy_maxmin_reference``.

    features: [B, N, D]; weights: [B, N] or None. Returns [B, k] long on ``features.device``.
    max_matrix_bytes: largest distance matrix (one sample, float32) to build; above it the ``rows`` path runs.
    block_bytes: distances held at once by the ``rows`` path's nearest-neighbour pass.
    """
    b, n, _ = features.shape
    picks = torch.empty(b, k, dtype=torch.long, device=features.device)
    if k == 0 or b == 0:
        return picks
    limit = DEFAULT_MATRIX_BYTES if max_matrix_bytes is None else max_matrix_bytes
    use_matrix = 4 * n * n <= limit
    for r in range(b):  # samples are independent; one at a time bounds the memory to one sample's
        w = None if weights is None else weights[r].float()
        if use_matrix:
            from .ops import pairwise_cosine_distance

            dist = pairwise_cosine_distance(features[r : r + 1])[0]
            source = _MatrixRows(dist)
        else:
            source = _FeatureRows(
                torch.nn.functional.normalize(features[r].float(), dim=-1),
                DEFAULT_BLOCK_BYTES if block_bytes is None else block_bytes,
            )
        first = int(w.argmax()) if w is not None else source.first_pick()
        picks[r] = _pick_all(source, first, k, w)
    return picks


def choose_path(n: int, max_matrix_bytes: int | None = None) -> str:
    """``"matrix"`` or ``"rows"``: the path ``maxmin_torch`` takes for N tokens per sample."""
    limit = DEFAULT_MATRIX_BYTES if max_matrix_bytes is None else max_matrix_bytes
    return "matrix" if 4 * n * n <= limit else "rows"


class _MatrixRows:
    """Distance rows read from the full matrix dist [N, N] (float32)."""

    def __init__(self, dist: torch.Tensor):
        self.dist, self.n, self.device = dist, dist.shape[0], dist.device

    def first_pick(self) -> int:
        """argmax over tokens of the distance to the nearest other token (the diagonal excluded)."""
        diag = self.dist.diagonal()
        saved = diag.clone()
        diag.fill_(float("inf"))  # in place and restored after: no second N x N buffer
        nearest = self.dist.amin(dim=-1)
        diag.copy_(saved)
        return int(nearest.argmax())

    def row(self, i, out: torch.Tensor) -> torch.Tensor:
        """Distances [N] from token i (an int, or a one-element long tensor: no host sync) to all tokens."""
        return self.dist[i] if isinstance(i, int) else self.dist.index_select(0, i).view(-1)


class _FeatureRows:
    """Distance rows computed from the normalised features xn [N, D] (float32), never the whole matrix."""

    def __init__(self, xn: torch.Tensor, block_bytes: int):
        self.xn, self.n, self.device = xn, xn.shape[0], xn.device
        self.block = max(1, min(self.n, block_bytes // (4 * self.n)))

    def first_pick(self) -> int:
        nearest = torch.empty(self.n, dtype=torch.float32, device=self.device)
        for r0 in range(0, self.n, self.block):
            blk = self.xn[r0 : r0 + self.block] @ self.xn.T  # [rows, N]
            blk.neg_().add_(1.0)  # 1 - s in place: -s + 1 rounds to the same float
            blk.diagonal(offset=r0).fill_(float("inf"))  # row j of the block is token r0 + j
            torch.amin(blk, dim=-1, out=nearest[r0 : r0 + blk.shape[0]])
        return int(nearest.argmax())

    def row(self, i, out: torch.Tensor) -> torch.Tensor:
        vec = self.xn[i] if isinstance(i, int) else self.xn.index_select(0, i).view(-1)
        torch.mv(self.xn, vec, out=out)
        return out.neg_().add_(1.0)


def _pick_all(source, first: int, k: int, weights: torch.Tensor | None) -> torch.Tensor:
    """The greedy loop from ``first``: returns [k] long (CPU: NumPy views; other devices: sync-free tensor ops)."""
    buf = torch.empty(source.n, dtype=torch.float32, device=source.device)  # the rows path writes each row here
    nearest = source.row(first, buf).clone()
    nearest[first] = float("-inf")
    w = None
    if weights is not None:
        w = weights.to(source.device, torch.float32, copy=True)
        w[first] = float("inf")  # inf * -inf = -inf: a picked token never scores again, whatever its weight
    if source.device.type == "cpu" and not _FORCE_TORCH_LOOP:
        return torch.from_numpy(_pick_all_numpy(source, first, k, nearest, w, buf))
    return _pick_all_tensors(source, first, k, nearest, w, buf)


_FORCE_TORCH_LOOP = False  # tests set it to run the tensor loop on CPU


def _pick_all_numpy(source, first, k, nearest, w, buf) -> np.ndarray:
    picks = np.empty(k, dtype=np.int64)
    picks[0] = first
    near, wn = nearest.numpy(), None if w is None else w.numpy()
    score = np.empty_like(near)
    for step in range(1, k):
        if wn is None:
            nxt = int(near.argmax())
        else:
            np.multiply(wn, near, out=score)
            nxt = int(score.argmax())
            wn[nxt] = np.inf
        picks[step] = nxt
        near[nxt] = -np.inf  # before the minimum: min(-inf, d) stays -inf
        np.minimum(near, source.row(nxt, buf).numpy(), out=near)
    return picks


def _pick_all_tensors(source, first, k, nearest, w, buf) -> torch.Tensor:
    picks = torch.empty(k, dtype=torch.long, device=source.device)
    picks[0] = first
    score = torch.empty_like(nearest)
    for step in range(1, k):
        if w is None:
            nxt = nearest.argmax().view(1)
        else:
            torch.mul(w, nearest, out=score)
            nxt = score.argmax().view(1)
            w.index_fill_(0, nxt, float("inf"))
        picks[step : step + 1] = nxt
        nearest.index_fill_(0, nxt, float("-inf"))
        torch.minimum(nearest, source.row(nxt, buf), out=nearest)
    return picks
