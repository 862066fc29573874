"""Prefill speed of a pruned model against the FLOPs-ideal and against the oracle, measured side by side.

A LLaVA-1.5-shaped model scaled to this CPU: 576 visual tokens (24x24), a few wide decoder layers. The image
features are encoded once and passed as ``mm_encoder_outputs`` so every timing is the language-model prefill
(methods that score through the projector, ``zoo``, get the pixels instead, and every variant pays the tower):

- pruned: the patched model, selection included, on the full prompt;
- oracle: the unpatched model on an input that already holds only the kept tokens (at their positions); defined
  for layer-0 stages only (an in-LLM stage has no such input);
- ideal: the speedup the FLOPs ratio of the language-model prefill implies (``vtprune.flops``).

Timings interleave the variants round by round and report medians, because this machine is noisy; ``--runs R``
repeats the whole measurement and prints each ratio's median and spread (min–max) over the runs.

    python -m benchmarks.bench_prefill [--methods pool,random|all] [--runs 3] [--repeats 7] [--threads 1]

A method spec is a registered name (its default layer), ``name@layer``, or a schedule ``a@0:284+b@2:38`` (stages
joined by ``+``, each ``method@layer:kept tokens``; a stage without ``:tokens`` keeps the row's budget).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtprune
from vtprune.flops import llm_prefill_flops

BUDGETS = (192, 128, 64)


def build(hidden: int, layers: int, seed: int = 0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(
        model_type="clip_vision_model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
        projection_dim=64,
    )
    text = dict(
        model_type="llama",
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=999,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def parse_spec(spec: str, k: int) -> list[dict]:
    """A method spec (see the module doc) as apply_pruner stages keeping ``k`` tokens where none is given."""
    stages = []
    for part in spec.split("+"):
        name, _, rest = part.partition("@")
        layer, _, tokens = rest.partition(":")
        if name not in vtprune.list_methods():
            raise ValueError(f"unknown method {name!r} in {spec!r}; available: {vtprune.list_methods()}")
        stage = {"method": name, "keep_tokens": int(tokens) if tokens else k}
        if layer:
            stage["layer"] = int(layer)
        stages.append(stage)
    return stages


def median_times(fns: dict, repeats: int) -> dict:
    """fns: name -> (setup, fn). setup (untimed) patches or unpatches the model before fn runs."""
    for setup, fn in fns.values():  # warm-up
        setup()
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (setup, fn) in fns.items():
            setup()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _unpatch(model):
    if vtprune.is_patched(model):
        vtprune.remove_pruner(model)


class Bench:
    """The model, one prompt of 35 text + 576 image + 20 text tokens, and its encoded image."""

    def __init__(self, hidden: int, layers: int, text_before: int = 35, text_after: int = 20):
        self.model = build(hidden, layers)
        self.n, self.before = 576, text_before
        image_token = self.model.config.image_token_id
        self.ids = torch.cat(
            [
                torch.randint(0, 900, (1, text_before)),
                torch.full((1, self.n), image_token),
                torch.randint(0, 900, (1, text_after)),
            ],
            dim=1,
        )
        self.pixels = torch.randn(1, 3, 336, 336)
        self.features = self.model.model.get_image_features(
            pixel_values=self.pixels,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            return_dict=True,
        )

    def call(self, ids=None, features=None, pixels=False, **extra):
        ids = self.ids if ids is None else ids
        media = (
            dict(pixel_values=self.pixels)
            if pixels
            else dict(mm_encoder_outputs={"image": self.features if features is None else features})
        )
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **media, **extra)

    def flops(self, length: int) -> int:
        return llm_prefill_flops(self.model.config.text_config, length)["total"]

    @torch.no_grad()
    def measure(self, spec: str, k: int, repeats: int) -> dict:
        model, stages = self.model, parse_spec(spec, k)
        vtprune.apply_pruner(model, schedule=stages)
        pruner = vtprune.get_pruner(model)
        pixels = any("projector" in m.needs for m in pruner.methods)
        full_call = self.call(pixels=pixels)
        model(**full_call)
        stats = vtprune.get_stats(model)
        layers = [s.layer for s in pruner.stages]
        vtprune.remove_pruner(model)
        seq = {0: self.ids.shape[1]}
        cur = self.ids.shape[1]
        for st in stats:
            cur = cur - st["tokens_before"][0] + st["tokens_after"][0]
            seq[st["layer"]] = cur
        ideal = self.flops(self.ids.shape[1]) / llm_prefill_flops(model.config.text_config, seq)["total"]
        fns = {"full": (lambda: _unpatch(model), lambda: model(**full_call))}
        select = []

        def pruned():
            model(**full_call)
            select.append(sum(s["select_time_s"] for s in vtprune.get_stats(model)))

        fns["pruned"] = (lambda: vtprune.apply_pruner(model, replace=True, schedule=stages), pruned)
        if layers == [0]:  # the oracle: only the kept tokens, at their original positions
            kept = stats[0]["kept_indices"][0]
            keep = torch.ones(self.ids.shape[1], dtype=torch.bool)
            keep[self.before : self.before + self.n] = False
            keep[kept + self.before] = True
            feats = type(self.features)(pooler_output=[self.features.pooler_output[0][kept]])
            oracle = self.call(self.ids[:, keep], feats, position_ids=torch.arange(self.ids.shape[1])[keep][None])
            fns["oracle"] = (lambda: _unpatch(model), lambda: model(**oracle))
            if pixels:  # the pruned call ran the tower too: time it alongside and add it to the oracle
                fns["tower"] = (
                    lambda: _unpatch(model),
                    lambda: model.model.get_image_features(
                        pixel_values=self.pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
                    ),
                )
        t = median_times(fns, repeats)
        _unpatch(model)
        oracle_s = t["oracle"] + t.get("tower", 0.0) if "oracle" in t else None
        return {
            "method": spec,
            "kept": stats[-1]["tokens_after"][0],
            "full_s": t["full"],
            "pruned_s": t["pruned"],
            "oracle_s": oracle_s,
            "select_s": statistics.median(select),
            "ideal_speedup": ideal,
        }


def run(methods=("pool", "random"), hidden=1024, layers=4, repeats=7, runs=1, budgets=BUDGETS) -> list[dict]:
    """One row per (method, budget): medians over ``runs`` whole measurements, with the spread of the ratios."""
    bench = Bench(hidden, layers)
    plan = [(m, k) for m in methods for k in ((bench.n,) if "+" in m and ":" in m else budgets)]
    per_run = [[bench.measure(m, k, repeats) for m, k in plan] for _ in range(runs)]
    rows = []
    for i in range(len(plan)):
        samples = [r[i] for r in per_run]
        row = dict(samples[0])
        for key in ("full_s", "pruned_s", "select_s"):
            row[key] = statistics.median(s[key] for s in samples)
        ratios = {
            "speedup": [s["full_s"] / s["pruned_s"] for s in samples],
            "choosing": [s["select_s"] / s["pruned_s"] for s in samples],
        }
        if row["oracle_s"] is not None:
            row["oracle_s"] = statistics.median(s["oracle_s"] for s in samples)
            ratios["vs_oracle"] = [s["pruned_s"] / s["oracle_s"] for s in samples]
        row["ratios"] = {k: (statistics.median(v), min(v), max(v)) for k, v in ratios.items()}
        rows.append(row)
    return rows


def _fmt(ratio, fmt, unit="") -> str:
    mid, lo, hi = ratio
    return f"{mid:{fmt}}{unit}" if lo == hi else f"{mid:{fmt}}{unit} ({lo:{fmt}}–{hi:{fmt}})"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | kept | full ms | pruned ms | oracle ms | speedup | ideal (FLOPs) | of ideal | pruned/oracle "
        "| choosing / pruned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["ratios"]
        oracle = "—" if r["oracle_s"] is None else f"{r['oracle_s'] * 1e3:.1f}"
        vs = "—" if "vs_oracle" not in q else _fmt(q["vs_oracle"], ".3f")
        choosing = tuple(100 * x for x in q["choosing"])
        lines.append(
            f"| {r['method']} | {r['kept']} | {r['full_s'] * 1e3:.1f} | {r['pruned_s'] * 1e3:.1f} | {oracle} | "
            f"{_fmt(q['speedup'], '.2f', 'x')} | {r['ideal_speedup']:.2f}x | "
            f"{q['speedup'][0] / r['ideal_speedup']:.2f} | {vs} | {_fmt(choosing, '.2f', ' %')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--methods",
        default="pool,random",
        help="comma-separated method specs, or 'all' for every registered method (default: %(default)s)",
    )
    ap.add_argument(
        "--budgets",
        default=",".join(map(str, BUDGETS)),
        help="visual tokens kept of 576, comma-separated (default: %(default)s)",
    )
    ap.add_argument("--hidden", type=int, default=1024, help="decoder width (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds per measurement (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=1, help="whole measurements; >1 prints the spread (default: 1)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = vtprune.list_methods() if args.methods == "all" else args.methods.split(",")
    for spec in methods:
        parse_spec(spec, 1)  # refuse a bad spec before minutes of timing
    budgets = tuple(int(b) for b in args.budgets.split(","))
    rows = run(methods, args.hidden, args.layers, args.repeats, args.runs, budgets)
    print(
        f"LLaVA-1.5-shaped LM prefill, hidden {args.hidden}, {args.layers} layers, 576 visual tokens, "
        f"{args.threads} threads, medians of {args.repeats} interleaved rounds"
        + (f", median (min–max) of {args.runs} runs" if args.runs > 1 else "")
    )
    print(table(rows))


if __name__ == "__main__":
    main()
