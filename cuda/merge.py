"""Size-weighted token merge (a scatter-reduce) in one launch.

Reference: ``vtprune.ops.merge_tokens_reference``: every token ``i`` is added, with weight ``sizes[i]``, to the kept
slot ``target[i]``; each slot is then divided by its total weight.

Grid ``(cdiv(D, BLOCK_D), B)``: a program owns the ``BLOCK_D`` channels of one sample for all ``k`` slots, so no two
programs touch the same accumulator entry and no separate zeroing or normalising launch is needed. In one program:
1. zero its columns of a float32 workspace ``acc [B, k, D]`` and its own row of slot totals ``tot [nD, B, k]``;
2. stream the ``N`` tokens in ``[BLOCK_N, BLOCK_D]`` tiles, ``atomic_add`` ``w * x`` into ``acc[target]`` and ``w``
   into ``tot[target]`` (atomics only resolve duplicate targets inside the program's own tiles: they are relaxed
   and uncontended across programs);
3. after a barrier, read its columns back (volatile loads, so nothing stale comes from L1), divide by the totals
   and store in the input dtype.
Accumulation is in float32, as in the reference; only the summation order differs (atomics: not bitwise
deterministic run to run). Blocks: ``BLOCK_D = 64``, halved (down to 16) until ``B * cdiv(D, BLOCK_D) >= 128``
programs on a GPU (D = 4096, B = 1: 32 channels, 128 programs); ``BLOCK_N = BLOCK_K = min(128, 4096 // BLOCK_D)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_device, interpret_mode, lazy_jit, on_device


def _merge_kernel(
    h_ptr,
    tgt_ptr,
    w_ptr,
    out_ptr,
    acc_ptr,
    tot_ptr,
    N,
    K,
    D,
    B,
    s_hb,
    s_hn,
    s_hd,  # hidden [B, N, D]
    s_tb,
    s_tn,  # target [B, N]
    s_wb,
    s_wn,  # sizes [B, N]
    HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc_b = acc_ptr + b * K * D  # workspace, contiguous [B, K, D] float32
    tot_b = tot_ptr + (pid_d * B + b) * K  # this program's totals, contiguous [nD, B, K] float32
    out_b = out_ptr + b * K * D  # output, contiguous [B, K, D]

    # 1. zero this program's part of the workspace
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        tl.store(
            acc_b + kk[:, None] * D + d[None, :],
            tl.zeros((BLOCK_K, BLOCK_D), tl.float32),
            mask=k_ok[:, None] & d_ok[None, :],
        )
        tl.store(tot_b + kk, tl.zeros((BLOCK_K,), tl.float32), mask=k_ok)
    tl.debug_barrier()

    # 2. scatter-add the weighted tokens into their slots
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        tgt = tl.load(tgt_ptr + b * s_tb + n * s_tn, mask=n_ok, other=0).to(tl.int64)
        if HAS_W:
            w = tl.load(w_ptr + b * s_wb + n * s_wn, mask=n_ok, other=0).to(tl.float32)
        else:
            w = tl.where(n_ok, 1.0, 0.0)
        ok = n_ok[:, None] & d_ok[None, :]
        x = tl.load(h_ptr + b * s_hb + n[:, None] * s_hn + d[None, :] * s_hd, mask=ok, other=0).to(tl.float32)
        tl.atomic_add(acc_b + tgt[:, None] * D + d[None, :], x * w[:, None], mask=ok, sem="relaxed")
        tl.atomic_add(tot_b + tgt, w, mask=n_ok, sem="relaxed")
    tl.debug_barrier()

    # 3. normalise and cast
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        ok = k_ok[:, None] & d_ok[None, :]
        a = tl.load(acc_b + kk[:, None] * D + d[None, :], mask=ok, other=0.0, volatile=True)
        s = tl.load(tot_b + kk, mask=k_ok, other=1.0, volatile=True)
        tl.store(out_b + kk[:, None] * D + d[None, :], (a / s[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


merge_kernel = lazy_jit(_merge_kernel)


def merge(
    hidden: torch.Tensor, keep: torch.Tensor, target: torch.Tensor, sizes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of every token into its assigned kept slot (the contract of ``ops.merge_tokens``).

    hidden: [B, N, D]; keep: [B, k] (only its ``k`` is used); target: [B, N] int32/int64 in [0, k) (checked on CPU
    only); sizes: [B, N] or None (ones). Returns (merged [B, k, D] in hidden's dtype, merged sizes [B, k] float32).
    """
    if hidden.dim() != 3 or keep.dim() != 2 or tuple(target.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"expected hidden [B, N, D], keep [B, k], target [B, N]; got {tuple(hidden.shape)}, "
            f"{tuple(keep.shape)}, {tuple(target.shape)}"
        )
    if sizes is not None and tuple(sizes.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"sizes must be [B, N]; got {tuple(sizes.shape)}")
    check_device(hidden, target, sizes)
    B, N, D = hidden.shape
    K = keep.shape[1]
    if not target.is_cuda and target.numel() and (int(target.min()) < 0 or int(target.max()) >= K):
        raise IndexError(f"target out of range [0, {K})")
    out = torch.empty(B, K, D, dtype=hidden.dtype, device=hidden.device)
    if B == 0 or K == 0 or D == 0:
        tot = torch.zeros(B, K, dtype=torch.float32, device=hidden.device)
        if D == 0 and K and B:  # no channels to carry the totals: compute them directly
            w = torch.ones_like(target, dtype=torch.float32) if sizes is None else sizes.float()
            tot.scatter_add_(1, target.long(), w)
        return out, tot
    block_d = min(triton.next_power_of_2(D), 64)
    min_programs = 1 if interpret_mode() else 128  # a GPU wants its SMs busy; the interpreter runs programs in turn
    while block_d > 16 and B * triton.cdiv(D, block_d) < min_programs:
        block_d //= 2
    block_n = min(128, 4096 // block_d)
    n_d = triton.cdiv(D, block_d)
    acc = torch.empty(B, K, D, dtype=torch.float32, device=hidden.device)
    tot = torch.empty(n_d, B, K, dtype=torch.float32, device=hidden.device)
    w = sizes if sizes is not None else target  # placeholder when absent (never read)
    with on_device(hidden):
        merge_kernel[(n_d, B)](
            hidden,
            target,
            w,
            out,
            acc,
            tot,
            N,
            K,
            D,
            B,
            hidden.stride(0),
            hidden.stride(1),
            hidden.stride(2),
            target.stride(0),
            target.stride(1),
            w.stride(0),
            w.stride(1),
            HAS_W=sizes is not None,
            BLOCK_N=block_n,
            BLOCK_K=block_n,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out, tot[0]
