"""The prefill side of the engine: the per-token flags of a new call, the layer-0 stage (on the merged embeddings, or
earlier on pre-encoded features), the projector rows a sensitivity method reads, and in-LLM stages."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from . import ops
from .calls import CallState, StageOutput, max_position, renumber
from .masks import language_model_mask, layer_mask, packed_segments
from .patches.base import Compaction, Unit
from .stage import Captured, TokenFlags, prune


class PrefillSteps:
    """Mixed into ``Pruner``: the steps of a prefill. Reads the pruner's ``adapter``, ``stages``, ``methods``,
    ``cfg``, ``_needs`` and ``_local``."""

    def _early_prefill(self, state: CallState, args, kwargs):
        """A layer-0 stage on pre-encoded image features, before the body embeds them: the body then builds only
        the shorter sequence (the embeddings, mask and positions compacting the full one would give, bit for bit:
        dummy slots hold the same dropped tokens), and neither embeds nor scatters the dropped tokens."""
        stage, method = self.stages[0], self.methods[0]
        if args or stage.layer != 0 or stage.options["merge"] or method.merges or "text" in method.needs:
            return None
        rows = self.adapter.encoded_rows(kwargs)
        input_ids = state.call["input_ids"]
        pos = kwargs.get("position_ids")
        packed = pos is not None and packed_segments(self.adapter.mask_positions(pos), kwargs, 1) is not None
        if rows is None or input_ids is None or packed:  # packed samples take the path that builds their mask
            return None
        vis = self.adapter.visual_mask(input_ids)
        if int(vis.sum()) != rows.shape[0] or rows.shape[0] == 0:
            return None  # no image, or a count mismatch the model itself reports
        weight = self.adapter.body.get_input_embeddings().weight
        rows = rows.to(weight.device, weight.dtype)  # as the body casts them
        pos = self._begin(state, kwargs, vis, None, weight.device)
        result = self._layer0(state, input_ids, vis, None, None, visual=rows)
        new_pos = self._record_layer0(state, result.stats, "torch", ops.gather_last(pos, result.index))
        index = result.index
        rank = (vis.flatten().cumsum(0) - 1).view_as(vis).gather(1, index)  # each slot's row of ``rows``
        encoded = dict(kwargs["mm_encoder_outputs"])
        state.encoded, state.phase = kwargs["mm_encoder_outputs"], "early"
        encoded.update(self.adapter.with_encoded_rows(encoded, rows[rank[vis.gather(1, index)]]))
        return (), dict(
            kwargs,
            input_ids=input_ids.gather(1, index),
            attention_mask=state.flags.mask,
            position_ids=new_pos,
            mm_encoder_outputs=encoded,
        )

    def _prefill(self, state: CallState, kwargs, embeds):
        if state.phase == "early":  # the body hook pruned already; the language model runs on the short sequence
            state.phase = "prefill"
            return None
        if state.phase in ("prefill", "decode"):  # the language model run again on one body call: start over
            state = self._local.state = CallState(call=state.call)
        input_ids = state.call.get("input_ids")
        if input_ids is None or input_ids.shape[:2] != embeds.shape[:2]:
            if not self._warned_embeds:
                self._warned_embeds = True
                warnings.warn(
                    "vtprune: this prefill was given inputs_embeds without input_ids, so the visual tokens "
                    "cannot be located and nothing was pruned; pass input_ids (as the processor "
                    "returns them)",
                    stacklevel=4,
                )
            return None
        vis = self.adapter.visual_mask(input_ids)
        if not bool(vis.any()):
            return None
        newline = None
        if self._needs & {"newline_mask", "projector", "tower_attention"}:
            # Newline flags are read by strategies that ask for them and keep newline slots out of projector rows.
            newline = self.adapter.newline_mask(embeds, vis)
        pos = self._begin(state, kwargs, vis, newline, embeds.device)
        if self._stage_at(0) is None:
            return (), dict(kwargs, attention_mask=self._lm_mask(state, embeds), position_ids=pos)
        result = self._layer0(state, input_ids, vis, newline, embeds)
        new_embeds, new_pos, _, backend = ops.compact(result.hidden, result.index, pos, with_backend=True)
        new_pos = self._record_layer0(state, result.stats, backend, new_pos)
        kwargs = dict(
            kwargs, inputs_embeds=new_embeds, attention_mask=self._lm_mask(state, new_embeds), position_ids=new_pos
        )
        kwargs.update(self.adapter.after_compact(self._compaction(state, 0, result.index, kwargs)))
        return (), kwargs

    def _stage_at(self, layer: int):
        """The index of the stage at decoder layer ``layer``, or None."""
        return next((i for i, s in enumerate(self.stages) if s.layer == layer), None)

    def _lm_mask(self, state: CallState, embeds):
        return language_model_mask(self.adapter.text_config, embeds, state.flags.mask, state.flags.segment)

    @staticmethod
    def _compaction(state: CallState, layer: int, index, kwargs) -> Compaction:
        return Compaction(layer, index, state.flags.mask.bool(), kwargs, state.extra)

    def _begin(self, state: CallState, kwargs, vis, newline, device):
        """The prefill's token flags, units and next position; returns its position ids [B, L] (or [3, B, L])."""
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise NotImplementedError(
                "vtprune needs a 2D attention mask (or none) on prefill, got "
                f"{type(mask).__name__} with shape {tuple(getattr(mask, 'shape', ()))}"
            )
        b, length = vis.shape
        if state.phase != "tower":  # after a tower stage the prompt is the one before its placeholders were dropped
            state.prompt_len = length
        mask = mask.long() if mask is not None else torch.ones(b, length, dtype=torch.long, device=device)
        needs = self._needs
        state.units = state.units or self._units(state.call, vis)
        pos = kwargs.get("position_ids")
        if state.phase == "tower" and state.flags is not None:  # the tower compaction found them on the full prompt
            segment = state.flags.segment
        else:
            segment = None if pos is None else packed_segments(self.adapter.mask_positions(pos), kwargs, b)
        state.flags = TokenFlags(
            vis=vis,
            mask=mask,
            newline=newline if "newline_mask" in needs else None,
            pad=self.adapter.pad_mask(state.call, vis) if "pad_mask" in needs else None,
            unit=_unit_ids(vis, state.units),
            segment=segment,
        )
        if pos is None:
            pos = self.adapter.default_positions(b, length, 0, device)
        state.next_pos, state.phase = max_position(pos) + 1, "prefill"
        return pos

    def _units(self, call: dict, vis: torch.Tensor) -> list:
        """The adapter's units per row; a row whose units do not add up to its visual tokens is one image."""
        units = self.adapter.units(call, vis)
        counts = vis.sum(1).tolist()
        return [
            row if sum(u.length for u in row) == n else ([Unit("image", n)] if n else [])
            for row, n in zip(units, counts)
        ]

    def _layer0(self, state: CallState, input_ids, vis, newline, hidden, visual=None):
        """The layer-0 stage, on the full sequence's ``hidden`` or on the ``visual`` rows alone (``stage.prune``),
        after recording the projector rows it reads."""
        captured, tower = self._this_call("projector"), self._this_call("tower")
        if "projector" in self._needs and captured:
            self._capture_projector(state, captured, input_ids, vis, newline)
        if "tower_attention" in self._needs and tower:
            self._capture_tower(state, tower, input_ids, vis, newline)
        return self._choose(state, self._stage_at(0), hidden, visual)

    def _this_call(self, what: str) -> list:
        """What the hooks captured while this call encoded its images (``pre_<what>``), or, for the later prefills
        of a generate() call that encoded them once, what its first prefill found (``call_<what>``)."""
        captured = getattr(self._local, f"pre_{what}")
        setattr(self._local, f"pre_{what}", [])
        if captured:  # generate(use_cache=False) runs every step as a prefill on the images it encoded once
            setattr(self._local, f"call_{what}", captured)
        elif self._local.generate_call:
            captured = getattr(self._local, f"call_{what}")
        return captured

    def _record_layer0(self, state: CallState, stats, backend: str, new_pos):
        """Keep the layer-0 stage's stats (with the backend that built the short sequence); returns the kept
        tokens' position ids, renumbered when the config asks."""
        state.stats.append(replace(stats, backend={**stats.backend, "compact": backend}))
        state.dropped = state.prompt_len - state.flags.mask.shape[1]
        if self.cfg.positions == "renumber":
            new_pos, state.outputs[0].shift = renumber(state)
        return new_pos

    def _capture_projector(self, state: CallState, captured: list, input_ids, vis, newline):
        """Projector inputs as one table, and each visual token's row in it (-1 for newline slots)."""
        table, index = self._token_table(
            self.adapter.projector_rows(captured, state.call), input_ids, vis, newline, "projector rows"
        )
        state.captured.pre_projector, state.captured.pre_index = table, index
        state.captured.projector = self.projector()

    def _capture_tower(self, state: CallState, captured: list, input_ids, vis, newline):
        """A tower layer's attention and keys, per visual token of the sequence (zeros on newline slots)."""
        rows = self.adapter.tower_rows([c for c, _ in captured], state.call)
        table, index = self._token_table(rows, input_ids, vis, newline, "tower-layer rows")
        if table is None:
            return
        per_token = table[index.clamp_min(0)].masked_fill((index < 0)[..., None], 0.0)  # [B, L, 1 + d]
        state.captured.tower_attention, state.captured.tower_keys = per_token[..., 0], per_token[..., 1:]
        state.captured.score_time_s += sum(seconds for _, seconds in captured)

    def _token_table(self, rows: dict, input_ids, vis, newline, what: str):
        """({kind: rows in token order} as one table [rows, C], each visual token's row in it [B, L], -1 for newline
        slots and other tokens)."""
        ids = self.adapter.visual_token_ids(self.model.config)
        index = torch.full_like(input_ids, -1)
        table, offset = [], 0
        for kind, kind_rows in rows.items():
            mine = (input_ids == ids[kind]) & vis
            if newline is not None:
                mine &= ~newline
            flat = mine.flatten()
            if int(flat.sum()) != kind_rows.shape[0]:
                raise RuntimeError(
                    f"vtprune: {kind_rows.shape[0]} {what} were captured for the {kind}s but "
                    f"the prompt holds {int(flat.sum())} of their tokens"
                )
            index.view(-1)[flat] = offset + torch.arange(kind_rows.shape[0], device=input_ids.device)
            table.append(kind_rows)
            offset += kind_rows.shape[0]
        return (torch.cat(table).to(input_ids.device) if table else None), index

    def _choose(self, state: CallState, i: int, hidden, visual=None):
        """Stage ``i`` on the current sequence (``stage.prune``); the call state moves on to its output."""
        stage = self.stages[i]
        self._local.selecting = True
        try:
            result = prune(
                stage,
                self.methods[i],
                hidden,
                state.flags,
                state.captured,
                state.units,
                len(self.adapter.layers),
                visual,
            )
        finally:
            self._local.selecting = False
        if "tower_attention" in self.methods[i].needs:
            result.stats = replace(result.stats, tower_layer=self.tower_layer)
        state.flags = result.flags
        state.outputs[stage.layer] = StageOutput(stage.layer, kept_mask=state.flags.mask)
        state.captured = Captured()  # scores are aligned to the sequence before this stage
        return result

    def _layer_stage(self, state: CallState, i: int, hidden, kwargs):
        """An in-LLM stage at decoder layer K: gather the hidden states, cos/sin and positions, and give every layer
        from K on a mask for its own shorter cache."""
        result = self._choose(state, i, hidden)
        output = state.outputs[self.stages[i].layer]
        new_hidden, new_pos, _, backend = ops.compact(
            result.hidden, result.index, kwargs.get("position_ids"), with_backend=True
        )
        state.stats.append(replace(result.stats, backend={**result.stats.backend, "compact": backend}))
        if self.cfg.positions == "renumber":
            new_pos, output.shift = renumber(state)
            cos, sin = self.adapter.rotary(new_hidden, new_pos)
        else:
            cos, sin = kwargs["position_embeddings"]
            cos, sin = ops.gather_tokens(cos, result.index), ops.gather_tokens(sin, result.index)
        mask = layer_mask(
            self.adapter.text_config, output.layer, new_hidden, state.flags.mask, kwargs, state.flags.segment
        )
        output.overrides = {"position_embeddings": (cos, sin), "position_ids": new_pos, "attention_mask": mask}
        output.overrides.update(self.adapter.after_compact(self._compaction(state, output.layer, result.index, kwargs)))
        return new_hidden


def _unit_ids(vis: torch.Tensor, units: list) -> torch.Tensor:
    """[B, L] long: each visual token's unit index within its row (units are consecutive runs), -1 elsewhere."""
    if max((len(row) for row in units), default=0) <= 1:
        return torch.where(vis, 0, -1)
    ordinal = vis.long().cumsum(1) - 1  # the token's rank among its row's visual tokens
    ends = [[sum(u.length for u in row[: i + 1]) for i in range(len(row))] for row in units]
    width = max(len(e) for e in ends)
    bounds = torch.tensor([e + [e[-1] if e else 0] * (width - len(e)) for e in ends], device=vis.device)
    return torch.where(vis, torch.searchsorted(bounds, ordinal, right=True), -1)
