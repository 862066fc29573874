"""The ``vtprune`` command line: ``eval`` (accuracy vs FLOPs), ``bench`` (wall time and memory), ``demo``, ``models``,
``methods``, ``tasks-path``.

Only the standard library and ``vtprune.eval.catalog`` are imported up front; torch, transformers and Gradio are
imported inside the subcommand that needs them, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .eval import catalog
from .eval.robustness import args as robustness_args


def _eval(args) -> int:
    import torch

    import vtprune

    from .eval import harness

    torch.set_num_threads(args.threads)
    budgets = harness.parse_budgets(args.budgets)
    # a spec's own options are separated by ';' on the command line ("divprune_stable:smooth=1;margin=0.02")
    methods = [m.replace(";", ",") for m in args.methods.split(",")] if args.methods else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    output = Path(args.output or time.strftime("vtprune-eval-%Y%m%d-%H%M%S"))
    if args.model:
        if not tasks:
            raise SystemExit("vtprune eval: --model needs --tasks (the lmms-eval tasks to run it on)")
        from .eval.lmms.runner import run_lmms

        rows = run_lmms(
            args.model,
            tasks,
            harness.check_methods(methods or vtprune.list_methods()),
            budgets,
            args.limit,
            output,
            batch_size=args.batch_size,
        )
        rows = harness.add_ratios(rows)
    else:
        rows = _eval_embedded(args, tasks or ["image"], methods, budgets)
    paths = harness.write_results(rows, output)
    print(harness.table(rows))
    print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['plot']}")
    return 0


def _eval_embedded(args, tasks: list[str], methods, budgets) -> list[dict]:
    """The embedded benchmarks named by ``tasks`` (image, video), each on its own models."""
    from .eval import harness

    bad = [t for t in tasks if t not in catalog.TASKS]
    if bad:
        raise ValueError(
            f"task(s) {bad} are not embedded benchmarks (expected {list(catalog.TASKS)}); lmms-eval tasks need --model"
        )
    names = args.models.split(",") if args.models else None
    per_task = {"image": catalog.EMBEDDED_MODELS, "video": catalog.VIDEO_MODELS}
    if names:
        stray = [n for n in names if not any(n in per_task[t] for t in tasks)]
        if stray:
            raise ValueError(
                f"unknown embedded model(s) {stray} for task(s) {tasks}; available: "
                + "; ".join(f"{t}: {per_task[t]}" for t in tasks)
            )
    rows = []
    for task in tasks:
        mine = [n for n in names if n in per_task[task]] if names else None
        if names and not mine:
            continue
        if task == "image":
            rows += harness.run_embedded(
                mine, methods, budgets, args.limit, args.batch_size, progress=not args.no_progress
            )
        else:
            rows += harness.run_video(
                mine, methods, budgets, args.limit, args.batch_size, progress=not args.no_progress
            )
    return rows


def _demo(args) -> int:
    import torch

    from .demo import build_app, example_scenes, load_model

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    examples = example_scenes() if args.model in catalog.EMBEDDED_MODELS else None  # scenes of their benchmark
    app = build_app(model, processor, examples, max_new_tokens=args.max_new_tokens, about=catalog.about(args.model))
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


def _models(args) -> int:
    print("| name | task | class | visual tokens per image or clip | test accuracy | weights |")
    print("|---|---|---|---|---|---|")
    for r in catalog.describe():
        acc = "?" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.1f} %"
        if r["multi_frame_accuracy"] is not None:  # the figure the video benchmark is about
            acc += f" ({100 * r['multi_frame_accuracy']:.1f} % multi-frame)"
        print(
            f"| {r['name']} | {r['task']} | {r['class']} | {r['visual_tokens'] or '?'} | {acc} | "
            f"{'present' if r['available'] else 'missing'} |"
        )
    return 0


def _methods(args) -> int:
    import vtprune
    from vtprune.strategies import get_method

    width = max(map(len, vtprune.list_methods()))
    for name in vtprune.list_methods():
        print(f"{name:<{width}}  {get_method(name).description}")
    return 0


def _bench(args) -> int:
    from . import bench

    return bench.run(args)


def _robustness(args) -> int:
    from .eval.robustness import run

    return run.run(args)


def _tasks_path(args) -> int:
    print(catalog.TASKS_DIR)
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vtprune", description="Training-free visual token pruning for HF VLMs")
    ap.add_argument("--version", action="version", version=f"vtprune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models, methods = ", ".join(catalog.EMBEDDED_MODELS + catalog.VIDEO_MODELS), ", ".join(catalog.builtin_methods())
    ev = sub.add_parser(
        "eval",
        help="accuracy vs prefill FLOPs on the embedded models (or lmms-eval tasks)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Accuracy versus prefill FLOPs of every method and budget. By default on the embedded image models"
        "\nand their Sort-of-CLEVR test split; --tasks video on the embedded video model and its clips (each"
        "\nmethod over the whole clip and with a budget per frame); with --model and --tasks on a real"
        "\ncheckpoint through lmms-eval. Writes results.json, results.csv and pareto.png and prints a table.",
        epilog=f"embedded models: {models}\nmethods: {methods}\n\nexamples:\n  vtprune eval --limit 40 "
        "--budgets 100,25,5.5 --output /tmp/vtprune-eval\n  vtprune eval --tasks video --methods "
        "divprune,temporal --limit 30",
    )
    ev.add_argument("--models", help="embedded models, comma-separated (default: all of the chosen tasks)")
    ev.add_argument(
        "--methods",
        help="methods, comma-separated, each optionally with options: "
        "divprune:temporal=frame, divprune_stable:smooth=1;margin=0.02 (default: all)",
    )
    ev.add_argument(
        "--budgets",
        default=",".join(f"{b:g}" for b in catalog.DEFAULT_BUDGETS),
        help="percent of visual tokens kept, comma-separated (default: %(default)s)",
    )
    ev.add_argument(
        "--limit", type=int, help="test questions per configuration (default: image 500, video 300; lmms-eval: all)"
    )
    ev.add_argument(
        "--batch-size", type=int, default=16, help="questions per generate() call, left-padded (default: %(default)s)"
    )
    ev.add_argument("--output", help="results folder (default: a new vtprune-eval-<time> folder)")
    ev.add_argument(
        "--threads", type=int, default=1, help="torch threads; tiny models run fastest on 1 (default: %(default)s)"
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    ev.add_argument("--model", help="HF id or path of a real model, evaluated through lmms-eval (default: none)")
    ev.add_argument(
        "--tasks",
        help="without --model: embedded benchmarks, image and/or video (default: image); "
        "with --model: lmms-eval tasks, comma-separated",
    )
    ev.set_defaults(fn=_eval)
    de = sub.add_parser(
        "demo",
        help="Gradio page comparing the original and the pruned model side by side",
        description="Serve a page that asks one question to the original and the pruned model.",
        epilog=f"embedded models: {models}",
    )
    de.add_argument(
        "--model",
        default="llava-tiny-sortofclevr",
        help="embedded model name, HF id or local path (default: %(default)s)",
    )
    de.add_argument("--max-new-tokens", type=int, default=32, help="longest answer, in tokens (default: %(default)s)")
    de.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 serves other machines (default: %(default)s)"
    )
    de.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    de.add_argument("--share", action="store_true", help="ask Gradio for a public link (default: off)")
    de.add_argument(
        "--threads", type=int, default=1, help="torch threads; tiny models run fastest on 1 (default: %(default)s)"
    )
    de.set_defaults(fn=_demo)
    sub.add_parser(
        "models",
        help="list the embedded models and their visual-token counts",
        description="The VLMs shipped in the package, usable by name in eval, demo and lmms-eval.",
    ).set_defaults(fn=_models)
    sub.add_parser(
        "methods",
        help="list the registered pruning methods",
        description="The methods apply_pruner accepts (imports torch).",
    ).set_defaults(fn=_methods)
    sub.add_parser(
        "tasks-path",
        help="print the lmms-eval task folder (for lmms-eval --include_path)",
        description="The folder holding the vtprune_sortofclevr lmms-eval tasks.",
    ).set_defaults(fn=_tasks_path)
    be = sub.add_parser(
        "bench",
        help="time to first token, prefill and decode speed and peak memory, unpruned vs each method",
        description="Wall time and memory of pruning, measured side by side: the unpatched model and each method "
        "on the same batch, interleaved round by round after warm-up, medians and spread; a table, and JSON "
        "with --json.",
        epilog=f"embedded models: {models}",
    )
    from . import bench

    bench.add_arguments(be)
    be.set_defaults(fn=_bench)
    ro = sub.add_parser(
        "robustness",
        help="how stable each method's selection is under pixel noise and patches",
        description="Kept-set Jaccard, answer changes and patch attraction of every method under "
        "pixel noise and corner patches, on the embedded models.",
    )
    robustness_args.add_arguments(ro)
    ro.set_defaults(fn=_robustness)
    return ap


def main(argv=None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a mistyped flag: the subcommand's usage, not the top level's
        command = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[args.command]
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.fn(args)
    except (ValueError, OSError) as exc:  # OSError: a checkpoint that cannot be found or read
        print(f"vtprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
