"""The attention masks a pruned sequence is given: transformers' own mask functions, over the kept tokens' 2D mask
(and, for packed samples, over which sample each token belongs to)."""

from __future__ import annotations

import torch
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
)


def cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def causal_mask(text_config, kind: str, hidden, mask2d, cache, segment=None, layer: int | None = None):
    """transformers' own mask for a layer of ``kind`` ("full_attention" / "sliding_attention") over ``mask2d``;
    packed samples (``segment`` [B, L]) see only their own tokens, as transformers' packed mask has them."""
    fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    extra = {}
    if segment is not None and not (text_config._attn_implementation or "").startswith("flash"):
        # (flash attention splits packed samples from the position ids, which restart at each sample)
        extra["and_mask_function"] = packed_sequence_mask_function(segment)
    return fn(
        config=text_config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        cache=cache,
        position_ids=None,
        layer_idx=layer,
        **extra,
    )


def language_model_mask(text_config, embeds, mask2d, segment):
    """The attention mask the language model is given for the current sequence: its 2D mask, or for packed samples
    the mask transformers would build for them, built here (a 4D mask, or one per layer type), since the language
    model detects packing only from an absent mask and unbroken positions."""
    if segment is None:
        return mask2d
    types = sorted(set(getattr(text_config, "layer_types", None) or ["full_attention"]))
    masks = {t: causal_mask(text_config, t, embeds, mask2d, None, segment) for t in types}
    return masks if len(masks) > 1 else next(iter(masks.values()))


def layer_mask(text_config, layer: int, hidden, mask2d, kwargs, segment=None):
    """The mask decoder layer ``layer`` expects, for a sequence described by ``mask2d`` (and ``segment``) and its
    own cache; ``kwargs`` are the layer's keywords."""
    if kwargs.get("attention_mask") is None and segment is None and bool(mask2d.all()):
        # The model found the full sequence needs no mask (sdpa's or flash's causal skip: no padding, and no past
        # or a single query); a subsequence without padding at the same query length needs none either.
        return None
    return causal_mask(text_config, layer_kind(text_config, layer), hidden, mask2d, cache_of(kwargs), segment, layer)


def layer_kind(text_config, layer: int) -> str:
    """The attention kind of decoder layer ``layer`` ("full_attention", "sliding_attention", ...): layers of one
    kind over one cache get the same mask."""
    types = getattr(text_config, "layer_types", None)
    return types[layer] if types is not None else "full_attention"


def packed_segments(text_positions, kwargs: dict, batch: int) -> torch.Tensor | None:
    """[B, L] long, the packed sample each token belongs to, when transformers would treat this prefill as packed
    samples (no attention mask, no cache given or to be made, and text position ids that restart); else None.
    ``text_positions``: the position ids [B, L] the model reads that from (``Adapter.mask_positions``)."""
    if (
        text_positions is None
        or kwargs.get("attention_mask") is not None
        or cache_of(kwargs) is not None
        or kwargs.get("use_cache")
    ):
        return None
    return find_packed_sequence_indices(text_positions.expand(batch, -1))
