"""`vtprune eval`: outputs, narrowing flags and the errors a user gets."""
import json

import pytest

from vtprune.cli import main
from vtprune.eval.embedded import is_available


@pytest.mark.parametrize("argv,message", [
    (["--budgets", "0,150"], "budgets must be percentages in (0, 100], got '0,150'"),
    (["--budgets", "half"], "budgets must be comma-separated percentages"),
    (["--methods", "divprune,nope"], "unknown method(s) ['nope']; available: ["),
    (["--models", "gpt"], "unknown embedded model(s) ['gpt']"),
])
def test_bad_arguments_name_the_value(argv, message, capsys, tmp_path):
    assert main(["eval", "--output", str(tmp_path), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not is_available("llava-tiny-sortofclevr"), reason="embedded LLaVA model not trained here")
def test_eval_writes_table_json_csv_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["eval", "--models", "llava-tiny-sortofclevr", "--methods", "random,pool", "--budgets", "100,25",
                 "--limit", "8", "--output", str(out), "--no-progress"])
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
    assert "| llava-tiny-sortofclevr | random | 25 % | 36.0 |" in capsys.readouterr().out
