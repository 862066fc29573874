"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a fixed square grid of CLIP patches per image."""
from __future__ import annotations

from .base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"

    def grids(self, call, counts):
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        # Rows with several images (or none) have no single grid.
        return [(side, side) if n == side * side else None for n in counts]
