"""Find EntropyPrune's pruning layer (the "entropy collapse layer") from a few calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from .strategies.entropy import COLLAPSE_ATTR as _CACHE_ATTR
from .strategies.entropy import collapse_layer, matrix_entropy


@torch.no_grad()
def layer_entropies(model, batches: Iterable[dict]) -> list[float]:
    """Mean matrix entropy of the visual tokens entering each layer, over all samples of ``batches``.

    batches: dicts from the model's processor (``input_ids``, ``pixel_values``, ...); tensors are moved to
    the model's device. Returns one value per ``hidden_states`` entry (embeddings, then each layer's output).
    """
    from .patches import FAMILIES, Adapter

    # Image and video tokens alike, as the model's family places them (any config naming image_token_id will do).
    family = FAMILIES.get(getattr(model.config, "model_type", None))
    placeholders = (family.adapter if family is not None else Adapter).placeholder_mask
    device = getattr(model, "device", None)
    sums, count = None, 0
    from .api import is_patched, paused

    # A patched model is measured as it would run unpruned: the hidden states must cover every visual token.
    patched = is_patched(model)
    for batch in batches:
        if device is not None:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with paused(model) if patched else contextlib.nullcontext():
            hidden = model(**batch, output_hidden_states=True).hidden_states
        visual = placeholders(model.config, batch["input_ids"])  # [B, S]
        for row in range(visual.shape[0]):
            if int(visual[row].sum()) < 2:
                continue  # a text-only sample has no visual representation to measure
            values = [matrix_entropy(h[row][visual[row]]) for h in hidden]
            sums = values if sums is None else [a + v for a, v in zip(sums, values)]
            count += 1
    if count == 0:
        raise ValueError("no calibration sample contains at least 2 image or video tokens")
    return [s / count for s in sums]


def find_collapse_layer(model, batches: Iterable[dict], cache: bool = True) -> int:
    """The entropy collapse layer K: prune at decoder layer K, scoring with layer K-1's queries.

    Runs ``model(**batch, output_hidden_states=True)`` on each calibration batch, averages the visual
    tokens' matrix entropy per layer and returns the layer after the sharpest drop (see ``collapse_layer``).
    On a patched model the calibration runs unpruned (``vtprune.paused``); visual tokens are located through
    ``input_ids``.
    The last hidden state is left out: it has been through the final norm, and a layer there could not be
    pruned at anyway, so K is in [1, num_layers - 1].
    With ``cache=True`` the answer is stored on the model (``model._vtprune_collapse_layer``) and reused.
    """
    if cache and getattr(model, _CACHE_ATTR, None) is not None:
        return getattr(model, _CACHE_ATTR)
    layer = collapse_layer(layer_entropies(model, batches)[:-1])
    if cache:
        setattr(model, _CACHE_ATTR, layer)
    return layer
