"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops unpadded and packed with newline tokens,
so rows of a batch can hold different numbers of visual tokens. The span has no single raster grid."""
from __future__ import annotations

import torch

from .base import as_rows
from .llava import _NORM, ClipLlamaFamily

_PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # the tiny test model's anyres grid


class LlavaNextAdapter(ClipLlamaFamily):
    family = "llava_next"
    model_types = ("llava_next",)

    @classmethod
    def crops(cls, config, pixel_values, image_sizes, **extra):
        """pixel_values [n, max_crops, 3, H, W] is padded; the real crop count per image comes from image_sizes."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else tuple(pixel_values)
        if image_sizes is None:
            return shape[0] * shape[1], shape[-2], shape[-1]
        n = sum(image_size_to_num_patches(list(s), config.image_grid_pinpoints, config.vision_config.image_size)
                for s in as_rows(image_sizes))
        return n, shape[-2], shape[-1]

    @classmethod
    def model_class(cls):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def _config_class(cls):
        from transformers import LlavaNextConfig

        return LlavaNextConfig

    @classmethod
    def _tiny_extra(cls) -> dict:
        return dict(image_grid_pinpoints=_PINPOINTS)

    @classmethod
    def tiny_processor(cls, tokenizer):
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=_PINPOINTS, do_center_crop=False, **_NORM)
        return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=7,
                                  vision_feature_select_strategy="default", image_token="<image>",
                                  num_additional_image_tokens=1)

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
