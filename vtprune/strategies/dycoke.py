"""DyCoke (CVPR 2025), its first part: temporal token merging before the LLM. The clip is taken in windows of four
frames; in each, the second and fourth frames lose the tokens most similar to the same position one frame earlier,
and the third the tokens most similar to the window's first frame, which stays whole. (Its second part, pruning the
KV cache at every decoding step, is the engine's decode stage: ``decode_keep_ratio`` / ``decode_layer``.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SelectionInputs, register, shares
from .baselines import spread
from .video import video_rows

WINDOW = 4


def references(frames: int) -> dict[int, int]:
    """{pruned frame: the frame it is compared with}: in each window of four frames w..w+3, w+1 and w+3 against the
    frame before, w+2 against w (the window's first, never pruned). A last, shorter window keeps what it has."""
    out = {}
    for w in range(0, frames, WINDOW):
        for f, ref in ((w + 1, w), (w + 2, w), (w + 3, w + 2)):
            if f < frames:
                out[f] = ref
    return out


def frame_picks(frames: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Each frame's kept positions (ascending) for ``k`` tokens of a clip frames [T, P, D]: the windows' first frames
    whole, the others sharing the rest equally (largest remainder, earlier frames first), each keeping its positions
    least similar (cosine) to its reference frame's, ties to the earlier position. Under the first frames' total
    (beyond DyCoke, which never thins them), the first frames share k the same way on a uniform raster subsample and
    the others keep nothing."""
    t, p, _ = frames.shape
    refs = references(t)
    firsts = [f for f in range(t) if f not in refs]
    x = F.normalize(frames.float(), dim=-1)
    whole = torch.arange(p, device=frames.device)
    if k < len(firsts) * p:
        picks = [whole[:0]] * t
        for f, m in zip(firsts, shares(k, [1.0] * len(firsts))):
            picks[f] = spread(m, p, frames.device)
        return picks
    picks = [whole] * t
    pruned = sorted(refs)
    for f, m in zip(pruned, shares(k - len(firsts) * p, [1.0] * len(pruned))):
        similarity = (x[f] * x[refs[f]]).sum(-1)  # [P]
        picks[f] = torch.sort(similarity, stable=True).indices[:m].sort().values
    return picks


@register(
    "dycoke",
    needs=("grid",),  # its one cosine per token is elementwise: no scoring FLOPs declared, as FlopCounterMode counts
    decode=(0.3, None),  # DyCoke's dynamic pruning: each step attends to 30 % of the visual tokens from layer 3 on
    description="video: in windows of 4 frames, tokens like the previous frame's dropped (+ KV pruning while decoding)",
)
def dycoke_select(inputs: SelectionInputs, k: int) -> torch.Tensor:
    """DyCoke's temporal merging on each row that is an unpruned video grid (``frames`` > 1): ``frame_picks``. Other
    rows (an image, or tokens already pruned) have no frames to compare and keep a uniform subsample.
    features: [batch, N, D]. Returns [batch, k] ascending."""
    n, out = inputs.num_tokens, []
    for row in range(inputs.batch):
        shape = video_rows(inputs, row)
        if shape is None:
            out.append(spread(k, n, inputs.features.device))
            continue
        t, per = shape
        picks = frame_picks(inputs.features[row].view(t, per, -1), k)
        out.append(torch.cat([pick + f * per for f, pick in enumerate(picks)]))
    return torch.stack(out)
