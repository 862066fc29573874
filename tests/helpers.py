"""What the tests share: cached tiny models and processors, batches, single rows of a batch, packed rows and the
inputs that continue a generation. Import it as ``helpers`` (pytest puts tests/ on the path, pyproject.toml)."""

import functools
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtprune
from vtprune import flops
from vtprune.testing import tiny_batch, tiny_images, tiny_model, tiny_processor

MEDIA_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "image_sizes",
    "batch_num_images",
    "pixel_values_videos",
    "video_grid_thw",
)


@functools.cache
def cached_model(family, attn="sdpa"):
    """One tiny model per (family, attention) for the whole run; tests that patch it must unpatch it."""
    return tiny_model(family, attn)


@functools.cache
def cached_processor(family):
    return tiny_processor(family)


def require(condition: bool, reason: str) -> None:
    """Skip when a dependency is missing, except in CI (``CI=true``), where the test fails instead: CI must prove
    that everything the README promises runs."""
    if not condition:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason} (CI=true: a missing dependency fails instead of skipping)")
        pytest.skip(reason)


def needs(ok: bool, reason: str):
    """A mark for a test that needs a dependency (weights, a browser, lmms-eval): without it the test is skipped
    with ``reason`` shown (``-rs``), or fails under CI=true (conftest.py applies it through ``require``)."""
    return pytest.mark.needs(ok=bool(ok), reason=reason)


def refusal(model, method: str, **settings) -> str | None:
    """None when ``apply_pruner`` takes ``method`` on ``model``, else its refusal's message (a method whose inputs the
    family lacks, such as a vision-tower stage on a tower that has no single grid, is refused by name)."""
    from vtprune.patches import get_adapter

    try:
        vtprune.PrunerConfig(method=method, **settings).resolved_stages(get_adapter(model))
    except NotImplementedError as exc:
        return str(exc)
    return None


def first_ratio(model) -> float:
    """The keep ratio of the patched model's first stage as resolved (a PyramidDrop drop's own share)."""
    return vtprune.get_pruner(model).stages[0].keep_ratio


def make_batch(family, n, seed=0):
    """n samples, one image each, questions of different lengths so rows are left padded."""
    return tiny_batch(family, cached_processor(family), tiny_images(n, seed=seed))


def make_video_batch(family, n, seed=0, frames=3):
    """n samples, each one image then one video (sizes differ between samples), left padded."""
    from vtprune.testing import tiny_videos, video_prompt

    questions = ["what moved ?", "is the red circle left of the blue square ?"]
    text = [video_prompt(family, questions[i % 2], images=1) for i in range(n)]
    return cached_processor(family)(
        images=tiny_images(n, seed=seed),
        videos=tiny_videos(n, frames, seed=seed),
        text=text,
        return_tensors="pt",
        padding=True,
    )


def row(batch, i):
    """Sample i of a processor batch, alone and without its left padding."""
    keep = batch["attention_mask"][i].bool()
    out = {}
    for k, v in batch.items():
        if k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[k] = v[i : i + 1, keep]
    if "image_grid_thw" in batch or "video_grid_thw" in batch:
        # One image and/or one video per sample: slice the flat patch tensors by their grids.
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if grid in batch:
                sizes = batch[grid].prod(-1).tolist()
                start = sum(sizes[:i])
                out[pixels] = batch[pixels][start : start + sizes[i]]
                out[grid] = batch[grid][i : i + 1]
    else:
        out["pixel_values"] = batch["pixel_values"][i : i + 1]
        if "pixel_values_videos" in batch:  # one clip per sample, batched on the first dim (LLaVA-OneVision)
            out["pixel_values_videos"] = batch["pixel_values_videos"][i : i + 1]
    if "image_sizes" in batch:
        out["image_sizes"] = batch["image_sizes"][i : i + 1]
    if "batch_num_images" in batch:  # one image per sample (tiny_batch)
        out["batch_num_images"] = batch["batch_num_images"][i : i + 1]
    return out


def packed(model, samples: list) -> dict:
    """One row holding ``samples`` (unpadded single-sample batches, as ``conftest.row`` gives them) back to back,
    the padding-free way transformers supports: no attention mask, position ids restarting at 0 for each sample
    (for M-RoPE models a [4, 1, L] tensor whose first row is the text positions)."""
    out = {"input_ids": torch.cat([s["input_ids"] for s in samples], 1)}
    if "mm_token_type_ids" in samples[0]:
        out["mm_token_type_ids"] = torch.cat([s["mm_token_type_ids"] for s in samples], 1)
    for key in MEDIA_KEYS:
        if key in samples[0]:
            out[key] = torch.cat([s[key] for s in samples])
    text = torch.cat([torch.arange(s["input_ids"].shape[1]) for s in samples])[None]
    if "image_grid_thw" in samples[0]:
        rope = [
            model.model.get_rope_index(
                s["input_ids"], image_grid_thw=s["image_grid_thw"], mm_token_type_ids=s["mm_token_type_ids"]
            )[0]
            for s in samples
        ]
        out["position_ids"] = torch.cat([text[None], torch.cat(rope, -1)])
    else:
        out["position_ids"] = text
    return out


