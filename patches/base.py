"""What vtprune knows about a model family, in three parts with one job each:

- ``Adapter``: the accessors of one model instance that the engine prunes through (its language model, decoder
  layers, attention and query modules, rotary embedding and projector; where the visual tokens sit; a family's extra
  per-token inputs). Adapters locate tensors; they decide nothing.
- ``Cost``: the FLOPs model of the family's vision tower and projector, from the config alone (``vtprune.flops``).
- ``Tiny``: the tiny random-weight model, processor and prompt tags the tests and benchmarks build.

A ``Family`` is the three under a name, registered in ``vtprune.patches`` by ``config.model_type``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# What the engine reads from a model call to locate and describe the visual inputs (batch_num_images:
# LLaVA-OneVision's images per sample, which decides whether an image is cropped).
CALL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "image_sizes",
    "pixel_values_videos",
    "video_grid_thw",
    "batch_num_images",
)


@dataclass(frozen=True)
class Unit:
    """One image or one video of a sample, as it sits in the sequence: a contiguous run of ``length`` visual
    tokens (newline tokens included). ``grid`` = (t, h, w) when the first ``length - tail`` tokens are one raster
    grid of t frames of h × w (after the family's merging), else None (e.g. anyres crops with newlines); ``tail``
    tokens follow the grid (LLaVA-OneVision's newline after a video)."""

    kind: str  # "image" or "video"
    length: int
    grid: tuple | None = None
    tail: int = 0

    @property
    def frames(self) -> int:
        return self.grid[0] if self.grid is not None else 1


@dataclass
class Compaction:
    """What an adapter is told after a stage gathered the sequence (``Adapter.after_compact``): the stage's decoder
    ``layer`` (0: before the language model), the gather ``index`` [B, L'] into the sequence before, which gathered
    slots hold real tokens (``kept`` [B, L'] bool: False on padding and on the dummy slots of shorter rows), the
    keywords being passed on (the language model's at layer 0, the decoder layer's at layer K) and the adapter's own
    per-call scratch ``extra``."""

    layer: int
    index: torch.Tensor
    kept: torch.Tensor
    kwargs: dict
    extra: dict = field(default_factory=dict)


def as_rows(x) -> list:
    """A [n, c] tensor or nested list as a list of lists."""
    return x.tolist() if torch.is_tensor(x) else [list(r) for r in x]


class Adapter:
    """The accessors of one model instance of a family, for the engine.

    ``family`` names the family (method defaults are keyed by it); ``position_kind`` is "1d" for [B, L] position
    ids, "mrope" for Qwen's [3, B, L]. The defaults fit the Llama-style decoders of every supported family; a family
    whose modules are named otherwise overrides the accessors, never the engine.
    """

    family = "base"
    position_kind = "1d"

    def __init__(self, model):
        self.model = model

    # ------------------------------------------------------------------ where the modules are
    @property
    def body(self):
        """The multimodal body (``LlavaModel``, ``Qwen2_5_VLModel``...) whose forward merges image features."""
        return self.model.model

    @property
    def language_model(self):
        return self.body.language_model

    @property
    def layers(self):
        return self.language_model.layers

    @property
    def text_config(self):
        return self.language_model.config

    def attention(self, layer: int) -> torch.nn.Module:
        """Decoder layer ``layer``'s self-attention module (its config selects the attention function)."""
        return self.layers[layer].self_attn

    def query_projection(self, layer: int) -> torch.nn.Module:
        """The linear layer whose output is decoder layer ``layer``'s query states [B, L, heads * head_dim]."""
        return self.attention(layer).q_proj

    def key_projection(self, layer: int) -> torch.nn.Module:
        """The linear layer whose output is decoder layer ``layer``'s key states [B, L, kv_heads * head_dim]."""
        return self.attention(layer).k_proj

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) of the language model's rotary embedding at ``position_ids``."""
        return self.language_model.rotary_emb(hidden, position_ids)

    # ------------------------------------------------------------------ the vision tower
    # A tower layer's attention, read by methods such as VisionZip: inside the tower (a tower stage, which also saves
    # the tower's later layers) where the family allows one, else mapped onto the prompt's visual tokens for a
    # layer-0 stage (``tower_rows``).
    tower_refusal: str | None = "its tower's output is not one token per patch of a single grid"
    tower_scores = False  # tower_layers, tower_attention, tower_feature_layer and tower_rows are given

    @property
    def supports_tower_stage(self) -> bool:
        """A stage can run inside the tower (tower_refusal says why not)."""
        return self.tower_refusal is None

    @property
    def tower_layers(self):
        """The vision tower's encoder layers, in order."""
        raise NotImplementedError(f"{type(self).__name__} has no tower stage")

    def tower_attention(self, layer: int) -> torch.nn.Module:
        return self.tower_layers[layer].self_attn

    @property
    def tower_feature_layer(self) -> int:
        """The tower layer whose output the model reads its image features from."""
        raise NotImplementedError(f"{type(self).__name__} has no tower stage")

    @property
    def tower_prefix_tokens(self) -> int:
        """Tokens the tower runs before the patches ([CLS]: 1), which the model does not place in the prompt."""
        return 0

    @property
    def tower_grid(self) -> tuple[int, int]:
        """(rows, cols) of the patches of one image at the tower."""
        raise NotImplementedError(f"{type(self).__name__} has no tower stage")

    def tower_rows(self, captured: list, call: dict) -> dict:
        """{kind: [tokens of that kind in the batch, in placement order (newlines excluded), C]} from per-tower-token
        rows ``captured`` (one [runs, T, C] per capture, in the order the tower ran): what the tower's token became
        in the prompt. Here, where the projector's inputs are the tower's tokens: the prefix ([CLS]) is dropped as the
        model's feature strategy does, then the rows go where ``projector_rows`` puts the projector's inputs."""
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "full")
        drop = self.tower_prefix_tokens if strategy == "default" else 0
        return self.projector_rows([c[:, drop:] for c in captured], call)

    def encode_images(self, kwargs: dict) -> dict:
        """{"image": ...} the ``mm_encoder_outputs`` the body would compute from the call's pixels itself."""
        raise NotImplementedError(f"{type(self).__name__} has no tower stage")

    # ------------------------------------------------------------------ where the visual tokens are
    @classmethod
    def visual_token_ids(cls, config) -> dict:
        """{kind: token id} of the placeholders the family fills with visual features."""
        ids = {"image": config.image_token_id}
        if getattr(config, "video_token_id", None) is not None:
            ids["video"] = config.video_token_id
        return ids

    @classmethod
    def placeholder_mask(cls, config, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: positions holding image or video placeholders, from the config alone."""
        first, *rest = cls.visual_token_ids(config).values()
        out = input_ids == first
        for token in rest:
            out |= input_ids == token
        return out

    @property
    def takes_videos(self) -> bool:
        return "video" in self.visual_token_ids(self.model.config)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: positions holding image or video tokens."""
        return self.placeholder_mask(self.model.config, input_ids)

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

    def pad_mask(self, call: dict, vis: torch.Tensor) -> torch.Tensor | None:
        """[B, L] bool, True at visual tokens that are mostly image padding; None if the family has none."""
        return None

    def newline_mask(self, embeds: torch.Tensor, vis: torch.Tensor) -> torch.Tensor | None:
        """[B, L] bool, True at row-separator tokens inside the image span; None if the family has none."""
        return None

    def default_positions(self, batch: int, length: int, offset: int, device) -> torch.Tensor:
        """The position ids the language model builds itself when given none."""
        pos = torch.arange(offset, offset + length, device=device).unsqueeze(0).expand(batch, -1)
        return pos if self.position_kind == "1d" else pos.unsqueeze(0).expand(3, -1, -1)

    def mask_positions(self, pos: torch.Tensor) -> torch.Tensor | None:
        """The position ids [B, L] the language model reads packed-sample boundaries from (transformers: the 1-D ids;
        for M-RoPE, the text row of a [4, B, L] tensor), or None where it reads none."""
        if self.position_kind == "1d":
            return pos
        return pos[0] if pos.dim() == 3 and pos.shape[0] == 4 else None

    def encoded_rows(self, kwargs: dict) -> torch.Tensor | None:
        """The visual tokens' embeddings [visual tokens of the batch, D] in sequence order, when the body's call
        brings them pre-encoded (``mm_encoder_outputs``) and places them as they are, one per placeholder, with no
        extra inputs for the language model; else None. Lets a layer-0 stage choose before the body builds the
        sequence, so that it builds only the kept part (``with_encoded_rows``). Default: None (never)."""
        return None

    def with_encoded_rows(self, encoded: dict, rows: torch.Tensor) -> dict:
        """The entries of ``mm_encoder_outputs`` that place ``rows`` (the kept slots' rows of ``encoded_rows``, in
        order) instead of the call's own features."""
        raise NotImplementedError

    def restore_encoded(self, output, encoded: dict):
        """The body's ``output`` with the caller's own ``mm_encoder_outputs`` put back where the family returns
        them (``encoded_rows`` let the body see a shortened copy)."""
        return output

    # Extension points for families whose language model takes extra per-token inputs (Qwen3-VL's DeepStack).
    def install(self, current_extra: Callable[[], dict | None]) -> None:
        """Called when the pruner is installed: instance-level wrappers go here (restored by ``remove``).
        ``current_extra()`` is the per-call scratch of the prefill running in the calling thread (what
        ``after_compact`` was given as ``extra``), or None when none is."""

    def remove(self) -> None:
        """Undo ``install`` exactly."""

    def after_compact(self, compaction: Compaction) -> dict:
        """Called right after a stage gathered the sequence. Returns keyword overrides: for the language model's
        call (layer 0) or for every decoder layer from this stage on (layer K)."""
        return {}

    # Projector access for sensitivity methods (ZOO): the module whose input is captured, the part scored through,
    # and how a captured input becomes [visual tokens of the batch in placement order, Din] rows for it.
    def projector_module(self) -> torch.nn.Module:
        return self.body.multi_modal_projector

    def projector_mlp(self) -> torch.nn.Module:
        """The live module mapping projector rows [..., Din] -> [..., D] that sensitivity is measured through."""
        return self.projector_module()

    def projector_rows(self, captured: list, call: dict) -> dict:
        """{kind: [tokens of that kind in the batch, in placement order (newlines excluded), Din]} float32, from
        the projector inputs ``captured`` in the order the model ran its projector on this call."""
        rows = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
        return {"image": rows.float()}


class Cost:
    """The FLOPs model of a family's vision tower and projector, from the config (no model instance needed)."""

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
    def tower_head_dim(cls, config) -> int:
        vc = config.vision_config
        return vc.hidden_size // vc.num_attention_heads

    @classmethod
    def tower_capture_flops(cls, config, layer: int, **call) -> int:
        """What reading tower layer ``layer``'s attention costs on one batch (``vtprune.capture.tower_attention``):
        the [CLS] query against every key where the tower has a [CLS], else every query against every key of its
        attention block (the QKᵀ half of that layer's attention)."""
        raise NotImplementedError(f"{cls.__name__} has no tower capture count")


# The word-level vocabulary of the tiny test models (vtprune.testing): the special tokens come first so the
# families' tiny configs can name their ids; tokens added later go at the end so earlier ids never move.
TINY_VOCAB = [
    "<pad>",
    "<unk>",
    "<s>",
    "<image>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "USER:",
    "ASSISTANT:",
    "what",
    "colour",
    "shape",
    "is",
    "the",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "left",
    "right",
    "?",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "<video>",
]
TINY_IDS = {w: i for i, w in enumerate(TINY_VOCAB)}
# Placeholders and markers: split out of the text by the tokenizer, never generated by the tiny models.
TINY_SPECIAL = [w for w in TINY_VOCAB[3:] if w.startswith("<")]


def tiny_text_config(**over) -> dict:
    """The decoder of every tiny test model: 4 layers, hidden 32, grouped-query attention."""
    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    base.update(over)
    return base


class Tiny:
    """The tiny random-weight model of a family the tests build (vision 28 px, patch 7; text hidden 32) and its
    real processor, built offline; ``prompt_tag`` / ``video_tag`` are the placeholders of a hand-written prompt."""

    prompt_tag = "<image>"
    video_tag: str | None = None  # for families that take videos

    @classmethod
    def model_class(cls):
        """The ``*ForConditionalGeneration`` class of the family."""
        raise NotImplementedError

    @classmethod
    def config(cls, num_layers: int = 4):
        raise NotImplementedError

    @classmethod
    def processor(cls, tokenizer):
        """A real processor of the family around ``tokenizer``, with pixel settings matching ``config``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Family:
    """A model family: its name, the ``config.model_type`` values it serves, and its three parts."""

    name: str
    model_types: tuple
    adapter: type
    cost: type
    tiny: type
