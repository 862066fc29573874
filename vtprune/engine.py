"""The patch layer: forward pre-hooks on one model instance that shrink the sequence at each stage.

Prefill (empty cache): the body hook records ``input_ids`` and the call's image metadata; the language-model hook
runs a layer-0 stage on the merged embeddings, mask and position ids; a pre-hook on decoder layer K runs an
in-LLM stage on the hidden states, cos/sin, position ids and a mask rebuilt for that layer's cache. Every layer
from a stage on then receives the stage's tensors, so the KV cache of those layers holds text + kept tokens only.

Decode (non-empty cache): the 2D mask that ``generate`` grows over the original prompt is rebuilt per stage as
(mask kept at prefill) + (columns of the new tokens); positions continue in the original numbering.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import (create_causal_mask, create_sliding_window_causal_mask,
                                        find_packed_sequence_indices, packed_sequence_mask_function)

from . import capture, ops
from .config import PrunerConfig, StageConfig
from .patches.base import CALL_KEYS, Unit
from .stage import Captured, Sequence, run_stage
from .stats import StageStats
from .strategies.base import get_method

CALL_ATTR = "_vtprune_call"  # on a KV cache a pruned prefill filled: that call's CallState, for its decode steps


def _cache(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _output_cache(output):
    """The KV cache in a language model's output (a ModelOutput, or a tuple with return_dict=False), or None."""
    if isinstance(output, tuple):
        return next((item for item in output if isinstance(item, Cache)), None)
    return getattr(output, "cache", None)


@dataclass
class _StageRun:
    """What one stage did on the last prefill; kept for the decode steps."""

    layer: int
    kept_mask: torch.Tensor  # [B, L_out] long: the 2D mask after this stage (0 on dummy/pad slots)
    shift: Optional[torch.Tensor] = None  # [B] renumbering offset (positions="renumber")
    overrides: dict = field(default_factory=dict)  # tensors every layer from this stage on receives


@dataclass
class CallState:
    """Everything that belongs to one forward / ``generate()`` call: created at its prefill, read by its decode
    steps. Each thread has its own current CallState, so concurrent calls on one model never see each other's."""

    call: dict  # input_ids and the image metadata of this call
    active: bool = False  # a stage ran on the prefill: decode steps need their masks/positions rebuilt
    prefill: bool = False
    runs: dict = field(default_factory=dict)  # layer -> _StageRun
    stats: list = field(default_factory=list)  # StageStats, one per stage that ran
    captured: Captured = field(default_factory=Captured)
    seq: Optional[Sequence] = None
    units: list = field(default_factory=list)  # per row, its images and videos (patches.base.Unit)
    prompt_len: int = 0
    fed: int = 0  # tokens fed after the prefill
    next_pos: Optional[torch.Tensor] = None  # [B] next original position id
    new_cols: Optional[torch.Tensor] = None  # [B, fed + q] mask columns of tokens after the prompt
    extra: dict = field(default_factory=dict)  # the adapter's own per-call tensors (Adapter.after_compact)
    dropped: int = 0  # tokens the layer-0 stage removed: a cache filled by this call is that much shorter
    early: bool = False  # the body hook ran the layer-0 stage: the language model's prefill is already short
    encoded: Optional[dict] = None  # the call's own mm_encoder_outputs, put back into the body's output


class _ThreadState(threading.local):
    """Per-thread slots: the current call, what a generate() wrapper saw, the captured projector input."""

    def __init__(self):
        self.state: Optional[CallState] = None
        self.generate_call: dict = {}
        self.pre_projector: list = []  # projector inputs of this call, one per projector run, in run order
        self.paused = 0
        self.selecting = False  # inside a stage: a strategy running the projector must not be captured
        self.lm_prefill = False  # the language model's current call is a prefill (its output cache gets tagged)
        self.call_projector: list = []  # the projector inputs a generate() call's later prefills score with


