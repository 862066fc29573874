"""The prefill benchmark's mechanics (not its timings: those are machine-dependent and never asserted)."""

import pytest
import torch

from benchmarks import bench_prefill
from helpers import needs
from vtprune.eval.catalog import is_available


def test_method_specs():
    assert bench_prefill.parse_spec("pool", 64) == [{"method": "pool", "keep_tokens": 64}]
    assert bench_prefill.parse_spec("divprune@0:284+random@2", 38) == [
        {"method": "divprune", "keep_tokens": 284, "layer": 0},
        {"method": "random", "keep_tokens": 38, "layer": 2},
    ]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        bench_prefill.parse_spec("pool+nope@1", 4)


def test_rows_carry_kept_tokens_ideal_and_spread():
    torch.manual_seed(0)
    rows = bench_prefill.run(
        ["pool", "fastv@1", "pool@0:100+random@2:50"], hidden=64, layers=3, repeats=1, runs=2, budgets=(64,)
    )
    by = {r["method"]: r for r in rows}
    assert by["pool"]["kept"] == 64 and by["fastv@1"]["kept"] == 64 and by["pool@0:100+random@2:50"]["kept"] == 50
    assert by["pool"]["oracle_s"] is not None and by["fastv@1"]["oracle_s"] is None  # oracle: layer-0 stages only
    for r in rows:
        for mid, lo, hi in r["ratios"].values():
            assert lo <= mid <= hi
        assert r["ideal_speedup"] > 1
    # Layer 0 keeps 64 of 576 in every layer; layer 1 keeps them from layer 1 on: less saving.
    assert by["pool"]["ideal_speedup"] > by["fastv@1"]["ideal_speedup"]
    assert "| pool | 64 |" in bench_prefill.table(rows)


@pytest.mark.parametrize("pixels", [False, True])
def test_stage_overhead_rows(pixels):
    from benchmarks import bench_overhead

    rows = bench_overhead.run(["fastv", "entropy"], rounds=2, pixels=pixels)
    assert [r["method"] for r in rows] == ["fastv", "entropy"]
    for r in rows:
        lo, hi = r["overhead_iqr_s"]
        assert lo <= r["overhead_s"] <= hi and r["choosing_s"] > 0
    assert "| fastv | 2 |" in bench_overhead.table(rows)


# ------------------------------------------------------------------------------------------- vtprune bench


@needs(is_available("llava-tiny-sortofclevr"), "the embedded LLaVA model's weights are missing")
def test_vtprune_bench_writes_a_row_per_variant_and_batch(tmp_path, capsys):
    """The command runs end to end (no timing is asserted): a row per variant and batch size, every run recorded,
    and the KV cache each variant leaves is the prompt's text plus its kept visual tokens."""
    import json

    from vtprune import cli

    out = tmp_path / "bench.json"
    argv = ["bench", "--methods", "visionzip,dart:image_pivots=2", "--batch-sizes", "1,2", "--rounds", "2"]
    assert cli.main(argv + ["--warmup", "0", "--new-tokens", "3", "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [(r["batch_size"], r["variant"]) for r in result["rows"]] == [
        (b, v) for b in (1, 2) for v in ("unpruned", "visionzip", "dart:image_pivots=2")
    ]
    for raw in result["raw"].values():
        assert all(len(runs["ttft"]) == len(runs["decode"]) == 2 for runs in raw.values())
    rows = {(r["batch_size"], r["variant"]): r for r in result["rows"]}
    assert rows[(1, "unpruned")]["ttft_speedup"] == 1.0 and rows[(1, "unpruned")]["flops_ratio"] == 1.0
    # visionzip keeps 16 of 144 visual tokens from the tower on: the cache holds 128 tokens fewer in every layer
    prompt = rows[(1, "unpruned")]["prompt_tokens"]
    base, zipped = rows[(1, "unpruned")]["cache_mib"], rows[(1, "visionzip")]["cache_mib"]
    assert zipped / base == pytest.approx((prompt - 128) / prompt, rel=1e-9)
    assert rows[(1, "visionzip")]["flops_ratio"] < rows[(1, "dart:image_pivots=2")]["flops_ratio"] < 1
    assert "| 2 | visionzip |" in printed and "KV cache MiB" in printed


def test_vtprune_bench_refuses_bad_settings(capsys):
    from vtprune import cli

    assert cli.main(["bench", "--methods", "nope"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    assert cli.main(["bench", "--methods", "dart", "--new-tokens", "1"]) == 2
    assert "--new-tokens must be >= 2" in capsys.readouterr().err
    assert cli.main(["bench", "--methods", "dart", "--batch-sizes", "0"]) == 2
    assert "--batch-sizes must be positive" in capsys.readouterr().err


@needs(is_available("llava-tiny-sortofclevr"), "the embedded LLaVA model's weights are missing")
def test_vtprune_bench_says_which_methods_cannot_run(capsys):
    """PyramidDrop's layer average cannot reach 11 % on a 4-layer LLM: the variant is named, with the reason."""
    from vtprune import cli

    assert cli.main(["bench", "--methods", "pdrop", "--keep-ratio", "0.11", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not run: pdrop: pdrop drops at layers [1, 2, 3] of 4" in err and "no method given runs" in err
