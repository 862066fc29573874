"""Qwen2-VL and Qwen2.5-VL: native-resolution images merged 2x2 by the patch merger, M-RoPE positions."""
from __future__ import annotations

from .base import Adapter


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    position_kind = "mrope"

    def grids(self, call, counts):
        thw = call.get("image_grid_thw")
        if thw is None:
            return None
        merge = self.model.config.vision_config.spatial_merge_size
        sizes = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in thw.tolist()]
        out, i = [], 0
        for n in counts:
            # Images are laid out row after row; a row's single image gives its grid.
            if i < len(sizes) and sizes[i][0] * sizes[i][1] * sizes[i][2] == n and sizes[i][0] == 1:
                out.append(sizes[i][1:])
                i += 1
            else:
                out.append(None)
                while n > 0 and i < len(sizes):
                    n -= sizes[i][0] * sizes[i][1] * sizes[i][2]
                    i += 1
        return out


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
