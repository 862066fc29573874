"""The patch layer: forward hooks on one model instance that shrink the sequence at each stage.

Prefill (empty cache): the body hook records ``input_ids`` and the call's image metadata; the language-model hook
runs a layer-0 stage on the merged embeddings, mask and position ids; a pre-hook on decoder layer K runs an
in-LLM stage on the hidden states, cos/sin, position ids and a mask rebuilt for that layer's cache. Every layer
from a stage on then receives the stage's tensors, so the KV cache of those layers holds text + kept tokens only.

Decode (non-empty cache): the cache a pruned prefill filled carries its call (``calls.CALL_ATTR``); the 2D mask that
``generate`` grows over the original prompt is rebuilt per stage as (mask kept at prefill) + (columns of the new
tokens), and positions continue in the original numbering.

Everything the pruner changes on the model is declared in ``_declared`` and installed and removed in one place
(``hooks``).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from transformers.cache_utils import Cache

from . import capture
from .calls import CALL_ATTR, CallState, StageOutput, ThreadState
from .config import PrunerConfig, StageConfig
from .decode import DecodeSteps
from .hooks import Hook, Patch, install_all, remove_all
from .masks import cache_of
from .patches.base import CALL_KEYS
from .prefill import PrefillSteps
from .strategies.base import get_method
from .tower import TowerSteps


class Pruner(TowerSteps, PrefillSteps, DecodeSteps):
    """The configuration and hooks of one patched model instance. Per-call state lives in ``CallState``."""

    def __init__(self, model, adapter, cfg: PrunerConfig):
        self.model, self.adapter, self.cfg = model, adapter, cfg
        self.stages: list[StageConfig] = cfg.resolved_stages(adapter)
        self.methods = [get_method(s.method) for s in self.stages]
        # Per-token flags are computed on each prefill only for methods that read them under their options:
        # LLaVA's padding flags cost more than FastV's choosing, and only its "sink" debiasing reads them.
        self._needs = set().union(*(m.needs_for(s.options) for s, m in zip(self.stages, self.methods)))
        # (keep ratio, layer K) of the decode stage, or None; the attention modules stages capture at prefill.
        self.decode_stage = next(
            (
                (s.options["decode_keep_ratio"], s.options["decode_layer"])
                for s in self.stages
                if s.options.get("decode_keep_ratio") is not None
            ),
            None,
        )
        self._prefill_capture = {
            id(adapter.attention(s.layer - 1))
            for s, m in zip(self.stages, self.methods)
            if s.layer > 0 and "attention" in m.needs
        }
        self._undo: list = []
        self._local = ThreadState()
        self._warned_embeds = False

    # ---------------------------------------------------------------- copies
    def __deepcopy__(self, memo):
        """A copy for a deep-copied model: same settings, hooks bound to the copy, no call in flight."""
        new = Pruner.__new__(Pruner)
        memo[id(self)] = new
        fresh = {"_local": ThreadState()}
        for key, value in self.__dict__.items():
            setattr(new, key, fresh[key] if key in fresh else copy.deepcopy(value, memo))
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "a model patched by vtprune cannot be pickled (torch.save / pickle): its hooks are bound "
            "to this process. Call vtprune.remove_pruner(model) before saving, and apply_pruner again "
            "after loading (or save model.state_dict(), which is unaffected)"
        )

    # ---------------------------------------------------------------- lifecycle
    def _declared(self) -> list:
        """Every change this pruner makes to the model, in installation order."""
        a = self.adapter
        items = [
            Hook(self.model, "pre", self._top_hook),
            Hook(a.body, "pre", self._body_hook),
            Hook(a.language_model, "pre", self._lm_hook),
            Hook(a.language_model, "post", self._lm_output_hook, with_kwargs=False),
        ]
        if self.stages[0].layer <= 0:  # a layer-0 or tower stage can run in the body hook
            items.append(Hook(a.body, "post", self._body_output_hook, with_kwargs=False))
        first = min((s.layer for s in self.stages if s.layer > 0), default=None)
        if first is not None:
            items += [Hook(a.layers[i], "pre", self._layer_hook_for(i)) for i in range(first, len(a.layers))]
        for stage, method in zip(self.stages, self.methods):
            if stage.layer == 0:
                continue
            if "attention" in method.needs:
                items.append(Patch(functools.partial(capture.attach, a.attention(stage.layer - 1), self)))
            if "queries" in method.needs:
                heads = a.text_config.num_attention_heads
                items.append(
                    Hook(
                        a.query_projection(stage.layer - 1),
                        "post",
                        functools.partial(self._queries_hook, heads),
                        with_kwargs=False,
                    )
                )
            if "keys" in method.needs:
                items.append(Hook(a.key_projection(stage.layer - 1), "post", self._keys_hook, with_kwargs=False))
        if self.decode_stage is not None:
            k = self.decode_stage[1]
            if id(a.attention(k - 1)) not in self._prefill_capture:  # one capturing function per module
                items.append(Patch(functools.partial(capture.attach, a.attention(k - 1), self)))
            # After the stages' own layer hooks, so the step's mask they rebuild is the one narrowed here.
            items += [
                Hook(a.layers[i], "pre", functools.partial(self._decode_stage_hook, i)) for i in range(k, len(a.layers))
            ]
        if "projector" in self._needs:
            items.append(Hook(a.projector_module(), "pre", self._projector_hook, with_kwargs=False))
        items += self._tower_items()
        items.append(Patch(self._install_adapter))
        return items

    def _install_adapter(self):
        self.adapter.install(self.current_extra)
        return self.adapter.remove

    def install(self):
        self._undo = install_all(self._declared())

    def remove(self):
        remove_all(self._undo)
        self._undo = []

    # ---------------------------------------------------------------- per-call state
    @property
    def state(self) -> CallState | None:
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
        self._local.pre_tower, self._local.call_tower = [], []
        self._local.tower_kept, self._local.call_tower_kept, self._local.tower_seconds = [], [], 0.0
        # generate() encodes the images before its prefill: the tower stage chooses then
        self._local.tower_armed = self.has_tower_stage and call.get("pixel_values") is not None

    @contextlib.contextmanager
    def paused(self):
        """Run the model unpruned in this thread (other threads are unaffected)."""
        self._local.paused += 1
        try:
            yield
        finally:
            self._local.paused -= 1

    def _live(self) -> CallState | None:
        return None if self._local.paused else self._local.state

    def current_extra(self) -> dict | None:
        """The adapter's scratch of the prefill running in this thread, or None (``Adapter.install``)."""
        state = self._live()
        return state.extra if state is not None and state.phase == "prefill" else None

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
    def wants_attention(self, module) -> bool:
        """Whether ``module`` (a captured attention) computes its last-query row now: at prefill for the stages
        that score with it, on decode steps for the decode stage."""
        state = self._live()
        if state is None:
            return False
        if state.phase == "prefill":
            return id(module) in self._prefill_capture
        return (
            state.phase == "decode"
            and self.decode_stage is not None
            and module is self.adapter.attention(self.decode_stage[1] - 1)
        )

    def attention_segments(self) -> torch.Tensor | None:
        """[B, L] packed-sample ids of the sequence whose attention is being captured (None: one sample per row)."""
        return self._local.state.flags.segment

    def record_attention(self, probs: torch.Tensor, seconds: float = 0.0):
        state = self._local.state
        if state.phase == "decode":
            state.decode_attention = probs
            return
        state.captured.attention, state.captured.score_time_s = probs, seconds

    def _queries_hook(self, heads: int, module, args, output):
        state = self._live()
        if state is not None and state.phase == "prefill":
            state.captured.queries = output.view(*output.shape[:2], heads, -1)

    def _keys_hook(self, module, args, output):
        state = self._live()
        if state is not None and state.phase == "prefill":
            state.captured.keys = output

    def _projector_hook(self, module, args):
        # Images are encoded before the prefill (inside generate(), or in the body's forward).
        if not (self._local.paused or self._local.selecting):
            self._local.pre_projector.append(args[0].detach())

    # ---------------------------------------------------------------- hooks
    def _top_hook(self, module, args, kwargs):
        if kwargs.get("labels") is not None and (
            kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs")
        ):
            raise NotImplementedError(
                "vtprune: labels (a loss) with pruning are not supported: logits cover text + "
                "kept tokens only and no longer line up with labels; remove_pruner(model) "
                "for training or scoring with labels"
            )
        return None

    def _body_hook(self, module, args, kwargs):
        if self._local.paused:
            return None
        cache = cache_of(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            # generate() encodes images before prefill and passes mm_encoder_outputs instead of the image
            # metadata, so fall back to what its wrapper saw.
            gen = self._local.generate_call
            call = {key: kwargs.get(key) if kwargs.get(key) is not None else gen.get(key) for key in CALL_KEYS}
            call["input_ids"] = kwargs.get("input_ids", args[0] if args else None)
            self._local.state = CallState(call=call)
            if self.has_tower_stage:
                return self._tower_prefill(self._local.state, args, kwargs)
            if not kwargs.get("mm_encoder_outputs"):
                # this forward encodes its images itself, after this hook
                self._local.pre_projector, self._local.pre_tower = [], []
                return None
            return self._early_prefill(self._local.state, args, kwargs)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if (
            kwargs.get("pixel_values") is not None
            or kwargs.get("pixel_values_videos") is not None
            or encoded.get("image")
            or encoded.get("video")
        ):
            raise NotImplementedError(
                "vtprune: images on top of a non-empty cache (multi-turn or prefix cache "
                "reuse) are not supported; start a new cache for each prompt"
            )
        # The decode steps of the call whose prefill filled this cache (a cache no pruned prefill filled is the
        # stock model's business), whichever call or thread continues it.
        state = getattr(cache, CALL_ATTR, None)
        if state is None or not state.pruned:
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

    def _body_output_hook(self, module, args, output):
        state = self._local.state
        if state is not None and state.encoded is not None:
            output = self.adapter.restore_encoded(output, state.encoded)  # the caller's, not the shortened copy
            state.encoded = None
        return output

    def _lm_hook(self, module, args, kwargs):
        cache = cache_of(kwargs)
        if getattr(cache, "is_compileable", False):
            raise NotImplementedError(
                "vtprune does not support static/compilable caches (cache_implementation="
                "'static'); use the default dynamic cache"
            )
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
        if state.pruned:
            return self._decode(state, kwargs, embeds)
        return None

    def _lm_output_hook(self, module, args, output):
        """Tag the cache a pruned prefill filled with its call, so that its decode steps (in this generate(), a
        later one continuing from it, or a manual loop) find the call whatever ran in between."""
        if not self._local.lm_prefill:
            return output
        self._local.lm_prefill = False
        state, cache = self._live(), _output_cache(output)
        if cache is not None and state is not None and state.pruned:
            setattr(cache, CALL_ATTR, state)
        return output

    def _layer_hook_for(self, layer_idx: int):
        stage_i = self._stage_at(layer_idx)
        # A partial of a bound method, not a closure: copy.deepcopy(model) rebinds it to the copy's Pruner.
        return functools.partial(self._layer_hook, layer_idx, stage_i)

    def _layer_hook(self, layer_idx: int, stage_i: int | None, module, args, kwargs):
        state = self._live()
        if state is None or not state.pruned:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs = dict(kwargs)
        if stage_i is not None:
            if state.phase == "prefill":
                # A second in-LLM stage gathers from the tensors the earlier one left, not the model's own.
                earlier = _output_before(state, layer_idx - 1)
                kwargs.update(earlier.overrides if earlier is not None else {})
                hidden = self._layer_stage(state, stage_i, hidden, kwargs)
            else:
                self._layer_decode(state, stage_i, hidden, kwargs)
        current = _output_before(state, layer_idx)
        if current is None:
            return None
        kwargs.update(current.overrides)
        kwargs.pop("hidden_states", None)
        return (hidden,), kwargs


def _output_before(state: CallState, layer_idx: int) -> StageOutput | None:
    """The in-LLM stage whose tensors layer ``layer_idx`` receives: the latest at or before it."""
    layers = [layer for layer in state.outputs if 0 < layer <= layer_idx]
    return state.outputs[max(layers)] if layers else None


def _output_cache(output):
    """The KV cache in a language model's output (a ModelOutput, or a tuple with return_dict=False), or None."""
    if isinstance(output, tuple):
        return next((item for item in output if isinstance(item, Cache)), None)
    return getattr(output, "cache", None)
