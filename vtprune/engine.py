"""The patch layer: forward pre-hooks on one model instance that shrink the sequence at each stage.

Prefill (empty cache): the body hook records ``input_ids`` and the call's image metadata; the language-model hook
runs a layer-0 stage on the merged embeddings, mask and position ids; a pre-hook on decoder layer K runs an
in-LLM stage on the hidden states, cos/sin, position ids and a mask rebuilt for that layer's cache. Every layer
from a stage on then receives the stage's tensors, so the KV cache of those layers holds text + kept tokens only.

Decode (non-empty cache): the 2D mask that ``generate`` grows over the original prompt is rebuilt per stage as
(mask kept at prefill) + (columns of the new tokens); positions continue in the original numbering.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from . import capture, ops
from .config import PrunerConfig, StageConfig, validate_against_model
from .strategies.base import SelectionInputs, get_method


@dataclass
class _StageRun:
    """What one stage did on the last prefill; kept for the decode steps."""

    layer: int
    kept_mask: torch.Tensor  # [B, L_out] long: the 2D mask after this stage (0 on dummy/pad slots)
    shift: Optional[torch.Tensor] = None  # [B] renumbering offset (positions="renumber")
    overrides: dict = field(default_factory=dict)  # tensors every layer from this stage on receives (prefill)
    stats: dict = field(default_factory=dict)


def keep_layout(keep: torch.Tensor):
    """Right-aligned gather index for rows keeping different numbers of tokens.

    keep: [B, L] bool. Returns (index [B, L'] long, valid [B, L'] bool) with L' = max kept per row; each row's
    kept positions in order, preceded by dummy slots (valid False) so rows stay rectangular and left padded.
    """
    b, length = keep.shape
    n_out = int(keep.sum(1).max())
    ar = torch.arange(length, device=keep.device)
    key = keep.long() * (length + ar)  # dropped first (key 0), then kept in original order
    index = key.sort(dim=1, stable=True).indices[:, length - n_out:]
    return index, keep.gather(1, index)


class Pruner:
    """The state and hooks of one patched model instance."""

    def __init__(self, model, adapter, cfg: PrunerConfig):
        self.model, self.adapter, self.cfg = model, adapter, cfg
        self.stages: list[StageConfig] = cfg.stages()
        validate_against_model(cfg, self.stages, len(adapter.layers), adapter.family)
        self.methods = [get_method(s.method) for s in self.stages]
        self._handles = []
        self._captures = []
        self.generate_call: dict = {}  # image metadata given to the running generate() call
        self.stats: list[dict] = []
        self._reset()

    # ---------------------------------------------------------------- install / remove
    def install(self):
        body, lm = self.adapter.base, self.adapter.language_model
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

    def remove(self):
        for h in self._handles:
            h.remove()
        for token in self._captures:
            capture.detach(token)
        self._handles, self._captures = [], []

    # ---------------------------------------------------------------- per-call state
    def _reset(self):
        self.call: dict = {}
        self.active = False  # the last prefill pruned something; decode steps must follow it
        self.prefill = False
        self.runs: dict[int, _StageRun] = {}
        self.vis: Optional[torch.Tensor] = None  # [B, L_cur] visual flags of the current sequence
        self.mask2d: Optional[torch.Tensor] = None  # [B, L_cur]
        self.prompt_len = 0
        self.fed = 0  # tokens fed after the prefill
        self.next_pos: Optional[torch.Tensor] = None  # [B] next original position id
        self.new_cols: Optional[torch.Tensor] = None  # [B, fed + q] mask columns of tokens after the prompt
        self._attention = None
        self._queries = None

    def wants_attention(self) -> bool:
        return self.prefill

    def record_attention(self, probs: torch.Tensor):
        self._attention = probs

    def _queries_hook(self, module, args, output):
        if self.prefill:
            self._queries = output

    # ---------------------------------------------------------------- hooks
    def _body_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        empty = cache is None or cache.get_seq_length() == 0
        if empty:
            # generate() encodes images before prefill and passes mm_encoder_outputs instead of the image
            # metadata, so fall back to what its wrapper saw.
            self.call = {key: kwargs.get(key) if kwargs.get(key) is not None else self.generate_call.get(key)
                         for key in ("image_grid_thw", "image_sizes", "pixel_values")}
            self.call["input_ids"] = input_ids
            return None
        if not self.active:
            return None
        if kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image"):
            raise NotImplementedError("vtprune: new images after a pruned prefill (multi-turn cache reuse) are "
                                      "not supported; start a new cache for each prompt")
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
            return self._decode(kwargs, embeds, cache)
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
                                      f"{type(mask).__name__} of dim {getattr(mask, 'dim', lambda: '?')()}")
        b, length = vis.shape
        self.active, self.prefill, self.prompt_len = True, True, length
        self.vis = vis
        self.mask2d = mask.long() if mask is not None else torch.ones(b, length, dtype=torch.long,
                                                                     device=embeds.device)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = self.adapter.default_positions(b, length, 0, embeds.device)
        self.next_pos = self._max_pos(pos) + 1
        kwargs = dict(kwargs, attention_mask=self.mask2d, position_ids=pos)
        stage0 = [i for i, s in enumerate(self.stages) if s.layer == 0]
        if not stage0:
            return (), kwargs
        i = stage0[0]
        index, valid = self._select(i, embeds, SelectionInputs(features=None))
        run = self.runs[self.stages[i].layer]
        new_embeds = self._gather_hidden(embeds, index, i)
        new_pos = ops.gather_last(pos, index)
        if self.cfg.positions == "renumber":
            new_pos, run.shift = self._renumber(new_pos)
        kwargs.update(inputs_embeds=new_embeds, attention_mask=self.mask2d, position_ids=new_pos)
        return (), kwargs

    def _reset_prefill(self):
        self.active, self.prefill = False, False
        self.runs, self.stats = {}, []
        self.fed, self.new_cols = 0, None
        self._attention = self._queries = None

    def _decode(self, kwargs, embeds, cache):
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
        def hook(module, args, kwargs):
            if not self.active:
                return None
            stage_i = next((i for i, s in enumerate(self.stages) if s.layer == layer_idx), None)
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
        layers = [s.layer for s in self.stages if 0 < s.layer <= layer_idx and s.layer in self.runs]
        return self.runs[max(layers)] if layers else None

    # ---------------------------------------------------------------- stages
    def _layer_stage(self, i: int, hidden, kwargs):
        stage = self.stages[i]
        attn = None
        if self._attention is not None:
            attn, self._attention = self._attention, None
        queries = None
        if self._queries is not None:
            heads = self.adapter.text_config.num_attention_heads
            queries = self._queries.view(*self._queries.shape[:2], heads, -1)
            self._queries = None
        index, valid = self._select(i, hidden, SelectionInputs(features=None), attention=attn, queries=queries)
        run = self.runs[stage.layer]
        new_hidden = self._gather_hidden(hidden, index, i)
        cos, sin = kwargs["position_embeddings"]
        pos = kwargs.get("position_ids")
        new_pos = ops.gather_last(pos, index) if pos is not None else None
        if self.cfg.positions == "renumber":
            new_pos, run.shift = self._renumber(new_pos)
            cos, sin = self.adapter.language_model.rotary_emb(new_hidden, new_pos)
        else:
            cos, sin = ops.gather_tokens(cos, index), ops.gather_tokens(sin, index)
        run.overrides = {"position_embeddings": (cos, sin), "position_ids": new_pos,
                         "attention_mask": self._layer_mask(stage.layer, new_hidden, self.mask2d, kwargs)}
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
                pos = (self.next_pos - hidden.shape[1])[:, None] + torch.arange(hidden.shape[1], device=hidden.device)
            pos = pos - run.shift[:, None]
            cos_sin = self.adapter.language_model.rotary_emb(hidden, pos)
            run.overrides.update(position_embeddings=cos_sin, position_ids=pos)

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

    def _select(self, i: int, hidden, _unused, attention=None, queries=None):
        """Choose tokens for stage ``i`` on the current sequence; updates vis/mask2d and records the run.

        hidden: [B, L_cur, D]. Returns (index [B, L'] into L_cur, valid [B, L'])."""
        stage, method = self.stages[i], self.methods[i]
        vis = self.vis
        counts = vis.sum(1).tolist()
        t0 = time.perf_counter()
        keep = ~vis
        kept_vis_idx: list[Optional[torch.Tensor]] = [None] * len(counts)
        grids = self.adapter.grids(self.call, counts) if stage.layer == 0 else None
        options = {k: v for k, v in stage.options.items() if k != "merge"}
        # Rows sharing a visual count (and so a budget) are scored in one batched call.
        for n in sorted(set(counts)):
            rows = [r for r, c in enumerate(counts) if c == n]
            k = stage.budget(n)
            if n == 0:
                continue
            rows_t = torch.tensor(rows, device=hidden.device)
            sub_vis = vis[rows_t]
            feats = hidden[rows_t][sub_vis].view(len(rows), n, -1)
            inputs = SelectionInputs(
                features=feats,
                attention=None if attention is None else attention[rows_t][sub_vis].view(len(rows), n),
                queries=None if queries is None else queries[rows_t][sub_vis].view(len(rows), n, *queries.shape[2:]),
                grid=None if grids is None else [grids[r] for r in rows],
                seed=options.get("seed"),
            )
            self._check_inputs(method, inputs)
            chosen = method.fn(inputs, k, **options).sort(dim=-1).values
            positions = sub_vis.nonzero()[:, 1].view(len(rows), n)
            kept_pos = positions.gather(1, chosen)
            for j, r in enumerate(rows):
                kept_vis_idx[r] = chosen[j]
                keep[r, kept_pos[j]] = True
        elapsed = time.perf_counter() - t0
        index, valid = keep_layout(keep)
        self.mask2d = self.mask2d.gather(1, index) * valid.long()
        self.vis = vis.gather(1, index) & valid
        self.runs[stage.layer] = _StageRun(stage.layer, kept_mask=self.mask2d)
        kmax = max((len(x) for x in kept_vis_idx if x is not None), default=0)
        kept = torch.full((len(counts), kmax), -1, dtype=torch.long, device=hidden.device)
        for r, x in enumerate(kept_vis_idx):
            if x is not None:
                kept[r, : len(x)] = x
        self.stats.append({"layer": stage.layer, "method": stage.method, "tokens_before": counts,
                           "tokens_after": [0 if x is None else len(x) for x in kept_vis_idx],
                           "kept_indices": kept, "select_time_s": elapsed,
                           "backend": ops.last_backend()})
        return index, valid

    def _check_inputs(self, method, inputs):
        for need in method.needs:
            if need in ("attention", "queries") and getattr(inputs, need) is None:
                raise RuntimeError(f"method {method.name!r} needs {need} from layer K-1 but none was captured")

    def _gather_hidden(self, hidden, index, i):
        return ops.gather_tokens(hidden, index)

    def _renumber(self, pos):
        """Contiguous positions over the kept sequence. pos: [B, L'] (1-D RoPE). Returns (new, shift [B])."""
        new = (self.mask2d.cumsum(1) - 1).clamp(min=0)
        shift = self.next_pos - (new.max(dim=1).values + 1)
        return new, shift

    def _max_pos(self, pos):
        p = pos if pos.dim() == 2 else pos[-3:].amax(dim=0)
        return p.amax(dim=-1)
