"""Side-by-side demo: the same question to the original and the pruned model, with the kept tokens shown.

    vtprune demo                                   # the embedded LLaVA model, example scenes included
    vtprune demo --model llava-hf/llava-1.5-7b-hf  # any supported HF checkpoint (id or local path)

``compare`` does the work and needs no Gradio; ``build_app`` wraps it in a ``gradio.Blocks`` page
(``pip install "vtprune[demo]"``).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont

from . import api
from .flops import count_prefill
from .strategies import list_methods

OVERLAY_MIN_SIDE = 384  # px on the overlay's long side: one token cell of a 24x24 grid is then 16 px wide


@dataclass
class Answer:
    text: str
    latency_s: float  # prefill + greedy decoding, wall clock
    prefill_flops: int  # analytic real FLOPs (2 per multiply-add)
    visual_tokens: int  # visual tokens the language model still holds after the last stage


@dataclass
class Comparison:
    original: Answer
    pruned: Answer
    method: str
    stats: list = field(default_factory=list)  # vtprune.get_stats of the pruned prefill
    # the (first) image as the model sees it beside the same with its dropped tokens painted over (single-grid models)
    overlay: Image.Image | None = None
    note: str = ""  # what the overlay cannot show (several crops) or how it was drawn (an image under one px a token)
    overlays: list = field(default_factory=list)  # one per image of the prompt, where its tokens form one grid

    @property
    def flops_ratio(self) -> float:
        return self.pruned.prefill_flops / self.original.prefill_flops

    def summary(self) -> str:
        o, p = self.original, self.pruned
        return (
            f"{self.method}: {p.visual_tokens} of {o.visual_tokens} visual tokens kept; prefill FLOPs "
            f"{p.prefill_flops / 1e9:.3g} G vs {o.prefill_flops / 1e9:.3g} G (x{self.flops_ratio:.2f}); "
            f"latency {p.latency_s * 1e3:.0f} ms vs {o.latency_s * 1e3:.0f} ms"
            + (f"\n\n{self.note}" if self.note else "")
        )


def kept_visual_tokens(stats: list, n_visual: int) -> torch.Tensor:
    """Indices (into the image's visual tokens, row 0 of the batch) that survive every stage of ``stats``."""
    idx = torch.arange(n_visual)
    for stage in stats:
        row = stage["kept_indices"][0].cpu()
        idx = idx[row[row >= 0]]
    return idx


DROPPED = (64, 64, 64)  # a dropped token's cell: opaque, so no object colour shows through
# Both pictures fill their boxes at one scale (a small upload would otherwise sit tiny beside a large overlay), pixels
# kept sharp.
PAGE_CSS = "#vt-image img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
TOP_MARGIN, VIEW_GAP, LEGEND_HEIGHT = (
    32,
    12,
    34,
)  # px above the views of ``side_by_side``, between them, and under each for its legend


def overlay(image: Image.Image, grid: tuple[int, int], kept: torch.Tensor) -> Image.Image:
    """``image`` (covering exactly the token grid) with every dropped token's cell painted over in flat dark grey and
    hatched, so that nothing of what the model no longer sees shows through."""
    rows, cols = grid
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[kept] = True
    out = image.convert("RGB").copy()
    w, h = out.size
    for t in (~keep).nonzero().flatten().tolist():
        r, c = divmod(t, cols)
        x0, y0 = round(c * w / cols), round(r * h / rows)
        x1, y1 = round((c + 1) * w / cols), round((r + 1) * h / rows)
        out.paste(_hatched((max(1, x1 - x0), max(1, y1 - y0))), (x0, y0))
    return out


def _hatched(size: tuple[int, int]) -> Image.Image:
    """A dropped cell: flat dark grey with lighter diagonals, drawn within the cell."""
    cell = Image.new("RGB", size, DROPPED)
    draw = ImageDraw.Draw(cell)
    w, h = size
    step = max(4, w // 3)
    for x in range(-h, w, step):
        draw.line([(x, h), (x + h, 0)], fill=(140, 140, 140), width=1)
    return cell


def side_by_side(picture: Image.Image, pruned: Image.Image, merged: bool = False) -> Image.Image:
    """What the model sees of an image (``picture``, above) and the same with its dropped tokens painted over (below),
    at one scale, with a legend under each (``merged``: the dropped tokens were merged into the kept ones). Stacked,
    so a wide image still fits the page's picture box; a white band on top leaves room for the page's label."""
    w, h = picture.size
    step = h + LEGEND_HEIGHT + VIEW_GAP
    out = Image.new("RGB", (w, TOP_MARGIN + 2 * step - VIEW_GAP), (255, 255, 255))
    out.paste(picture.convert("RGB"), (0, TOP_MARGIN))
    out.paste(pruned, (0, TOP_MARGIN + step))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=15)
    draw.text((4, TOP_MARGIN + h + 8), "what the model sees", fill=(0, 0, 0), font=font)
    y = TOP_MARGIN + step + h + 8
    out.paste(_hatched((16, 16)), (4, y))
    legend = "merged into a kept token" if merged else "dropped token (kept ones unchanged)"
    draw.text((26, y), legend, fill=(0, 0, 0), font=font)
    return out


def readable(picture: Image.Image, grid: tuple[int, int], min_side: int = OVERLAY_MIN_SIDE) -> Image.Image:
    """``picture`` resized (nearest neighbour, so pixels stay sharp) to whole cells of at least ``min_side`` / grid
    px each: a 96 px crop or a 1x1 upload becomes a picture the eye can read, and every cell has the same size."""
    rows, cols = grid
    cell = max(1, math.ceil(min_side / max(rows, cols)))
    return picture.convert("RGB").resize((cols * cell, rows * cell), Image.NEAREST)


def _token_image(processor, image: Image.Image, batch: dict, index: int = 0) -> Image.Image | None:
    """The picture image ``index``'s token grid covers: LLaVA's padded, resized crop (from pixel_values); Qwen's
    resized image."""
    pv = batch.get("pixel_values")
    if "image_grid_thw" in batch:
        return image
    if pv is None or pv.dim() != 4 or index >= pv.shape[0]:
        return None  # several crops (LLaVA-NeXT): no single grid to draw on
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    arr = ((pv[index].float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _as_images(image) -> list:
    if image is None:
        return []
    return [as_image(im) for im in (image if isinstance(image, (list, tuple)) else [image])]


def as_image(image) -> Image.Image:
    """An RGB PIL image from what users hold: a PIL image, a file path, encoded bytes, or pixels as an array or
    tensor ([H, W, 3] or [3, H, W]; uint8, or floats in [0, 1])."""
    import io
    import os

    import numpy as np

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return Image.open(image).convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if torch.is_tensor(image) or isinstance(image, np.ndarray):
        pixels = image.detach().cpu().numpy() if torch.is_tensor(image) else image
        if pixels.ndim == 3 and pixels.shape[0] in (1, 3) and pixels.shape[-1] not in (1, 3):
            pixels = pixels.transpose(1, 2, 0)  # channels first, as torchvision keeps them
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
            raise ValueError(f"an image array must be [H, W, 3], [3, H, W] or [H, W]; got shape {pixels.shape}")
        if np.issubdtype(pixels.dtype, np.floating):
            pixels = (np.clip(pixels, 0, 1) * 255).round()
        return Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    raise ValueError(
        f"cannot read an image from a {type(image).__name__}; give a PIL image, a file path, bytes, "
        "or an array / tensor of pixels"
    )


def read_clip(video, max_frames: int = 16):
    """A clip as the processors take it, uint8 [frames, H, W, 3]: an array as it is, a list of PIL frames, or a
    video file's path (decoded with PyAV, evenly sampled down to ``max_frames``)."""
    import numpy as np

    if isinstance(video, (str, bytes)) or hasattr(video, "__fspath__"):
        try:
            import av
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise ImportError('reading a video file needs PyAV: pip install "vtprune[demo]"') from exc
        with av.open(str(video)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not frames:
            raise ValueError(f"{video} holds no video frames")
        step = max(1, math.ceil(len(frames) / max_frames))
        video = frames[::step][:max_frames]
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in video])
    clip = np.asarray(video)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"a video must be [frames, height, width, 3]; got shape {clip.shape}")
    return clip.astype(np.uint8)


def _unit_kept(stats: list, units: list) -> list:
    """Per unit of row 0, the indices into its tokens that survive every stage."""
    kept = [torch.arange(u.length) for u in units]
    for stage in stats:
        for u, unit_stats in enumerate(stage["units"][0]):
            kept[u] = kept[u][unit_stats.kept_indices.cpu()]
    return kept


def _run(model, batch, max_new_tokens, tok) -> tuple[str, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    elapsed = time.perf_counter() - t0
    text = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return text, elapsed


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model) -> threading.Lock:
    """One lock per model: compare() patches the model for its pruned run, so comparisons on one model (Gradio
    serves each request in a thread) take turns instead of finding it already patched."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


def compare(
    model,
    processor,
    image,
    question: str,
    method: str = "divprune",
    keep_ratio: float | None = None,
    keep_tokens: int | None = None,
    layer: int | None = None,
    max_new_tokens: int = 32,
    prompt: str | None = None,
    video=None,
    **options,
) -> Comparison:
    """Answer ``question`` about ``image`` (a PIL image, a list of them, or None) and ``video`` (a clip: array
    [frames, H, W, 3], list of frames or a file path; families that take videos) with ``model`` as it is, then
    pruned by ``method`` (patched for this call only and restored afterwards). ``options`` go to
    ``apply_pruner`` (``video_keep_ratio=``, ``temporal=``, method options). The model must not already be patched.
    ``prompt`` overrides the text given to the processor (default: the processor's chat template with the images,
    the video and the question). Safe to call from several threads on one model: the comparisons take turns."""
    with _model_lock(model):
        return _compare(
            model,
            processor,
            image,
            question,
            method,
            keep_ratio,
            keep_tokens,
            layer,
            max_new_tokens,
            prompt,
            video,
            options,
        )


def _compare(
    model, processor, image, question, method, keep_ratio, keep_tokens, layer, max_new_tokens, prompt, video, options
) -> Comparison:
    from .eval.models import build_prompt, count_visual_tokens
    from .patches import get_adapter

    if api.is_patched(model):
        raise ValueError("compare() needs an unpatched model: call vtprune.remove_pruner(model) first")
    if not question or not question.strip():
        raise ValueError("question is empty: ask something about the image")
    adapter = get_adapter(model)
    images = _as_images(image)
    if video is not None and not adapter.takes_videos:
        raise ValueError(f"{type(model).__name__} takes no videos; give images only")
    clip = None if video is None else read_clip(video)
    if not images and clip is None:
        raise ValueError("give an image, several images or a video to ask about")
    prompt = (
        prompt if prompt is not None else build_prompt(processor, question.strip(), len(images), int(clip is not None))
    )
    media = dict(images=images or None, videos=None if clip is None else [clip])
    try:
        batch = processor(text=[prompt], return_tensors="pt", **media)
    except ValueError as exc:  # e.g. Qwen's resizing refuses aspect ratios over 200
        sizes = ", ".join(f"{im.width}x{im.height}" for im in images) or "video"
        raise ValueError(f"the processor cannot encode this input ({sizes} px): {exc}") from exc
    batch = {
        k: (v.to(model.device, model.dtype) if torch.is_floating_point(v) else v.to(model.device))
        for k, v in batch.items()
    }
    tok = processor.tokenizer
    n_visual = count_visual_tokens(model, batch["input_ids"])[0]

    _run(model, batch, 1, tok)  # warm-up: the first call pays one-off allocation and kernel set-up costs
    text, latency = _run(model, batch, max_new_tokens, tok)
    original = Answer(text, latency, count_prefill(model, batch)["total"], n_visual)

    api.apply_pruner(model, method=method, keep_ratio=keep_ratio, keep_tokens=keep_tokens, layer=layer, **options)
    try:
        text, latency = _run(model, batch, max_new_tokens, tok)
        stats = api.get_stats(model)
    finally:
        api.remove_pruner(model)
    kept = kept_visual_tokens(stats, n_visual)
    pruned = Answer(text, latency, count_prefill(model, batch, stats)["total"], len(kept))

    units = adapter.units(batch, adapter.visual_mask(batch["input_ids"]))[0]
    kept_per_unit = _unit_kept(stats, units) if stats else [torch.arange(u.length) for u in units]
    overlays, notes = [], []
    image_units = [(u, k) for u, k in zip(units, kept_per_unit) if u.kind == "image"]
    for i, (img, (unit, unit_kept)) in enumerate(zip(images, image_units)):
        grid = unit.grid[1:] if unit.grid is not None and unit.grid[0] == 1 else None
        picture = _token_image(processor, img, batch, i) if grid is not None else None
        if picture is None:
            notes.append("No overlay: this model encodes the image as several crops, not one token grid.")
            continue
        if img.width < grid[1] or img.height < grid[0]:
            notes.append(
                f"The image ({img.width}x{img.height} px) has fewer pixels than the {grid[0]}x{grid[1]} "
                "token grid: the processor enlarged it, and the overlay shows that enlarged picture."
            )
        view = readable(picture, grid)
        merged = any(s.merged for s in stats)
        overlays.append(side_by_side(view, overlay(view, grid, unit_kept), merged))
    if clip is not None:
        video_units = [(u, k) for u, k in zip(units, kept_per_unit) if u.kind == "video"]
        frames = len(clip)
        notes += [
            f"Video: {len(k)} of {u.length} tokens kept ({frames} frames, which the model sees as {u.frames} "
            f"temporal groups of {(u.length - u.tail) // max(u.frames, 1)} tokens)."
            for u, k in video_units
        ]
    note = " ".join(dict.fromkeys(notes))  # the same note once
    return Comparison(original, pruned, method, stats, overlays[0] if overlays else None, note, overlays)


def load_model(name_or_path: str):
    """An embedded model by name, or an HF checkpoint (id or folder) with its processor."""
    from .eval.catalog import EMBEDDED_MODELS, VIDEO_MODELS
    from .eval.models import load_embedded

    if name_or_path in EMBEDDED_MODELS + VIDEO_MODELS:
        return load_embedded(name_or_path)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype="auto", device_map="auto")
    return model.eval(), processor


def example_scenes(n: int = 4) -> list[list]:
    """[image, question] pairs from the embedded benchmark's test split."""
    from .eval.data import make_split

    return [[e.image, e.question] for e in make_split("test", n, seed=0)]


def build_app(model, processor, examples: list | None = None, max_new_tokens: int = 32, about: str = ""):
    """A ``gradio.Blocks`` page: one or two images (and a video, for families that take videos) and a question in;
    both answers, the kept-token overlays and the cost out. ``about``: one line on what the model knows, shown at the
    top (the CLI gives the embedded models' from ``vtprune.eval.catalog.about``)."""
    try:
        import gradio as gr
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError('the demo needs Gradio: pip install "vtprune[demo]"') from exc
    from .patches import get_adapter

    def run(image, question, method, percent, layer, image2=None, video=None):
        if image is None and image2 is None and video is None:
            raise gr.Error("upload an image (or a video) first")
        try:
            c = compare(
                model,
                processor,
                [im for im in (image, image2) if im is not None],
                question,
                method=method,
                keep_ratio=float(percent) / 100,
                layer=None if layer in (None, "", -1) else int(layer),
                max_new_tokens=max_new_tokens,
                video=video,
            )
        except (ValueError, NotImplementedError) as exc:
            raise gr.Error(str(exc)) from exc
        second = c.overlays[1] if len(c.overlays) > 1 else None
        return c.original.text, c.pruned.text, c.overlay, second, c.summary()

    with gr.Blocks(title="vtprune: original vs pruned") as app:
        gr.Markdown("## vtprune: the same question to the original and the pruned model")
        if about:
            gr.Markdown(about, elem_id="vt-about")
        # png: Gradio would store examples and uploads as lossy WebP, and the model would see another picture
        image = _refuse_non_images(
            gr.Image(
                type="pil", label="image", elem_id="vt-image", format="png", height=OVERLAY_MIN_SIDE + 40, render=False
            ),
            gr,
        )
        question = gr.Textbox(label="question", elem_id="vt-question", render=False)
        if examples:  # first on the page: one click fills the image and the question
            gr.Examples(examples, [image, question], elem_id="vt-examples", label="examples (click one)")
        with gr.Row():
            image.render()
            shown = gr.Image(  # no fixed height: the two stacked views keep their shape whatever the image's
                type="pil",
                label="what the model sees, and the tokens kept (dropped ones painted over, hatched)",
                elem_id="vt-overlay",
                format="png",
            )
        question.render()
        with gr.Row():
            method = gr.Dropdown(list_methods(), value="divprune", label="method")
            percent = gr.Slider(1, 100, value=25, step=0.5, label="visual tokens kept (%)")
            layer = gr.Number(value=-1, precision=0, label="layer (-1: the method's default)")
        go = gr.Button("compare", variant="primary", elem_id="vt-compare")
        with gr.Row():
            original = gr.Textbox(label="original model", elem_id="vt-original")
            pruned = gr.Textbox(label="pruned model", elem_id="vt-pruned")
        summary = gr.Markdown(elem_id="vt-summary")
        with gr.Row():
            image2 = gr.Image(type="pil", label="second image (optional)", elem_id="vt-image-2", format="png")
            shown2 = gr.Image(type="pil", label="second image: tokens kept", elem_id="vt-overlay-2", format="png")
            takes_video = get_adapter(model).takes_videos
            video = gr.Video(label="video (optional)", elem_id="vt-video", visible=takes_video)
        go.click(
            run, [image, question, method, percent, layer, image2, video], [original, pruned, shown, shown2, summary]
        )
    app.vtprune_run = run  # the click handler, for tests and scripting
    launch = app.launch

    def launch_with_css(*args, **kwargs):  # Gradio 6 takes page CSS at launch, not when the page is built
        return launch(*args, **{"css": PAGE_CSS, **kwargs})

    app.launch = launch_with_css
    return app


def _refuse_non_images(component, gr):
    """Make ``component`` (a gr.Image) refuse a file PIL cannot read with a message naming the file; Gradio's own
    error would be a generic "upstream app raised an exception". The instance is wrapped, not subclassed: Gradio
    writes a .pyi stub next to the module of every component subclass."""
    from PIL import UnidentifiedImageError

    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (UnidentifiedImageError, OSError) as exc:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(
                f"{name} is not an image this demo can read ({type(exc).__name__}); upload a PNG, "
                "JPEG, WebP, GIF or BMP picture"
            ) from exc

    component.preprocess = checked
    return component
