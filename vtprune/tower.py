"""A stage inside the vision tower: after tower layer j, each image keeps (or merges into) its budget of patches, so
the tower's later layers, the projector and the language model run on those alone.

The tower runs where the model encodes its images: inside ``generate()`` before the prefill, or in the body's forward
(which the body hook then does first, itself). A post-hook on layer j, armed only while a pruned call encodes, chooses
per image and returns the shorter hidden states (before transformers records them, so the model reads the short
ones); the body hook then drops the placeholders of the patches no longer there, keeping every other token's
position id, and the language model prefills the shorter sequence.
"""

from __future__ import annotations

import time

import torch

from . import capture, ops
from .budgets import unit_budgets
from .calls import CallState, StageOutput, max_position, renumber
from .hooks import Hook, Patch
from .masks import packed_segments
from .merge import apply_plan, merge_pruned
from .patches.base import Unit
from .stage import TokenFlags, keep_layout, method_options
from .stats import StageStats, UnitStats
from .strategies.base import TOWER, Merged, SelectionInputs


class TowerSteps:
    """Mixed into ``Pruner``: the tower stage (``stages[0]`` when its layer is ``TOWER``)."""

    @property
    def has_tower_stage(self) -> bool:
        return self.stages[0].layer == TOWER

    @property
    def tower_layer(self) -> int:
        layer = self.stages[0].options["tower_layer"]
        return self.adapter.tower_feature_layer if layer is None else layer

    @property
    def tower_cls(self) -> int:
        return self.adapter.tower_prefix_tokens

    def _tower_items(self) -> list:
        """The tower stage's hook on layer j, and the capture of layer j's attention for a method that reads it
        (inside the tower, or at layer 0 on the prompt's visual tokens)."""
        if not self.has_tower_stage and "tower_attention" not in self.methods[0].needs:
            return []
        a, j = self.adapter, self.tower_layer
        items = []
        if self.has_tower_stage:
            # Before transformers' own hooks on the layer, which record the hidden states the model then reads.
            items.append(Hook(a.tower_layers[j], "post", self._tower_hook, with_kwargs=False, prepend=True))
        if "tower_attention" in self.methods[0].needs:
            items.append(Patch(lambda: capture.attach(a.tower_attention(j), self, capture.TOWER_CAPTURE_IMPL)))
        return items

    # ---------------------------------------------------------------- capture (armed while a pruned call encodes)
    def wants_tower_attention(self) -> bool:
        if self._local.paused or self._local.selecting:
            return False
        return self._local.tower_armed if self.has_tower_stage else True  # a layer-0 stage: as the projector's inputs

    def record_tower_attention(self, attention: torch.Tensor, keys: torch.Tensor, seconds: float) -> None:
        """attention: [runs, T]; keys: [runs, T, d] (one tower batch, or one attention block of it)."""
        if self.has_tower_stage:
            self._local.tower_capture = (attention, keys, seconds)
        else:
            self._local.pre_tower.append((torch.cat([attention[..., None], keys], dim=-1), seconds))

    def _tower_hook(self, module, args, output):
        if not self.wants_tower_attention():
            return output
        hidden = output[0] if isinstance(output, tuple) else output  # [images, prefix + N, C]
        stage, method = self.stages[0], self.methods[0]
        prefix, t0 = self.tower_cls, time.perf_counter()
        patches = hidden[:, prefix:]
        n = patches.shape[1]
        (k,) = unit_budgets(stage, ["image"], [n])
        attention, keys, seconds = self._local.tower_capture or (None, None, 0.0)
        self._local.tower_capture = None
        inputs = SelectionInputs(
            features=patches,
            tower_attention=None if attention is None else attention[:, prefix:],
            tower_keys=None if keys is None else keys[:, prefix:],
            grid=[self.adapter.tower_grid] * hidden.shape[0],
            frames=[1] * hidden.shape[0],
            kinds=["image"] * hidden.shape[0],
        )
        self._local.selecting = True
        try:
            choice = method.select(inputs, k, **method_options(stage))
        finally:
            self._local.selecting = False
        backends: dict = {}
        if isinstance(choice, Merged):
            kept, backends["merge"] = choice.keep, "torch"
            rows, _ = apply_plan(patches, kept, choice.target, choice.rule)
        elif stage.options["merge"]:
            kept = choice
            rows, _, backends["merge"] = merge_pruned(patches, kept, with_backend=True)
        else:
            kept = choice
            rows = ops.gather_tokens(patches, kept)
        self._local.tower_kept.append(kept)
        self._local.tower_seconds += time.perf_counter() - t0 + seconds
        short = torch.cat([hidden[:, :prefix], rows], dim=1)
        return (short, *output[1:]) if isinstance(output, tuple) else short

    # ---------------------------------------------------------------- the body's prefill
    def _tower_prefill(self, state: CallState, args, kwargs):
        """Encode the call's images with the tower stage armed (unless generate() did), then drop the placeholders of
        the patches the stage left out. Returns the body's new (args, kwargs)."""
        if kwargs.get("pixel_values") is not None and not kwargs.get("mm_encoder_outputs"):
            self._local.tower_kept, self._local.tower_seconds = [], 0.0
            self._local.tower_armed = True
            try:
                encoded = self.adapter.encode_images(kwargs)
            finally:
                self._local.tower_armed = False
            self._local.call_tower_kept = self._local.tower_kept
            kwargs = {key: v for key, v in kwargs.items() if key != "pixel_values"}
            kwargs["mm_encoder_outputs"] = encoded
        elif self._local.tower_kept:  # generate() encoded the images just now
            self._local.call_tower_kept, self._local.tower_kept = self._local.tower_kept, []
        self._local.tower_armed = False
        kept = self._local.call_tower_kept
        if not kept:
            return args, kwargs  # no image went through the tower stage: nothing to drop
        return self._tower_compact(state, args, kwargs, torch.cat(kept))

    def _tower_compact(self, state: CallState, args, kwargs, kept: torch.Tensor):
        """Drop the placeholders of the patches ``kept`` [images, k] (per image, ascending) leaves out."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        vis = self.adapter.visual_mask(input_ids)
        b, length = vis.shape
        n = self.adapter.tower_grid[0] * self.adapter.tower_grid[1]
        per_row = (vis.sum(1) // n).tolist()
        if sum(per_row) != kept.shape[0] or bool((vis.sum(1) % n).any()):
            raise RuntimeError(
                f"vtprune: the tower stage chose for {kept.shape[0]} images but the prompt holds "
                f"{int(vis.sum())} image tokens ({n} per image)"
            )
        k = kept.shape[1]
        keep = ~vis
        row_kept, image = [], 0
        for r, count in enumerate(per_row):
            places = vis[r].nonzero().flatten().view(count, n)
            mine = kept[image : image + count].to(places.device)
            keep[r, places.gather(1, mine).flatten()] = True
            row_kept.append((mine + n * torch.arange(count, device=mine.device)[:, None]).flatten())
            image += count
        index, valid = (keep[0].nonzero().view(1, -1), None) if b == 1 else keep_layout(keep)
        mask = kwargs.get("attention_mask")
        mask = mask.long() if mask is not None else torch.ones(b, length, dtype=torch.long, device=vis.device)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = self.adapter.default_positions(b, length, 0, vis.device)
        new_mask = mask.gather(1, index) * (1 if valid is None else valid.long())
        new_ids, new_pos = input_ids.gather(1, index), ops.gather_last(pos, index)
        state.phase, state.prompt_len, state.next_pos = "tower", length, max_position(pos) + 1
        state.call["input_ids"] = new_ids  # the language model's prefill finds the visual tokens here
        state.units = [[Unit("image", k)] * count for count in per_row]
        # Packed samples (no mask, positions restarting) are found on the full prompt: gaps would look like restarts.
        segment = packed_segments(self.adapter.mask_positions(pos), kwargs, b)
        state.flags = TokenFlags(
            vis=self.adapter.visual_mask(new_ids),
            mask=new_mask,
            segment=None if segment is None else segment.gather(1, index),
        )
        state.outputs[0] = StageOutput(0, kept_mask=new_mask)  # until a layer-0 stage shortens it again
        state.dropped = length - new_ids.shape[1]
        if self.cfg.positions == "renumber":
            new_pos, state.outputs[0].shift = renumber(state)
        state.stats.append(self._tower_stats(per_row, n, k, row_kept, vis.device))
        kwargs = dict(kwargs, input_ids=new_ids, attention_mask=new_mask, position_ids=new_pos)
        return (), kwargs

    def _tower_stats(self, per_row: list, n: int, k: int, row_kept: list, device) -> StageStats:
        stage = self.stages[0]
        units = [
            [UnitStats("image", 1, n, k, kept[u * k : (u + 1) * k] - u * n) for u in range(count)]
            for count, kept in zip(per_row, row_kept)
        ]
        width = max((len(x) for x in row_kept), default=0)
        kept_indices = torch.full((len(row_kept), width), -1, dtype=torch.long, device=device)
        for r, x in enumerate(row_kept):
            kept_indices[r, : len(x)] = x
        return StageStats(
            layer=TOWER,
            method=stage.method,
            tokens_before=[n * c for c in per_row],
            tokens_after=[k * c for c in per_row],
            kept_indices=kept_indices,
            units=units,
            selections=[[(n, k)] * c for c in per_row],
            select_time_s=self._local.tower_seconds,
            budget=stage.options["budget"],
            merged=stage.options["merge"] or self.methods[0].merges,
            backend={"compact": "torch"},
            tower_layer=self.tower_layer,
        )
