"""FastVID (NeurIPS 2025): cut the clip into segments of similar frames, then in each segment keep the density peaks of
its tokens (across its frames: spatio-temporal) and merge every other token into its nearest peak."""

from __future__ import annotations

from typing import Annotated

import torch

from .base import Merged, Range, ScoringShape, SelectionInputs, register
from .video import distances, merge_into_peaks, segments, video_rows


def _flops(shape: ScoringShape, **_) -> int:
    # One Gram matrix of the clip's tokens gives every distance the segments' density peaks and merges read.
    return 2 * shape.n * shape.n * shape.d


@register(
    "fastvid",
    needs=("grid",),
    merges=True,
    flops=_flops,
    description="video: segments of similar frames, density peaks kept in each, the rest merged into them",
)
def fastvid_select(
    inputs: SelectionInputs,
    k: int,
    threshold: Annotated[float, Range(ge=-1, le=1)] = 0.9,
    cuts: Annotated[int, Range(ge=0)] = 7,
    neighbours: Annotated[int, Range(ge=1)] = 5,
) -> Merged:
    """FastVID on each row that is an unpruned video grid (``frames`` > 1): ``segments`` (``threshold``, ``cuts`` + 1
    segments at least), each segment's share of ``k`` by its tokens, its ``density_peaks`` kept and its other tokens
    merged into the nearest one (size-weighted mean). Other rows: the density peaks of the row.
    features: [batch, N, D]. Returns a ``Merged`` plan (rule "mean")."""
    n, keeps, targets = inputs.num_tokens, [], []
    for row in range(inputs.batch):
        x = inputs.features[row]
        dist = distances(x)
        shape = video_rows(inputs, row)
        parts = [(0, n)]
        if shape is not None:
            t, per = shape
            parts = [(a * per, b * per) for a, b in segments(x.view(t, per, -1), threshold, cuts)]
        pools = [torch.arange(start, end, device=x.device) for start, end in parts]
        kept, target = merge_into_peaks(dist, pools, k, neighbours)
        keeps.append(kept)
        targets.append(target)
    return Merged(torch.stack(keeps), torch.stack(targets), rule="mean")
