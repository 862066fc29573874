"""Attention scores that stages read, without forcing eager attention on the model.

Inside registered attention functions that then call the real implementation (sdpa, eager or flash), so outputs are
unchanged: the last query's attention row at the language model's layer K-1, computed in O(H·L·d); and a vision-tower
layer's attention to each patch (the [CLS] query's row where the tower has one, else the mean over all queries,
computed block by block) with its key states. Only the chosen attention module is pointed at them, through a
copied config on that module instance.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_IMPL = "vtprune_capture"
TOWER_CAPTURE_IMPL = "vtprune_tower_capture"


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # The eager attention of the module's own model file (a CLIP layer has no grouped heads, a Llama layer has).
    fn = sys.modules[type(module).__module__].eager_attention_forward
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _inner(module, query, key, value, attention_mask, **kwargs):
    inner = module._vtprune_inner_impl
    fn = _eager if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


def tower_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, cls: int, block: int = 256):
    """The attention each token receives at a tower layer, mean over heads: [B, T] float32. With a [CLS] token
    (``cls`` = 1), the [CLS] query's softmax row; without one, the mean over all queries of their softmax rows
    (``block`` queries at a time, so the T x T matrix never exists whole). query, key: [B, H, T, d] (no mask: tower
    attention is full)."""
    k = key.float()
    if cls:
        return ((query[:, :, :1].float() @ k.transpose(-1, -2)) * scaling).softmax(-1)[:, :, 0].mean(1)
    total = torch.zeros(key.shape[0], key.shape[2], dtype=torch.float32, device=key.device)
    for start in range(0, query.shape[2], block):
        probs = ((query[:, :, start : start + block].float() @ k.transpose(-1, -2)) * scaling).softmax(-1)
        total += probs.sum(2).mean(1)
    return total / query.shape[2]


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
    if sink is not None and sink.wants_attention(module):
        t0 = time.perf_counter()
        probs = last_query_attention(
            query, key, attention_mask, kwargs.get("scaling") or module.scaling, sink.attention_segments()
        )
        sink.record_attention(probs, time.perf_counter() - t0)
    return _inner(module, query, key, value, attention_mask, **kwargs)


def _tower_capture_forward(module, query, key, value, attention_mask, **kwargs):
    sink = getattr(module, "_vtprune_sink", None)
    if sink is not None and sink.wants_tower_attention():
        t0 = time.perf_counter()
        scaling = kwargs.get("scaling") or module.scale
        attention = tower_attention(query, key, scaling, sink.tower_cls)
        sink.record_tower_attention(attention, key.float().mean(1), time.perf_counter() - t0)
    return _inner(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPL, _capture_forward)
AttentionInterface.register(TOWER_CAPTURE_IMPL, _tower_capture_forward)


def attach(attn_module, sink, impl_name: str = CAPTURE_IMPL):
    """Point ``attn_module`` at a capturing function (``CAPTURE_IMPL`` the language model's last-query row,
    ``TOWER_CAPTURE_IMPL`` a tower layer's attention and keys); returns the callable that undoes exactly that."""
    original = attn_module.config
    impl = original._attn_implementation or "eager"
    if impl not in ("eager", "sdpa") and not impl.startswith("flash_attention"):
        raise NotImplementedError(
            f"attention-scored stages support eager, sdpa and flash attention, got attn_implementation={impl!r}"
        )
    cfg = copy.copy(original)
    cfg._attn_implementation_internal = impl_name
    attn_module.config = cfg
    attn_module._vtprune_inner_impl = impl
    attn_module._vtprune_sink = sink

    def detach():
        attn_module.config = original
        del attn_module._vtprune_inner_impl
        del attn_module._vtprune_sink

    return detach
