"""What the engine needs to know about a model family. Adapters only locate tensors; they decide nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# What the engine reads from a model call to locate and describe the visual inputs.
CALL_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw")


@dataclass(frozen=True)
class Unit:
    """One image or one video of a sample, as it sits in the sequence: a contiguous run of ``length`` visual
    tokens (newline tokens included). ``grid`` = (t, h, w) when the tokens are one raster grid of t frames of
    h × w (after the family's merging), else None (e.g. anyres crops with newlines)."""

    kind: str  # "image" or "video"
    length: int
    grid: Optional[tuple] = None

    @property
    def frames(self) -> int:
        return self.grid[0] if self.grid is not None else 1


# The word-level vocabulary of the tiny test models (vtprune.testing): the special tokens come first so the
# families' tiny configs can name their ids.
TINY_VOCAB = ["<pad>", "<unk>", "<s>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
              "<|vision_end|>", "USER:", "ASSISTANT:", "what", "colour", "shape", "is", "the", "red", "blue",
              "green", "circle", "square", "left", "right", "?", "a", "b", "c", "d", "e", "f", "g", "h"]
TINY_IDS = {w: i for i, w in enumerate(TINY_VOCAB)}


def tiny_text_config(**over) -> dict:
    """The decoder of every tiny test model: 4 layers, hidden 32, grouped-query attention."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                eos_token_id=1, tie_word_embeddings=False)
    base.update(over)
    return base


def as_rows(x) -> list:
    """A [n, c] tensor or nested list as a list of lists."""
    return x.tolist() if torch.is_tensor(x) else [list(r) for r in x]


class Adapter:
    """Everything vtprune knows about one model family, and the accessors of one model instance.

    Instance side (the engine): the language model, its layers, the visual tokens, grids, padding and newline
    flags and the projector. Class side (FLOPs counting, tests, plugins; no model needed): ``model_types``
    (the ``config.model_type`` values it serves), ``position_kind`` ("1d" for [B, L] ids, "mrope" for Qwen's
    [3, B, L]), ``entropy_layer``, ``vision_flops`` / ``projector_dims`` / ``projector_rows_run`` and the tiny
    random-weight model the tests build (``tiny_config``, ``model_class``, ``tiny_processor``, ``prompt_tag``).
    """

    family = "base"
    model_types: tuple = ()
    position_kind = "1d"
    entropy_layer = 2  # EntropyPrune's published collapse layer for the family (its released scripts)
    prompt_tag = "<image>"  # the image placeholder in a hand-written prompt of the tiny test models
    video_tag: Optional[str] = None  # the video placeholder there, for families that take videos

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

    @classmethod
    def visual_token_ids(cls, config) -> dict:
        """{kind: token id} of the placeholders the family fills with visual features."""
        ids = {"image": config.image_token_id}
        if getattr(config, "video_token_id", None) is not None:
            ids["video"] = config.video_token_id
        return ids

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: positions holding image or video tokens."""
        out = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.visual_token_ids(self.model.config).values():
            out |= input_ids == token
        return out

    def units(self, call: dict, vis: torch.Tensor) -> list:
        """Per row, the ``Unit``s its visual tokens fall into, in sequence order (lengths sum to the row's count).
        Default: each contiguous run of one kind's placeholders is one unit, with no grid."""
        ids = self.visual_token_ids(self.model.config)
        kinds = {token: kind for kind, token in ids.items()}
        out = []
        for row_ids, row_vis in zip(call["input_ids"].tolist(), vis.tolist()):
            units, prev = [], None
            for token, is_vis in zip(row_ids, row_vis):
                kind = kinds.get(token) if is_vis else None
                if kind is not None and kind == prev:
                    units[-1] = Unit(kind, units[-1].length + 1)
                elif kind is not None:
                    units.append(Unit(kind, 1))
                prev = kind
            out.append(units)
        return out

    def grids(self, call: dict, counts: list[int]) -> list:
        """One (height, width) per row whose visual tokens are a single one-frame grid, else None."""
        vis = self.visual_mask(call["input_ids"])
        out = []
        for units in self.units(call, vis):
            one = len(units) == 1 and units[0].grid is not None and units[0].grid[0] == 1
            out.append(tuple(units[0].grid[1:]) if one else None)
        return out

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

    # Extension points for families whose language model takes extra per-token inputs (Qwen3-VL's DeepStack).
    def install(self, pruner) -> None:
        """Called at the end of ``Pruner.install``: instance-level wrappers go here (restored by ``remove``)."""

    def remove(self) -> None:
        """Undo ``install`` exactly."""

    def after_compact(self, state, layer: int, index: torch.Tensor, kwargs: dict) -> dict:
        """Called right after a stage gathered the sequence with ``index`` [B, L'] (``state.seq`` is already the
        gathered one). Returns keyword overrides: for the language model's call (layer 0, ``kwargs`` are its
        keywords) or for every decoder layer from this stage on (layer K). ``state.extra`` is the adapter's own
        per-call scratch."""
        return {}

    # Projector access for sensitivity methods (ZOO): the module whose input is captured, the part scored through,
    # and how a captured input becomes [visual tokens of the batch in placement order, Din] rows for it.
    def projector_module(self) -> torch.nn.Module:
        return self.base.multi_modal_projector

    def projector_mlp(self) -> torch.nn.Module:
        """The live module mapping projector rows [..., Din] -> [..., D] that sensitivity is measured through."""
        return self.projector_module()

    def projector_rows(self, captured: list, call: dict) -> dict:
        """{kind: [tokens of that kind in the batch, in placement order (newlines excluded), Din]} float32, from
        the projector inputs ``captured`` in the order the model ran its projector on this call."""
        rows = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
        return {"image": rows.float()}

    # ------------------------------------------------------------------ family facts (no model instance needed)
    @classmethod
    def vision_flops(cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, **videos) -> int:
        """Real FLOPs of the vision tower (without the projector) on one batch of images (and videos: the
        ``video_grid_thw`` / ``pixel_values_videos`` of the processor output, for families that take them)."""
        raise NotImplementedError(f"{cls.__name__} has no vision FLOPs model")

    @classmethod
    def projector_dims(cls, config) -> tuple:
        """(d_in, d_hidden, d_out) of the projector's Linear -> act -> Linear, per output token."""
        raise NotImplementedError(f"{cls.__name__} has no projector shape")

    @classmethod
    def projector_rows_run(cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, **videos) -> int:
        """How many rows the model runs through its projector for one batch of images (and videos)."""
        raise NotImplementedError(f"{cls.__name__} has no projector row count")

    @classmethod
    def model_class(cls):
        """The ``*ForConditionalGeneration`` class of the family."""
        raise NotImplementedError

    @classmethod
    def tiny_config(cls, num_layers: int = 4):
        """A tiny random-weight config of the family (vision 28 px, patch 7; text hidden 32) for tests."""
        raise NotImplementedError

    @classmethod
    def tiny_processor(cls, tokenizer):
        """A real processor of the family around ``tokenizer``, with pixel settings matching ``tiny_config``."""
        raise NotImplementedError
