"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops unpadded and packed with newline tokens,
so rows of a batch can hold different numbers of visual tokens. The span has no single raster grid."""
from __future__ import annotations

import torch

from .base import Adapter


class LlavaNextAdapter(Adapter):
    family = "llava_next"

    def newline_mask(self, embeds, vis):
        newline = self.base.image_newline.to(embeds.dtype)
        return (embeds == newline).all(dim=-1) & vis

    def projector_rows(self, captured, call):
        """Reorder the projector input (all crops of all images) into the packed, unpadded token order, with
        newline slots removed, by packing an index tensor the way the model packs features."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        sizes = call["image_sizes"]
        crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=cfg.vision_config.image_size) for s in sizes]
        idx = torch.arange(captured.shape[0] * captured.shape[1], device=captured.device, dtype=torch.float64)
        idx = idx.view(captured.shape[0], captured.shape[1], 1)
        packed, _ = self.base.pack_image_features(list(torch.split(idx, crops, dim=0)), sizes,
                                                  cfg.vision_feature_select_strategy, image_newline=None)
        order = torch.cat(packed).flatten().long()
        return captured.reshape(-1, captured.shape[-1])[order].float()
