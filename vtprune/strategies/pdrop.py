"""PyramidDrop (CVPR 2025): drop visual tokens at several layer boundaries of the LLM, each time keeping a fixed
share (lambda) of those left, ranked by the last instruction token's attention at the layer before."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import torch

from .base import Range, SelectionInputs, register


def drop_layers(num_layers: int, drops: int) -> list[int]:
    """The ``drops`` layer boundaries that split ``num_layers`` layers into equal parts (8, 16, 24 of 32 for 3),
    at least layer 1 and distinct."""
    layers = sorted({max(1, round(i * num_layers / (drops + 1))) for i in range(1, drops + 1)})
    return [layer for layer in layers if layer < num_layers]


def layer_average_share(layers: list[int], num_layers: int, ratio: float) -> float:
    """The share of the visual tokens a layer holds on average when each drop keeps ``ratio`` of those left."""
    bounds = layers + [num_layers]
    held = layers[0] + sum(ratio ** (i + 1) * (bounds[i + 1] - bounds[i]) for i in range(len(layers)))
    return held / num_layers


def ratio_for_average(layers: list[int], num_layers: int, target: float) -> float:
    """The per-drop ratio lambda whose layer average is ``target`` (bisection). A ValueError when no lambda reaches
    it: the layers before the first drop hold every token."""
    floor = layer_average_share(layers, num_layers, 0.0)
    if target < floor:
        raise ValueError(
            f"pdrop drops at layers {layers} of {num_layers}: every layer before layer {layers[0]} holds every visual "
            f"token, so the layer average is at least {floor:.3f}; got keep_ratio={target:g}. Ask for more, set more "
            "drops (the drops option), or give each drop's share (the ratio option)"
        )
    lo, hi = 0.0, 1.0
    if layer_average_share(layers, num_layers, 1.0) <= target:
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if layer_average_share(layers, num_layers, mid) < target else (lo, mid)
    return lo


def _expand(stage, num_layers: int) -> list:
    """A ``pdrop`` stage with no layer given becomes one stage per drop. Its ``keep_ratio`` (when given) is the
    layer-averaged share PyramidDrop's papers report, from which lambda is solved; ``ratio`` sets lambda itself.
    A stage given its layer is one drop there."""
    if stage.layer is not None:
        return [stage]
    options = dict(stage.options)
    drops, ratio = options.pop("drops", 3), options.pop("ratio", None)
    if stage.keep_tokens is not None:
        raise ValueError(
            "pdrop keeps a share of the tokens left at each drop: give keep_ratio (the share a layer "
            "holds on average) or the ratio option (each drop's share), not keep_tokens"
        )
    if ratio is not None and stage.keep_ratio is not None:
        raise ValueError(
            "give pdrop either keep_ratio (the layer-averaged share) or ratio (each drop's share), not both"
        )
    layers = drop_layers(num_layers, drops)
    if ratio is None:
        ratio = ratio_for_average(layers, num_layers, 0.25 if stage.keep_ratio is None else stage.keep_ratio)
    per_drop = max(ratio, 1e-9)  # a share, at least one token each drop (the budget rounds up to 1)
    return [replace(stage, layer=layer, keep_ratio=per_drop, options=dict(options)) for layer in layers]


@register(
    "pdrop",
    needs=("attention",),
    layer=2,
    min_layer=1,
    expand=_expand,
    flops=lambda s, **_: 2 * s.heads * s.seq_len * s.head_dim * s.n // (s.row_n or s.n),
    description="several in-LLM drops, each keeping a share by the last instruction token's attention",
)
def pdrop_select(
    inputs: SelectionInputs,
    k: int,
    drops: Annotated[int, Range(ge=1)] = 3,
    ratio: Annotated[float, Range(gt=0, le=1)] | None = None,
) -> torch.Tensor:
    """One PyramidDrop drop: the ``k`` tokens the last instruction token attends to most at layer K-1 (mean over
    heads; ties to the earlier token). attention: [batch, N]. Returns [batch, k] ascending. ``drops`` and ``ratio``
    shape the schedule (``_expand``)."""
    order = torch.sort(inputs.attention.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=-1).values
