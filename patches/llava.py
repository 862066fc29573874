"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a fixed square grid of CLIP patches per image."""
from __future__ import annotations

import torch

from .base import Adapter

_PAD_TOLERANCE = 0.02  # normalised units; the pad colour is the (rounded) image mean, so it maps to ~0


class LlavaAdapter(Adapter):
    family = "llava"

    @property
    def side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def grids(self, call, counts):
        # Rows with several images (or none) have no single grid.
        return [(self.side, self.side) if n == self.side ** 2 else None for n in counts]

    def pad_mask(self, call, vis):
        """Patches more than half covered by the constant border that pad-to-square adds.

        The border is found from the pixels: whole rows/columns, from each edge inwards, whose every channel
        equals the pad colour (the normalised image mean, ~0). Needs one image per visual span of side² tokens.
        """
        pixels = call.get("pixel_values")
        if pixels is None or pixels.dim() != 4 or int(vis.sum()) != pixels.shape[0] * self.side ** 2:
            return None
        is_pad = (pixels.abs() < _PAD_TOLERANCE).all(dim=1)  # [n_img, H, W]
        rows, cols = _edge_runs(is_pad.all(dim=2)), _edge_runs(is_pad.all(dim=1))  # [n_img, H], [n_img, W]
        patch = pixels.shape[-1] // self.side
        frac_r = rows.float().view(rows.shape[0], self.side, patch).mean(-1)  # [n_img, side]
        frac_c = cols.float().view(cols.shape[0], self.side, patch).mean(-1)
        covered = 1 - (1 - frac_r[:, :, None]) * (1 - frac_c[:, None, :])  # area share in padding
        out = torch.zeros_like(vis)
        out[vis] = (covered > 0.5).flatten().to(vis.device)
        return out


def _edge_runs(line_pad: torch.Tensor) -> torch.Tensor:
    """[n, M] bool -> [n, M] bool keeping only the runs of True touching either end."""
    from_start = line_pad.long().cumprod(dim=1).bool()
    from_end = line_pad.flip(1).long().cumprod(dim=1).bool().flip(1)
    return from_start | from_end
