"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops unpadded and packed with newline tokens,
so rows of a batch can hold different numbers of visual tokens. The span has no single raster grid."""

from __future__ import annotations

import torch

from .base import Adapter, Family, Unit, as_rows
from .llava import _NORM, ClipCost, LlavaTiny, TowerAccess

_PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # the tiny test model's anyres grid


class LlavaNextCost(ClipCost):
    @classmethod
    def crops(cls, config, pixel_values, image_sizes, **extra):
        """pixel_values [n, max_crops, 3, H, W] is padded; the real crop count per image comes from image_sizes."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if pixel_values is None:
            return 0, 0, 0
        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else tuple(pixel_values)
        if image_sizes is None:
            return shape[0] * shape[1], shape[-2], shape[-1]
        n = sum(
            image_size_to_num_patches(list(s), config.image_grid_pinpoints, config.vision_config.image_size)
            for s in as_rows(image_sizes)
        )
        return n, shape[-2], shape[-1]


class LlavaNextTiny(LlavaTiny):
    @classmethod
    def model_class(cls):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def _config_class(cls):
        from transformers import LlavaNextConfig

        return LlavaNextConfig

    @classmethod
    def _extra(cls) -> dict:
        return dict(image_grid_pinpoints=_PINPOINTS)

    @classmethod
    def processor(cls, tokenizer):
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": 28},
            crop_size={"height": 28, "width": 28},
            image_grid_pinpoints=_PINPOINTS,
            do_center_crop=False,
            **_NORM,
        )
        return LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tokenizer,
            patch_size=7,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
        )


class LlavaNextAdapter(TowerAccess, Adapter):
    family = "llava_next"
    tower_refusal = (
        "its anyres crops are unpadded and packed with newline tokens after the tower "
        "(pack_image_features), which needs every crop's whole grid"
    )

    def newline_mask(self, embeds, vis):
        newline = self.body.image_newline.to(embeds.dtype)
        return (embeds == newline).all(dim=-1) & vis

    def _packed_index(self, patches: int, sizes, newline):
        """Pack an index tensor [crops, patches, 1] the way the model packs features: per image, the (unpadded)
        order of the crop patches, with -1 at newline slots when ``newline``. Only real crops count (the model
        drops the padded crop slots of pixel_values before its tower)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        crops = [
            image_size_to_num_patches(
                image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )
            for s in as_rows(sizes)
        ]
        idx = torch.arange(sum(crops) * patches, dtype=torch.float64).view(sum(crops), patches, 1)
        line = torch.full((1,), -1.0, dtype=torch.float64) if newline else None
        packed, _ = self.body.pack_image_features(
            list(torch.split(idx, crops, dim=0)), sizes, cfg.vision_feature_select_strategy, image_newline=line
        )
        return packed

    def units(self, call, vis):
        """One unit per image, its length as the model packs it (unpadded crops + a newline per row)."""
        pixels, sizes = call.get("pixel_values"), call.get("image_sizes")
        if pixels is None or sizes is None:
            return super().units(call, vis)
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        lengths = [p.shape[0] for p in self._packed_index(side * side, sizes, newline=True)]
        out, i = [], 0
        for n in vis.sum(1).tolist():
            units = []
            while n > 0 and i < len(lengths):
                units.append(Unit("image", lengths[i]))
                n, i = n - lengths[i], i + 1
            out.append(units)
        return out

    def projector_rows(self, captured, call):
        """Reorder the projector input (all crops of all images) into the packed, unpadded token order, with
        newline slots removed."""
        rows = captured[-1]
        packed = self._packed_index(rows.shape[1], call["image_sizes"], newline=False)
        order = torch.cat(packed).flatten().long().to(rows.device)
        return {"image": rows.reshape(-1, rows.shape[-1])[order].float()}


LLAVA_NEXT = Family("llava_next", ("llava_next",), LlavaNextAdapter, LlavaNextCost, LlavaNextTiny)
