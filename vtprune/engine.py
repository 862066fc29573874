"""The patch layer: forward pre-hooks on one model instance that shrink the sequence at each stage.

Prefill (empty cache): the body hook records ``input_ids`` and the call's image metadata; the language-model hook
runs a layer-0 stage on the merged embeddings, mask and position ids; a pre-hook on decoder layer K runs an
in-LLM stage on the hidden states, cos/sin, position ids and a mask rebuilt for that layer's cache. Every layer
from a stage on then receives the stage's tensors, so the KV cache of those layers holds text + kept tokens only.

Decode (non-empty cache): the 2D mask that ``generate`` grows over the original prompt is rebuilt per stage as
(mask kept at prefill) + (columns of the new tokens); positions continue in the original numbering.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from . import capture, ops
from .config import PrunerConfig, StageConfig
from .stage import Captured, Sequence, run_stage
from .strategies.base import get_method


@dataclass
class _StageRun:
    """What one stage did on the last prefill; kept for the decode steps."""

    layer: int
    kept_mask: torch.Tensor  # [B, L_out] long: the 2D mask after this stage (0 on dummy/pad slots)
    shift: Optional[torch.Tensor] = None  # [B] renumbering offset (positions="renumber")
    overrides: dict = field(default_factory=dict)  # tensors every layer from this stage on receives


class Pruner:
    """The state and hooks of one patched model instance."""

    def __init__(self, model, adapter, cfg: PrunerConfig):
        self.model, self.adapter, self.cfg = model, adapter, cfg
        self.stages: list[StageConfig] = cfg.resolved_stages(len(adapter.layers), adapter.family, model)
        self.methods = [get_method(s.method) for s in self.stages]
        needs = set().union(*(m.needs for m in self.methods))
        self._needs = needs  # per-token flags are computed on each prefill only for methods that read them
        self._projector = adapter.projector_fn() if "projector" in needs else None
        self._handles, self._captures = [], []
        self.generate_call: dict = {}  # image metadata given to the running generate() call
        self.stats: list[dict] = []
        self._pre_projector = None
        self._reset_prefill()
        self.active = False

    # ---------------------------------------------------------------- install / remove
    def install(self):
        body, lm = self.adapter.base, self.adapter.language_model
        self._handles.append(self.model.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        self._handles.append(body.register_forward_pre_hook(self._body_hook, with_kwargs=True))
        self._handles.append(lm.register_forward_pre_hook(self._lm_hook, with_kwargs=True))
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
                self._handles.append(prev.q_proj.register_forward_hook(self._queries_hook))
        if self._projector is not None:
            self._handles.append(self.adapter.projector_module().register_forward_pre_hook(self._projector_hook))

    def remove(self):
        for h in self._handles:
            h.remove()
        for token in self._captures:
            capture.detach(token)
        self._handles, self._captures = [], []

    # ---------------------------------------------------------------- capture callbacks
    def wants_attention(self) -> bool:
        return self.prefill

    def record_attention(self, probs: torch.Tensor):
        self.captured.attention = probs

    def _queries_hook(self, module, args, output):
        if self.prefill:
            heads = self.adapter.text_config.num_attention_heads
            self.captured.queries = output.view(*output.shape[:2], heads, -1)

    def _projector_hook(self, module, args):
        # Images are encoded before the prefill (inside generate(), or in the body's forward).
        self._pre_projector = args[0].detach()

    # ---------------------------------------------------------------- hooks
    def _top_hook(self, module, args, kwargs):
        if kwargs.get("labels") is not None and (kwargs.get("pixel_values") is not None
                                                 or kwargs.get("mm_encoder_outputs")):
            raise NotImplementedError("vtprune: labels (a loss) with pruning are not supported: logits cover text + "
                                      "kept tokens only and no longer line up with labels; remove_pruner(model) "
                                      "for training or scoring with labels")
        return None

    def _body_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            # generate() encodes images before prefill and passes mm_encoder_outputs instead of the image
            # metadata, so fall back to what its wrapper saw.
            self.call = {key: kwargs.get(key) if kwargs.get(key) is not None else self.generate_call.get(key)
                         for key in ("image_grid_thw", "image_sizes", "pixel_values")}
            self.call["input_ids"] = input_ids
            return None
        if kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image"):
            raise NotImplementedError("vtprune: images on top of a non-empty cache (multi-turn or prefix cache "
                                      "reuse) are not supported; start a new cache for each prompt")
        if not self.active:
            return None
        if kwargs.get("position_ids") is None:
            # The model would derive positions from the (pruned) cache length: continue the original numbering.
            q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            pos = self.next_pos[:, None] + torch.arange(q, device=self.next_pos.device)
            kwargs = dict(kwargs, position_ids=pos if self.adapter.position_kind == "1d" else pos.expand(3, -1, -1))
            return args, kwargs
        return None

    def _lm_hook(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if getattr(cache, "is_compileable", False):
            raise NotImplementedError("vtprune does not support static/compilable caches (cache_implementation="
                                      "'static'); use the default dynamic cache")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        if cache is None or cache.get_seq_length() == 0:
            return self._prefill(kwargs, embeds)
        if self.active:
            return self._decode(kwargs, embeds)
        return None

    def _prefill(self, kwargs, embeds):
        self._reset_prefill()
        input_ids = self.call.get("input_ids")
        if input_ids is None or input_ids.shape[:2] != embeds.shape[:2]:
            return None  # called without input_ids (inputs_embeds only): positions of images unknown
        vis = self.adapter.visual_mask(input_ids)
        if not bool(vis.any()):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
            raise NotImplementedError("vtprune needs a 2D attention mask (or none) on prefill, got "
                                      f"{type(mask).__name__} with shape {tuple(getattr(mask, 'shape', ()))}")
        b, length = vis.shape
        self.active, self.prefill, self.prompt_len = True, True, length
        mask = mask.long() if mask is not None else torch.ones(b, length, dtype=torch.long, device=embeds.device)
        needs = self._needs
        self.seq = Sequence(vis=vis, mask=mask,
                            newline=self.adapter.newline_mask(embeds, vis) if "newline_mask" in needs else None,
                            pad=self.adapter.pad_mask(self.call, vis) if "pad_mask" in needs else None)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = self.adapter.default_positions(b, length, 0, embeds.device)
        self.next_pos = self._max_pos(pos) + 1
        kwargs = dict(kwargs, attention_mask=mask, position_ids=pos)
        if self.stages[0].layer != 0:
            return (), kwargs
        if self._projector is not None and self._pre_projector is not None:
            self.captured.pre_projector = self.adapter.projector_rows(self._pre_projector, self.call)
            self.captured.projector = self._projector
        if "grid" in self._needs:
            self.captured.grids = self.adapter.grids(self.call, vis.sum(1).tolist())
        index, embeds = self._run(0, embeds)
        run = self.runs[0]
        new_embeds, new_pos, _ = ops.compact(embeds, index, pos)
        self.stats[-1]["backend"] = ops.last_backend()
        if self.cfg.positions == "renumber":
            new_pos, run.shift = self._renumber()
        kwargs.update(inputs_embeds=new_embeds, attention_mask=self.seq.mask, position_ids=new_pos)
        return (), kwargs

    def _reset_prefill(self):
        self.call = getattr(self, "call", {})
        self.active = self.prefill = False
        self.runs: dict[int, _StageRun] = {}
        self.stats = []
        self.captured = Captured()
        self.seq: Optional[Sequence] = None
        self.prompt_len = self.fed = 0  # tokens fed after the prefill
        self.next_pos: Optional[torch.Tensor] = None  # [B] next original position id
        self.new_cols: Optional[torch.Tensor] = None  # [B, fed + q] mask columns of tokens after the prompt

    def _run(self, i: int, hidden):
        stage = self.stages[i]
        index, hidden, self.seq, stats = run_stage(stage, self.methods[i], hidden, self.seq, self.captured,
                                                   len(self.adapter.layers))
        self.stats.append(stats)
        self.runs[stage.layer] = _StageRun(stage.layer, kept_mask=self.seq.mask)
        self.captured = Captured()  # scores are aligned to the sequence before this stage
        return index, hidden

    def _decode(self, kwargs, embeds):
        self.prefill = False
        b, q = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise NotImplementedError("vtprune needs a 2D attention mask on decode steps")
            if mask.shape[1] != self.prompt_len + self.fed + q:
                raise ValueError(f"attention_mask has {mask.shape[1]} columns; after the pruned prompt of "
                                 f"{self.prompt_len} tokens and {self.fed} fed since, {self.prompt_len + self.fed + q}"
                                 " were expected (reuse of a cache across prompts is not supported)")
            self.new_cols = mask[:, self.prompt_len:].long()
        else:
            self.new_cols = torch.ones(b, self.fed + q, dtype=torch.long, device=embeds.device)
        self.fed += q
        pos = kwargs.get("position_ids")
        if pos is not None:
            self.next_pos = self._max_pos(pos) + 1
        run0 = self.runs.get(0)
        if run0 is None:
            return None
        kwargs = dict(kwargs, attention_mask=torch.cat([run0.kept_mask, self.new_cols], dim=1))
        if run0.shift is not None and pos is not None:
            kwargs["position_ids"] = pos - run0.shift[:, None]
        return (), kwargs

    def _make_layer_hook(self, layer_idx: int):
        stage_i = next((i for i, s in enumerate(self.stages) if s.layer == layer_idx), None)

        def hook(module, args, kwargs):
            if not self.active:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = dict(kwargs)
            if stage_i is not None:
                if self.prefill:
                    hidden = self._layer_stage(stage_i, hidden, kwargs)
                else:
                    self._layer_decode(stage_i, hidden, kwargs)
            current = self._current_run(layer_idx)
            if current is None:
                return None
            kwargs.update(current.overrides)
            kwargs.pop("hidden_states", None)
            return (hidden,), kwargs

        return hook

    def _current_run(self, layer_idx: int) -> Optional[_StageRun]:
        layers = [layer for layer in self.runs if 0 < layer <= layer_idx]
        return self.runs[max(layers)] if layers else None

    # ---------------------------------------------------------------- in-LLM stages
    def _layer_stage(self, i: int, hidden, kwargs):
        index, hidden = self._run(i, hidden)
        run = self.runs[self.stages[i].layer]
        new_hidden, new_pos, _ = ops.compact(hidden, index, kwargs.get("position_ids"))
        self.stats[-1]["backend"] = ops.last_backend()
        cos, sin = kwargs["position_embeddings"]
        if self.cfg.positions == "renumber":
            new_pos, run.shift = self._renumber()
            cos, sin = self.adapter.language_model.rotary_emb(new_hidden, new_pos)
        else:
            cos, sin = ops.gather_tokens(cos, index), ops.gather_tokens(sin, index)
        run.overrides = {"position_embeddings": (cos, sin), "position_ids": new_pos,
                         "attention_mask": self._layer_mask(run.layer, new_hidden, self.seq.mask, kwargs)}
        return new_hidden

    def _layer_decode(self, i: int, hidden, kwargs):
        run = self.runs.get(self.stages[i].layer)
        if run is None:
            return
        mask2d = torch.cat([run.kept_mask, self.new_cols], dim=1)
        run.overrides = {"attention_mask": self._layer_mask(run.layer, hidden, mask2d, kwargs)}
        if run.shift is not None:
            pos = kwargs.get("position_ids")
            if pos is None:
                q = hidden.shape[1]
                pos = (self.next_pos - q)[:, None] + torch.arange(q, device=hidden.device)
            pos = pos - run.shift[:, None]
            run.overrides.update(position_embeddings=self.adapter.language_model.rotary_emb(hidden, pos),
                                 position_ids=pos)

    def _layer_mask(self, layer: int, hidden, mask2d, kwargs):
        """The mask this layer's attention expects, for a sequence described by ``mask2d`` and its own cache."""
        cfg = self.adapter.text_config
        layer_types = getattr(cfg, "layer_types", None)
        fn = create_causal_mask
        if layer_types is not None and layer_types[layer] == "sliding_attention":
            fn = create_sliding_window_causal_mask
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return fn(config=cfg, inputs_embeds=hidden, attention_mask=mask2d, cache=cache, position_ids=None,
                  layer_idx=layer)

    # ---------------------------------------------------------------- positions
    def _renumber(self):
        """Contiguous positions over the kept sequence (1-D RoPE). Returns (positions [B, L'], shift [B])."""
        new = (self.seq.mask.cumsum(1) - 1).clamp(min=0)
        return new, self.next_pos - (new.max(dim=1).values + 1)

    @staticmethod
    def _max_pos(pos):
        p = pos if pos.dim() == 2 else pos[-3:].amax(dim=0)
        return p.amax(dim=-1)
