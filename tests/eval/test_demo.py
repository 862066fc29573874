"""The side-by-side demo: both answers are the real ones, the overlay shows exactly the kept tokens, undo is exact."""

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from helpers import needs
from vtprune.api import _ATTR
from vtprune.demo import build_app, compare, example_scenes, kept_visual_tokens, overlay
from vtprune.eval.catalog import EMBEDDED_MODELS, is_available
from vtprune.eval.data import make_split
from vtprune.eval.models import build_prompt, load_embedded
from vtprune.testing import image_prompt, tiny_images, tiny_model, tiny_processor

pytestmark = needs(all(map(is_available, EMBEDDED_MODELS)), "the embedded models' weights are missing")


@pytest.fixture(scope="module", params=EMBEDDED_MODELS)
def embedded(request):
    return load_embedded(request.param)


def _generate(model, processor, image, question, **settings):
    batch = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt")
    if settings:
        vtprune.apply_pruner(model, **settings)
    try:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        stats = vtprune.get_stats(model) if settings else None
    finally:
        if settings:
            vtprune.remove_pruner(model)
    text = processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return text, stats


@pytest.mark.parametrize("method,ratio", [("divprune", 0.25), ("fastv", 0.11), ("random", 0.5)])
def test_answers_are_those_of_the_unpatched_and_the_patched_model(embedded, method, ratio):
    model, processor = embedded
    e = make_split("test", 3, seed=0)[2]
    opts = {"seed": 1} if method == "random" else {}
    c = compare(model, processor, e.image, e.question, method=method, keep_ratio=ratio, max_new_tokens=3, **opts)
    assert c.original.text == _generate(model, processor, e.image, e.question)[0]
    pruned, stats = _generate(model, processor, e.image, e.question, method=method, keep_ratio=ratio, **opts)
    assert c.pruned.text == pruned
    assert torch.equal(c.stats[0]["kept_indices"], stats[0]["kept_indices"])
    assert c.pruned.visual_tokens == stats[-1]["tokens_after"][0] < c.original.visual_tokens
    assert c.flops_ratio < 1
    assert getattr(model, _ATTR, None) is None and not model._forward_pre_hooks  # restored


def test_keep_all_gives_the_original_answer_and_cost(embedded):
    model, processor = embedded
    for e in make_split("test", 5, seed=0):
        c = compare(model, processor, e.image, e.question, method="pool", keep_ratio=1.0, max_new_tokens=3)
        assert c.pruned.text == c.original.text
        assert c.pruned.visual_tokens == c.original.visual_tokens


def test_overlay_paints_over_exactly_the_dropped_cells(embedded):
    """Dropped cells show nothing of the picture (only the flat grey and its hatching); kept cells are untouched."""
    model, processor = embedded
    e = make_split("test", 1, seed=0)[0]
    c = compare(model, processor, e.image, e.question, method="divprune", keep_ratio=0.25, max_new_tokens=1)
    kept = kept_visual_tokens(c.stats, c.original.visual_tokens)
    rows = 12 if model.config.model_type == "llava" else 10
    cols = c.original.visual_tokens // rows
    red = Image.new("RGB", (cols * 8, rows * 8), (220, 30, 30))
    cells = np.array(overlay(red, (rows, cols), kept)).reshape(rows, 8, cols, 8, 3).transpose(0, 2, 1, 3, 4)
    cells = cells.reshape(rows * cols, 64, 3)
    no_colour = ((cells[..., 0] == cells[..., 1]) & (cells[..., 1] == cells[..., 2])).all(axis=1)
    untouched = (cells == (220, 30, 30)).all(axis=(1, 2))
    assert torch.equal(torch.from_numpy(untouched).nonzero().flatten(), kept)
    assert (no_colour == ~untouched).all() and len(kept) == c.pruned.visual_tokens


def test_kept_tokens_compose_across_stages():
    stats = [{"kept_indices": torch.tensor([[0, 2, 5, 7, 8]])}, {"kept_indices": torch.tensor([[1, 3, -1]])}]
    assert kept_visual_tokens(stats, 10).tolist() == [2, 7]


def test_multi_crop_models_answer_without_an_overlay():
    model, processor = tiny_model("llava_next"), tiny_processor("llava_next")
    image = tiny_images(1)[0]
    c = compare(
        model,
        processor,
        image,
        "q",
        method="random",
        keep_ratio=0.5,
        max_new_tokens=2,
        prompt=image_prompt("llava_next"),
        seed=0,
    )
    assert c.overlay is None and c.pruned.visual_tokens < c.original.visual_tokens


def test_bad_input_is_refused_with_the_reason(embedded):
    model, processor = embedded
    e = make_split("test", 1, seed=0)[0]
    with pytest.raises(ValueError, match="question is empty"):
        compare(model, processor, e.image, "  ")
    vtprune.apply_pruner(model, method="random", keep_ratio=0.5)
    try:
        with pytest.raises(ValueError, match="unpatched model"):
            compare(model, processor, e.image, e.question)
    finally:
        vtprune.remove_pruner(model)
    with pytest.raises(ValueError, match="keep_ratio"):
        compare(model, processor, e.image, e.question, keep_ratio=1.5)
    assert getattr(model, _ATTR, None) is None


