"""Accuracy versus FLOPs on the embedded models and benchmark: the engine behind ``vtprune eval``.

Every configuration (model x method x budget) answers the same test questions with greedy decoding; a row
records accuracy (overall and per question type), visual tokens kept per sample (from ``get_stats``), analytic
prefill FLOPs per sample (real FLOPs, 2 per multiply-add, ``vtprune.flops``) and the measured prefill latency
of one batch. The unpruned model is the 100 % row of every method.
"""

from __future__ import annotations

import ast
import statistics
import sys
import time
from collections.abc import Iterable

import torch

import vtprune

from ..catalog import DEFAULT_BUDGETS, EMBEDDED_MODELS
from ..data import QUESTION_TYPES, make_split, score
from ..models import count_visual_tokens, load_embedded
from .predict import predict

DEFAULT_LIMIT = 500  # test questions per configuration when no --limit is given


def parse_budgets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"budgets must be comma-separated percentages in (0, 100], got {text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise ValueError(f"budgets must be percentages in (0, 100], got {text!r}")
    small = [v for v in values if v < 1]
    if small:
        # A fraction (0.25 for a quarter) would silently keep a quarter of one percent: percentages only.
        raise ValueError(
            f"budgets are percentages of the visual tokens kept (25 keeps a quarter); {small[0]:g} is "
            f"below 1 %: give {100 * small[0]:g} for {small[0]:g} of the tokens"
        )
    return values


