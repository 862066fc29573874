import functools
import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before triton is first
# imported (transformers imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The demo tests start a Gradio server: no usage reporting from test runs.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

from vtprune.testing import FAMILIES, tiny_batch, tiny_images, tiny_model, tiny_processor

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _model(family, attn):
    return tiny_model(family, attn)


@functools.lru_cache(maxsize=None)
def _processor(family):
    return tiny_processor(family)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=["sdpa", "eager"])
def attn(request):
    return request.param


@pytest.fixture
def model(family, attn):
    m = _model(family, attn)
    yield m
    # A failed test must not leave a patch behind for the next one.
    if hasattr(m, "_vtprune_pruner"):
        import vtprune

        vtprune.remove_pruner(m)


def make_batch(family, n, seed=0):
    """n samples, one image each, questions of different lengths so rows are left padded."""
    return tiny_batch(family, _processor(family), tiny_images(n, seed=seed))


def make_video_batch(family, n, seed=0, frames=3):
    """n samples, each one image then one video (sizes differ between samples), left padded."""
    from vtprune.testing import tiny_videos, video_prompt

    questions = ["what moved ?", "is the red circle left of the blue square ?"]
    text = [video_prompt(family, questions[i % 2], images=1) for i in range(n)]
    return _processor(family)(images=tiny_images(n, seed=seed), videos=tiny_videos(n, frames, seed=seed),
                              text=text, return_tensors="pt", padding=True)


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
