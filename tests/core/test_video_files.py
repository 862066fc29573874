"""Videos given as files: the processor decodes them and samples frames at a requested fps, with the clip's real
timestamps (video_metadata: Qwen2.5-VL's seconds per temporal group, Qwen3-VL's per-frame time stamps in the text).
Pruning keeps those: keep-all equals the stock model, kept tokens keep their (t, h, w) ids, cached equals uncached."""

import importlib.util

import numpy as np
import pytest
import torch

import vtprune
from helpers import cached_model, cached_processor, require
from vtprune.patches import get_adapter
from vtprune.testing import video_prompt

FILE_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
GEN = dict(do_sample=False, return_dict_in_generate=True, output_logits=True, max_new_tokens=3)


def _decodes() -> bool:
    if importlib.util.find_spec("torchcodec") is None:
        return False
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads FFmpeg's libraries)
    except (OSError, RuntimeError):
        return False
    return True


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A 2-second, 8 fps MPEG-4 file of a white bar sliding right on black (16 frames)."""
    require(importlib.util.find_spec("av") is not None, "writing the test clip needs PyAV (pip install av)")
    require(_decodes(), "decoding a video file needs torchcodec and FFmpeg's libraries (apt install ffmpeg)")
    import av

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 56
        stream.pix_fmt = "yuv420p"
        for i in range(16):
            frame = np.zeros((56, 56, 3), np.uint8)
            frame[20:36, 3 * i : 3 * i + 10] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _inputs(family, path, fps):
    proc = cached_processor(family)
    text = [video_prompt(family, "what moved ?", images=0)]
    return proc(videos=[path], text=text, return_tensors="pt", do_sample_frames=True, fps=fps)


def _lm_inputs(model, batch):
    lm, seen = model.model.language_model, {}
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        logits = model(**batch).logits
    finally:
        handle.remove()
    return logits, seen


@torch.no_grad()
@pytest.mark.parametrize("family", FILE_FAMILIES)
def test_a_video_file_sampled_at_fps_prunes_exactly(family, clip_file):
    batch = _inputs(family, clip_file, fps=2)
    if "video_grid_thw" in batch:
        assert batch["video_grid_thw"][0, 0] * cached_model(family).config.vision_config.temporal_patch_size == 4
    else:  # OneVision: [videos, frames, 3, H, W]
        assert batch["pixel_values_videos"].shape[1] == 4  # 2 s at 2 fps
    model = cached_model(family, "sdpa")
    ref, full = _lm_inputs(model, batch)
    vtprune.apply_pruner(model, method="random", keep_ratio=1.0)
    try:
        assert torch.equal(model(**batch).logits, ref)
        vtprune.apply_pruner(model, method="fastvid", keep_ratio=0.4, replace=True)
        _, pruned = _lm_inputs(model, batch)
        video = vtprune.get_stats(model)[0]["units"][0][0]
        cached = model.generate(**batch, use_cache=True, **GEN)
        uncached = model.generate(**batch, use_cache=False, **GEN)
    finally:
        vtprune.remove_pruner(model)
    assert video.kind == "video" and video.tokens_after < video.tokens_before
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    if full.get("position_ids") is None:  # 1-D RoPE (OneVision): positions are the kept tokens' own, in order
        return
    vis = get_adapter(model).visual_mask(batch["input_ids"])[0]
    keep = ~vis
    keep[vis.nonzero().flatten()[video.kept_indices]] = True
    # The clip's time ids (and Qwen3-VL's time-stamp tokens between frames) reach the pruned model unchanged.
    assert torch.equal(pruned["position_ids"][..., 0, :], full["position_ids"][..., 0, keep])


@torch.no_grad()
def test_the_clips_timestamps_reach_the_position_ids(clip_file):
    """Qwen2.5-VL: sampled at 2 and at 4 fps, the clip's temporal groups are 1/2 and 1/4 s apart, so their time ids
    differ; pruned, each kept token keeps the time id of its own sampling."""
    model = cached_model("qwen2_5_vl", "sdpa")
    times = {}
    for fps in (2, 4):
        batch = _inputs("qwen2_5_vl", clip_file, fps=fps)
        _, full = _lm_inputs(model, batch)
        vtprune.apply_pruner(model, method="temporal", keep_ratio=0.5)
        try:
            _, pruned = _lm_inputs(model, batch)
            video = vtprune.get_stats(model)[0]["units"][0][0]
        finally:
            vtprune.remove_pruner(model)
        vis = get_adapter(model).visual_mask(batch["input_ids"])[0]
        keep = ~vis
        keep[vis.nonzero().flatten()[video.kept_indices]] = True
        assert torch.equal(pruned["position_ids"][..., 0, :], full["position_ids"][..., 0, keep])
        times[fps] = full["position_ids"][-3, 0, vis].unique().tolist()  # the video tokens' time ids (t of t, h, w)
    assert len(times[4]) == 2 * len(times[2]) and times[4] != times[2]
