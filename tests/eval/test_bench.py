"""The prefill benchmark's mechanics (not its timings: those are machine-dependent and never asserted)."""

import pytest
import torch

from benchmarks import bench_prefill


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
