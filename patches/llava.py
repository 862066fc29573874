"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a fixed square grid of CLIP patches per image."""

from __future__ import annotations

import functools

import torch

from .base import TINY_IDS, Adapter, Cost, Family, Tiny, Unit, tiny_text_config

_PAD_TOLERANCE = 0.02  # normalised units; the pad colour is the (rounded) image mean, so it maps to ~0
_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


class ClipCost(Cost):
    """What LLaVA-1.5 and LLaVA-NeXT share: a CLIP tower over each image or crop, a two-layer projector."""

    tower_cls_tokens = 1  # tokens the tower runs besides the patches (CLIP's CLS; SigLIP has none)

    @classmethod
    def crops(cls, config, pixel_values, image_sizes, **extra) -> tuple[int, int, int]:
        """(crops run through the tower, crop height, crop width) for pixel_values [n, 3, H, W]."""
        if pixel_values is None:
            return 0, 0, 0
        shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else tuple(pixel_values)
        return shape[0], shape[-2], shape[-1]

    @classmethod
    def vision_flops(cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, **extra) -> int:
        """CLIP runs every layer (even when vision_feature_layer picks an earlier one) over patches + CLS, once
        per image or crop: conv patch embed, q/k/v/o, QKᵀ and AV, fc1 and fc2."""
        n, height, width = cls.crops(config, pixel_values, image_sizes, **extra)
        if n == 0:
            return 0
        vc = config.vision_config
        e, p = vc.hidden_size, vc.patch_size
        patches = (height // p) * (width // p)
        conv = 2 * patches * vc.num_channels * p * p * e
        return n * (conv + vc.num_hidden_layers * cls.tower_layer_flops(config, patches + cls.tower_cls_tokens))

    @classmethod
    def tower_capture_flops(cls, config, layer: int, pixel_values=None, image_sizes=None, **extra) -> int:
        n, height, width = cls.crops(config, pixel_values, image_sizes, **extra)
        if n == 0:
            return 0
        e, p = config.vision_config.hidden_size, config.vision_config.patch_size
        tokens = (height // p) * (width // p) + cls.tower_cls_tokens
        return n * 2 * e * tokens * (1 if cls.tower_cls_tokens else tokens)

    @classmethod
    def tower_layer_flops(cls, config, tokens: int) -> int:
        """One tower layer on ``tokens`` tokens of one image: q/k/v/o, QKᵀ and AV, fc1 and fc2."""
        vc = config.vision_config
        e = vc.hidden_size
        return 2 * tokens * e * 4 * e + 4 * tokens * tokens * e + 2 * 2 * tokens * e * vc.intermediate_size

    @classmethod
    def projector_dims(cls, config) -> tuple:
        layers = config.vision_feature_layer
        d_in = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
        d = config.get_text_config().hidden_size
        return d_in, d, d

    @classmethod
    def projector_rows_run(cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, **extra) -> int:
        # Every crop's tower tokens ("default" drops the first: CLIP's CLS), before LLaVA-NeXT unpads.
        n, height, width = cls.crops(config, pixel_values, image_sizes, **extra)
        if n == 0:
            return 0
        p = config.vision_config.patch_size
        dropped = 1 if config.vision_feature_select_strategy == "default" else 0
        return n * ((height // p) * (width // p) + cls.tower_cls_tokens - dropped)


class LlavaTiny(Tiny):
    @classmethod
    def model_class(cls):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def _config_class(cls):
        from transformers import LlavaConfig

        return LlavaConfig

    @classmethod
    def config(cls, num_layers: int = 4):
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
            projection_dim=32,
        )
        text = dict(model_type="llama", **tiny_text_config(num_hidden_layers=num_layers))
        return cls._config_class()(
            vision_config=vision,
            text_config=text,
            image_token_id=TINY_IDS["<image>"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            **cls._extra(),
        )

    @classmethod
    def _extra(cls) -> dict:
        return {}

    @classmethod
    def processor(cls, tokenizer):
        from transformers import LlavaImageProcessorPil, LlavaProcessor

        ip = LlavaImageProcessorPil(
            size={"height": 28, "width": 28},
            crop_size={"height": 28, "width": 28},
            do_pad=True,
            do_center_crop=False,
            **_NORM,
        )
        return LlavaProcessor(
            image_processor=ip,
            tokenizer=tokenizer,
            patch_size=7,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
        )


class TowerAccess:
    """The tower accessors of the LLaVA families: a CLIP (or SigLIP) encoder whose layer's output is the features."""

    tower_scores = True

    @property
    def tower_layers(self):
        tower = self.body.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # transformers 5 flattened CLIPVisionModel

    @property
    def tower_feature_layer(self) -> int:
        # hidden_states[0] is the embeddings: entry i is the output of layer i - 1
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise NotImplementedError("a vision-tower stage needs one vision_feature_layer, got a list")
        return (layer if layer >= 0 else len(self.tower_layers) + 1 + layer) - 1

    @property
    def tower_prefix_tokens(self) -> int:
        tower = self.body.vision_tower
        embeddings = getattr(tower, "vision_model", tower).embeddings
        return 1 if hasattr(embeddings, "class_embedding") else 0  # CLIP's [CLS]; SigLIP has none


class LlavaAdapter(TowerAccess, Adapter):
    """LLaVA-1.5: a fixed square grid of CLIP patches per image."""

    family = "llava"

    @property
    def tower_refusal(self) -> str | None:
        if self.model.config.vision_feature_select_strategy != "default":
            return "its feature strategy places the tower's [CLS] in the prompt, which a tower stage would drop"
        return None

    @property
    def tower_grid(self) -> tuple[int, int]:
        return self.side, self.side

    def encode_images(self, kwargs):
        return {"image": self.body.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True)}

    @functools.cached_property
    def side(self) -> int:  # read on every prefill; the tower's geometry does not change under a patch
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def units(self, call, vis):
        """Every image is side² tokens in a side × side grid (several images may sit back to back)."""
        per = self.side**2
        out = []
        for n in vis.sum(1).tolist():
            out.append(
                [Unit("image", per, (1, self.side, self.side))] * (n // per) if n % per == 0 else [Unit("image", n)]
            )
        return out

    def encoded_rows(self, kwargs):
        encoded = kwargs.get("mm_encoder_outputs") or {}
        image = encoded.get("image")
        if (
            image is None
            or kwargs.get("pixel_values") is not None
            or any(v is not None for k, v in encoded.items() if k != "image")
        ):
            return None
        feats = image.pooler_output
        if torch.is_tensor(feats):
            return feats.reshape(-1, feats.shape[-1])
        return feats[0] if len(feats) == 1 else torch.cat(list(feats))  # one image: a view, no copy

    def with_encoded_rows(self, encoded, rows):
        image = encoded["image"]
        return {"image": type(image)(**{**image, "pooler_output": [rows]})}

    def restore_encoded(self, output, encoded):
        if hasattr(output, "image_outputs"):
            output.image_outputs = encoded.get("image")
        return output

    def pad_mask(self, call, vis):
        """Patches more than half covered by the border that pad-to-square adds.

        The border is found from the pixels and its geometry: full-width rows (or full-height columns) of the pad
        colour (the normalised image mean, ~0) running in from BOTH opposite edges with about equal widths, on one
        axis only, as pad-to-square centres the image. A band of that colour on one side, or on all four, is
        image content and is kept. Needs one image per visual span of side² tokens.
        """
        pixels = call.get("pixel_values")
        if pixels is None or pixels.dim() != 4 or int(vis.sum()) != pixels.shape[0] * self.side**2:
            return None
        is_pad = (pixels.abs() < _PAD_TOLERANCE).all(dim=1)  # [n_img, H, W]
        rows, cols = _symmetric_bands(is_pad.all(dim=2)), _symmetric_bands(is_pad.all(dim=1))  # [n, H], [n, W]
        both = rows.any(1) & cols.any(1)  # bands on all four sides: not what pad-to-square makes
        rows, cols = rows & ~both[:, None], cols & ~both[:, None]
        patch = pixels.shape[-1] // self.side
        frac_r = rows.float().view(rows.shape[0], self.side, patch).mean(-1)  # [n_img, side]
        frac_c = cols.float().view(cols.shape[0], self.side, patch).mean(-1)
        covered = 1 - (1 - frac_r[:, :, None]) * (1 - frac_c[:, None, :])  # area share in padding
        out = torch.zeros_like(vis)
        out[vis] = (covered > 0.5).flatten().to(vis.device)
        return out


def _symmetric_bands(line_pad: torch.Tensor) -> torch.Tensor:
    """[n, M] bool -> [n, M] bool: the runs of True touching each end, kept only where both ends have one and their
    lengths agree within resizing slack (2 lines or 15 %)."""
    from_start = line_pad.long().cumprod(dim=1)
    from_end = line_pad.flip(1).long().cumprod(dim=1).flip(1)
    a, b = from_start.sum(1), from_end.sum(1)
    full = a == line_pad.shape[1]  # a constant image: no content to centre
    symmetric = (a > 0) & (b > 0) & ((a - b).abs() <= torch.clamp_min(0.15 * torch.maximum(a, b), 2)) & ~full
    return (from_start.bool() | from_end.bool()) & symmetric[:, None]


LLAVA = Family("llava", ("llava",), LlavaAdapter, ClipCost, LlavaTiny)
