"""The ``vtprune`` command line: ``vtprune eval`` (accuracy vs FLOPs), ``vtprune demo`` and ``vtprune methods``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _eval(args) -> int:
    import torch

    import vtprune

    from .eval import harness, report

    torch.set_num_threads(args.threads)
    budgets = harness.parse_budgets(args.budgets)
    methods = args.methods.split(",") if args.methods else None
    output = Path(args.output or time.strftime("vtprune-eval-%Y%m%d-%H%M%S"))
    if args.model or args.tasks:
        if not (args.model and args.tasks):
            raise SystemExit("vtprune eval: --model and --tasks go together (an HF id or path, and lmms-eval tasks)")
        from .eval.lmms_runner import run_lmms

        rows = run_lmms(args.model, args.tasks.split(","), harness.check_methods(methods or vtprune.list_methods()),
                        budgets, args.limit, output, batch_size=args.batch_size)
        rows = harness.add_ratios(rows)
    else:
        models = args.models.split(",") if args.models else None
        rows = harness.run_embedded(models, methods, budgets, args.limit, args.batch_size,
                                    progress=not args.no_progress)
    paths = report.write_results(rows, output)
    print(report.table(rows))
    print(f"\nwrote {paths['json']}, {paths['csv']}, {paths['plot']}")
    return 0


def _demo(args) -> int:
    import torch

    from .demo import build_app, example_scenes, load_model
    from .eval.embedded import EMBEDDED_MODELS

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    examples = example_scenes() if args.model in EMBEDDED_MODELS else None  # scenes of their own benchmark
    app = build_app(model, processor, examples, max_new_tokens=args.max_new_tokens)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vtprune", description="Training-free visual token pruning for HF VLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="accuracy vs prefill FLOPs on the embedded models (or lmms-eval tasks)")
    ev.add_argument("--models", help="embedded models, comma-separated (default: all)")
    ev.add_argument("--methods", help="methods, comma-separated (default: all registered)")
    ev.add_argument("--budgets", default="100,50,25,11,5.5", help="percent of visual tokens kept (default: %(default)s)")
    ev.add_argument("--limit", type=int, help="test questions per configuration (default 500)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--output", help="results folder (default: a new vtprune-eval-<time> folder)")
    ev.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on 1)")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--model", help="HF id or path of a real model, evaluated through lmms-eval")
    ev.add_argument("--tasks", help="lmms-eval tasks, comma-separated (with --model)")
    ev.set_defaults(fn=_eval)
    de = sub.add_parser("demo", help="Gradio page comparing the original and the pruned model side by side")
    de.add_argument("--model", default="llava-tiny-sortofclevr",
                    help="embedded model name, HF id or local path (default: %(default)s)")
    de.add_argument("--max-new-tokens", type=int, default=32)
    de.add_argument("--host", default="127.0.0.1")
    de.add_argument("--port", type=int, default=7860)
    de.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    de.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on 1)")
    de.set_defaults(fn=_demo)
    # The selection-stability report keeps its options next to its code.
    from .eval import robustness

    ro = sub.add_parser("robustness", help="how stable each method's selection is under pixel noise and patches")
    robustness.add_arguments(ro)
    ro.set_defaults(fn=robustness.run)
    me = sub.add_parser("methods", help="list the registered pruning methods")
    me.set_defaults(fn=lambda args: print("\n".join(__import__("vtprune").list_methods())) or 0)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError) as exc:  # OSError: a checkpoint that cannot be found or read
        print(f"vtprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
