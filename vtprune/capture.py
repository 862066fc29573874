"""Scores that in-LLM stages read at layer K-1, without forcing eager attention on the model.

The last query's attention row is computed in O(H·L·d) inside a registered attention function that then calls
the real implementation (sdpa, eager or flash), so outputs are unchanged. Only the one attention module at layer
K-1 is pointed at it, through a copied config on that module instance.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_IMPL = "vtprune_capture"


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def last_query_attention(
    query: torch.Tensor, key: torch.Tensor, mask, scaling: float, segments: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of the last query over all keys, mean over heads.

    query: [B, H, Lq, d]; key: [B, Hkv, Lk, d] (grouped heads repeated); mask: None, a 4D bool/additive
    [B, 1, Lq, Lk] mask or a 2D [B, Lk] padding mask (flash). segments: [B, Lk] long for packed samples (queries and
    keys are the same tokens then): each key is scored by the last token of its own sample instead. Returns [B, Lk]
    float32.
    """
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    lk = k.shape[2]
    if segments is None:
        rows = torch.full((query.shape[0], 1), query.shape[2] - 1, dtype=torch.long, device=query.device)
    else:  # the last position of each sample, [B, S]
        order = torch.arange(lk, device=query.device).expand_as(segments)
        rows = torch.zeros(segments.shape[0], int(segments.max()) + 1, dtype=torch.long, device=query.device)
        rows = rows.scatter_reduce(1, segments, order, "amax", include_self=False)
    q = query.gather(2, rows[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1])).float()
    logits = (q @ k.transpose(-1, -2)) * scaling  # [B, H, S, Lk]
    if mask is not None:
        if mask.dim() == 4:
            row = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))[..., -lk:]
        else:
            row = mask[:, None, None, -lk:]
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        elif row.is_floating_point():
            logits = logits + row.float()
        else:
            logits = logits.masked_fill(row == 0, float("-inf"))
    if segments is not None and (mask is None or mask.dim() != 4):  # a 4D mask already separates the samples
        other = segments[:, None, None, :] != torch.arange(rows.shape[1], device=query.device)[None, None, :, None]
        logits = logits.masked_fill(other, float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=1)  # [B, S, Lk]
    return probs[:, 0] if segments is None else probs.gather(1, segments[:, None, :]).squeeze(1)


def _capture_forward(module, query, key, value, attention_mask, **kwargs):
    sink = getattr(module, "_vtprune_sink", None)
    if sink is not None and sink.wants_attention():
        t0 = time.perf_counter()
        probs = last_query_attention(
            query, key, attention_mask, kwargs.get("scaling") or module.scaling, sink.attention_segments()
        )
        sink.record_attention(probs, time.perf_counter() - t0)
    inner = module._vtprune_inner_impl
    fn = _eager if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPL, _capture_forward)


def attach(attn_module, sink):
    """Point ``attn_module`` at the capturing function; returns the callable that undoes exactly that."""
    original = attn_module.config
    impl = original._attn_implementation or "eager"
    if impl not in ("eager", "sdpa") and not impl.startswith("flash_attention"):
        raise NotImplementedError(
            f"attention-scored stages support eager, sdpa and flash attention, got attn_implementation={impl!r}"
        )
    cfg = copy.copy(original)
    cfg._attn_implementation_internal = CAPTURE_IMPL
    attn_module.config = cfg
    attn_module._vtprune_inner_impl = impl
    attn_module._vtprune_sink = sink

    def detach():
        attn_module.config = original
        del attn_module._vtprune_inner_impl
        del attn_module._vtprune_sink

    return detach