def parse_method(spec: str) -> tuple[str, dict]:
    """A method spec: ``"divprune"``, or with options ``"divprune:temporal=frame"`` /
    ``"divprune_stable:smooth=1,margin=0.02"`` -> ("divprune_stable", {"smooth": 1, "margin": 0.02})."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r} is not key=value")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()  # a bare word: a string option
    return name.strip(), options


def check_methods(methods: Iterable[str]) -> list[str]:
    """The specs, unchanged, once every method exists and its options are valid (an error names the bad one)."""
    methods = list(methods)
    unknown = [m for m in methods if parse_method(m)[0] not in vtprune.list_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {vtprune.list_methods()}")
    for spec in methods:
        name, options = parse_method(spec)
        if options:
            vtprune.PrunerConfig(method=name, keep_ratio=0.5, options=options)  # raises on a bad option or value
    return methods


def configs(methods: Iterable[str], budgets: Iterable[float]) -> list[tuple[str | None, float]]:
    """(method, budget %) pairs: the unpruned model (None, 100) first, then every method at every budget < 100."""
    methods = check_methods(m for m in methods if m != "none")
    budgets = list(budgets)
    if any(not 0 < b <= 100 for b in budgets):
        raise ValueError(f"budgets are percentages of the visual tokens kept, in (0, 100]; got {budgets}")
    return [(None, 100.0)] + [(m, b) for m in methods for b in budgets if b < 100]


@torch.no_grad()
def _prefill_latency(model, inputs, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs, use_cache=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def image_scores(preds: list[str], examples) -> dict:
    """``accuracy`` and ``acc_<question type>`` of the image benchmark."""
    hits = [score(p, e.answer) for p, e in zip(preds, examples)]
    row = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    for t in QUESTION_TYPES:
        h = [x for x, e in zip(hits, examples) if e.qtype == t]
        if h:
            row[f"acc_{t}"] = sum(h) / len(h)
    return row


def evaluate_config(
    model,
    processor,
    examples,
    method: str | None,
    budget: float,
    batch_size: int,
    bar=None,
    predict_fn=predict,
    scores_fn=image_scores,
) -> dict:
    """One row: ``method=None`` is the unpruned model; ``method`` is a spec (``parse_method``).
    ``predict_fn(model, processor, examples, batch_size=, on_batch=)`` answers, ``scores_fn(preds, examples)``
    scores (the video benchmark passes its own)."""
    from vtprune.flops import count_prefill

    if method is not None:
        name, options = parse_method(method)
        vtprune.apply_pruner(model, method=name, keep_ratio=budget / 100.0, **options)
    kept, before, flops, first = [], [], [], []

    def on_batch(inputs, chunk):
        stats = vtprune.get_stats(model) if method is not None else None
        n_vis = count_visual_tokens(model, inputs["input_ids"])
        before.extend(n_vis)
        kept.extend(stats[-1]["tokens_after"] if stats else n_vis)
        flops.append(count_prefill(model, inputs, stats)["total"])
        if not first:  # the latency is timed on the first batch
            first.append(inputs)
        if bar is not None:
            bar.update(len(chunk))

    try:
        preds = predict_fn(model, processor, examples, batch_size=batch_size, on_batch=on_batch)
        latency = _prefill_latency(model, first[0])
    finally:
        if method is not None:
            vtprune.remove_pruner(model)
    scores = scores_fn(preds, examples)
    return {
        "method": method or "none",
        "keep_ratio": budget / 100.0,
        "budget_pct": budget,
        "visual_tokens": statistics.mean(before),
        "kept_tokens": statistics.mean(kept),
        "accuracy": scores.pop("accuracy"),
        "n": scores.pop("n"),
        "prefill_flops": sum(flops) / len(examples),
        "prefill_latency_ms": 1e3 * latency,
        "latency_batch": min(batch_size, len(examples)),
        **scores,
    }


def run_embedded(
    models=None,
    methods=None,
    budgets=DEFAULT_BUDGETS,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict]:
    """All configurations on the embedded test split. Returns the result rows."""
    models = list(models or EMBEDDED_MODELS)
    unknown = [m for m in models if m not in EMBEDDED_MODELS]
    if unknown:
        raise ValueError(f"unknown embedded model(s) {unknown}; available: {EMBEDDED_MODELS}")
    todo = configs(methods or vtprune.list_methods(), budgets)
    examples = make_split("test", limit or DEFAULT_LIMIT, seed=0)
    return run_grid(models, load_embedded, todo, examples, batch_size, progress, unit="q", desc="vtprune eval")


def refusal(model, method: str | None, budget: float) -> str | None:
    """Why ``apply_pruner`` refuses ``method`` at ``budget`` % on ``model`` (None: it takes it)."""
    if method is None:
        return None
    from vtprune.patches import get_adapter

    name, options = parse_method(method)
    try:
        vtprune.PrunerConfig(method=name, keep_ratio=budget / 100.0, options=options).resolved_stages(
            get_adapter(model)
        )
    except (ValueError, NotImplementedError) as exc:
        return str(exc)
    return None


def run_grid(
    models,
    load,
    todo,
    examples,
    batch_size: int,
    progress: bool,
    unit: str,
    desc: str,
    extra: dict | None = None,
    **evaluate_kwargs,
) -> list[dict]:
    """Every (method, budget) of ``todo`` on ``examples`` for each model name (``load(name)`` -> model, processor),
    with one progress bar over all questions. Rows: ``{"model": name, **extra, **evaluate_config(...)}``, with
    the ratios to each model's unpruned row."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(models) * len(todo) * len(examples), unit=unit, desc=desc)
    rows = []
    try:
        for name in models:
            model, processor = load(name)
            for method, budget in todo:
                if bar is not None:
                    bar.set_postfix_str(f"{name.split('-')[0]} {method or 'unpruned'} {budget:g}%")
                reason = refusal(model, method, budget)
                if reason is not None:  # this budget cannot be reached on this model (e.g. pdrop's layer average)
                    rows.append(
                        {
                            "model": name,
                            **(extra or {}),
                            "method": method,
                            "budget_pct": budget,
                            "keep_ratio": budget / 100.0,
                            "skipped": reason,
                        }
                    )
                    print(f"vtprune eval: skipped {method} at {budget:g} % on {name}: {reason}", file=sys.stderr)
                    if bar is not None:
                        bar.update(len(examples))
                    continue
                row = evaluate_config(model, processor, examples, method, budget, batch_size, bar, **evaluate_kwargs)
                rows.append({"model": name, **(extra or {}), **row})
    finally:
        if bar is not None:
            bar.close()
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """flops_ratio and latency_speedup relative to the unpruned row of the same model (and task)."""
    key = lambda r: (r["model"], r.get("task"))  # noqa: E731
    base = {key(r): r for r in rows if r["method"] == "none"}
    out = []
    for r in rows:
        b, r = base.get(key(r)), dict(r)
        if b is not None and r.get("prefill_flops") is not None and b.get("prefill_flops"):
            r["flops_ratio"] = r["prefill_flops"] / b["prefill_flops"]
        if b is not None and r.get("prefill_latency_ms") and b.get("prefill_latency_ms"):
            r["latency_speedup"] = b["prefill_latency_ms"] / r["prefill_latency_ms"]
        out.append(r)
    return out
