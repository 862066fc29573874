"""Writing results: the printed table, results.json, results.csv and the accuracy-vs-FLOPs Pareto plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def label(r: dict) -> str:
    """The panel/row name: the model, and the task when rows come from lmms-eval."""
    return r["model"] + (f" [{r['task']}]" if r.get("task") else "")


def tokens(value) -> str:
    """A token count as printed: a whole number when it is one (144, not 144.0), else one decimal (a mean)."""
    return "-" if value is None else (f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def table(rows: list[dict]) -> str:
    """Markdown: the results (FLOPs in GFLOPs per sample), then the latencies apart, marked as indicative.
    Video rows add their multi-frame and single-frame accuracies."""
    skipped = [r for r in rows if "skipped" in r]
    rows = [r for r in rows if "skipped" not in r]
    video = any("acc_multi_frame" in r for r in rows)
    extra = " multi-frame | single-frame |" if video else ""
    lines = [
        "| model | method | budget | kept tokens | accuracy |" + extra + " prefill GFLOPs | FLOPs ratio |",
        "|" + "---|" * (9 if video else 7),
    ]
    for r in rows:
        flops, ratio = r.get("prefill_flops"), r.get("flops_ratio")
        cells = f" {_pct(r.get('acc_multi_frame'))} | {_pct(r.get('acc_single_frame'))} |" if video else ""
        lines.append(
            f"| {label(r)} | {r['method']} | {r['budget_pct']:g} % | {tokens(r['kept_tokens'])} | "
            f"{_pct(r['accuracy'])} |{cells} {'-' if flops is None else f'{flops / 1e9:.3f}'} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} |"
        )
    lines += [
        "",
        "Latency (indicative only: one batch, wall clock, on whatever else this machine was doing; compare "
        "FLOPs, or time side by side with `python -m benchmarks.bench_prefill`):",
        "",
        "| model | method | budget | prefill ms | speedup |",
        "|" + "---|" * 5,
    ]
    for r in rows:
        ms, speed = r.get("prefill_latency_ms"), r.get("latency_speedup")
        lines.append(
            f"| {label(r)} | {r['method']} | {r['budget_pct']:g} % | {'-' if ms is None else f'{ms:.1f}'} | "
            f"{'-' if speed is None else f'{speed:.2f}x'} |"
        )
    if skipped:
        lines += ["", "Not run (the method refuses this budget on this model):", ""]
        lines += [f"- {label(r)} {r['method']} at {r['budget_pct']:g} %: {r['skipped']}" for r in skipped]
    return "\n".join(lines)


def write_results(rows: list[dict], output: Path, title: str = "accuracy vs prefill FLOPs") -> dict:
    """results.json, results.csv, pareto.png under ``output``. Returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "csv": output / "results.csv", "plot": output / "pareto.png"}
    write_rows(rows, paths["json"], paths["csv"])
    ran = [r for r in rows if "skipped" not in r]
    pareto_plot(ran + multi_frame_rows(ran), paths["plot"], title)
    return paths


def multi_frame_rows(rows: list[dict]) -> list[dict]:
    """Video rows again with their multi-frame accuracy as ``accuracy``: the plot's extra panel per video model."""
    from ..data.video import MULTI_FRAME_TYPES, VIDEO_QUESTION_TYPES

    share = len(MULTI_FRAME_TYPES) / len(VIDEO_QUESTION_TYPES)  # the test split asks every type equally often
    return [
        {
            **r,
            "task": f"{r.get('task') or 'video'}, multi-frame questions",
            "accuracy": r["acc_multi_frame"],
            "n": r.get("n_multi_frame") or round(r["n"] * share),
        }
        for r in rows
        if r.get("acc_multi_frame") is not None
    ]


def wilson(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval (lower, upper) of an accuracy measured on ``n`` questions."""
    if not n:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def series_style(i: int) -> dict:
    """Series ``i``'s colour, line style and marker: 10 colours x 3 line styles, 12 markers, so that every series of
    a run (17 methods in a video run) looks different from every other."""
    return dict(color=f"C{i % 10}", linestyle=("-", "--", ":")[(i // 10) % 3], marker=MARKERS[i % len(MARKERS)])


def write_rows(rows: list[dict], json_path: Path, csv_path: Path) -> None:
    """Rows as a JSON list and as CSV (columns: every key, in first-seen order; missing cells empty)."""
    json_path.write_text(json.dumps(rows, indent=2))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (FLOPs, accuracy) points no other point beats: none has fewer or equal FLOPs and a higher accuracy
    (ties in FLOPs keep the most accurate). Sorted by FLOPs; accuracy rises along it."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


MARKERS = "osD^vP*Xh<>p"  # one per method, drawn hollow and shrinking so that coincident points stay visible


def legend_below(fig, axes, ncol: int, legend_rows: int, top: float = 1.0) -> None:
    """One legend under the panels, each label once (with a dozen methods a legend inside a panel hides its points),
    and the panels laid out above it, below ``top`` (a figure title above it keeps clear of the panels' titles)."""
    handles = {}
    for ax in axes:
        for h, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * legend_rows / fig.get_figheight() + 0.01, 1, top))