def packed_pair(model, family: str, second_seed: int = 0) -> dict:
    """Sample 0 of ``make_batch(family, 2)`` packed with sample 1 of ``make_batch(family, 2, seed=second_seed)``:
    the same sizes, other pixels when the seed differs."""
    return packed(model, [row(make_batch(family, 2), 0), row(make_batch(family, 2, seed=second_seed), 1)])


def continuation(batch: dict, sequences: torch.Tensor) -> dict:
    """The inputs that continue a generate() call from its returned cache: the prompt plus the tokens generated so
    far, the mask grown over them, no images."""
    extra = sequences.shape[1] - batch["input_ids"].shape[1]
    b = sequences.shape[0]
    out = {
        "input_ids": sequences,
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(b, extra, dtype=torch.long)], 1),
    }
    if "mm_token_type_ids" in batch:
        types = batch["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, torch.zeros(b, extra, dtype=types.dtype)], 1)
    return out


# ------------------------------------------------------------------------------------------- FLOPs
# vtprune.flops against torch's FlopCounterMode, which counts matmuls and convolutions as vtprune.flops does. On CPU,
# SDPA runs as aten._scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode has no formula for and
# silently counts as 0: the formula of the GPU flash op is registered for it. Mixture-of-experts layers run
# aten._grouped_mm, also uncounted: its formula is registered too.
TOL = 0.02


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    b, h, lq, d = query_shape
    return 2 * b * h * lq * key_shape[-2] * (d + value_shape[-1])


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs):
    # Mixture-of-experts layers (experts_implementation "grouped_mm"): token rows [T, K] grouped against the
    # experts' [G, K, N] weights; FlopCounterMode has no formula and would count 0.
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


CUSTOM = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    torch.ops.aten._grouped_mm: _grouped_mm,
}


# Pruning setups: name -> apply_pruner schedule (None: unpatched).
def measure(model, **inputs):
    """Run ``model(**inputs)`` under FlopCounterMode; returns (output, {module path: FLOPs})."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM) as fc:
        out = model(**inputs)
    return out, {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}


def part(counts, suffix):
    return sum(v for k, v in counts.items() if k.endswith(suffix))


def measured_parts(counts):
    """Measured FLOPs split like count_prefill: vision tower, projector/merger, decoder, LM head, total."""
    projector = part(counts, ".model.multi_modal_projector") + part(counts, ".model.visual.merger")
    vision = part(counts, ".model.vision_tower") + part(counts, ".model.visual") - part(counts, ".visual.merger")
    return {
        "vision": vision,
        "projector": projector,
        "language_model": part(counts, ".model.language_model"),
        "lm_head": part(counts, ".lm_head"),
        "total": counts["Global"],
    }


def assert_close(got, want, what):
    assert abs(got - want) <= TOL * max(want, 1), (
        f"{what}: analytic {got} vs FlopCounterMode {want} ({100 * (got - want) / max(want, 1):+.2f} %)"
    )


def check_prefill(model, batch, schedule, patched):
    model = patched(model, schedule)
    out, counts = measure(model, **batch)
    stats = vtprune.get_stats(model) if schedule is not None else None
    if schedule is not None:
        assert [s["layer"] for s in stats] == [s.layer for s in vtprune.get_pruner(model).stages]
    res = flops.count_prefill(model, batch, stats)
    got = measured_parts(counts)
    assert res["tokens_per_stage"][-1]["seq_len"] == out.logits.shape[1]  # pruned length as the model ran it
    for key in ("projector", "lm_head", "total"):
        assert_close(res[key], got[key], key)
    # Reading the tower's attention (and a stage inside the tower) runs in the tower's scope; every other stage's
    # scoring in the language model's: layer-0 stages in its forward pre-hook, in-LLM stages in the decoder
    # layers' hooks and the attention capture.
    assert_close(res["vision"] + res["scoring_in_tower"], got["vision"], "vision")
    assert_close(res["llm"] + res["scoring"] - res["scoring_in_tower"], got["language_model"], "language_model")
    return res, got
