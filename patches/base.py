"""What the engine needs to know about a model family. Adapters only locate tensors; they decide nothing."""
from __future__ import annotations

from typing import Optional

import torch


class Adapter:
    """Locates the language model, its layers and the visual tokens of one model instance.

    Subclasses set ``family`` and ``position_kind`` ("1d" for [B, L] ids, "mrope" for Qwen's [3, B, L]) and
    may override ``grids`` and ``pad_mask``.
    """

    family = "base"
    position_kind = "1d"

    def __init__(self, model):
        self.model = model

    @property
    def base(self):
        """The multimodal body (``LlavaModel``, ``Qwen2_5_VLModel``...) whose forward merges image features."""
        return self.model.model

    @property
    def language_model(self):
        return self.base.language_model

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: positions holding image tokens."""
        return input_ids == self.image_token_id

    def grids(self, call: dict, counts: list[int]) -> Optional[list]:
        """One (height, width) per row for its visual tokens in raster order, or None where unknown."""
        return None

    def pad_mask(self, call: dict, vis: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, N] bool of mostly-padding patches, or None when the family does not pad images."""
        return None

    def default_positions(self, batch: int, length: int, offset: int, device) -> torch.Tensor:
        """The position ids the language model builds itself when given none."""
        pos = torch.arange(offset, offset + length, device=device).unsqueeze(0).expand(batch, -1)
        return pos if self.position_kind == "1d" else pos.unsqueeze(0).expand(3, -1, -1)
