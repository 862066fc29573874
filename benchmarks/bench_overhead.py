"""What an in-LLM stage costs per call beyond its choosing, at batch 1 on the embedded LLaVA model.

Each method runs at layer 2 keeping every visual token, so the patched prefill does the same language-model work as
the unpatched one; the difference, minus the stage's own choosing time (``select_time_s``: budgets, scoring with
the attention row at layer 1, selection), is the patch layer's overhead: its hooks, the sequence flags, the gather
of hidden states, positions, cos/sin and the mask. The image is encoded once and passed as ``mm_encoder_outputs``
(as ``generate()`` does), or with ``--pixels`` as ``pixel_values`` (the tower then runs in both calls, and the
pruner sees the pixels, as it does inside ``generate()``). Calls interleave round by round; the overhead is the
median over rounds of (patched - unpatched - choosing), with its interquartile range.

    python -m benchmarks.bench_overhead [--methods fastv,entropy] [--rounds 400] [--pixels] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtprune


def _inputs(model, processor, pixels: bool = False):
    from vtprune.eval.data import make_split
    from vtprune.eval.models import build_prompt

    example = make_split("test", 1, seed=0)[0]
    batch = processor(text=[build_prompt(processor, example.question)], images=[example.image], return_tensors="pt")
    if pixels:
        media = {"pixel_values": batch["pixel_values"]}
    else:
        media = {
            "mm_encoder_outputs": {
                "image": model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
            }
        }
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True, **media)


@torch.no_grad()
def run(methods=("fastv", "entropy"), rounds: int = 400, layer: int = 2, pixels: bool = False) -> list[dict]:
    """One row per method: medians (seconds) of the unpatched and patched calls and of choosing, and the overhead's
    median and quartiles over rounds."""
    from vtprune.eval.models import load_embedded

    model, processor = load_embedded("llava-tiny-sortofclevr")
    call = _inputs(model, processor, pixels)
    variants = {"unpatched": None, **{m: dict(method=m, layer=layer, keep_ratio=1.0) for m in methods}}
    times = {name: [] for name in variants}
    choosing = {name: [] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up
        for name, settings in variants.items():
            if vtprune.is_patched(model):
                vtprune.remove_pruner(model)
            if settings is not None:
                vtprune.apply_pruner(model, **settings)
            t0 = time.perf_counter()
            model(**call)
            elapsed = time.perf_counter() - t0
            stats = vtprune.get_stats(model) if settings is not None else []
            if settings is not None and stats[0].tokens_after != stats[0].tokens_before:
                raise RuntimeError(f"{name} did not keep every token")
            if r:
                times[name].append(elapsed)
                choosing[name].append(sum(s.select_time_s for s in stats))
    if vtprune.is_patched(model):
        vtprune.remove_pruner(model)
    rows = []
    for name in methods:
        over = sorted(p - u - c for p, u, c in zip(times[name], times["unpatched"], choosing[name]))
        q = len(over) // 4
        rows.append(
            {
                "method": name,
                "layer": layer,
                "unpatched_s": statistics.median(times["unpatched"]),
                "patched_s": statistics.median(times[name]),
                "choosing_s": statistics.median(choosing[name]),
                "overhead_s": statistics.median(over),
                "overhead_iqr_s": (over[q], over[-1 - q]),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| method | layer | unpatched ms | patched (keep all) ms | choosing ms | overhead ms (IQR) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["overhead_iqr_s"]
        lines.append(
            f"| {r['method']} | {r['layer']} | {r['unpatched_s'] * 1e3:.2f} | {r['patched_s'] * 1e3:.2f} | "
            f"{r['choosing_s'] * 1e3:.2f} | {r['overhead_s'] * 1e3:.2f} ({lo * 1e3:.2f}–{hi * 1e3:.2f}) |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="fastv,entropy", help="comma-separated in-LLM methods (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=400, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--layer", type=int, default=2, help="the stage's decoder layer (default: %(default)s)")
    ap.add_argument("--pixels", action="store_true", help="pass pixel_values instead of the encoded image")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.methods.split(","), args.rounds, args.layer, args.pixels)
    image = "pixel_values" if args.pixels else "image pre-encoded"
    print(
        f"Embedded LLaVA (llava-tiny-sortofclevr), batch 1, {image}, {args.threads} thread(s), "
        f"{args.rounds} interleaved rounds"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