def test_gradio_app_runs_the_comparison(embedded):
    pytest.importorskip("gradio")
    model, processor = embedded
    app = build_app(model, processor, example_scenes(2), max_new_tokens=3)
    e = make_split("test", 2, seed=0)[1]
    original, pruned, shown, second, summary = app.vtprune_run(e.image, e.question, "pool", 25, -1)
    assert second is None  # one image: no second overlay
    c = compare(model, processor, e.image, e.question, method="pool", keep_ratio=0.25, max_new_tokens=3)
    assert (original, pruned) == (c.original.text, c.pruned.text)
    assert np.array_equal(np.asarray(shown), np.asarray(c.overlay))
    assert summary.startswith(f"pool: {c.pruned.visual_tokens} of {c.original.visual_tokens} visual tokens kept")
    import gradio as gr

    with pytest.raises(gr.Error, match="upload an image"):
        app.vtprune_run(None, e.question, "pool", 25, -1)
    with pytest.raises(gr.Error, match="unknown method"):
        app.vtprune_run(e.image, e.question, "nope", 25, -1)


def test_cli_demo_launches_the_page_and_names_a_bad_model(monkeypatch, capsys):
    gr = pytest.importorskip("gradio")
    from vtprune.cli import main

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, app=self))
    assert main(["demo", "--port", "7999"]) == 0
    assert launched["server_port"] == 7999 and launched["server_name"] == "127.0.0.1" and not launched["share"]
    assert hasattr(launched["app"], "vtprune_run")
    assert main(["demo", "--model", "/nonexistent/vlm"]) == 2
    assert "/nonexistent/vlm" in capsys.readouterr().err


def test_served_page_answers_over_http(tmp_path):
    pytest.importorskip("gradio")
    import socket

    from gradio_client import Client, handle_file

    model, processor = load_embedded("llava-tiny-sortofclevr")
    app = build_app(model, processor, max_new_tokens=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        e = make_split("test", 3, seed=0)[2]
        e.image.save(tmp_path / "scene.png")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        original, pruned, shown, second, summary = client.predict(
            handle_file(str(tmp_path / "scene.png")), e.question, "divprune", 11, -1, None, None, api_name="/run"
        )
    finally:
        app.close()
    c = compare(model, processor, e.image, e.question, method="divprune", keep_ratio=0.11, max_new_tokens=3)
    assert (original, pruned) == (c.original.text, c.pruned.text)
    assert summary.startswith(f"divprune: {c.pruned.visual_tokens} of 144 visual tokens kept")
    assert Image.open(shown).size == c.overlay.size


@torch.no_grad()
def test_compare_two_images_and_a_video():
    """Two images and a clip in one prompt (a Qwen model): both answers, an overlay per image drawn from that image's
    own kept tokens, and the video's count in the note."""
    from helpers import cached_model, cached_processor
    from vtprune.demo import compare
    from vtprune.testing import tiny_images, tiny_videos, video_prompt

    model, proc = cached_model("qwen2_vl", "sdpa"), cached_processor("qwen2_vl")
    images, clip = tiny_images(2, seed=3), tiny_videos(1, frames=3, seed=3)[0]
    prompt = video_prompt("qwen2_vl", "what moved ?", images=2)
    c = compare(
        model,
        proc,
        images,
        "what moved ?",
        method="pool",
        keep_ratio=0.5,
        video_keep_ratio=0.25,
        prompt=prompt,
        video=clip,
        max_new_tokens=2,
    )
    units = c.stats[0]["units"][0]
    assert [u.kind for u in units] == ["image", "image", "video"]
    assert [u.tokens_after for u in units] == [int(u.tokens_before * r + 0.5) for u, r in zip(units, (0.5, 0.5, 0.25))]
    assert len(c.overlays) == 2 and c.overlay is c.overlays[0]
    from vtprune.demo import LEGEND_HEIGHT, TOP_MARGIN, VIEW_GAP, readable

    for img, shown, unit in zip(images, c.overlays, units):
        # The composite: what the model sees, and under it at the same scale the same with dropped cells painted.
        w, h = shown.size[0], (shown.size[1] - TOP_MARGIN + VIEW_GAP) // 2 - LEGEND_HEIGHT - VIEW_GAP
        top, step = TOP_MARGIN, h + LEGEND_HEIGHT + VIEW_GAP
        seen, pruned = shown.crop((0, top, w, top + h)), shown.crop((0, top + step, w, top + step + h))
        assert np.array_equal(np.asarray(seen), np.asarray(readable(img, _grid_of(unit, img, seen))))
        changed = (np.asarray(pruned) != np.asarray(seen)).any(-1).mean()
        # The cells painted over on this image's view are exactly its own dropped share.
        assert abs(changed - (1 - unit.tokens_after / unit.tokens_before)) < 0.02
    assert (
        f"{units[2].tokens_after} of {units[2].tokens_before} tokens kept (3 frames, which the model sees as 3 "
        "temporal groups" in c.note
    )
    with pytest.raises(ValueError, match="takes no videos"):
        compare(cached_model("llava", "sdpa"), cached_processor("llava"), images[0], "what ?", video=clip, prompt="x")


def _grid_of(unit, img, shown):
    """(rows, cols) of a unit's token grid, from its overlay's cell layout and the image's aspect."""
    n = unit.tokens_before
    for rows in range(1, n + 1):
        if (
            n % rows == 0
            and shown.size[1] % rows == 0
            and shown.size[0] % (n // rows) == 0
            and shown.size[1] // rows == shown.size[0] // (n // rows)
        ):
            return rows, n // rows
    raise AssertionError(f"no square-cell grid of {n} tokens fits {shown.size}")
