"""Qwen2-VL and Qwen2.5-VL: native-resolution images merged 2x2 by the patch merger, M-RoPE positions."""
from __future__ import annotations

import copy

import torch

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

    def projector_module(self):
        return self.base.visual.merger

    def projector_fn(self):
        # The sensitivity is taken through the merger's MLP on the normalised, 2x2-grouped patch rows.
        return copy.deepcopy(self.base.visual.merger.mlp).float()

    def projector_rows(self, captured, call):
        merger = self.base.visual.merger
        rows = merger.ln_q(captured).view(-1, merger.hidden_size).float()
        return rows[self._merged_order(call, rows.device)]

    def _merged_order(self, call, device):
        return slice(None)  # Qwen2-VL merges patches already in raster order


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"

    def _merged_order(self, call, device):
        # Qwen2.5-VL's tower runs in window order and un-permutes after the merger; do the same here.
        from transformers.vision_utils import get_vision_window_index

        visual = self.base.visual
        window_index, _ = get_vision_window_index(call["image_grid_thw"], spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size,
                                                  kwargs={})
        return torch.argsort(window_index.to(device))
