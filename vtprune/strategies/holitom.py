"""HoliTom (NeurIPS 2025): holistic token merging before the LLM. The clip is cut into segments of similar frames; in
a segment, a position whose token stays the same through every frame becomes one token (temporal merging); the
tokens left are clustered and merged into their density peaks (spatial merging)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import torch
import torch.nn.functional as F

from .base import Merged, Range, ScoringShape, SelectionInputs, register
from .video import distances, merge_into_peaks, segments, video_rows


def temporal_groups(frames: torch.Tensor, parts: list, k: int, threshold: float) -> torch.Tensor:
    """The representative of every token [T * P] after temporal merging: in a segment of two frames or more, the
    tokens at a position whose cosine to the segment's first frame stays >= ``threshold`` in every frame join that
    first token. The most redundant positions merge first, and only while at least ``k`` tokens remain."""
    t, p, _ = frames.shape
    x = F.normalize(frames.float(), dim=-1)
    candidates = []
    for a, b in parts:
        if b - a < 2:
            continue
        redundancy = (x[a + 1 : b] * x[a][None]).sum(-1).amin(0)  # [P]: the least similar frame decides
        for pos in (redundancy >= threshold).nonzero().flatten().tolist():
            candidates.append((-float(redundancy[pos]), a, pos, b))
    rep = torch.arange(t * p, device=frames.device)
    left = t * p
    for _, a, pos, b in sorted(candidates):
        if left - (b - a - 1) < k:
            continue
        rep[torch.arange(a + 1, b, device=frames.device) * p + pos] = a * p + pos
        left -= b - a - 1
    return rep


def _expand(stage, num_layers: int) -> list:
    """With ``inner_layer``, HoliTom's merging inside the LLM follows as a second stage: at that layer the tokens the
    last instruction token attends to most keep ``inner_keep`` of what is left, and every other token is merged
    into its most similar kept one (``fastv`` with ``merge=True``)."""
    options = dict(stage.options)
    inner, share = options.pop("inner_layer", None), options.pop("inner_keep", 0.5)
    if inner is None:
        return [replace(stage, options=options)]
    if stage.layer not in (None, 0):
        raise ValueError(
            f"holitom with inner_layer={inner} merges before the LLM (layer 0) and again at inner_layer; got "
            f"layer={stage.layer}: leave layer unset, or write the two stages as a schedule"
        )
    outer = replace(stage, layer=0, options=options)
    merge = replace(stage, method="fastv", layer=inner, keep_ratio=share, keep_tokens=None, options={"merge": True})
    return [outer, replace(merge, video_keep_ratio=None, video_keep_tokens=None)]


def _flops(shape: ScoringShape, **_) -> int:
    # One Gram matrix of the clip's tokens gives every distance the density peaks and merges read (the temporal
    # cosines are elementwise).
    return 2 * shape.n * shape.n * shape.d


@register(
    "holitom",
    needs=("grid",),
    merges=True,
    flops=_flops,
    expand=_expand,
    description="video: segments, static positions merged over time, the rest merged into density peaks",
)
def holitom_select(
    inputs: SelectionInputs,
    k: int,
    threshold: Annotated[float, Range(ge=-1, le=1)] = 0.9,
    cuts: Annotated[int, Range(ge=0)] = 7,
    merge_threshold: Annotated[float, Range(ge=-1, le=1)] = 0.8,
    neighbours: Annotated[int, Range(ge=1)] = 5,
    inner_layer: Annotated[int, Range(ge=1)] | None = None,
    inner_keep: Annotated[float, Range(gt=0, le=1)] = 0.5,
) -> Merged:
    """HoliTom on each row that is an unpruned video grid (``frames`` > 1): ``segments``, ``temporal_groups``
    (``merge_threshold``), then in each segment its share of ``k`` (by its tokens left) as density peaks of the
    tokens left, every token merged into its group's nearest peak (size-weighted mean: a temporal group counts its
    frames). Other rows: the density peaks of the row. ``inner_layer`` / ``inner_keep``: HoliTom's merging inside the
    LLM as a second stage (``_expand``). features: [batch, N, D]. Returns a ``Merged`` plan."""
    n, keeps, targets = inputs.num_tokens, [], []
    for row in range(inputs.batch):
        x = inputs.features[row]
        dist = distances(x)
        shape = video_rows(inputs, row)
        rep, parts = torch.arange(n, device=x.device), [(0, n)]
        if shape is not None:
            t, per = shape
            cuts_ = segments(x.view(t, per, -1), threshold, cuts)
            rep = temporal_groups(x.view(t, per, -1), cuts_, k, merge_threshold)
            parts = [(a * per, b * per) for a, b in cuts_]
        alive = rep == torch.arange(n, device=x.device)
        pools = [alive[a:b].nonzero().flatten() + a for a, b in parts]
        kept_t, target = merge_into_peaks(dist, pools, k, neighbours)
        target = target[rep]  # a temporally merged token goes where its group's representative goes
        keeps.append(kept_t)
        targets.append(target)
    return Merged(torch.stack(keeps), torch.stack(targets), rule="mean")
