"""Results as printed and plotted: integer token counts, latency apart, the Pareto frontier, coincident methods."""

from vtprune.eval.harness.report import frontier, pareto_plot, table, tokens


def _rows():
    rows = []
    for model, scale in (("a", 1.0), ("b", 2.0)):
        rows.append(
            {
                "model": model,
                "method": "none",
                "budget_pct": 100,
                "kept_tokens": 144.0,
                "accuracy": 0.9,
                "prefill_flops": 10e9 * scale,
                "prefill_latency_ms": 50.0,
            }
        )
        for method in ("pool", "random"):  # same FLOPs and accuracy: they would hide each other
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "budget_pct": 25,
                    "kept_tokens": 36.0,
                    "accuracy": 0.6,
                    "prefill_flops": 4e9 * scale,
                    "prefill_latency_ms": 20.0,
                }
            )
        rows.append(
            {
                "model": model,
                "method": "fastv",
                "budget_pct": 25,
                "kept_tokens": 36.5,
                "accuracy": 0.8,
                "prefill_flops": 7e9 * scale,
                "prefill_latency_ms": 30.0,
            }
        )
        rows.append(
            {
                "model": model,
                "method": "zoo",
                "budget_pct": 25,
                "kept_tokens": 36.0,
                "accuracy": 0.5,
                "prefill_flops": 12e9 * scale,
                "prefill_latency_ms": 90.0,
            }
        )
    return rows


def test_frontier_keeps_only_points_nothing_beats():
    pts = [(1, 50), (2, 40), (2, 60), (3, 55), (4, 70), (0.5, 10), (5, 70)]
    assert frontier(pts) == [(0.5, 10), (1, 50), (2, 60), (4, 70)]
    assert frontier([]) == []


def test_token_counts_print_as_integers_unless_a_mean():
    assert [tokens(v) for v in (144.0, 36, 36.5, None)] == ["144", "36", "36.5", "-"]


def test_table_keeps_latency_apart_and_says_it_is_indicative():
    text = table(_rows())
    main, latency = text.split("Latency", 1)
    assert "| a | pool | 25 % | 36 | 60.0 % |" in main and "144.0" not in main
    assert "ms" not in main and "indicative" in latency and "| a | zoo | 25 % | 90.0 |" in latency


def test_plot_draws_each_models_frontier_and_keeps_coincident_methods_visible(tmp_path):
    fig = pareto_plot(_rows(), tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    for ax, scale in zip(fig.axes, (1.0, 2.0)):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        front = lines["Pareto frontier"]
        expected = frontier([(4 * scale, 60.0), (7 * scale, 80.0), (10 * scale, 90.0), (12 * scale, 50.0)])
        assert list(zip(front.get_xdata(), front.get_ydata())) == expected
        series = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: the data line, then the bars
        pool, rand = series["pool"], series["random"]
        assert list(pool.get_xydata().tolist()) == list(rand.get_xydata().tolist())  # they coincide ...
        assert pool.get_marker() != rand.get_marker() and pool.get_markersize() != rand.get_markersize()
        assert pool.get_markerfacecolor() == "none"  # ... and hollow markers of two sizes show both


def test_every_series_of_a_video_run_has_its_own_style():
    from vtprune.eval.harness.report import series_style

    styles = [tuple(sorted(series_style(i).items())) for i in range(30)]
    assert len(set(styles)) == 30 and len({s["color"] for s in map(dict, styles[:10])}) == 10


def test_wilson_interval_and_the_multi_frame_panels_n():
    from vtprune.eval.harness.report import multi_frame_rows, wilson

    low, high = wilson(0.9, 20)
    assert 0.69 < low < 0.71 and 0.97 < high < 0.98  # 18 of 20: the interval a 20-question run carries
    assert wilson(1.0, 20)[1] == 1.0 and wilson(0.5, 0) == (0.0, 1.0)
    video = {"model": "v", "method": "none", "accuracy": 0.8, "acc_multi_frame": 0.7, "n": 300}
    assert multi_frame_rows([video])[0]["n"] == 200  # 4 of the 6 question types when the run did not record it
    assert multi_frame_rows([{**video, "n_multi_frame": 150}])[0]["n"] == 150


def test_plot_labels_budgets_and_n(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    fig = pareto_plot([{**r, "n": 20} for r in _rows()], tmp_path / "p.png", "t")
    ax = fig.axes[0]
    assert "n = 20" in ax.get_title()
    assert "25%" in [t.get_text() for t in ax.texts]
