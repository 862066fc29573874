"""What pruning buys a user in wall time and memory, measured side by side on one machine in one run.

For each batch size, the unpatched model and every requested method run the same batch, interleaved round by round
(machines are noisy: a slow moment hits every variant of that round, and ratios are taken within a round), after
warm-up rounds that are not recorded:

- TTFT: from ``generate()``'s start to the first token's logits (a logits processor timestamps every step):
  encoding the images, the prefill and the first token;
- prefill tokens/s: the prompt's tokens (as given, before pruning) over the TTFT;
- decode tokens/s: the tokens generated after the first over the time of their steps, in the same call;
- memory: the KV cache the prefill leaves (what pruning the prompt shrinks for every later step) and, on CUDA, the
  call's peak allocation above what was held before it (CPU allocators keep freed pages: no per-call peak there);
- FLOPs: the prefill's analytic FLOPs ratio to unpatched (``vtprune.flops``): the speedup a perfect runtime gives.

Each figure is the median over the rounds, with its min–max; a speedup is the median of the per-round ratios.

    vtprune bench --model llava-tiny-sortofclevr --methods visionzip,dart,fastv --keep-ratio 0.11 --batch-sizes 1,16
    python -m vtprune.bench ...   (the same)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

BASE = "unpruned"


class _Clock:
    """A logits processor that timestamps each generation step (it runs right after the step's forward)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, batch, new_tokens: int) -> dict:
    """One greedy generate() of exactly ``new_tokens`` tokens: {"ttft": seconds to the first token's logits,
    "decode": seconds of the later steps, "peak": bytes allocated above the start (CUDA; None on CPU)}."""
    import torch
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    clock = _Clock()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    _sync(device)  # the steps' timestamps are taken after their forward has been queued: synchronised by then on CPU
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if device.type == "cuda" else None
    return {"ttft": clock.stamps[0] - t0, "decode": clock.stamps[-1] - clock.stamps[0], "peak": peak}


def cache_bytes(model, batch) -> int:
    """Bytes of the KV cache a prefill of ``batch`` leaves (what pruning the prompt shrinks for every later step)."""
    import torch

    with torch.no_grad():
        cache = model(**batch, use_cache=True).cache
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(model, batch: dict, variants: dict, rounds: int, warmup: int, new_tokens: int, progress=None) -> dict:
    """{variant: {"ttft": [s per round], "decode": [...], "peak": [bytes or None], "cache": bytes}}. ``variants``
    maps a name to the ``apply_pruner`` keyword arguments (None: unpatched); the model is patched and restored
    around each run."""
    import vtprune

    out = {name: {"ttft": [], "decode": [], "peak": []} for name in variants}
    for r in range(warmup + rounds):
        for name, settings in variants.items():
            if settings is not None:
                vtprune.apply_pruner(model, **settings)
            try:
                run = timed_generate(model, batch, new_tokens)
                if r == 0:
                    out[name]["cache"] = cache_bytes(model, batch)
            finally:
                if settings is not None:
                    vtprune.remove_pruner(model)
            if r >= warmup:
                for key in ("ttft", "decode", "peak"):
                    out[name][key].append(run[key])
            if progress:
                progress(r, name)
    return out


def flops_ratio(model, batch: dict, settings: dict | None) -> float:
    """The prefill's analytic FLOPs with ``settings`` over unpatched (1.0 for None)."""
    import torch

    import vtprune
    from vtprune import flops

    if settings is None:
        return 1.0
    base = flops.count_prefill(model, batch)["total"]
    vtprune.apply_pruner(model, **settings)
    try:
        with torch.no_grad():
            model(**batch)
        pruned = flops.count_prefill(model, batch, vtprune.get_stats(model))["total"]
    finally:
        vtprune.remove_pruner(model)
    return pruned / base


def summarise(raw: dict, batch_size: int, prompt_tokens: int, new_tokens: int, ideal: dict) -> list[dict]:
    """One row per variant: medians, spreads and per-round ratios to unpatched."""
    rows = []
    base = raw[BASE]
    for name, runs in raw.items():
        peaks = [p for p in runs["peak"] if p is not None]
        rows.append(
            {
                "variant": name,
                "batch_size": batch_size,
                "prompt_tokens": prompt_tokens,
                "ttft_s": _spread(runs["ttft"]),
                "ttft_speedup": statistics.median(b / t for b, t in zip(base["ttft"], runs["ttft"])),
                "prefill_tok_s": statistics.median(batch_size * prompt_tokens / t for t in runs["ttft"]),
                "decode_tok_s": statistics.median(batch_size * (new_tokens - 1) / d for d in runs["decode"]),
                "decode_speedup": statistics.median(b / d for b, d in zip(base["decode"], runs["decode"])),
                "cache_mib": runs["cache"] / 2**20,
                "peak_mib": _spread([p / 2**20 for p in peaks]) if peaks else None,
                "flops_ratio": ideal[name],
            }
        )
    return rows


def _spread(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def table(rows: list[dict]) -> str:
    head = (
        "| batch | variant | TTFT ms (min–max) | TTFT speedup | FLOPs ideal | prefill tok/s | decode tok/s "
        "| decode speedup | KV cache MiB | peak MiB |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        t, p = r["ttft_s"], r["peak_mib"]
        peak = "-" if p is None else f"{p['median']:.0f}"
        lines.append(
            f"| {r['batch_size']} | {r['variant']} | {1000 * t['median']:.1f} ({1000 * t['min']:.1f}–"
            f"{1000 * t['max']:.1f}) | ×{r['ttft_speedup']:.2f} | ×{1 / r['flops_ratio']:.2f} | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | ×{r['decode_speedup']:.2f} | "
            f"{r['cache_mib']:.2f} | {peak} |"
        )
    return "\n".join(lines)


def parse_methods(text: str, keep_ratio: float) -> dict:
    """{variant name: apply_pruner settings} for "dart,visionzip:contextual_share=0.2;tower_layer=20" (``vtprune
    eval``'s specs): every method at ``keep_ratio`` and its default layer, with the options given."""
    from .eval.harness.grid import check_methods, parse_method

    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError("give at least one method (--methods)")
    check_methods(s.replace(";", ",") for s in specs)
    variants = {BASE: None}
    for spec in specs:
        name, options = parse_method(spec.replace(";", ","))
        # PyramidDrop's ``ratio`` is each drop's share: it replaces the budget
        budget = {} if "ratio" in options else {"keep_ratio": keep_ratio}
        variants[spec] = dict(method=name, **budget, **options)
    return variants


def refused(model, variants: dict) -> dict:
    """{variant: why apply_pruner refuses it on ``model``} (a budget out of a method's reach, a family it does not
    take)."""
    from .config import PrunerConfig
    from .patches import get_adapter

    out = {}
    for name, settings in variants.items():
        if settings is None:
            continue
        options = {k: v for k, v in settings.items() if k not in ("method", "keep_ratio")}
        try:
            PrunerConfig(
                method=settings["method"], keep_ratio=settings.get("keep_ratio"), options=options
            ).resolved_stages(get_adapter(model))
        except (ValueError, NotImplementedError) as exc:
            out[name] = str(exc)
    return out


def load(model_name: str, device: str, dtype: str):
    """(model, processor, batch builder(batch_size) -> processor output) for an embedded name or an HF id / path."""
    import torch

    from .eval.models import MODELS, build_prompt, load_embedded

    torch_dtype = getattr(torch, dtype)
    if model_name in MODELS:
        model, processor = load_embedded(model_name, dtype=torch_dtype)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_name)
        model = AutoModelForImageTextToText.from_pretrained(model_name, dtype=torch_dtype)
    model.to(device).eval()
    return model, processor, build_prompt


def batch_for(processor, build_prompt, size: int, image, question: str, device) -> dict:
    """``size`` copies of the question about ``image`` (or, without one, about the embedded benchmark's scenes)."""
    from .eval.data.image import make_split

    if image is None:
        examples = make_split("test", size)
        images, questions = [e.image for e in examples], [e.question for e in examples]
    else:
        images, questions = [image] * size, [question] * size
    text = [build_prompt(processor, q) for q in questions]
    batch = processor(images=images, text=text, return_tensors="pt", padding=True)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--model",
        default="llava-tiny-sortofclevr",
        help="embedded model name, HF id or local path (default: %(default)s)",
    )
    ap.add_argument(
        "--methods",
        required=True,
        help="methods, comma-separated, options after a colon: dart,visionzip:contextual_share=0.2 (no default)",
    )
    ap.add_argument("--keep-ratio", type=float, default=0.11, help="share of visual tokens kept (default: %(default)s)")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated (default: %(default)s)")
    ap.add_argument("--image", default=None, help="an image file (default: the embedded benchmark's scenes)")
    ap.add_argument("--question", default="What is in the image?", help="asked with --image (default: %(default)s)")
    ap.add_argument(
        "--new-tokens", type=int, default=8, help="tokens generated for decode speed (default: %(default)s)"
    )
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights (default: %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--json", default=None, help="write every timing and the summary here (default: none)")
    ap.add_argument("--no-progress", action="store_true", help="no progress line (default: shown)")


def run(args) -> int:
    import torch

    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (one for the TTFT, the rest for decode), got {args.new_tokens}")
    if args.rounds < 1 or args.warmup < 0:
        raise ValueError(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    torch.set_num_threads(args.threads)
    variants = parse_methods(args.methods, args.keep_ratio)
    model, processor, build_prompt = load(args.model, args.device, args.dtype)
    skipped = refused(model, variants)
    for name, reason in skipped.items():
        print(f"vtprune bench: not run: {name}: {reason}", file=sys.stderr)
        del variants[name]
    if len(variants) == 1:
        raise ValueError("no method given runs on this model: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    image = None
    if args.image is not None:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    device = torch.device(args.device)
    rows, raw_all = [], {}
    for size in sizes:
        batch = batch_for(processor, build_prompt, size, image, args.question, device)
        prompt_tokens = int(batch["attention_mask"].sum()) // size
        ideal = {name: flops_ratio(model, batch, s) for name, s in variants.items()}
        total = (args.warmup + args.rounds) * len(variants)

        def progress(r, name, size=size, seen=[0]):  # noqa: B006 - a counter local to this batch size
            seen[0] += 1
            if not args.no_progress:
                print(f"\rbatch {size}: {seen[0]}/{total} runs ({name})", end="", file=sys.stderr, flush=True)

        raw = measure(model, batch, variants, args.rounds, args.warmup, args.new_tokens, progress)
        if not args.no_progress:
            print(file=sys.stderr)
        raw_all[size] = raw
        rows += summarise(raw, size, prompt_tokens, args.new_tokens, ideal)
    print(
        f"{args.model} on {args.device} ({args.dtype}, {args.threads} thread(s)), {args.keep_ratio:g} of the "
        f"visual tokens kept, {args.rounds} rounds after {args.warmup} warm-up, {args.new_tokens} new tokens"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            settings = {k: v for k, v in vars(args).items() if k != "fn"}  # fn: the CLI's handler
            json.dump({"settings": settings, "rows": rows, "raw": raw_all, "not_run": skipped}, f, indent=1)
        print(f"wrote {os.path.abspath(args.json)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vtprune.bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
