"""Fused compaction: kept hidden states, position ids and attention-mask entries in one launch.

Reference: ``vtprune.ops.compact_reference`` (``torch.gather`` on each tensor).

Grid ``(cdiv(L', BLOCK_T), cdiv(D, BLOCK_D), B)``; each program copies one ``[BLOCK_T, BLOCK_D]`` tile of kept rows
(one ``index`` load per row, a 2-D gather load, a contiguous store). The programs of the first D-tile
(``program_id(1) == 0``) also copy the ``R`` position-id rows and the mask entries of their ``BLOCK_T`` tokens, so
the small tensors ride along in the same launch. Copies are bit-exact for every dtype (bool is moved as uint8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_device, lazy_jit, on_device

_TILE = 4096  # elements per program: 8 KiB of fp16, 32 elements per thread at 4 warps


def _compact_kernel(
    h_ptr,
    idx_ptr,
    out_ptr,
    pos_ptr,
    pos_out_ptr,
    msk_ptr,
    msk_out_ptr,
    n_keep,
    D,
    s_hb,
    s_hl,
    s_hd,  # hidden [B, L, D]
    s_ib,
    s_il,  # index [B, L']
    s_pr,
    s_pb,
    s_pl,  # position ids [R, B, L]
    s_mb,
    s_ml,  # attention mask [B, L]
    B,  # batch (for the [R, B, L'] position-id output)
    R: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # output rows of this program
    t_ok = t < n_keep
    src = tl.load(idx_ptr + b * s_ib + t * s_il, mask=t_ok, other=0).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = t_ok[:, None] & (d < D)[None, :]
    x = tl.load(h_ptr + b * s_hb + src[:, None] * s_hl + d[None, :] * s_hd, mask=ok)
    out_row = (b * n_keep + t.to(tl.int64)) * D  # output is contiguous [B, L', D]
    tl.store(out_ptr + out_row[:, None] + d[None, :], x, mask=ok)

    if pid_d == 0:
        if HAS_POS:
            for r in tl.static_range(R):
                p = tl.load(pos_ptr + r * s_pr + b * s_pb + src * s_pl, mask=t_ok)
                tl.store(pos_out_ptr + (r * B + b) * n_keep + t, p, mask=t_ok)
        if HAS_MASK:
            m = tl.load(msk_ptr + b * s_mb + src * s_ml, mask=t_ok)
            tl.store(msk_out_ptr + b * n_keep + t, m, mask=t_ok)


compact_kernel = lazy_jit(_compact_kernel)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def compact(
    hidden: torch.Tensor,
    index: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
):
    """Keep tokens of ``hidden`` and, in the same launch, of its position ids and attention mask.

    hidden: [B, L, D]; index: [B, L'] (int32 or int64, values in [0, L), checked on CPU only);
    position_ids: [B, L] or [R, B, L] (e.g. R = 3 or 4 rows of M-RoPE ids) or None; attention_mask: [B, L] or None.
    Returns (hidden [B, L', D], position_ids [B, L'] / [R, B, L'] or None, attention_mask [B, L'] or None),
    new contiguous tensors with the input dtypes.
    """
    if hidden.dim() != 3 or index.dim() != 2 or index.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"expected hidden [B, L, D] and index [B, L'], got {tuple(hidden.shape)} and {tuple(index.shape)}"
        )
    B, L, D = hidden.shape
    n_keep = index.shape[1]
    pos3 = None
    if position_ids is not None:
        pos3 = position_ids if position_ids.dim() == 3 else position_ids.unsqueeze(0)
        if pos3.dim() != 3 or tuple(pos3.shape[1:]) != (B, L) or not 1 <= pos3.shape[0] <= 8:
            raise ValueError(
                f"position_ids must be [B, L] or [R, B, L] with B, L = {B}, {L}; got {tuple(position_ids.shape)}"
            )
    if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
        raise ValueError(f"attention_mask must be [B, L] = [{B}, {L}]; got {tuple(attention_mask.shape)}")
    check_device(hidden, index, position_ids, attention_mask)
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be int32 or int64, got {index.dtype}")
    if not index.is_cuda and index.numel() and (int(index.min()) < 0 or int(index.max()) >= L):
        raise IndexError(f"index out of range [0, {L})")

    out = torch.empty(B, n_keep, D, dtype=hidden.dtype, device=hidden.device)
    pos_out = None if pos3 is None else torch.empty(pos3.shape[0], B, n_keep, dtype=pos3.dtype, device=pos3.device)
    msk_out = (
        None
        if attention_mask is None
        else torch.empty(B, n_keep, dtype=attention_mask.dtype, device=attention_mask.device)
    )
    if n_keep and B:
        block_d = min(triton.next_power_of_2(max(D, 1)), 1024)
        block_t = max(1, min(64, _TILE // block_d))
        grid = (triton.cdiv(n_keep, block_t), max(1, triton.cdiv(D, block_d)), B)
        p = pos3 if pos3 is not None else index  # placeholders when absent (never read)
        m = _as_bits(attention_mask) if attention_mask is not None else index
        with on_device(hidden):
            compact_kernel[grid](
                hidden,
                index,
                out,
                p,
                _as_bits(pos_out) if pos_out is not None else index,
                m,
                _as_bits(msk_out) if msk_out is not None else index,
                n_keep,
                D,
                hidden.stride(0),
                hidden.stride(1),
                hidden.stride(2),
                index.stride(0),
                index.stride(1),
                p.stride(0),
                p.stride(1),
                p.stride(2) if pos3 is not None else 0,
                m.stride(0),
                m.stride(1),
                B,
                R=pos3.shape[0] if pos3 is not None else 1,
                HAS_POS=pos3 is not None,
                HAS_MASK=attention_mask is not None,
                BLOCK_T=block_t,
                BLOCK_D=block_d,
                num_warps=4,
            )
    if pos_out is not None and position_ids.dim() == 2:
        pos_out = pos_out[0]
    return out, pos_out, msk_out