def pareto_plot(rows: list[dict], path: Path, title: str):
    """Accuracy against prefill FLOPs, one line per method (from the unpruned point), one panel per model, with
    that model's Pareto frontier. Every point carries its budget (% of the visual tokens kept) and a 95 % interval
    of its accuracy (Wilson, over the panel's n questions, in its title). Returns the figure (saved and closed)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(label(r) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    ncol = max(1, min(len(methods) + 2, 3 * len(models)))
    legend_rows = -(-(len(methods) + 2) // ncol)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.2 + 0.22 * legend_rows), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if label(r) == name and r.get("prefill_flops") is not None]
        base = [r for r in mine if r["method"] == "none"]
        for i, method in enumerate(methods):
            pts = sorted(base + [r for r in mine if r["method"] == method], key=lambda r: r["prefill_flops"])
            if len(pts) == len(base):
                continue
            x = [r["prefill_flops"] / 1e9 for r in pts]
            y = [100 * r["accuracy"] for r in pts]
            low, high = zip(*(wilson(r["accuracy"], r.get("n") or 0) for r in pts))
            # (clamped: at 0 % or 100 % the interval's near end equals the point up to rounding)
            yerr = [
                [max(0.0, v - 100 * lo) for v, lo in zip(y, low)],
                [max(0.0, 100 * hi - v) for v, hi in zip(y, high)],
            ]
            style = series_style(i)
            ax.errorbar(
                x,
                y,
                yerr=yerr,
                label=method,
                markersize=11 - 6 * i / max(1, len(methods) - 1),
                markerfacecolor="none",
                markeredgewidth=1.4,
                linewidth=1,
                elinewidth=0.8,
                capsize=2,
                alpha=0.9,
                **style,
            )
            for r, xi, yi in zip(pts, x, y):
                if r["method"] != "none":
                    ax.annotate(
                        f"{r['budget_pct']:g}%",
                        (xi, yi),
                        textcoords="offset points",
                        xytext=(4, 3),
                        fontsize=6,
                        color=style["color"],
                    )
        for r in base:
            ax.scatter(
                [r["prefill_flops"] / 1e9], [100 * r["accuracy"]], color="black", zorder=5, s=25, label="unpruned"
            )
        front = frontier([(r["prefill_flops"] / 1e9, 100 * r["accuracy"]) for r in mine])
        if front:
            ax.step(
                [x for x, _ in front],
                [y for _, y in front],
                where="post",
                color="black",
                linestyle="--",
                linewidth=1.5,
                zorder=4,
                label="Pareto frontier",
            )
        ax.set_xscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 2, 3 rather than 2x10^0, 3x10^0
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("prefill GFLOPs per sample (real FLOPs, log scale)")
        ax.set_ylabel("accuracy (%), 95 % interval")
        counts = sorted({r.get("n") for r in mine if r.get("n")})
        ax.set_title(
            f"{name}\n(n = {', '.join(map(str, counts))} questions per point)" if counts else name, fontsize=10
        )
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    legend_below(fig, axes.flat, ncol, legend_rows, top=0.93)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend of long names may be wider than the panels
    plt.close(fig)
    return fig


def main(argv=None) -> None:
    """``python -m vtprune.eval.harness.report OUTPUT RUN [RUN ...]``: merge the results.json of several runs (for
    example one ``vtprune eval --models ...`` per model, run in parallel) into one table, JSON, CSV and plot."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("output", type=Path)
    ap.add_argument("runs", type=Path, nargs="+", help="folders holding results.json")
    args = ap.parse_args(argv)
    rows = [r for run in args.runs for r in json.loads((run / "results.json").read_text())]
    write_results(rows, args.output)
    print(table(rows))


if __name__ == "__main__":
    main()
