"""Qwen3-VL: Qwen2-VL's layout (2x2 merged native-resolution patches, interleaved M-RoPE) plus DeepStack: the vision
tower's early-layer features are added to the visual positions' hidden states after the first decoder layers.

The language model receives ``visual_pos_masks`` [B, L] and ``deepstack_visual_embeds`` (one [n_visual, D] tensor
per DeepStack layer, rows in the mask's row-major order). A stage must shrink both to the kept tokens: at layer 0
the language model's kwargs are rewritten; an in-LLM stage cannot reach them (the language model's loop passes its
own unpruned mask), so ``_deepstack_process`` is wrapped on the patched instance and gathers at each call.
"""

from __future__ import annotations

import torch

from .. import ops
from .base import TINY_IDS, Adapter, Compaction, Family, Unit, tiny_text_config
from .qwen2_vl import Qwen2VLAdapter, Qwen2VLCost, Qwen2VLTiny


def gather_visual_rows(
    embeds: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """Rows of ``embeds`` [n_visual, D] (placed at ``mask`` [B, L]) at the tokens a stage kept: ``index`` [B, L']
    gathers the sequence, ``kept`` [B, L'] marks its visual tokens. Returns [kept.sum(), D] in placement order."""
    full = embeds.new_zeros(*mask.shape, embeds.shape[-1])
    full[mask] = embeds
    return ops.gather_tokens(full, index)[kept]


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"

    def __init__(self, model):
        super().__init__(model)
        self._current_extra = None  # the engine's accessor of the running prefill's scratch (install)
        self._saved = None  # an instance-level _deepstack_process found at install (None: the class's)

    # ------------------------------------------------------------------ DeepStack
    def install(self, current_extra) -> None:
        lm = self.language_model
        self._current_extra = current_extra
        self._saved = lm.__dict__.get("_deepstack_process")
        # A bound method of this adapter (not a closure): a deep copy of the model rebinds it to the copy's adapter.
        lm._deepstack_process = self._deepstack_process

    def remove(self) -> None:
        lm = self.language_model
        if self._saved is None:
            lm.__dict__.pop("_deepstack_process", None)
        else:
            lm._deepstack_process = self._saved
        self._current_extra, self._saved = None, None

    def after_compact(self, compaction: Compaction) -> dict:
        extra, index = compaction.extra, compaction.index
        if compaction.layer == 0:
            kwargs = compaction.kwargs
            mask, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
            extra.pop("deepstack_index", None)  # the language model's own mask is pruned from here on
            if mask is None or embeds is None:
                return {}
            kept = mask.gather(1, index) & compaction.kept
            return {
                "visual_pos_masks": kept,
                "deepstack_visual_embeds": [gather_visual_rows(e, mask, index, kept) for e in embeds],
            }
        # In-LLM: compose with earlier in-LLM stages, as an index into the language model's input sequence.
        prev = extra.get("deepstack_index")
        extra["deepstack_index"] = index if prev is None else prev.gather(1, index)
        extra["deepstack_kept"] = compaction.kept
        return {}

    def _deepstack_process(self, hidden, visual_pos_masks, visual_embeds):
        lm = self.language_model
        extra = self._current_extra() if self._current_extra is not None else None
        index = None if extra is None else extra.get("deepstack_index")
        if index is not None:  # an in-LLM stage ran before this layer: its mask and rows are still unpruned
            kept = visual_pos_masks.to(index.device).gather(1, index) & extra["deepstack_kept"]
            visual_embeds = gather_visual_rows(visual_embeds.to(hidden.device), visual_pos_masks, index, kept)
            visual_pos_masks = kept
        original = self._saved if self._saved is not None else type(lm)._deepstack_process.__get__(lm)
        return original(hidden, visual_pos_masks, visual_embeds)

    # ------------------------------------------------------------------ projector (ZOO)
    def projector_mlp(self):
        merger = self.body.visual.merger
        # The merger has no MLP submodule; these are its live layers after the (pre-shuffle) norm.
        return torch.nn.Sequential(merger.linear_fc1, merger.act_fn, merger.linear_fc2)

    def projector_rows(self, captured, call):
        """One merger call per kind (images, then videos), as in Qwen2-VL; the norm comes before the 2x2 grouping."""
        merger = self.body.visual.merger
        kinds = [k for k in ("image", "video") if call.get(f"{k}_grid_thw") is not None]
        out = {}
        for kind, rows in zip(kinds, captured[-len(kinds) :] if kinds else []):
            if rows.shape[0] != int(torch.as_tensor(call[f"{kind}_grid_thw"]).prod(-1).sum()):
                raise RuntimeError(
                    f"vtprune: the projector inputs captured for the {kind}s do not match {kind}_grid_thw"
                )
            out[kind] = merger.norm(rows).view(-1, merger.hidden_size).float()
        return out

    def units(self, call, vis):
        """As Qwen2-VL, but a video's prompt holds one span per temporal group (timestamps between them): the
        consecutive video spans that make up one video's t·h·w tokens are one unit."""
        grids = {kind: iter(self._grids(call, kind)) for kind in ("image", "video")}
        out = []
        for runs in Adapter.units(self, call, vis):
            row, missing = [], 0  # missing: tokens of the current video still to come in later spans
            for run in runs:
                if run.kind == "video" and missing > 0:
                    row[-1] = Unit("video", row[-1].length + run.length, row[-1].grid)
                    missing -= run.length
                    continue
                grid = next(grids[run.kind], None)
                size = 0 if grid is None else grid[0] * grid[1] * grid[2]
                row.append(Unit(run.kind, run.length, grid))
                missing = size - run.length if run.kind == "video" else 0
            out.append(
                [
                    u
                    if u.grid is not None and u.grid[0] * u.grid[1] * u.grid[2] == u.length
                    else Unit(u.kind, u.length)
                    for u in row
                ]
            )
        return out


class Qwen3VLCost(Qwen2VLCost):
    @classmethod
    def _dims(cls, vc) -> tuple[int, int]:
        return vc.hidden_size, vc.out_hidden_size

    @classmethod
    def _mlp(cls, vc, n: int, e: int) -> int:
        return 2 * 2 * n * e * vc.intermediate_size  # linear_fc1, linear_fc2

    @classmethod
    def _attention(cls, vc, t: int, h: int, w: int) -> list[int]:
        return [4 * vc.hidden_size * t * (h * w) ** 2] * vc.depth  # within each frame

    @classmethod
    def vision_flops(
        cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, video_grid_thw=None, **_
    ) -> int:
        """Qwen2-VL's tower count plus the DeepStack mergers, each the main merger's shape on the same rows."""
        grids = dict(image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)
        d_in, d_mid, d_out = cls.projector_dims(config)
        rows = cls.projector_rows_run(config, **grids)
        deepstack = len(config.vision_config.deepstack_visual_indexes) * rows * 2 * (d_in * d_mid + d_mid * d_out)
        return super().vision_flops(config, **grids) + deepstack


class Qwen3VLTiny(Qwen2VLTiny):
    @classmethod
    def model_class(cls):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    @classmethod
    def _tiny_vision(cls) -> dict:
        return dict(
            depth=2,
            hidden_size=32,
            num_heads=4,
            intermediate_size=64,
            patch_size=7,
            temporal_patch_size=1,
            spatial_merge_size=2,
            in_channels=3,
            out_hidden_size=32,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        )

    @classmethod
    def _tiny_text(cls, num_layers: int) -> dict:
        return tiny_text_config(
            num_hidden_layers=num_layers,
            head_dim=8,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
        )

    @classmethod
    def config(cls, num_layers: int = 4):
        return cls.model_class().config_class(
            vision_config=cls._tiny_vision(),
            text_config=cls._tiny_text(num_layers),
            image_token_id=TINY_IDS["<|image_pad|>"],
            video_token_id=TINY_IDS["<|video_pad|>"],
            vision_start_token_id=TINY_IDS["<|vision_start|>"],
            vision_end_token_id=TINY_IDS["<|vision_end|>"],
        )

    @classmethod
    def processor(cls, tokenizer):
        from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor, Qwen3VLVideoProcessor

        ip = Qwen2VLImageProcessorPil(
            patch_size=7,
            merge_size=2,
            temporal_patch_size=1,
            min_pixels=14 * 14,
            max_pixels=56 * 56,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        vp = Qwen3VLVideoProcessor(
            patch_size=7,
            merge_size=2,
            temporal_patch_size=1,
            do_sample_frames=False,
            size={"shortest_edge": 14 * 14, "longest_edge": 56 * 56 * 4},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: the same body, DeepStack and vision tower; the decoder MLPs are sparse mixtures of experts."""

    family = "qwen3_vl_moe"


class Qwen3VLMoeTiny(Qwen3VLTiny):
    @classmethod
    def model_class(cls):
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration

    @classmethod
    def _tiny_text(cls, num_layers: int) -> dict:
        # Layer 1 dense (mlp_only_layers), so the FLOPs count sees both kinds of layer.
        return dict(
            super()._tiny_text(num_layers),
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )


QWEN3_VL = Family("qwen3_vl", ("qwen3_vl",), Qwen3VLAdapter, Qwen3VLCost, Qwen3VLTiny)
QWEN3_VL_MOE = Family("qwen3_vl_moe", ("qwen3_vl_moe",), Qwen3VLMoeAdapter, Qwen3VLCost, Qwen3VLMoeTiny)
