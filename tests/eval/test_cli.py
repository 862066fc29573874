"""The `vtprune` command line: eval outputs, narrowing flags, the errors a user gets, fast help and listings."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vtprune
from helpers import needs
from vtprune.cli import _parser, main
from vtprune.eval import catalog
from vtprune.eval.catalog import is_available


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--budgets", "0,150"], "budgets must be percentages in (0, 100], got '0,150'"),
        (["--budgets", "half"], "budgets must be comma-separated percentages"),
        (["--methods", "divprune,nope"], "unknown method(s) ['nope']; available: ["),
        (["--models", "gpt"], "unknown embedded model(s) ['gpt']"),
        (["--budgets", "0.25"], "0.25 is below 1 %: give 25 for 0.25 of the tokens"),
    ],
)
def test_bad_arguments_name_the_value(argv, message, capsys, tmp_path):
    assert main(["eval", "--output", str(tmp_path), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_mistyped_flag_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--budgetz", "25"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: vtprune eval" in err and "unrecognized arguments: --budgetz 25" in err


@needs(is_available("llava-tiny-sortofclevr"), "the embedded LLaVA model's weights are missing")
def test_eval_reports_a_budget_the_method_refuses_and_goes_on(tmp_path, capsys):
    """PyramidDrop's budget is a layer average: on a 4-layer LLM its three drops keep every token in layer 0, so
    5.5 % cannot be reached; that configuration is reported, with the reason, and the others still run."""
    import json

    out = tmp_path / "run"
    argv = ["eval", "--models", "llava-tiny-sortofclevr", "--methods", "pdrop", "--budgets", "50,5.5"]
    assert main(argv + ["--limit", "4", "--output", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["budget_pct"], "skipped" in r) for r in rows] == [
        ("none", 100.0, False),
        ("pdrop", 50.0, False),
        ("pdrop", 5.5, True),
    ]
    assert "layer average is at least 0.250" in rows[-1]["skipped"]
    assert "Not run" in captured.out and "skipped pdrop at 5.5 %" in captured.err


@needs(is_available("llava-tiny-sortofclevr"), "the embedded LLaVA model's weights are missing")
def test_eval_writes_table_json_csv_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "eval",
            "--models",
            "llava-tiny-sortofclevr",
            "--methods",
            "random,pool",
            "--budgets",
            "100,25",
            "--limit",
            "8",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["budget_pct"]) for r in rows] == [("none", 100), ("random", 25), ("pool", 25)]
    for r in rows:
        assert {"model", "method", "keep_ratio", "kept_tokens", "accuracy", "prefill_flops"} <= set(r)
    base = rows[0]
    assert base["kept_tokens"] == base["visual_tokens"] == 144
    assert rows[1]["kept_tokens"] == 36 and rows[1]["flops_ratio"] < 1
    assert (out / "results.csv").read_text().count("\n") == 4
    assert (out / "pareto.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| llava-tiny-sortofclevr | random | 25 % | 36 |" in out
    assert out.index("| prefill ms |") > out.index("| FLOPs ratio |") and "indicative" in out


# ------------------------------------------------------------------------------------- a newcomer's first calls


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["eval", "--help"],
        ["demo", "--help"],
        ["models", "--help"],
        ["methods", "--help"],
        ["tasks-path", "--help"],
        ["models"],
        ["tasks-path"],
    ],
)
def test_help_and_listings_answer_fast_without_torch(argv):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    code = (
        "import runpy, sys; sys.argv = ['vtprune', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('vtprune.cli', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [m for m in ('torch', 'transformers', 'gradio') if m in sys.modules]\nassert not bad, bad"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert elapsed < 1.5, f"vtprune {' '.join(argv)} took {elapsed:.2f} s"
    if argv == ["--version"]:
        assert out.stdout.strip() == f"vtprune {vtprune.__version__}"


def test_every_flag_has_help_and_its_default():
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help and "default" in action.help, (name, action.option_strings)
            if action.default not in (None, False):
                assert str(action.default) in action.help % {"default": action.default}, (name, action.dest)


def test_eval_help_lists_models_and_methods(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for name in catalog.EMBEDDED_MODELS + vtprune.list_methods():
        assert name in text, name


def test_static_method_list_is_the_registry():
    assert catalog.builtin_methods() == vtprune.list_methods()


def test_models_lists_the_visual_tokens_the_processor_makes(capsys):
    from vtprune.eval.data import make_split
    from vtprune.eval.models import build_prompt, load_embedded

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    image = make_split("test", 1, seed=0)[0].image
    for name in catalog.EMBEDDED_MODELS:
        if not catalog.is_available(name):
            continue
        model, processor = load_embedded(name)
        batch = processor(images=[image], text=[build_prompt(processor, "q")], return_tensors="pt")
        n = int((batch["input_ids"] == model.config.image_token_id).sum())
        line = next(ln for ln in out.splitlines() if ln.startswith(f"| {name} |"))
        assert f"| {n} |" in line, (line, n)
    for name in catalog.VIDEO_MODELS:  # a video model also shows its multi-frame accuracy; image models do not
        line = next(ln for ln in out.splitlines() if ln.startswith(f"| {name} |"))
        assert "% multi-frame)" in line and "| video |" in line, line
    assert all("multi-frame" not in ln for ln in out.splitlines() if "| image |" in ln)


def test_tasks_path_holds_the_task_yaml(capsys):
    assert main(["tasks-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "vtprune_sortofclevr" / "vtprune_sortofclevr.yaml").exists()
