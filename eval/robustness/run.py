"""How stable is each method's selection: ``vtprune robustness`` / ``python -m vtprune.eval.robustness``.

For every model x method x budget the same seeded test questions are answered on the clean images and on each
perturbed copy (``vtprune.eval.perturb``: Gaussian pixel noise, corner patches). A row per perturbation records

* ``jaccard``: mean Jaccard index of the kept visual tokens against the clean run's, question by question;
* ``answer_change``: share of questions whose answer differs from the clean answer (the unpruned model's rate,
  method ``none``, is the control: what the perturbation does without pruning);
* ``accuracy`` under the perturbation, and ``accuracy_clean``;
* for patches: ``pick_share`` (mean share of the kept tokens' area inside the patch), the same for the clean
  picks (``pick_share_clean``, the patch region's share before the patch is drawn), ``area_share`` (the patch's
  share of the image area, in token cells), and ``attraction`` = pick_share / area_share (1 = the patch is kept no
  more than its size; uniform picking over the image gives about 1).

Token cells are mapped to pixels with the adapter's grid and the processor's resize (``perturb.token_frame``);
a cell partly inside the patch counts with the share of its area inside.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import vtprune

from ..catalog import EMBEDDED_MODELS
from ..data import make_split, score
from ..harness import parse_method, predict
from ..models import load_embedded
from .args import DEFAULT_LIMIT, DEFAULT_PERTURBATIONS, add_arguments
from .perturb import cell_coverage, parse_perturbation, perturb, token_frame

DEFAULT_BUDGETS = (11.0,)


@dataclass
class Shown:
    """What ``predict`` reads from an example: the (possibly perturbed) image and the question."""

    image: Image.Image
    question: str


def kept_sets(stats: list, n_visual: list[int]) -> list[frozenset]:
    """Per row, the visual-token indices (into the row's image tokens) that survive every stage."""
    out = []
    for r, n in enumerate(n_visual):
        idx = torch.arange(n)
        for stage in stats:
            row = stage["kept_indices"][r].cpu()
            idx = idx[row[row >= 0]]
        out.append(frozenset(idx.tolist()))
    return out


def run_pass(model, processor, items: list, spec: str | None, budget: float, batch_size: int = 16):
    """Answers, kept sets and token grids of one pass over ``items`` (``spec=None``: the unpruned model)."""
    from vtprune.patches import get_adapter

    kept, grids = [], []

    def on_batch(inputs, chunk):
        n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
        grids.extend(get_adapter(model).grids(inputs, n_vis) or [None] * len(n_vis))
        if spec is None:
            kept.extend(frozenset(range(n)) for n in n_vis)
        else:
            kept.extend(kept_sets(vtprune.get_stats(model), n_vis))

    if spec is not None:
        name, options = parse_method(spec)
        vtprune.apply_pruner(model, method=name, keep_ratio=budget / 100.0, **options)
    try:
        answers = predict(model, processor, items, batch_size=batch_size, on_batch=on_batch)
    finally:
        if spec is not None:
            vtprune.remove_pruner(model)
    return answers, kept, grids


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def compare(clean, perturbed, answers: list[str], pert, processor, images) -> dict:
    """Metrics of one perturbed pass against the clean pass (both from ``run_pass``)."""
    (a0, k0, _), (a1, k1, grids) = clean, perturbed
    row = {
        "jaccard": _mean(len(x & y) / len(x | y) if x | y else 1.0 for x, y in zip(k0, k1)),
        "answer_change": _mean(float(x != y) for x, y in zip(a0, a1)),
        "accuracy": _mean(score(p, g) for p, g in zip(a1, answers)),
        "accuracy_clean": _mean(score(p, g) for p, g in zip(a0, answers)),
    }
    if pert.is_patch:
        share, share0, area = [], [], []
        for img, grid, s0, s1 in zip(images, grids, k0, k1):
            if grid is None:
                continue  # several crops (LLaVA-NeXT): no single grid to map the patch onto
            frame = token_frame(processor, *img.size)
            cov = cell_coverage(frame, grid, pert.box(*img.size))
            inside = cell_coverage(frame, grid, (0, 0, *img.size))
            share.append(float(cov[sorted(s1)].sum()) / max(1, len(s1)))
            share0.append(float(cov[sorted(s0)].sum()) / max(1, len(s0)))
            area.append(float(cov.sum() / inside.sum()))
        row.update(pick_share=_mean(share), pick_share_clean=_mean(share0), area_share=_mean(area))
        if row["area_share"]:
            row["attraction"] = row["pick_share"] / row["area_share"]
            row["attraction_clean"] = row["pick_share_clean"] / row["area_share"]
    return row


def measure(
    model, processor, examples, specs, budgets, perturbations, seed: int = 0, batch_size: int = 16, bar=None
) -> list[dict]:
    """All rows for one model: the unpruned control, then every method spec x budget, each x perturbation."""
    perts = [parse_perturbation(p) if isinstance(p, str) else p for p in perturbations]
    clean_items = [Shown(e.image, e.question) for e in examples]
    shown = {p.name: [Shown(perturb(e.image, p, seed, i), e.question) for i, e in enumerate(examples)] for p in perts}
    answers = [e.answer for e in examples]
    configs = [(None, 100.0)] + [(s, b) for s in specs for b in budgets if b < 100]
    rows = []
    for spec, budget in configs:
        clean = run_pass(model, processor, clean_items, spec, budget, batch_size)
        for p in perts:
            perturbed = run_pass(model, processor, shown[p.name], spec, budget, batch_size)
            row = compare(clean, perturbed, answers, p, processor, [s.image for s in shown[p.name]])
            if spec is None:
                row.pop("jaccard")  # keep-all: trivially 1
            rows.append(
                {
                    "method": spec or "none",
                    "budget_pct": budget,
                    "perturbation": p.name,
                    "n": len(examples),
                    "seed": seed,
                    **row,
                }
            )
            if bar is not None:
                bar.update(1)
    return rows


def run_embedded(
    models=None,
    specs=None,
    budgets=DEFAULT_BUDGETS,
    perturbations=DEFAULT_PERTURBATIONS,
    limit: int = DEFAULT_LIMIT,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
):
    models = list(models or EMBEDDED_MODELS)
    unknown = [m for m in models if m not in EMBEDDED_MODELS]
    if unknown:
        raise ValueError(f"unknown embedded model(s) {unknown}; available: {EMBEDDED_MODELS}")
    specs = list(specs or vtprune.list_methods())
    bad = [s for s in specs if parse_method(s)[0] not in vtprune.list_methods()]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; available: {vtprune.list_methods()}")
    examples = make_split("test", limit, seed=seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        n_cfg = 1 + len(specs) * len([b for b in budgets if b < 100])
        bar = tqdm(total=len(models) * n_cfg * len(perturbations), unit="pass", desc="vtprune robustness")
    rows = []
    try:
        for name in models:
            model, processor = load_embedded(name)
            rows += [
                {"model": name, **r}
                for r in measure(model, processor, examples, specs, budgets, perturbations, seed, batch_size, bar)
            ]
    finally:
        if bar is not None:
            bar.close()
    return rows


def merge_runs(runs: list[Path]) -> list[dict]:
    """Rows of several runs' robustness.json, keeping the first of rows that repeat the same configuration (the
    unpruned control that every run measures)."""
    import json

    rows, seen = [], set()
    for run in runs:
        for r in json.loads((run / "robustness.json").read_text()):
            key = (r["model"], r["method"], r["budget_pct"], r["perturbation"], r["n"], r["seed"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per row; percentages, Jaccard to two decimals, attraction as a factor."""

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = [
        "| model | method | budget | perturbation | Jaccard | answers changed % | accuracy % (clean) | "
        "patch picks % (clean) | attraction (clean) |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        jac = "-" if r.get("jaccard") is None else f"{r['jaccard']:.2f}"
        patch = f"{pct(r['pick_share'])} ({pct(r['pick_share_clean'])})" if r.get("pick_share") is not None else "-"
        attr = f"{r['attraction']:.2f} ({r['attraction_clean']:.2f})" if r.get("attraction") is not None else "-"
        lines.append(
            f"| {r['model'].split('-')[0]} | {r['method']} | {r['budget_pct']:g} % | {r['perturbation']} | "
            f"{jac} | {pct(r['answer_change'])} | {pct(r['accuracy'])} ({pct(r['accuracy_clean'])}) | "
            f"{patch} | {attr} |"
        )
    return "\n".join(lines)


def write_results(rows: list[dict], output: Path) -> dict:
    """robustness.json, robustness.csv and robustness.png under ``output``."""
    from ..harness.report import write_rows

    output.mkdir(parents=True, exist_ok=True)
    paths = {k: output / f"robustness.{k}" for k in ("json", "csv", "png")}
    write_rows(rows, paths["json"], paths["csv"])
    plot(rows, paths["png"])
    return paths


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy under each perturbation against the answer-change rate: one panel per model x perturbation, one
    line per method through its budgets; the unpruned control in black. Up and left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..harness.report import legend_below

    models = list(dict.fromkeys(r["model"] for r in rows))
    perts = list(dict.fromkeys(r["perturbation"] for r in rows))
    # One colour per method across panels, whatever methods a panel lacks.
    colour = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))}
    ncol = max(1, min(len(colour) + 1, 2 * len(perts)))
    legend_rows = -(-(len(colour) + 1) // ncol)
    fig, axes = plt.subplots(
        len(models), len(perts), squeeze=False, figsize=(3.6 * len(perts), 3.4 * len(models) + 0.22 * legend_rows)
    )
    for i, model in enumerate(models):
        for j, pert in enumerate(perts):
            ax, mine = axes[i][j], [r for r in rows if r["model"] == model and r["perturbation"] == pert]
            for method in dict.fromkeys(r["method"] for r in mine):
                pts = sorted((r for r in mine if r["method"] == method), key=lambda r: r["budget_pct"])
                style = dict(color="black", zorder=5) if method == "none" else dict(marker="o", color=colour[method])
                ax.plot(
                    [100 * r["answer_change"] for r in pts],
                    [100 * r["accuracy"] for r in pts],
                    label="unpruned (control)" if method == "none" else method,
                    **style,
                    **({"marker": "s"} if method == "none" else {}),
                )
            ax.set_title(f"{model.split('-')[0]} · {pert}", fontsize=9)
            ax.set_xlabel("answers changed (%)", fontsize=8)
            ax.set_ylabel("accuracy under perturbation (%)", fontsize=8)
            ax.grid(True, alpha=0.3)
    legend_below(fig, axes.flat, ncol, legend_rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    """Run the report for parsed ``add_arguments`` options; print the table, write JSON, CSV and plot."""
    import time

    from ..harness import parse_budgets

    if args.merge:
        rows = merge_runs([Path(r) for r in args.merge])
        paths = write_results(rows, Path(args.output or "."))
        print(table(rows))
        return 0
    torch.set_num_threads(args.threads)
    # Options of one method are separated by ';' on the command line, since ',' separates methods.
    specs = [s.replace(";", ",") for s in args.methods.split(",")] if args.methods else None
    perts = [parse_perturbation(p).name for p in args.perturbations.split(",") if p.strip()]
    rows = run_embedded(
        args.models.split(",") if args.models else None,
        specs,
        parse_budgets(args.budgets),
        perts,
        args.limit,
        args.seed,
        args.batch_size,
        progress=not args.no_progress,
    )
    paths = write_results(rows, Path(args.output or time.strftime("vtprune-robustness-%Y%m%d-%H%M%S")))
    print(table(rows))
    print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return 0


def main(argv=None) -> int:
    """Selection stability of every method under pixel noise and corner patches (the embedded models)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vtprune.eval.robustness", description=main.__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
