"""What the engine needs to know about a model family. Adapters only locate tensors; they decide nothing."""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch


class Adapter:
    """Locates the language model, its layers, the visual tokens and the projector of one model instance.

    Subclasses set ``family`` and ``position_kind`` ("1d" for [B, L] ids, "mrope" for Qwen's [3, B, L]) and
    override what their family has: ``grids``, ``pad_mask``, ``newline_mask``, the projector accessors.
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
        """[B, L] bool, True at visual tokens that are mostly image padding; None if the family has none."""
        return None

    def newline_mask(self, embeds: torch.Tensor, vis: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, L] bool, True at row-separator tokens inside the image span; None if the family has none."""
        return None

    def default_positions(self, batch: int, length: int, offset: int, device) -> torch.Tensor:
        """The position ids the language model builds itself when given none."""
        pos = torch.arange(offset, offset + length, device=device).unsqueeze(0).expand(batch, -1)
        return pos if self.position_kind == "1d" else pos.unsqueeze(0).expand(3, -1, -1)

    # Projector access for sensitivity methods (ZOO): the module whose input is captured, and how a captured
    # input becomes [visual tokens of the batch in placement order, Din] rows for a float32 projector copy.
    def projector_module(self) -> torch.nn.Module:
        return self.base.multi_modal_projector

    def projector_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A float32 copy of the projector mapping [..., Din] -> [..., D] (finite differences need float32)."""
        return copy.deepcopy(self.projector_module()).float()

    def projector_rows(self, captured: torch.Tensor, call: dict) -> torch.Tensor:
        return captured.reshape(-1, captured.shape[-1]).float()
