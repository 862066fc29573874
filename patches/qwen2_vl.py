"""Qwen2-VL and Qwen2.5-VL: native-resolution images merged 2x2 by the patch merger, M-RoPE positions."""

from __future__ import annotations

import torch

from .base import TINY_IDS, Adapter, Cost, Family, Tiny, Unit, as_rows, tiny_text_config


def _thw_rows(*grids) -> list:
    """The (t, h, w) rows of several grid_thw tensors (None skipped), in order."""
    return [row for g in grids if g is not None for row in as_rows(g)]


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    position_kind = "mrope"
    tower_refusal = (
        "its tower merges every 2x2 patches after its last block and, in Qwen2.5-VL, attends within "
        "windows: tokens could leave only at the merger's input, which saves the merger alone; score "
        "with the method at layer 0 instead"
    )

    def _grids(self, call, kind: str) -> list:
        """(t, h, w) per image or video of the batch, in order, after the 2x2 merge."""
        thw = call.get(f"{kind}_grid_thw")
        merge = self.model.config.vision_config.spatial_merge_size
        return [] if thw is None else [(t, h // merge, w // merge) for t, h, w in as_rows(thw)]

    def units(self, call, vis):
        """Runs of image / video placeholders, matched in order to image_grid_thw / video_grid_thw."""
        grids = {kind: iter(self._grids(call, kind)) for kind in ("image", "video")}
        out = []
        for runs in super().units(call, vis):
            row = []
            for run in runs:
                grid = next(grids[run.kind], None)
                ok = grid is not None and grid[0] * grid[1] * grid[2] == run.length
                row.append(Unit(run.kind, run.length, grid if ok else None))
            out.append(row)
        return out

    def projector_module(self):
        return self.body.visual.merger

    def projector_mlp(self):
        # The sensitivity is taken through the merger's MLP on the normalised, 2x2-grouped patch rows.
        return self.body.visual.merger.mlp

    def projector_rows(self, captured, call):
        """The model runs the merger on the images, then on the videos (one call each): the captures are paired
        with the kinds in that order, each checked by its patch count."""
        merger = self.body.visual.merger
        kinds = [(k, call[f"{k}_grid_thw"]) for k in ("image", "video") if call.get(f"{k}_grid_thw") is not None]
        captured = captured[-len(kinds) :] if kinds else []
        out = {}
        for (kind, thw), rows in zip(kinds, captured):
            patches = int(torch.as_tensor(thw).prod(-1).sum())
            if rows.shape[0] != patches:
                raise RuntimeError(
                    f"vtprune: the projector inputs captured for the {kind}s hold {rows.shape[0]} "
                    f"patches, but {kind}_grid_thw describes {patches}"
                )
            rows = merger.ln_q(rows).view(-1, merger.hidden_size).float()
            out[kind] = rows[self._merged_order(thw, rows.device)]
        return out

    def _merged_order(self, thw, device):
        return slice(None)  # Qwen2-VL merges patches already in raster order

    # ------------------------------------------------------------------ tower attention (a layer-0 stage)
    tower_scores = True

    @property
    def tower_layers(self):
        return self.body.visual.blocks

    def tower_attention(self, layer: int) -> torch.nn.Module:
        return self.tower_layers[layer].attn

    @property
    def tower_feature_layer(self) -> int:
        return len(self.tower_layers) - 1  # the merger reads the last block's output

    def tower_rows(self, captured, call):
        """The tower attends frame by frame (window by window in Qwen2.5-VL's windowed blocks): the captures, in run
        order, are the images' patches then the videos'; each token is the mean of its 2x2 merged patches."""
        rows = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
        group = self.model.config.vision_config.spatial_merge_size**2
        out, start = {}, 0
        for kind in ("image", "video"):
            thw = call.get(f"{kind}_grid_thw")
            if thw is None:
                continue
            patches = int(torch.as_tensor(thw).prod(-1).sum())
            part = rows[start : start + patches]
            start += patches
            out[kind] = part.view(-1, group, part.shape[-1]).mean(1)[self._merged_order(thw, part.device)]
        if start != rows.shape[0]:
            raise RuntimeError(
                f"vtprune: the tower attention captured covers {rows.shape[0]} patches, but the call's grid_thw "
                f"describe {start}"
            )
        return out


class Qwen2VLCost(Cost):
    @classmethod
    def _dims(cls, vc) -> tuple[int, int]:
        """(vision width E, merger output dim): Qwen2-VL names them embed_dim / hidden_size."""
        return vc.embed_dim, vc.hidden_size

    @classmethod
    def _attention(cls, vc, t: int, h: int, w: int) -> list[int]:
        """Attention FLOPs of each block for one image: every block attends within the frame."""
        return [4 * vc.embed_dim * t * (h * w) ** 2] * vc.depth

    @classmethod
    def _mlp(cls, vc, n: int, e: int) -> int:
        return 2 * 2 * n * e * int(e * vc.mlp_ratio)  # fc1, fc2

    @classmethod
    def vision_flops(
        cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, video_grid_thw=None, **_
    ) -> int:
        """Conv3d patch embed, then per block q/k/v/o, attention within each frame (or window) and the MLP;
        image_grid_thw / video_grid_thw [n, 3] give the patches in t, h, w (the tower runs on both)."""
        vc = config.vision_config
        e, _ = cls._dims(vc)
        total = 0
        for t, h, w in _thw_rows(image_grid_thw, video_grid_thw):
            n = t * h * w
            total += 2 * n * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * e
            total += sum(2 * n * e * 4 * e + cls._mlp(vc, n, e) + attn for attn in cls._attention(vc, t, h, w))
        return total

    @classmethod
    def tower_head_dim(cls, config) -> int:
        return cls._dims(config.vision_config)[0] // config.vision_config.num_heads

    @classmethod
    def tower_capture_flops(cls, config, layer: int, image_grid_thw=None, video_grid_thw=None, **_) -> int:
        vc = config.vision_config
        return sum(cls._attention(vc, t, h, w)[layer] // 2 for t, h, w in _thw_rows(image_grid_thw, video_grid_thw))

    @classmethod
    def projector_dims(cls, config) -> tuple:
        e, d_out = cls._dims(config.vision_config)
        q = e * config.vision_config.spatial_merge_size**2
        return q, q, d_out

    @classmethod
    def projector_rows_run(
        cls, config, pixel_values=None, image_grid_thw=None, image_sizes=None, video_grid_thw=None, **_
    ) -> int:
        patches = sum(t * h * w for t, h, w in _thw_rows(image_grid_thw, video_grid_thw))
        return patches // config.vision_config.spatial_merge_size**2


class Qwen2VLTiny(Tiny):
    prompt_tag = "<|vision_start|> <|image_pad|> <|vision_end|>"
    video_tag = "<|vision_start|> <|video_pad|> <|vision_end|>"

    @classmethod
    def model_class(cls):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    @classmethod
    def _tiny_vision(cls) -> dict:
        return dict(
            depth=2,
            hidden_size=32,
            embed_dim=32,
            num_heads=4,
            intermediate_size=64,
            patch_size=7,
            temporal_patch_size=1,
            spatial_merge_size=2,
            in_channels=3,
            out_hidden_size=32,
            hidden_act="silu",
        )

    @classmethod
    def config(cls, num_layers: int = 4):
        text = tiny_text_config(
            num_hidden_layers=num_layers,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        )
        return cls.model_class().config_class(
            vision_config=cls._tiny_vision(),
            text_config=text,
            image_token_id=TINY_IDS["<|image_pad|>"],
            video_token_id=TINY_IDS["<|video_pad|>"],
            vision_start_token_id=TINY_IDS["<|vision_start|>"],
            vision_end_token_id=TINY_IDS["<|vision_end|>"],
        )

    @classmethod
    def _processor_class(cls):
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor

    @classmethod
    def processor(cls, tokenizer):
        from transformers import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor  # the video one needs torchvision

        pixels = dict(
            patch_size=7,
            merge_size=2,
            temporal_patch_size=1,
            min_pixels=14 * 14,
            max_pixels=56 * 56,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        ip = Qwen2VLImageProcessorPil(**pixels)
        vp = Qwen2VLVideoProcessor(**pixels, do_sample_frames=False, cap_pixels_per_frame=True)
        tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
        return cls._processor_class()(image_processor=ip, tokenizer=tokenizer, video_processor=vp)


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"

    def _merged_order(self, thw, device):
        # Qwen2.5-VL's tower runs in window order and un-permutes after the merger; do the same here.
        from transformers.vision_utils import get_vision_window_index

        visual = self.body.visual
        window_index, _ = get_vision_window_index(
            thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs={},
        )
        return torch.argsort(window_index.to(device))


class Qwen25VLCost(Qwen2VLCost):
    @classmethod
    def _dims(cls, vc) -> tuple[int, int]:
        return vc.hidden_size, vc.out_hidden_size  # Qwen2.5-VL's names for (E, merger output)

    @classmethod
    def _mlp(cls, vc, n: int, e: int) -> int:
        return 3 * 2 * n * e * vc.intermediate_size  # gate, up, down

    @classmethod
    def _attention(cls, vc, t: int, h: int, w: int) -> list[int]:
        """Full attention within the frame in fullatt_block_indexes, within each window elsewhere. Windows are
        ws×ws merged units tiled from the top-left corner, partial at the bottom/right edges."""
        ms = vc.spatial_merge_size
        ws = vc.window_size // ms // vc.patch_size
        gh, gw = h // ms, w // ms
        sizes = [min(ws, gh - i) * min(ws, gw - j) * ms * ms for i in range(0, gh, ws) for j in range(0, gw, ws)]
        full = 4 * vc.hidden_size * t * (h * w) ** 2
        window = 4 * vc.hidden_size * t * sum(s * s for s in sizes)
        return [full if b in set(vc.fullatt_block_indexes) else window for b in range(vc.depth)]


class Qwen25VLTiny(Qwen2VLTiny):
    @classmethod
    def model_class(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def _tiny_vision(cls) -> dict:
        return dict(super()._tiny_vision(), fullatt_block_indexes=[1], window_size=28)

    @classmethod
    def _processor_class(cls):
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor


QWEN2_VL = Family("qwen2_vl", ("qwen2_vl",), Qwen2VLAdapter, Qwen2VLCost, Qwen2VLTiny)
QWEN2_5_VL = Family("qwen2_5_vl", ("qwen2_5_vl",), Qwen25VLAdapter, Qwen25VLCost, Qwen25VLTiny)
