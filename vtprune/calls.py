"""Per-call state: one ``CallState`` per forward / ``generate()`` call, created at its prefill and read by its decode
steps, and the per-thread slots that find the current one. Concurrent calls on one model never share either."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .stage import Captured, TokenFlags

PHASES = ("idle", "tower", "early", "prefill", "decode")
CALL_ATTR = "_vtprune_call"  # on a KV cache a pruned prefill filled: that call's CallState, for its decode steps


@dataclass
class StageOutput:
    """What one stage left for the layers after it on the last prefill; kept for the decode steps."""

    layer: int
    kept_mask: torch.Tensor  # [B, L_out] long: the 2D mask after this stage (0 on dummy/pad slots)
    shift: torch.Tensor | None = None  # [B] renumbering offset (positions="renumber")
    overrides: dict = field(default_factory=dict)  # keywords every layer from this stage on receives


@dataclass
class CallState:
    """Everything that belongs to one call. ``phase``: "idle" (nothing pruned: no visual token, or not yet),
    "early" (the body hook ran the layer-0 stage on pre-encoded features; the language model's prefill comes),
    "prefill" (the language model's prefill, stages running) or "decode" (steps after the prefill)."""

    call: dict  # input_ids and the image metadata of this call
    phase: str = "idle"  # "tower": the body dropped the placeholders a tower stage left out; the prefill comes
    outputs: dict = field(default_factory=dict)  # layer -> StageOutput
    stats: list = field(default_factory=list)  # StageStats, one per stage that ran
    captured: Captured = field(default_factory=Captured)
    flags: TokenFlags | None = None
    units: list = field(default_factory=list)  # per row, its images and videos (patches.base.Unit)
    prompt_len: int = 0
    fed: int = 0  # tokens fed after the prefill
    next_pos: torch.Tensor | None = None  # [B] next original position id
    new_cols: torch.Tensor | None = None  # [B, fed + q] mask columns of tokens after the prompt
    extra: dict = field(default_factory=dict)  # the adapter's own per-call scratch (Adapter.after_compact)
    dropped: int = 0  # tokens the layer-0 stage removed: a cache filled by this call is that much shorter
    encoded: dict | None = None  # the call's own mm_encoder_outputs, put back into the body's output
    decode_attention: torch.Tensor | None = None  # [B, cache] this decode step's last-token attention at K-1
    decode_mask: torch.Tensor | None = None  # [B, cache] this step's 2D mask from the decode stage's layer on
    decode_layer_masks: dict = field(default_factory=dict)  # this step's layer masks built from it, by layer kind

    @property
    def pruned(self) -> bool:
        """A stage ran on this call's prefill: its decode steps need their masks and positions rebuilt."""
        return self.phase != "idle"


class ThreadState(threading.local):
    """Per-thread slots: the current call, what a generate() wrapper saw, the captured projector inputs."""

    def __init__(self):
        self.state: CallState | None = None
        self.generate_call: dict = {}
        self.pre_projector: list = []  # projector inputs of this call, one per projector run, in run order
        self.call_projector: list = []  # the projector inputs a generate() call's later prefills score with
        self.pre_tower: list = []  # a tower layer's [attention | keys] per run, for a layer-0 stage (as pre_projector)
        self.call_tower: list = []  # as call_projector
        self.paused = 0
        self.selecting = False  # inside a stage: a strategy running the projector must not be captured
        self.lm_prefill = False  # the language model's current call is a prefill (its output cache gets tagged)
        self.tower_armed = False  # a pruned call is encoding its images: the tower stage chooses
        self.tower_capture = None  # (attention [images, T], keys [images, T, d], seconds) of the tower layer
        self.tower_kept: list = []  # per tower run of this encoding, its images' kept patches [images, k]
        self.call_tower_kept: list = []  # the kept patches a generate() call's prefills compact with
        self.tower_seconds = 0.0


def max_position(pos: torch.Tensor) -> torch.Tensor:
    """[B]: each row's largest position id, from [B, L] ids or M-RoPE's [3, B, L] / [4, B, L] (text row first)."""
    p = pos if pos.dim() == 2 else pos[-3:].amax(dim=0)
    return p.amax(dim=-1)


def renumber(state: CallState):
    """Contiguous positions over the kept sequence (1-D RoPE). Returns (positions [B, L'], shift [B])."""
    new = (state.flags.mask.cumsum(1) - 1).clamp(min=0)
    return new, state.next_pos - (new.max(dim=1).values + 1)
