"""The demo page in a real browser (Playwright driving the system Chromium): pick an example, compare, read both
answers and see the overlay. Skipped only outside CI when Playwright or Chromium is missing; CI=true fails instead."""

import os
import shutil
import socket

import pytest
from PIL import Image

from helpers import needs
from vtprune.eval.catalog import EMBEDDED_MODELS, is_available

CHROMIUM = os.environ.get("VTPRUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _missing():
    try:
        import gradio  # noqa: F401
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install playwright gradio)"
    if not CHROMIUM:
        return "no chromium on PATH (apt-get install -y chromium)"
    if not all(map(is_available, EMBEDDED_MODELS)):
        return "embedded models not built"
    return None


MISSING = _missing()
pytestmark = needs(MISSING is None, f"the browser test needs {MISSING}")


@pytest.fixture(scope="module")
def served():
    from vtprune.demo import build_app, example_scenes
    from vtprune.eval import catalog
    from vtprune.eval.models import load_embedded

    model, processor = load_embedded("qwen2_5_vl-tiny-sortofclevr")
    about = catalog.about("qwen2_5_vl-tiny-sortofclevr")
    app = build_app(model, processor, example_scenes(2), max_new_tokens=3, about=about)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield f"http://127.0.0.1:{port}/", model, processor
    app.close()


@pytest.fixture()
def page(served):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(120_000)  # a shared 2-core machine: both answers take seconds
        page.goto(served[0])
        yield page
        browser.close()


FIELD = "#{} :is(textarea, input)"  # Gradio draws a one-line textbox as an <input>


def _answers(page):
    page.wait_for_function(
        "() => ['vt-original', 'vt-pruned'].every(id => "
        "document.querySelector(`#${id} :is(textarea, input)`).value.trim() !== '')"
    )
    return [page.locator(FIELD.format(i)).input_value() for i in ("vt-original", "vt-pruned")]


def test_example_compare_shows_both_answers_and_the_overlay(page, served, tmp_path):
    from vtprune.demo import compare
    from vtprune.eval.data import make_split

    _, model, processor = served
    e = make_split("test", 2, seed=0)[1]
    # What the model knows is said first, and the examples are in view without scrolling (viewport 1280 x 1100).
    assert "Sort-of-CLEVR" in page.locator("#vt-about").inner_text()
    examples = page.locator("#vt-examples").bounding_box()
    assert examples["y"] + examples["height"] < 1100 and examples["y"] < page.locator("#vt-image").bounding_box()["y"]
    page.locator("#vt-examples").get_by_text(e.question).click()
    page.locator("#vt-image img").wait_for(state="visible")  # the example is loaded before we ask
    assert page.locator(FIELD.format("vt-question")).input_value() == e.question
    page.locator("#vt-compare").click()
    original, pruned = _answers(page)
    overlay = page.locator("#vt-overlay img")
    overlay.wait_for(state="visible")
    width, height = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'demo.png'}")

    c = compare(model, processor, e.image, e.question, method="divprune", keep_ratio=0.25, max_new_tokens=3)
    assert (original, pruned) == (c.original.text, c.pruned.text)
    assert (width, height) == c.overlay.size and max(width, height) >= 384
    assert overlay.bounding_box()["width"] > 200  # drawn at a readable size on the page, not a thumbnail
    summary = page.locator("#vt-summary").inner_text()
    assert f"{c.pruned.visual_tokens} of {c.original.visual_tokens} visual tokens kept" in summary


def test_a_one_pixel_image_gets_answers_and_a_note(page, tmp_path):
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "dot.png")
    page.locator("#vt-image input[type=file]").set_input_files(str(tmp_path / "dot.png"))
    page.locator("#vt-image img").wait_for(state="visible")
    page.locator(FIELD.format("vt-question")).fill("what colour is the circle ?")
    page.locator("#vt-compare").click()
    assert all(_answers(page))
    page.locator("#vt-overlay img").wait_for(state="visible")
    assert "fewer pixels than the 13x13 token grid" in page.locator("#vt-summary").inner_text()
    page.screenshot(path=str(tmp_path / "one-pixel.png"), full_page=True)


def test_a_file_that_is_no_image_gets_a_clear_message(page, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    page.locator("#vt-image input[type=file]").set_input_files(str(tmp_path / "notes.png"))
    page.locator(FIELD.format("vt-question")).fill("what colour is the circle ?")
    page.locator("#vt-compare").click()
    toast = page.get_by_text("notes.png is not an image this demo can read")
    toast.wait_for(state="visible")
    assert page.locator(FIELD.format("vt-original")).input_value() == ""
