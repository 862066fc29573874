"""Run a real VLM through lmms-eval for every pruning configuration: the lmms-eval engine behind ``vtprune eval``.

``run_lmms`` loads the model once in a vtprune wrapper (``eval/lmms_plugin.py``), then for the unpruned model and
every method x budget switches the pruner and calls ``lmms_eval.evaluator.simple_evaluate`` in-process. Rows carry
the same fields as the embedded harness (``eval/harness/grid.py``). Importing this module does not import lmms_eval.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from ..catalog import TASKS_DIR  # noqa: F401  (pass to lmms-eval as --include_path; `vtprune tasks-path`)

UNPRUNED = "none"


def _require_lmms():
    try:
        import lmms_eval  # noqa: F401
    except ImportError as exc:
        raise ImportError("running lmms-eval tasks needs lmms-eval: pip install 'vtprune[lmms]'") from exc
    try:  # lmms-eval 0.7.3's evaluator imports filelock._api, which filelock 4 removed
        import filelock._api  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "lmms-eval 0.7.3 needs filelock<4 (it imports filelock._api): pip install 'filelock>=3.24.2,<4'"
        ) from exc


def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, str):
        return [s.strip() for s in x.split(",") if s.strip()]
    return list(x)


def main_metric(task_results: dict, task_config: dict | None) -> tuple[str | None, float | None]:
    """(name, value) of a task's main metric: the first of its metric_list, else its first numeric metric."""
    wanted = None
    if task_config and task_config.get("metric_list"):
        wanted = task_config["metric_list"][0].get("metric")
    numeric = [
        (k.split(",")[0], v)
        for k, v in task_results.items()
        if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for name, value in numeric:
        if wanted is None or name == wanted:
            return name, float(value)
    return (numeric[0][0], float(numeric[0][1])) if numeric else (None, None)


def _rows_for(results: dict, lm, base: dict) -> list[dict]:
    rows = []
    subtasks = results.get("group_subtasks", {})
    for task, res in results.get("results", {}).items():
        metric, value = main_metric(res, results.get("configs", {}).get(task))
        members = subtasks.get(task) or [task]
        s = lm.summary(tasks=members)
        row = {
            **base,
            "task": task,
            "metric": metric,
            "accuracy": value,
            "n": s["n"],
            "visual_tokens": s["visual_tokens"],
            "kept_tokens": s["kept_tokens"],
            "prefill_flops": s["prefill_flops"],
            "latency_s": s["latency_s"],
            "prefill_latency_ms": None if s["prefill_latency_s"] is None else 1e3 * s["prefill_latency_s"],
            "latency_batch": s["prefill_latency_batch"],
        }
        for k, v in res.items():  # per question type of the embedded task (acc_shape, ...)
            name = k.split(",")[0]
            if name.startswith("acc_") and "_stderr" not in name and isinstance(v, (int, float)):
                row[name] = float(v)
        rows.append(row)
    return rows


def run_lmms(
    model_path: str,
    tasks: str | Iterable[str],
    methods: str | Iterable[str],
    budgets: str | Iterable[float],
    limit: int | None = None,
    output_dir: str | Path | None = None,
    *,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str = "auto",
    model_args: dict | None = None,
    include_path: str | Iterable[str] | None = None,
    time_prefill: bool = True,
    verbosity: str = "WARNING",
) -> list[dict]:
    """Evaluate ``model_path`` on lmms-eval ``tasks`` unpruned and for every ``methods`` x ``budgets``.

    ``budgets`` are percentages of the visual tokens kept, as in the embedded harness (100 is the unpruned row,
    which always comes first as method ``none``). ``limit``: documents per task. ``output_dir``: where each
    configuration's lmms-eval results dict is written as JSON (nothing written when None). ``model_args``: extra wrapper
    model_args (e.g. ``{"attn_implementation": "sdpa"}``); the embedded task folder is always on the include path.

    Returns one row per task and configuration: model, task, metric, method, keep_ratio, budget_pct, accuracy
    (the task's main metric), n, visual_tokens and kept_tokens (means per sample; kept from get_stats),
    prefill_flops (analytic, per sample; None when the family is not covered), latency_s (generate() wall time
    per sample), prefill_latency_ms (median uncached prefill of the first batch, latency_batch samples) and, for the
    embedded task, acc_<question type>.
    """
    _require_lmms()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .. import harness
    from . import plugin as lmms_plugin

    task_list = _as_list(tasks)
    if not task_list:
        raise ValueError("no lmms-eval task given")
    configs = harness.configs(_as_list(methods), [float(b) for b in _as_list(budgets)])
    path = str(model_path)
    name = Path(path).name if Path(path).exists() else path

    lm = lmms_plugin.VtpruneLMM(
        pretrained=path,
        method=UNPRUNED,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        time_prefill=time_prefill,
        **(model_args or {}),
    )
    lm.keep_loaded = True  # simple_evaluate would otherwise free the model after the first configuration
    includes = [str(TASKS_DIR)] + [str(p) for p in _as_list(include_path)]
    task_manager = TaskManager(verbosity, include_path=includes)
    # lmms-eval's own CLI logs an unknown task and exits 0; here it is an error before any model work.
    unknown = [t for t in task_list if t not in task_manager.all_tasks]
    if unknown:
        close = {t: task_manager.match_tasks([t]) or [] for t in unknown}
        raise ValueError(
            f"lmms-eval task(s) {unknown} not found in lmms-eval's tasks or {includes}"
            + "".join(f"; did you mean {m[:3]} for {t!r}?" for t, m in close.items() if m)
        )
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    for method, budget in configs:
        if method is None:
            lm.reconfigure(None)
        else:
            lm.reconfigure(method=method, keep_ratio=budget / 100.0)
        results = simple_evaluate(
            model=lm,
            tasks=task_list,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
            bootstrap_iters=0,
            verbosity=verbosity,
        )
        if results is None:  # not rank 0 of a distributed run
            continue
        base = {"model": name, "method": method or UNPRUNED, "keep_ratio": budget / 100.0, "budget_pct": budget}
        rows += _rows_for(results, lm, base)
        if out_dir is not None:
            tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}_{method or UNPRUNED}_{budget:g}")
            results = {k: v for k, v in results.items() if k != "samples"}
            results["vtprune"] = {"pruning": lm.pruning, **lm.summary()}
            (out_dir / f"lmms_{tag}.json").write_text(json.dumps(results, indent=2, default=str))
    lm.reconfigure(None)
    return rows
