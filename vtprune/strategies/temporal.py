"""Temporal redundancy (as efficient video sampling does): keep the video tokens that changed most since the same
position in the previous frame; the first frame counts as all new."""

from __future__ import annotations

import torch

from .base import SelectionInputs, register
from .baselines import grid_subsample, spread


def temporal_change(features: torch.Tensor, frames: int) -> torch.Tensor:
    """Dissimilarity of each token to the token at its position one frame earlier.

    features: [batch, N, D] with N = frames * P (frame-major, the same P positions in every frame).
    Returns [batch, N] float32: 1 - cos(x_t[p], x_{t-1}[p]) for t >= 1, +inf on the first frame.
    """
    b, n, d = features.shape
    x = torch.nn.functional.normalize(features.float().view(b, frames, n // frames, d), dim=-1)
    change = 1.0 - (x[:, 1:] * x[:, :-1]).sum(-1)  # [b, frames-1, P]
    first = torch.full_like(change[:, :1], float("inf"))
    return torch.cat([first, change], dim=1).reshape(b, n)


@register(
    "temporal",
    needs=("grid",),
    flops=lambda s, **_: 2 * s.n * s.d,
    description="video: drop tokens nearly unchanged from the previous frame (first frame kept first)",
)
def temporal_select(inputs: SelectionInputs, k: int) -> torch.Tensor:
    """The ``k`` tokens that changed most since the previous frame. Returns [batch, k] (ascending).

    Rows that are an unpruned video grid (``frames`` > 1, N = frames * h * w) rank by ``temporal_change`` (ties
    to the earlier token, so the first frame is kept first); when ``k`` is not more than one frame's h * w, the
    first frame is thinned uniformly over its grid instead (in raster order the kept tokens would all be its top
    rows). Other rows (images, or tokens already pruned) have no previous frame to compare with and fall back to
    uniform spatial subsampling.
    """
    n = inputs.num_tokens
    out = []
    for row in range(inputs.batch):
        hw = inputs.grid[row] if inputs.grid is not None else None
        t = inputs.frames[row] if inputs.frames is not None else 1
        if hw is None or t * hw[0] * hw[1] != n:
            out.append(spread(k, n, inputs.features.device))
        elif t > 1 and k > hw[0] * hw[1]:
            score = temporal_change(inputs.features[row : row + 1], t)[0]
            out.append(torch.sort(score, descending=True, stable=True).indices[:k].sort().values)
        else:  # one frame, or a budget within the first frame
            out.append(grid_subsample(hw[0], hw[1], k).to(inputs.features.device))
    return torch.stack(out)
