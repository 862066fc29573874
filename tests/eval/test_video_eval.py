"""`vtprune eval --tasks video`: the video benchmark's rows, specs with options, the CLI and its errors."""

import json

import pytest
import torch

import vtprune
from helpers import needs
from vtprune.cli import main
from vtprune.eval import harness
from vtprune.eval.catalog import VIDEO_MODELS
from vtprune.eval.catalog import is_available as is_video_model_available
from vtprune.eval.data import make_video_split
from vtprune.eval.harness import evaluate_video
from vtprune.eval.harness import video as video_eval
from vtprune.eval.models import load_embedded as load_video_model

VIDEO_MODEL = VIDEO_MODELS[0]

needs_model = needs(is_video_model_available(VIDEO_MODEL), f"{VIDEO_MODEL}'s weights are missing")


def test_parse_method_reads_options_and_rejects_bad_ones():
    assert harness.parse_method("divprune") == ("divprune", {})
    assert harness.parse_method("divprune_stable:smooth=1,margin=0.02") == (
        "divprune_stable",
        {"smooth": 1, "margin": 0.02},
    )
    assert harness.parse_method("divprune:temporal=frame") == ("divprune", {"temporal": "frame"})
    with pytest.raises(ValueError, match="'temporal' in 'divprune:temporal' is not key=value"):
        harness.parse_method("divprune:temporal")
    with pytest.raises(ValueError, match="temporal must be one of"):
        harness.check_methods(["divprune:temporal=sometimes"])
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nope:temporal=frame'\]"):
        harness.check_methods(["nope:temporal=frame"])


def test_video_specs_add_the_per_frame_form():
    specs = video_eval.video_specs(["divprune", "temporal", "pool:temporal=clip", "divprune_stable:cells=3"])
    assert specs == [
        "divprune",
        "divprune:temporal=frame",
        "temporal",
        "pool:temporal=clip",
        "divprune_stable:cells=3",
        "divprune_stable:cells=3,temporal=frame",
    ]
    every = video_eval.video_specs()
    assert len(every) == 2 * len(vtprune.list_methods()) - len(video_eval.CLIP_ONLY)


@needs_model
def test_run_video_rows_match_the_model_and_the_budget():
    torch.set_num_threads(1)
    rows = video_eval.run_video(methods=["pool"], budgets=[100, 25], limit=6, batch_size=3, progress=False)
    assert [r["method"] for r in rows] == ["none", "pool", "pool:temporal=frame"]
    base, clip, frame = rows
    assert base["visual_tokens"] == base["kept_tokens"] == 600
    assert clip["kept_tokens"] == frame["kept_tokens"] == 150
    assert clip["flops_ratio"] < 1 and frame["flops_ratio"] < 1 and base["flops_ratio"] == 1
    # the unpruned row is the model's own accuracy on the same clips
    model, processor = load_video_model(VIDEO_MODEL)
    own = evaluate_video(model, processor, make_video_split("test", 6, seed=0), batch_size=3)
    assert base["accuracy"] == own["overall"] and base["acc_multi_frame"] == own["multi_frame"]
    assert {"acc_single_frame", "acc_moved", "acc_side"} <= set(base) and all(r["task"] == "video" for r in rows)


@needs_model
def test_per_frame_pool_keeps_a_share_of_every_frame():
    torch.set_num_threads(1)
    model, processor = load_video_model(VIDEO_MODEL)
    ex = make_video_split("test", 1, seed=0)[0]
    from vtprune.eval.models import build_video_prompt

    inputs = processor(videos=[ex.frames], text=[build_video_prompt(processor, ex.question)], return_tensors="pt")
    kept = {}
    for temporal in ("clip", "frame"):
        vtprune.apply_pruner(model, method="random", keep_ratio=0.1, temporal=temporal, seed=3)
        with torch.no_grad():
            model(**inputs)
        idx = vtprune.get_stats(model)[-1]["kept_indices"][0]
        kept[temporal] = torch.bincount(idx[idx >= 0] // 150, minlength=4).tolist()
        vtprune.remove_pruner(model)
    assert kept["frame"] == [15, 15, 15, 15]  # 60 of 600: each frame its share
    assert sum(kept["clip"]) == 60


@needs_model
def test_cli_video_task_writes_multi_frame_columns(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "eval",
                "--tasks",
                "video",
                "--methods",
                "random",
                "--budgets",
                "100,11",
                "--limit",
                "6",
                "--batch-size",
                "6",
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["none", "random", "random:temporal=frame"]
    text = capsys.readouterr().out
    assert "| multi-frame | single-frame |" in text and f"| {VIDEO_MODEL} [video] | random | 11 % | 66 |" in text
    assert "acc_multi_frame" in (out / "results.csv").read_text().splitlines()[0]
    assert (out / "pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tasks", "nope"], "task(s) ['nope'] are not embedded benchmarks (expected ['image', 'video'])"),
        (
            ["--tasks", "video", "--models", "llava-tiny-sortofclevr"],
            "unknown embedded model(s) ['llava-tiny-sortofclevr'] for task(s) ['video']",
        ),
        (["--tasks", "video", "--methods", "divprune:temporal=often"], "temporal must be one of ['clip', 'frame']"),
    ],
)
def test_cli_video_errors_name_the_value(argv, message, tmp_path, capsys):
    assert main(["eval", "--output", str(tmp_path), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
