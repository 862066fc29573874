"""What ships in the package, known without importing torch: the embedded models, the lmms-eval task folder and
the method names (so ``vtprune --help`` and ``vtprune models`` answer at once)."""

from __future__ import annotations

import json
import re
from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
TASKS_DIR = Path(__file__).parent / "lmms" / "tasks"  # lmms-eval's --include_path for the offline tasks
EMBEDDED_MODELS = ["llava-tiny-sortofclevr", "qwen2_5_vl-tiny-sortofclevr"]  # the image benchmark's models
VIDEO_MODELS = ["qwen2_5_vl-tiny-sortofclevr-video"]  # the video benchmark's (eval/data/video.py clips)
TASKS = ("image", "video")  # `vtprune eval --tasks` without --model: the embedded benchmarks
DEFAULT_BUDGETS = (100.0, 50.0, 25.0, 11.0, 5.5)  # percent of the visual tokens kept: `vtprune eval`'s grid


def builtin_methods() -> list[str]:
    """The built-in methods' names, sorted, read from their ``@register("name"`` lines: the registry
    (``vtprune.list_methods()``) imports torch, which ``vtprune --help`` should not wait for."""
    import importlib.util

    folder = Path(importlib.util.find_spec("vtprune.strategies").submodule_search_locations[0])  # not imported
    found = set()
    for path in folder.glob("*.py"):
        found.update(re.findall(r'^@register\(\s*"([A-Za-z0-9_]+)"', path.read_text(), flags=re.M))
    return sorted(found)


def about(name: str) -> str:
    """One line on what an embedded model knows (empty for other models): the demo shows it."""
    if name in VIDEO_MODELS:
        return (
            "This small model was trained here on 8-frame clips of coloured circles, squares and triangles moving "
            "on white; it answers one-word questions about which object moved, how many frames show it, which "
            "appeared last and where it ended, and nothing else."
        )
    if name in EMBEDDED_MODELS:
        return (
            "This small model was trained here on Sort-of-CLEVR-style scenes (coloured circles, squares and "
            "triangles on white); it answers one-word questions about shape, colour, side, count and the nearest "
            "object, and nothing else."
        )
    return ""


def model_dir(name: str) -> Path:
    return MODELS_DIR / name


def is_available(name: str) -> bool:
    d = model_dir(name)
    return (d / "config.json").exists() and any(d.glob("*.safetensors"))


def training_info(name: str) -> dict:
    p = model_dir(name) / "training.json"
    return json.loads(p.read_text()) if p.exists() else {}


def resolve(name_or_path: str) -> str:
    """An embedded model name becomes its folder; a local path or an HF id is returned unchanged."""
    if name_or_path in EMBEDDED_MODELS + VIDEO_MODELS and not Path(name_or_path).exists():
        return str(model_dir(name_or_path))
    return name_or_path


def describe() -> list[dict]:
    """One row per embedded model: name, benchmark (image / video), class, visual tokens per image or clip, test
    accuracy (and, for a video model, its multi-frame questions' accuracy, else None), folder."""
    rows = []
    for name in EMBEDDED_MODELS + VIDEO_MODELS:
        info = training_info(name)
        video = name in VIDEO_MODELS
        acc = info.get("test_accuracy") or {}
        rows.append(
            {
                "name": name,
                "task": "video" if video else "image",
                "class": info.get("model_class", "?"),
                "visual_tokens": info.get("visual_tokens_per_clip" if video else "visual_tokens_per_image"),
                "test_accuracy": acc.get("overall"),
                "multi_frame_accuracy": acc.get("multi_frame"),
                "available": is_available(name),
                "path": str(model_dir(name)),
            }
        )
    return rows