class Pruner:
    """The configuration and hooks of one patched model instance. Per-call state lives in ``CallState``."""

    def __init__(self, model, adapter, cfg: PrunerConfig):
        self.model, self.adapter, self.cfg = model, adapter, cfg
        self.stages: list[StageConfig] = cfg.resolved_stages(adapter)
        self.methods = [get_method(s.method) for s in self.stages]
        # Per-token flags are computed on each prefill only for methods that read them.
        # Each stage's needs under its options: LLaVA's padding flags cost more than FastV's choosing, and only its
        # "sink" debiasing reads them.
        self._needs = set().union(*(m.needs_for(s.options) for s, m in zip(self.stages, self.methods)))
        self._handles, self._captures = [], []
        self._local = _ThreadState()
        self._warned_embeds = False

    # ---------------------------------------------------------------- copies
    def __deepcopy__(self, memo):
        """A copy for a deep-copied model: same settings, hooks bound to the copy, no call in flight."""
        new = Pruner.__new__(Pruner)
        memo[id(self)] = new
        fresh = {"_local": _ThreadState()}
        for key, value in self.__dict__.items():
            setattr(new, key, fresh[key] if key in fresh else copy.deepcopy(value, memo))
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError("a model patched by vtprune cannot be pickled (torch.save / pickle): its hooks are bound "
                        "to this process. Call vtprune.remove_pruner(model) before saving, and apply_pruner again "
                        "after loading (or save model.state_dict(), which is unaffected)")

    # ---------------------------------------------------------------- install / remove
    def install(self):
        body, lm = self.adapter.base, self.adapter.language_model
        self._handles.append(self.model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        self._handles.append(body.register_forward_pre_hook(self._body_hook, with_kwargs=True))
        if self.stages[0].layer == 0:  # only a layer-0 stage can run in the body hook (_early_prefill)
            self._handles.append(body.register_forward_hook(self._body_output_hook))
        self._handles.append(lm.register_forward_pre_hook(self._lm_hook, with_kwargs=True))
        self._handles.append(lm.register_forward_hook(self._lm_output_hook))
        first = min((s.layer for s in self.stages if s.layer > 0), default=None)
        if first is not None:
            for i in range(first, len(self.adapter.layers)):
                self._handles.append(self.adapter.layers[i].register_forward_pre_hook(
                    self._make_layer_hook(i), with_kwargs=True))
        for stage, method in zip(self.stages, self.methods):
            if stage.layer == 0:
                continue
            prev = self.adapter.layers[stage.layer - 1].self_attn
            if "attention" in method.needs:
                self._captures.append(capture.attach(prev, self))
            if "queries" in method.needs:
                hook = functools.partial(self._queries_hook, self.adapter.text_config.num_attention_heads)
                self._handles.append(prev.q_proj.register_forward_hook(hook))
        if "projector" in self._needs:
            self._handles.append(self.adapter.projector_module().register_forward_pre_hook(self._projector_hook))
        self.adapter.install(self)

    def remove(self):
        for h in self._handles:
            h.remove()
        for token in self._captures:
            capture.detach(token)
        self._handles, self._captures = [], []
        self.adapter.remove()

    # ---------------------------------------------------------------- per-call state
    @property
    def state(self) -> Optional[CallState]:
        """The calling thread's current call (None before its first prefill)."""
        return self._local.state

    def last_stats(self) -> list:
        state = self._local.state
        return [] if state is None else list(state.stats)

    def set_generate_call(self, call: dict) -> None:
        """What a generate() wrapper saw (its image metadata), or {} when it returns. Either way a new call starts:
        projector inputs captured before are not this call's."""
        self._local.generate_call = call
        self._local.pre_projector, self._local.call_projector = [], []

    @contextlib.contextmanager
    def paused(self):
        """Run the model unpruned in this thread (other threads are unaffected)."""
        self._local.paused += 1
        try:
            yield
        finally:
            self._local.paused -= 1

    def _live(self) -> Optional[CallState]:
        return None if self._local.paused else self._local.state

    def projector(self):
        """The projector as the strategy scores through it, with the model's current weights: the live module when
        it is float32, else a float32 copy made for this call. No copy is kept: weights can change in ways no
        version counter sees (``param.data = ...``), and a stale copy would score with old weights."""
        module = self.adapter.projector_mlp()
        if all(p.dtype == torch.float32 for p in module.parameters()):
            return module
        # The memo stops the copy at this Pruner (bound in the projector's capture hook): not the whole model.
        return copy.deepcopy(module, memo={id(self): self}).float()

    # ---------------------------------------------------------------- capture callbacks
    def wants_attention(self) -> bool:
        state = self._live()
        return state is not None and state.prefill

    def attention_segments(self) -> Optional[torch.Tensor]:
        """[B, L] packed-sample ids of the sequence whose attention is being captured (None: one sample per row)."""
        return self._local.state.seq.segment

    def record_attention(self, probs: torch.Tensor, seconds: float = 0.0):
        captured = self._local.state.captured
        captured.attention, captured.score_time_s = probs, seconds

    def _queries_hook(self, heads: int, module, args, output):
        state = self._live()
        if state is not None and state.prefill:
            state.captured.queries = output.view(*output.shape[:2], heads, -1)

    def _projector_hook(self, module, args):
        # Images are encoded before the prefill (inside generate(), or in the body's forward).
        if not (self._local.paused or self._local.selecting):
            self._local.pre_projector.append(args[0].detach())

    # ---------------------------------------------------------------- hooks
    def _top_hook(self, module, args, kwargs):
        if kwargs.get("labels") is not None and (kwargs.get("pixel_values") is not None
                                                 or kwargs.get("mm_encoder_outputs")):
            raise NotImplementedError("vtprune: labels (a loss) with pruning are not supported: logits cover text + "
                                      "kept tokens only and no longer line up with labels; remove_pruner(model) "
                                      "for training or scoring with labels")
        return None

    def _body_hook(self, module, args, kwargs):
        if self._local.paused:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = _cache(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            # generate() encodes images before prefill and passes mm_encoder_outputs instead of the image
            # metadata, so fall back to what its wrapper saw.
            gen = self._local.generate_call
            call = {key: kwargs.get(key) if kwargs.get(key) is not None else gen.get(key) for key in CALL_KEYS}
            call["input_ids"] = input_ids
            self._local.state = CallState(call=call)
            if not kwargs.get("mm_encoder_outputs"):
                self._local.pre_projector = []  # this forward encodes its images itself, after this hook
                return None
            return self._early_prefill(self._local.state, args, kwargs)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None \
                or encoded.get("image") or encoded.get("video"):
            raise NotImplementedError("vtprune: images on top of a non-empty cache (multi-turn or prefix cache "
                                      "reuse) are not supported; start a new cache for each prompt")
        # The decode steps of the call whose prefill filled this cache (a cache no pruned prefill filled is the
        # stock model's business), whichever call or thread continues it.
        state = getattr(cache, CALL_ATTR, None)
        if state is None or not state.active:
            return None
        self._local.state = state
        if len(args) == 1 and "input_ids" not in kwargs:  # LLaVA-NeXT passes input_ids by position
            args, kwargs = (), dict(kwargs, input_ids=args[0])
        kwargs = self._drop_refed(state, kwargs)
        if kwargs.get("position_ids") is None:
            # The model would derive positions from the (pruned) cache length: continue the original numbering.
            q = (kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
            pos = state.next_pos[:, None] + torch.arange(q, device=state.next_pos.device)
            kwargs = dict(kwargs, position_ids=pos if self.adapter.position_kind == "1d" else pos.expand(3, -1, -1))
        return args, kwargs

    @staticmethod
    def _drop_refed(state: CallState, kwargs: dict) -> dict:
        """``generate(past_key_values=cache)`` continuing a returned cache slices its input from the cache length,
        which the layer-0 stage made ``state.dropped`` shorter than what the call consumed: the first ``dropped``
        tokens it feeds are already in the cache. Drop them, when the 2D mask (the whole sequence) shows exactly
        that re-feed; anything else is left to ``_decode``'s checks."""
        mask = kwargs.get("attention_mask")
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if state.dropped == 0 or tokens is None or mask is None or not torch.is_tensor(mask) or mask.dim() != 2:
            return kwargs
        new = mask.shape[1] - state.prompt_len - state.fed
        if new < 1 or tokens.shape[1] - new != state.dropped:
            return kwargs
        cut = {key: kwargs[key][:, -new:] for key in ("input_ids", "inputs_embeds") if kwargs.get(key) is not None}
        cut.update({key: kwargs[key][..., -new:] for key in ("position_ids", "mm_token_type_ids", "token_type_ids")
                    if torch.is_tensor(kwargs.get(key))})
        return dict(kwargs, **cut)

    def _body_output_hook(self, module, args, output):
        state = self._local.state
        if state is not None and state.encoded is not None:
            if hasattr(output, "image_outputs"):
                output.image_outputs = state.encoded.get("image")  # the caller's, not the shortened copy
            state.encoded = None
        return output

    def _early_prefill(self, state: CallState, args, kwargs):
        """A layer-0 stage on pre-encoded image features, before the body embeds them: the body then builds only
        the shorter sequence (the embeddings, mask and positions compacting the full one would give, bit for bit:
        dummy slots hold the same dropped tokens), and neither embeds nor scatters the dropped tokens."""
        stage, method = self.stages[0], self.methods[0]
        if args or stage.layer != 0 or stage.options["merge"] or "text" in method.needs:
            return None
        rows = self.adapter.encoded_rows(kwargs)
        input_ids = state.call["input_ids"]
        if rows is None or input_ids is None or self._segments(kwargs, kwargs.get("position_ids"), 1) is not None:
            return None  # packed samples take the language-model path, which builds their mask
        vis = self.adapter.visual_mask(input_ids)
        if int(vis.sum()) != rows.shape[0] or rows.shape[0] == 0:
            return None  # no image, or a count mismatch the model itself reports
        weight = self.adapter.base.get_input_embeddings().weight
        rows = rows.to(weight.device, weight.dtype)  # as the body casts them
        pos = self._begin(state, kwargs, vis, None, weight.device)
        index, _, stats = self._layer0(state, input_ids, vis, None, None, visual=rows)
        new_pos = self._record_layer0(state, stats, "torch", ops.gather_last(pos, index))
        rank = (vis.flatten().cumsum(0) - 1).view_as(vis).gather(1, index)  # each slot's row of ``rows``
        encoded = dict(kwargs["mm_encoder_outputs"])
        state.encoded, state.early = kwargs["mm_encoder_outputs"], True
        encoded.update(self.adapter.with_encoded_rows(encoded, rows[rank[vis.gather(1, index)]]))
        return (), dict(kwargs, input_ids=input_ids.gather(1, index), attention_mask=state.seq.mask,
                        position_ids=new_pos, mm_encoder_outputs=encoded)

    def _lm_hook(self, module, args, kwargs):
        cache = _cache(kwargs)
        if getattr(cache, "is_compileable", False):
            raise NotImplementedError("vtprune does not support static/compilable caches (cache_implementation="
                                      "'static'); use the default dynamic cache")
        embeds = kwargs.get("inputs_embeds")
        prefill = cache is None or cache.get_seq_length() == 0
        self._local.lm_prefill = prefill
        if prefill and cache is not None:
            cache.__dict__.pop(CALL_ATTR, None)  # a cache started over belongs to this prefill, pruned or not
        state = self._live() if prefill else (None if self._local.paused else getattr(cache, CALL_ATTR, None))
        if embeds is None or state is None:
            return None
        if prefill:
            return self._prefill(state, kwargs, embeds)
        if state.active:
            return self._decode(state, kwargs, embeds)
        return None

    def _lm_output_hook(self, module, args, output):
        """Tag the cache a pruned prefill filled with its call, so that its decode steps (in this generate(), a
        later one continuing from it, or a manual loop) find the call whatever ran in between."""
        if not self._local.lm_prefill:
            return output
        self._local.lm_prefill = False
        state, cache = self._live(), _output_cache(output)
        if cache is not None and state is not None and state.active:
            setattr(cache, CALL_ATTR, state)
        return output

    def _prefill(self, state: CallState, kwargs, embeds):
        if state.early:  # the body hook pruned already; a second run of the language model starts over
            state.early = False
            return None
        if state.active:  # the language model run again on the same body call (uncached re-entry): start over
            state = self._local.state = CallState(call=state.call)
        input_ids = state.call.get("input_ids")
        if input_ids is None or input_ids.shape[:2] != embeds.shape[:2]:
            if not self._warned_embeds:
                self._warned_embeds = True
                warnings.warn("vtprune: this prefill was given inputs_embeds without input_ids, so the visual tokens "
                              "cannot be located and nothing was pruned; pass input_ids (as the processor "
                              "returns them)", stacklevel=4)
            return None
        vis = self.adapter.visual_mask(input_ids)
        if not bool(vis.any()):
            return None
        newline = None
        if self._needs & {"newline_mask", "projector"}:
            # Newline flags are read by strategies that ask for them and keep newline slots out of projector rows.
            newline = self.adapter.newline_mask(embeds, vis)
        pos = self._begin(state, kwargs, vis, newline, embeds.device)
        if self.stages[0].layer != 0:
            return (), dict(kwargs, attention_mask=self._lm_mask(state, embeds), position_ids=pos)
        index, embeds, stats = self._layer0(state, input_ids, vis, newline, embeds)
        new_embeds, new_pos, _, ran = ops.compact(embeds, index, pos, with_backend=True)
        new_pos = self._record_layer0(state, stats, ran, new_pos)
        kwargs = dict(kwargs, inputs_embeds=new_embeds, attention_mask=self._lm_mask(state, new_embeds),
                      position_ids=new_pos)
        kwargs.update(self.adapter.after_compact(state, 0, index, kwargs))
        return (), kwargs

    def _lm_mask(self, state: CallState, embeds):
        """The attention mask the language model is given for the current sequence: its 2D mask, or for packed
        samples (``seq.segment``) the mask transformers would build for them, built here (a 4D mask, or one per
        layer type), since the language model detects packing only from an absent mask and unbroken positions."""
        if state.seq.segment is None:
            return state.seq.mask
        types = sorted(set(getattr(self.adapter.text_config, "layer_types", None) or ["full_attention"]))
        masks = {t: self._causal_mask(t, embeds, state.seq.mask, None, state.seq.segment) for t in types}
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def _segments(self, kwargs: dict, pos, batch: int) -> Optional[torch.Tensor]:
        """[B, L] long, the packed sample each token belongs to, when transformers would treat this prefill as packed
        samples (no attention mask, no cache given or to be made, and text position ids that restart); else None."""
        if pos is None or kwargs.get("attention_mask") is not None or _cache(kwargs) is not None \
                or kwargs.get("use_cache"):
            return None
        text = self.adapter.mask_positions(pos)
        return None if text is None else find_packed_sequence_indices(text.expand(batch, -1))

    def _layer0(self, state: CallState, input_ids, vis, newline, hidden, visual=None):
        """The layer-0 stage, on the full sequence's ``hidden`` or on the ``visual`` rows alone (``run_stage``),
        after recording the projector rows it reads. Returns ``_run``'s (index, hidden, stats)."""
        captured, self._local.pre_projector = self._local.pre_projector, []
        if captured:  # generate(use_cache=False) runs every step as a prefill on the images it encoded once
            self._local.call_projector = captured
        elif self._local.generate_call:
            captured = self._local.call_projector
        if "projector" in self._needs and captured:
            self._capture_projector(state, captured, input_ids, vis, newline)
        return self._run(state, 0, hidden, visual)

    def _record_layer0(self, state: CallState, stats: dict, compact: str, new_pos):
        """Keep the layer-0 stage's stats (with the backend that built the short sequence); returns the kept
        tokens' position ids, renumbered when the config asks."""
        state.stats.append(StageStats(**{**stats, "backend": {**stats["backend"], "compact": compact}}))
        state.dropped = state.prompt_len - state.seq.mask.shape[1]
        if self.cfg.positions == "renumber":
            new_pos, state.runs[0].shift = self._renumber(state)
        return new_pos

    def _begin(self, state: CallState, kwargs, vis, newline, device):
        """The prefill's sequence flags, units and next position; returns its position ids [B, L] (or [3, B, L])."""
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise NotImplementedError("vtprune needs a 2D attention mask (or none) on prefill, got "
                                      f"{type(mask).__name__} with shape {tuple(getattr(mask, 'shape', ()))}")
        b, length = vis.shape
        state.active, state.prefill, state.prompt_len = True, True, length
        mask = mask.long() if mask is not None else torch.ones(b, length, dtype=torch.long, device=device)
        needs = self._needs
        state.units = self._units(state.call, vis)
        pos = kwargs.get("position_ids")
        state.seq = Sequence(vis=vis, mask=mask, newline=newline if "newline_mask" in needs else None,
                             pad=self.adapter.pad_mask(state.call, vis) if "pad_mask" in needs else None,
                             unit=_unit_ids(vis, state.units), segment=self._segments(kwargs, pos, b))
        if pos is None:
            pos = self.adapter.default_positions(b, length, 0, device)
        state.next_pos = self._max_pos(pos) + 1
        return pos

    def _units(self, call: dict, vis: torch.Tensor) -> list:
        """The adapter's units per row; a row whose units do not add up to its visual tokens is one image."""
        units = self.adapter.units(call, vis)
        counts = vis.sum(1).tolist()
        return [row if sum(u.length for u in row) == n else ([Unit("image", n)] if n else [])
                for row, n in zip(units, counts)]

    def _capture_projector(self, state: CallState, captured: list, input_ids, vis, newline):
        """Projector inputs as one table, and each visual token's row in it (-1 for newline slots)."""
        rows = self.adapter.projector_rows(captured, state.call)
        ids = self.adapter.visual_token_ids(self.model.config)
        index = torch.full_like(input_ids, -1)
        table, offset = [], 0
        for kind, kind_rows in rows.items():
            mine = (input_ids == ids[kind]) & vis
            if newline is not None:
                mine &= ~newline
            flat = mine.flatten()
            if int(flat.sum()) != kind_rows.shape[0]:
                raise RuntimeError(f"vtprune: {kind_rows.shape[0]} projector rows were captured for the {kind}s but "
                                   f"the prompt holds {int(flat.sum())} of their tokens")
            index.view(-1)[flat] = offset + torch.arange(kind_rows.shape[0], device=input_ids.device)
            table.append(kind_rows)
            offset += kind_rows.shape[0]
        state.captured.pre_projector = torch.cat(table).to(input_ids.device) if table else None
        state.captured.pre_index = index
        state.captured.projector = self.projector()

    def _run(self, state: CallState, i: int, hidden, visual=None):
        stage = self.stages[i]
        self._local.selecting = True
        try:
            index, hidden, state.seq, stats = run_stage(stage, self.methods[i], hidden, state.seq, state.captured,
                                                        state.units, len(self.adapter.layers), visual)
        finally:
            self._local.selecting = False
        state.runs[stage.layer] = _StageRun(stage.layer, kept_mask=state.seq.mask)
        state.captured = Captured()  # scores are aligned to the sequence before this stage
        return index, hidden, stats

    def _decode(self, state: CallState, kwargs, embeds):
        state.prefill = False
        b, q = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise NotImplementedError("vtprune needs a 2D attention mask on decode steps")
            expected = state.prompt_len + state.fed + q
            if mask.shape[1] != expected:
                raise ValueError(f"attention_mask has {mask.shape[1]} columns; after the pruned prompt of "
                                 f"{state.prompt_len} tokens and {state.fed} fed since, {expected}"
                                 " were expected (reuse of a cache across prompts is not supported)")
            state.new_cols = mask[:, state.prompt_len:].long()
        else:
            state.new_cols = torch.ones(b, state.fed + q, dtype=torch.long, device=embeds.device)
        state.fed += q
        pos = kwargs.get("position_ids")
        if pos is not None:
            state.next_pos = self._max_pos(pos) + 1
        run0 = state.runs.get(0)
        if run0 is None:
            return None
        kwargs = dict(kwargs, attention_mask=torch.cat([run0.kept_mask, state.new_cols], dim=1))
        if run0.shift is not None and pos is not None:
            kwargs["position_ids"] = pos - run0.shift[:, None]
        return (), kwargs

    def _make_layer_hook(self, layer_idx: int):
        stage_i = next((i for i, s in enumerate(self.stages) if s.layer == layer_idx), None)
        # A partial of a bound method, not a closure: copy.deepcopy(model) rebinds it to the copy's Pruner.
        return functools.partial(self._layer_hook, layer_idx, stage_i)

    def _layer_hook(self, layer_idx: int, stage_i: Optional[int], module, args, kwargs):
        state = self._live()
        if state is None or not state.active:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs = dict(kwargs)
        if stage_i is not None:
            if state.prefill:
                # A second in-LLM stage gathers from the tensors the earlier one left, not the model's own.
                earlier = self._current_run(state, layer_idx - 1)
                kwargs.update(earlier.overrides if earlier is not None else {})
                hidden = self._layer_stage(state, stage_i, hidden, kwargs)
            else:
                self._layer_decode(state, stage_i, hidden, kwargs)
        current = self._current_run(state, layer_idx)
        if current is None:
            return None
        kwargs.update(current.overrides)
        kwargs.pop("hidden_states", None)
        return (hidden,), kwargs

    @staticmethod
    def _current_run(state: CallState, layer_idx: int) -> Optional[_StageRun]:
        layers = [layer for layer in state.runs if 0 < layer <= layer_idx]
        return state.runs[max(layers)] if layers else None

    # ---------------------------------------------------------------- in-LLM stages
    def _layer_stage(self, state: CallState, i: int, hidden, kwargs):
        index, hidden, stats = self._run(state, i, hidden)
        run = state.runs[self.stages[i].layer]
        new_hidden, new_pos, _, ran = ops.compact(hidden, index, kwargs.get("position_ids"), with_backend=True)
        state.stats.append(StageStats(**{**stats, "backend": {**stats["backend"], "compact": ran}}))
        cos, sin = kwargs["position_embeddings"]
        if self.cfg.positions == "renumber":
            new_pos, run.shift = self._renumber(state)
            cos, sin = self.adapter.language_model.rotary_emb(new_hidden, new_pos)
        else:
            cos, sin = ops.gather_tokens(cos, index), ops.gather_tokens(sin, index)
        run.overrides = {"position_embeddings": (cos, sin), "position_ids": new_pos,
                         "attention_mask": self._layer_mask(run.layer, new_hidden, state.seq.mask, kwargs,
                                                            state.seq.segment)}
        run.overrides.update(self.adapter.after_compact(state, run.layer, index, kwargs))
        return new_hidden

    def _layer_decode(self, state: CallState, i: int, hidden, kwargs):
        run = state.runs.get(self.stages[i].layer)
        if run is None:
            return
        mask2d = torch.cat([run.kept_mask, state.new_cols], dim=1)
        run.overrides = {"attention_mask": self._layer_mask(run.layer, hidden, mask2d, kwargs)}
        if run.shift is not None:
            pos = kwargs.get("position_ids")
            if pos is None:
                q = hidden.shape[1]
                pos = (state.next_pos - q)[:, None] + torch.arange(q, device=hidden.device)
            pos = pos - run.shift[:, None]
            run.overrides.update(position_embeddings=self.adapter.language_model.rotary_emb(hidden, pos),
                                 position_ids=pos)

    def _layer_mask(self, layer: int, hidden, mask2d, kwargs, segment=None):
        """The mask this layer's attention expects, for a sequence described by ``mask2d`` (and ``segment``, packed
        samples) and its own cache."""
        if kwargs.get("attention_mask") is None and segment is None and bool(mask2d.all()):
            # The model found the full sequence needs no mask (sdpa's or flash's causal skip: no padding, and no
            # past or a single query); a subsequence without padding at the same query length needs none either.
            return None
        types = getattr(self.adapter.text_config, "layer_types", None)
        kind = types[layer] if types is not None else "full_attention"
        return self._causal_mask(kind, hidden, mask2d, _cache(kwargs), segment, layer)

    def _causal_mask(self, kind: str, hidden, mask2d, cache, segment, layer: Optional[int] = None):
        """transformers' own mask for a layer of ``kind`` ("full_attention" / "sliding_attention") over ``mask2d``;
        packed samples (``segment`` [B, L]) see only their own tokens, as transformers' packed mask has them."""
        cfg = self.adapter.text_config
        fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        extra = {}
        if segment is not None and not (cfg._attn_implementation or "").startswith("flash"):
            # (flash attention splits packed samples from the position ids, which restart at each sample)
            extra["and_mask_function"] = packed_sequence_mask_function(segment)
        return fn(config=cfg, inputs_embeds=hidden, attention_mask=mask2d, cache=cache, position_ids=None,
                  layer_idx=layer, **extra)

    # ---------------------------------------------------------------- positions
    @staticmethod
    def _renumber(state: CallState):
        """Contiguous positions over the kept sequence (1-D RoPE). Returns (positions [B, L'], shift [B])."""
        new = (state.seq.mask.cumsum(1) - 1).clamp(min=0)
        return new, state.next_pos - (new.max(dim=1).values + 1)

    @staticmethod
    def _max_pos(pos):
        p = pos if pos.dim() == 2 else pos[-3:].amax(dim=0)
        return p.amax(dim=-1)


def _unit_ids(vis: torch.Tensor, units: list) -> torch.Tensor:
    """[B, L] long: each visual token's unit index within its row (units are consecutive runs), -1 elsewhere."""
    if max((len(row) for row in units), default=0) <= 1:
        return torch.where(vis, 0, -1)
    ordinal = vis.long().cumsum(1) - 1  # the token's rank among its row's visual tokens
    ends = [[sum(u.length for u in row[: i + 1]) for i in range(len(row))] for row in units]
    width = max(len(e) for e in ends)
    bounds = torch.tensor([e + [e[-1] if e else 0] * (width - len(e)) for e in ends], device=vis.device)
    return torch.where(vis, torch.searchsorted(bounds, ordinal, right=True), -1)
