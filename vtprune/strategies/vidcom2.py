"""VidCom2 (EMNLP 2025): a video's budget goes to its frames by how unique each frame is in the clip, then each frame
keeps its tokens that are most unique against both the frame and the whole clip. Embeddings only."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F

from .base import Range, ScoringShape, SelectionInputs, register, shares
from .video import video_rows


def frame_budgets(frames: torch.Tensor, k: int, per_frame: int, temperature: float) -> list[int]:
    """Each frame's share of ``k``: softmax over the frames of their uniqueness (1 - cosine of the frame's mean token
    to the clip's mean) / ``temperature``, by largest remainder, none above ``per_frame`` (the excess goes to the
    others by the same weights). frames: [T, P, D]. Returns T budgets summing to k."""
    means = F.normalize(frames.float().mean(1), dim=-1)  # [T, D]
    clip = F.normalize(frames.float().mean((0, 1)), dim=-1)
    weights = ((1.0 - (means * clip).sum(-1)) / temperature).softmax(0).tolist()
    budgets = [0] * len(weights)
    left, open_ = k, list(range(len(weights)))
    while left > 0:
        share = shares(left, [weights[t] for t in open_])
        full = []
        for t, s in zip(open_, share):
            take = min(s, per_frame - budgets[t])
            budgets[t] += take
            left -= take
            if budgets[t] == per_frame:
                full.append(t)
        open_ = [t for t in open_ if t not in full]
    return budgets


def token_uniqueness(frames: torch.Tensor) -> torch.Tensor:
    """Each token's distance to its frame's mean token plus its distance to the clip's (1 - cosine each): [T, P]."""
    x = F.normalize(frames.float(), dim=-1)  # [T, P, D]
    frame = F.normalize(frames.float().mean(1), dim=-1)  # [T, D]
    clip = F.normalize(frames.float().mean((0, 1)), dim=-1)  # [D]
    to_frame = torch.bmm(x, frame[:, :, None])[..., 0]  # [T, P]
    to_clip = (x.reshape(-1, x.shape[-1]) @ clip[:, None]).view(to_frame.shape)
    return (1.0 - to_frame) + (1.0 - to_clip)


def _flops(shape: ScoringShape, **_) -> int:
    # Every token's cosine to its frame's mean and to the clip's (the means are sums, not matmuls; the frames' T
    # cosines to the clip are negligible and elementwise).
    return 2 * 2 * shape.n * shape.d


@register(
    "vidcom2",
    needs=("grid",),
    flops=_flops,
    description="video: frames share the budget by uniqueness, then each keeps its most unique tokens",
)
def vidcom2_select(inputs: SelectionInputs, k: int, temperature: Annotated[float, Range(gt=0)] = 0.01) -> torch.Tensor:
    """VidCom2 on each row that is an unpruned video grid (``frames`` > 1, N = frames * h * w): ``frame_budgets``,
    then in each frame the ``token_uniqueness`` top (ties to the earlier token). Rows that are one frame or not a grid
    keep the tokens most unique against their own mean. features: [batch, N, D]. Returns [batch, k]."""
    out = []
    for row in range(inputs.batch):
        x = inputs.features[row]
        shape = video_rows(inputs, row)
        if shape is None:
            score = token_uniqueness(x[None])[0]
            out.append(torch.sort(score, descending=True, stable=True).indices[:k].sort().values)
            continue
        t, per = shape
        frames = x.view(t, per, -1)
        budgets = frame_budgets(frames, k, per, temperature)
        score = token_uniqueness(frames)
        picks = [
            torch.sort(score[f], descending=True, stable=True).indices[:b] + f * per for f, b in enumerate(budgets) if b
        ]
        out.append(torch.cat(picks).sort().values)
    return torch.stack(out)
