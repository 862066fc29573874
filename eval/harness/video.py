"""Accuracy versus FLOPs on the embedded video benchmark: the engine behind ``vtprune eval --tasks video``.

The video model answers the test clips of ``eval/data/video.py`` (multi-frame questions and single-frame controls)
under every method at every budget, with the same rows as the image benchmark (``eval/harness/grid.py``) plus the
multi-frame and single-frame accuracies.  A budget is the share of the clip's video tokens kept.  Every method runs
twice: choosing over the whole clip (``temporal="clip"``, the default) and with a budget per frame
(``temporal="frame"``, spec ``"<method>:temporal=frame"``); the video methods (``temporal``, ``vidcom2``,
``fastvid``, ``holitom``, ``dycoke``) read the clip's frames themselves, so they run over the clip only.
"""

from __future__ import annotations

from collections.abc import Iterable

import vtprune

from ..catalog import DEFAULT_BUDGETS, VIDEO_MODELS
from ..data.video import MULTI_FRAME_TYPES, make_video_split
from ..models import load_embedded
from .grid import check_methods, configs, parse_method, run_grid
from .predict import predict_video, video_accuracy

DEFAULT_VIDEO_LIMIT = 300  # test clips per configuration (50 per question type, 200 multi-frame)
PER_FRAME = "temporal=frame"
# Methods that compare frames or share the budget among them: inside one frame there is nothing for them to do.
CLIP_ONLY = ("temporal", "vidcom2", "fastvid", "holitom", "dycoke")


def video_specs(methods: Iterable[str] | None = None) -> list[str]:
    """Each method as given, then its per-frame form: bare names gain ``:temporal=frame`` (unless the spec already
    sets ``temporal`` or the method only works over the clip)."""
    out = []
    for spec in check_methods(methods or vtprune.list_methods()):
        out.append(spec)
        name, options = parse_method(spec)
        if "temporal" not in options and name not in CLIP_ONLY:
            out.append(f"{spec},{PER_FRAME}" if options else f"{spec}:{PER_FRAME}")
    return out


def video_scores(preds: list[str], examples) -> dict:
    """``accuracy`` (overall), ``acc_multi_frame``, ``acc_single_frame`` and ``acc_<question type>``."""
    res = video_accuracy(preds, examples)
    out = {"accuracy": res.pop("overall"), "n": res.pop("n")}
    multi = [e for e in examples if e.qtype in MULTI_FRAME_TYPES]
    out["n_multi_frame"] = len(multi)  # what the multi-frame accuracy is a share of (the plot's interval)
    out.update({f"acc_{k}": v for k, v in res.items()})
    return out


def _predict(model, processor, examples, batch_size: int, on_batch=None) -> list[str]:
    return predict_video(model, processor, examples, batch_size, on_batch=on_batch)


def run_video(
    models=None,
    methods=None,
    budgets=DEFAULT_BUDGETS,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    per_frame: bool = True,
) -> list[dict]:
    """All configurations on the video test split (``limit`` clips, default ``DEFAULT_VIDEO_LIMIT``).
    ``per_frame=False`` runs the specs as given, without adding their per-frame forms. Returns the rows."""
    models = list(models or VIDEO_MODELS)
    unknown = [m for m in models if m not in VIDEO_MODELS]
    if unknown:
        raise ValueError(f"unknown video model(s) {unknown}; available: {VIDEO_MODELS}")
    specs = video_specs(methods) if per_frame else check_methods(methods or vtprune.list_methods())
    todo = configs(specs, budgets)
    examples = make_video_split("test", limit or DEFAULT_VIDEO_LIMIT, seed=0)
    return run_grid(
        models,
        load_embedded,
        todo,
        examples,
        batch_size,
        progress,
        unit="clip",
        desc="vtprune eval video",
        extra={"task": "video"},
        predict_fn=_predict,
        scores_fn=video_scores,
    )
