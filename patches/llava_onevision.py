"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres crops, unpadding and newline
tokens, with a SigLIP tower (no CLS token, select strategy "full"), a Qwen2 decoder, the ``anyres_max_N`` cap
(unpadded features bilinearly downscaled when an image has more than ~N crops' worth) and a video path (frames
pooled 2x per side, one newline after the whole video). A sample with several images runs each as its base crop
only (``batch_num_images``)."""

from __future__ import annotations

import math

import torch

from .base import TINY_IDS, Adapter, Family, Tiny, Unit, as_rows, tiny_text_config
from .llava import _NORM
from .llava_next import LlavaNextAdapter, LlavaNextCost

_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]  # the tiny test model's anyres grid


def crop_counts(config, image_sizes, batch_num_images=None) -> list[int]:
    """Crops the tower runs per image: anyres crops + base for a sample's only image, the base crop alone for each
    image of a multi-image sample (as the model decides it)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    sizes = as_rows(image_sizes)
    single = [True] * len(sizes)
    if batch_num_images is not None:
        per_sample = torch.as_tensor(batch_num_images).flatten().tolist()
        single = [n == 1 for n in per_sample for _ in range(n)]
    return [
        image_size_to_num_patches(list(s), config.image_grid_pinpoints, config.vision_config.image_size) if one else 1
        for s, one in zip(sizes, single)
    ]


class LlavaOnevisionCost(LlavaNextCost):
    tower_cls_tokens = 0  # SigLIP: patches only

    @classmethod
    def crops(cls, config, pixel_values, image_sizes, batch_num_images=None, pixel_values_videos=None, **extra):
        """(images' crops + video frames, crop height, crop width): the tower runs each once."""
        n, height, width = 0, 0, 0
        if pixel_values is not None:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else tuple(pixel_values)
            n = shape[0] * shape[1] if image_sizes is None else sum(crop_counts(config, image_sizes, batch_num_images))
            height, width = shape[-2:]
        if pixel_values_videos is not None:  # [videos, frames, 3, H, W]
            shape = (
                tuple(pixel_values_videos.shape) if torch.is_tensor(pixel_values_videos) else tuple(pixel_values_videos)
            )
            n, height, width = n + shape[0] * shape[1], shape[-2], shape[-1]
        return n, height, width

    @classmethod
    def vision_flops(cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, **extra) -> int:
        """The CLIP-style count (SigLIP: patches only), plus SigLIP's attention-pooling head where the config
        enables it: it runs on every crop although OneVision never reads its output."""
        flops = super().vision_flops(config, pixel_values, image_grid_thw, image_sizes, **extra)
        vc = config.vision_config
        if pixel_values is None or not getattr(vc, "vision_use_head", False):
            return flops
        n, height, width = cls.crops(config, pixel_values, image_sizes, **extra)
        t, e = (height // vc.patch_size) * (width // vc.patch_size), vc.hidden_size
        # One probe query: q and out projections on 1 row, k/v on t rows, QKᵀ and AV, the MLP on 1 row.
        head = 2 * e * e * 2 + 2 * t * e * e * 2 + 2 * 2 * t * e + 2 * 2 * e * vc.intermediate_size
        return flops + n * head


class LlavaOnevisionTiny(Tiny):
    prompt_tag = "<image>"
    video_tag = "<video>"

    @classmethod
    def model_class(cls):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    @classmethod
    def config(cls, num_layers: int = 4, **over):
        from transformers import LlavaOnevisionConfig

        vision = dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            vision_use_head=False,
        )
        text = dict(model_type="qwen2", **tiny_text_config(num_hidden_layers=num_layers))
        settings = dict(
            vision_config=vision,
            text_config=text,
            image_token_id=TINY_IDS["<image>"],
            video_token_id=TINY_IDS["<video>"],
            image_grid_pinpoints=_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        return LlavaOnevisionConfig(**{**settings, **over})

    @classmethod
    def processor(cls, tokenizer, vision_aspect_ratio: str = "anyres_max_9"):
        from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

        ip = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=_PINPOINTS, **_NORM)
        vp = LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28}, **_NORM)
        return LlavaOnevisionProcessor(
            image_processor=ip,
            video_processor=vp,
            tokenizer=tokenizer,
            num_image_tokens=16,
            vision_feature_select_strategy="full",
            image_token="<image>",
            video_token="<video>",
            vision_aspect_ratio=vision_aspect_ratio,
        )


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"

    def _image_lengths(self, call) -> list[int]:
        """Tokens of each image of the batch as the model packs them (newlines included), in order."""
        cfg, sizes = self.model.config, call["image_sizes"]
        crops = crop_counts(cfg, sizes, call.get("batch_num_images"))
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        shapes = [torch.zeros(c, side * side, 1) for c in crops]  # only the packed shapes are wanted
        packed, lengths = self.body.pack_image_features(
            shapes, sizes, image_newline=torch.zeros(1), vision_aspect_ratio=cfg.vision_aspect_ratio
        )
        return lengths.tolist()

    def _video_units(self, call) -> list:
        """Each video: a grid of frames x the pooled side x side tokens, then one newline."""
        videos = call["pixel_values_videos"]
        side = math.ceil(self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size / 2)
        return [Unit("video", videos.shape[1] * side * side + 1, (videos.shape[1], side, side), tail=1)] * videos.shape[
            0
        ]

    def units(self, call, vis):
        """One unit per image and per video, in sequence order. Adjacent placeholders of one kind (two images in a
        row) are split by the lengths the model packs them to. Images have newline tokens, so no grid; a video is
        its frames' pooled grid followed by one newline (the unit's tail)."""
        queues = {
            "image": [Unit("image", n) for n in self._image_lengths(call)]
            if call.get("image_sizes") is not None
            else [],
            "video": self._video_units(call) if call.get("pixel_values_videos") is not None else [],
        }
        out = []
        for row in Adapter.units(self, call, vis):  # runs of one kind (not NeXT's packing), maybe several images
            units = []
            for run in row:
                left = run.length
                while left > 0 and queues[run.kind]:
                    units.append(queues[run.kind].pop(0))
                    left -= units[-1].length
            out.append(units)
        return out

    def projector_rows(self, captured, call):
        """{kind: projector inputs in token order, newlines left out}. The model runs its projector on the
        images' crops first, then on the videos' frames. Images: base crop first, then the anyres crops unpadded;
        videos: each frame's grid. Unpadding only selects, so those rows are exact; where the model interpolates its
        projector output (the anyres_max downscale, the 2x video pooling) the inputs are interpolated the same
        way, which approximates (the projector is not linear) what each token was made from."""
        cfg, out, runs = self.model.config, {}, list(captured)
        if call.get("pixel_values") is not None and call.get("image_sizes") is not None:
            rows = runs.pop(0)
            crops = crop_counts(cfg, call["image_sizes"], call.get("batch_num_images"))
            packed, _ = self.body.pack_image_features(
                list(torch.split(rows, crops, dim=0)),
                call["image_sizes"],
                image_newline=None,
                vision_aspect_ratio=cfg.vision_aspect_ratio,
            )
            out["image"] = torch.cat(packed).float()
        if call.get("pixel_values_videos") is not None and runs:
            pooled = self.body.apply_pooling(runs.pop(0))  # [videos * frames, pooled grid, Din]
            out["video"] = pooled.reshape(-1, pooled.shape[-1]).float()
        return out


LLAVA_ONEVISION = Family(
    "llava_onevision", ("llava_onevision",), LlavaOnevisionAdapter, LlavaOnevisionCost, LlavaOnevisionTiny
)
