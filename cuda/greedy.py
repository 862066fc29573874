"""Greedy max-min diversity selection (DivPrune) and its sensitivity-weighted variant (ZOO-Prune), one launch.

Reference: ``vtprune.ops.greedy_maxmin_reference``. Same picks, in the same order, on tie-free inputs; ties go to
the lowest index in both (``torch.argmax`` and ``tl.argmax`` both return the first maximum).

Input: the cosine-distance matrix ``dist [B, N, N]`` (``ops.pairwise_cosine_distance``, one batched GEMM), not the
features. Computing distance rows on the fly inside one program per sample would re-read all ``N x D`` features at
every step (``k * N * D`` multiply-adds and ``k * N * D * 2`` bytes: 7.5 G and 15 GB for N = 2880, D = 4096, k = 640)
on one SM, while the matrix costs one GEMM over the whole GPU and its rows are only ``4 N`` bytes. Using the matrix the
reference uses also makes the picks bit-identical: after it, the selection only takes minima, products and argmaxes,
which are exact.

Grid ``(B,)``, one program per sample, ``BLOCK_N = next_power_of_2(N)`` lanes (4096 for N = 2880, 16 warps):
- first pick: without weights, stream the matrix in ``[BLOCK_R, BLOCK_N]`` row tiles (``BLOCK_R * BLOCK_N <= 16384``),
  take each row's minimum off the diagonal and keep a running (max, argmax) pair across tiles; with weights, the
  argmax of the weights;
- then ``k - 1`` steps of a loop whose carried values are the running minimum ``nearest [BLOCK_N]`` (float32) and the
  ``taken [BLOCK_N]`` mask, both in registers for the whole selection: score = nearest (times the weights, held in
  registers too), taken lanes set to -inf, argmax, store the pick, load the picked token's distance row (the only
  memory traffic per step: ``4 N`` bytes) and fold it into ``nearest`` with ``minimum``. No host sync anywhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_device, lazy_jit, on_device

MAX_N = 16384  # lanes kept in registers; beyond this the running minimum would spill


def _greedy_kernel(
    dist_ptr,
    w_ptr,
    out_ptr,
    N,
    K,
    s_db,
    s_dr,
    s_dc,  # dist [B, N, N]
    s_wb,
    s_wn,  # weights [B, N]
    WEIGHTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    c_ok = cols < N
    base = dist_ptr + b * s_db
    out = out_ptr + b * K

    if WEIGHTED:
        w = tl.load(w_ptr + b * s_wb + cols * s_wn, mask=c_ok, other=0.0).to(tl.float32)
        first = tl.argmax(tl.where(c_ok, w, float("-inf")), axis=0)
    else:
        best = tl.full((), float("-inf"), tl.float32)
        first = tl.full((), 0, tl.int32)
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            r_ok = rows < N
            d = tl.load(
                base + rows.to(tl.int64)[:, None] * s_dr + cols[None, :] * s_dc,
                mask=r_ok[:, None] & c_ok[None, :],
                other=float("inf"),
            ).to(tl.float32)
            d = tl.where(rows[:, None] == cols[None, :], float("inf"), d)
            row_min = tl.where(r_ok, tl.min(d, axis=1), float("-inf"))
            blk_best = tl.max(row_min, axis=0)
            blk_arg = tl.argmax(row_min, axis=0) + r0
            better = blk_best > best  # strict: an earlier block wins ties
            first = tl.where(better, blk_arg, first)
            best = tl.where(better, blk_best, best)

    tl.store(out, first.to(tl.int64))
    nearest = tl.load(base + first.to(tl.int64) * s_dr + cols * s_dc, mask=c_ok, other=0.0).to(tl.float32)
    taken = (cols == first) | (cols >= N)
    for step in range(1, K):
        if WEIGHTED:
            score = w * nearest
        else:
            score = nearest
        score = tl.where(taken, float("-inf"), score)
        nxt = tl.argmax(score, axis=0)
        tl.store(out + step, nxt.to(tl.int64))
        row = tl.load(base + nxt.to(tl.int64) * s_dr + cols * s_dc, mask=c_ok, other=0.0).to(tl.float32)
        nearest = tl.minimum(nearest, row)
        taken = taken | (cols == nxt)


greedy_kernel = lazy_jit(_greedy_kernel)


def maxmin_kernel(dist: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min selection from a distance matrix, in pick order.

    dist: [B, N, N] (float32 as from ``ops.pairwise_cosine_distance``; half types are upcast on load);
    weights: [B, N] or None. Returns [B, k] int64, identical to ``ops.greedy_maxmin_reference`` on the same matrix.
    """
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2]:
        raise ValueError(f"dist must be [B, N, N]; got {tuple(dist.shape)}")
    B, N, _ = dist.shape
    if weights is not None and tuple(weights.shape) != (B, N):
        raise ValueError(f"weights must be [B, N] = [{B}, {N}]; got {tuple(weights.shape)}")
    if N > MAX_N:
        raise ValueError(f"greedy kernel handles N <= {MAX_N}; got {N}")
    check_device(dist, weights)
    k = int(k)
    out = torch.empty(B, max(k, 0), dtype=torch.long, device=dist.device)
    if B == 0 or k <= 0 or N == 0:
        return out
    block_n = triton.next_power_of_2(N)
    block_r = max(1, min(64, 16384 // block_n))
    num_warps = 4 if block_n <= 512 else (8 if block_n <= 2048 else 16)
    w = weights if weights is not None else dist  # placeholder when absent (never read)
    with on_device(dist):
        greedy_kernel[(B,)](
            dist,
            w,
            out,
            N,
            k,
            dist.stride(0),
            dist.stride(1),
            dist.stride(2),
            w.stride(0),
            w.stride(1),
            WEIGHTED=weights is not None,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            num_warps=num_warps,
        )
    return out
