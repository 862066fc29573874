"""Time the Triton kernels of vtprune.cuda against the PyTorch references and DivPrune's official-style loop.

    python -m benchmarks.bench_kernels [--peak-tbps 3.35] [--json out.json]
    python -m benchmarks.bench_kernels --interpret     # tiny shapes on CPU under Triton's interpreter (smoke run)

Selection (DivPrune rule, and the weighted ZOO-Prune rule), LLaVA-1.5 (N = 576, k = 64/128/192) and LLaVA-NeXT
(N = 2880, k = 320/640) shapes, fp16 features with D = 4096, batch 1. All three contenders start from the same float32
cosine-distance matrix (its GEMM is timed on its own line):
  kernel    vtprune.cuda.greedy, one launch;
  reference ops.maxmin_on_distances, a running-minimum loop in PyTorch (a few launches per step);
  official  k steps of index_select / min / argmax over the rows picked so far, as DivPrune's released code does.
"kernel k=1" is the first pick alone (an N x N pass inside one program), to show its share.

Compaction: ops.compact's kernel (hidden states + position ids + mask, one launch) vs the three torch.gather calls of
compact_reference; achieved bandwidth = bytes read and written / time, against the device's peak (table below, or
--peak-tbps / VTPRUNE_PEAK_TBPS). The prefill shapes of the two models move ~1-25 MB and are launch-latency bound; the
"bandwidth" shape (B = 16, L = 4096 -> 2048, D = 4096, 0.5 GB) is the one the 70 % goal is judged on.

Timing: CUDA events around each call, after a compiling call and warmup calls, L2 flushed before each call
(a 256 MiB write), median of the repetitions. Without a CUDA device (and without --interpret) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from vtprune import ops

# Peak DRAM bandwidth in TB/s, matched against torch.cuda.get_device_name() (first match wins, so the more specific
# names come first).
PEAK_TBPS = [
    ("GH200", 4.0),
    ("H200", 4.8),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # "H100 80GB HBM3" = SXM
    ("H800", 3.35),
    ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("L40", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
    ("A10", 0.6),
    ("RTX 4090", 1.008),
    ("RTX 3090", 0.936),
    ("V100", 0.9),
    ("T4", 0.32),
]
SELECTION_GOAL = 10.0  # kernel vs official-style loop at N = 2880, k = 640
BANDWIDTH_GOAL = 0.70  # share of peak for the compaction


def peak_tbps(name: str, override: float | None) -> float | None:
    if override:
        return override
    env = os.environ.get("VTPRUNE_PEAK_TBPS")
    if env:
        return float(env)
    for key, value in PEAK_TBPS:
        if key.lower() in name.lower():
            return value
    return None


def official_divprune(dist: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's released selection, restated: each step re-reduces over all rows picked so far. dist: [N, N]."""
    picks = torch.empty(k, dtype=torch.long, device=dist.device)
    for i in range(k):
        if i == 0:  # second-smallest of each column: its nearest other token
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            rows = torch.index_select(picks, 0, torch.arange(0, i, device=dist.device))
            scores = torch.index_select(dist, 0, rows).min(dim=0).values
        picks[i] = torch.argmax(scores)
    return picks


class Timer:
    def __init__(self, device: str, reps: int, budget_s: float):
        self.device, self.reps, self.budget_s = device, reps, budget_s
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device == "cuda" else None

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn, warmup: int = 2) -> float:
        """Median seconds per call."""
        fn()  # first call compiles the kernels: not part of the estimate below
        self._sync()
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        self._sync()
        est = (time.perf_counter() - t0) / max(warmup, 1)
        reps = max(3, min(self.reps, int(self.budget_s / max(est, 1e-6))))
        if self.device != "cuda":
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e-3


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:9.3f} ms"


def bench_selection(timer: Timer, device: str, cases, d: int, results: list) -> None:
    from vtprune.cuda.greedy import maxmin_kernel as kernel

    print(f"\n## Selection (batch 1, D = {d}, fp16 features, float32 distance matrix)")
    print(
        f"{'N':>6} {'k':>5} {'rule':>9} | {'kernel':>12} {'reference':>12} {'official':>12} | "
        f"{'x ref':>7} {'x official':>10} | same picks"
    )
    seen_n = set()
    for n, k in cases:
        gen = torch.Generator().manual_seed(n)
        feats = torch.randn(1, n, d, generator=gen).to(device=device, dtype=torch.float16)
        weights = torch.rand(1, n, generator=gen).to(device)
        dist = ops.pairwise_cosine_distance(feats)
        if n not in seen_n:
            seen_n.add(n)
            t_dist = timer(lambda: ops.pairwise_cosine_distance(feats))
            t_first = timer(lambda: kernel(dist, 1))
            print(
                f"{n:>6} {'':>5} {'':>9} | distance matrix (GEMM, float32) {_fmt_ms(t_dist)}; "
                f"kernel k=1 (first pick) {_fmt_ms(t_first)}"
            )
            results.append({"op": "distance", "N": n, "D": d, "s": t_dist})
            results.append({"op": "greedy_first_pick", "N": n, "s": t_first})
        for rule, w in (("divprune", None), ("zoo", weights)):
            t_k = timer(lambda: kernel(dist, k, w))
            t_r = timer(lambda: ops.maxmin_on_distances(dist, k, w))
            same = torch.equal(kernel(dist, k, w), ops.maxmin_on_distances(dist, k, w))
            row = {
                "op": "greedy",
                "rule": rule,
                "N": n,
                "k": k,
                "kernel_s": t_k,
                "reference_s": t_r,
                "same_as_reference": same,
            }
            if rule == "divprune":
                t_o = timer(lambda: official_divprune(dist[0], k), warmup=1)
                same_o = torch.equal(kernel(dist, k)[0], official_divprune(dist[0], k))
                row.update(official_s=t_o, same_as_official=same_o)
                print(
                    f"{n:>6} {k:>5} {rule:>9} | {_fmt_ms(t_k)} {_fmt_ms(t_r)} {_fmt_ms(t_o)} | "
                    f"{t_r / t_k:6.1f}x {t_o / t_k:9.1f}x | ref {same}, official {same_o}"
                )
            else:
                print(
                    f"{n:>6} {k:>5} {rule:>9} | {_fmt_ms(t_k)} {_fmt_ms(t_r)} {'':>12} | "
                    f"{t_r / t_k:6.1f}x {'':>10} | ref {same}"
                )
            results.append(row)


def _compact_bytes(hidden, index, pos, mask) -> int:
    b, lk = index.shape
    moved = 2 * b * lk * hidden.shape[-1] * hidden.element_size() + index.numel() * index.element_size()
    if pos is not None:
        moved += 2 * (pos.numel() // pos.shape[-1]) * lk * pos.element_size()
    if mask is not None:
        moved += 2 * b * lk * mask.element_size()
    return moved


def bench_compaction(timer: Timer, device: str, cases, d: int, peak: float | None, results: list) -> None:
    from vtprune.cuda.compact import compact as kernel

    print(
        f"\n## Compaction (hidden fp16, D = {d}, int64 position ids, int64 mask)"
        + (f"; peak {peak:.2f} TB/s" if peak else "; peak unknown (--peak-tbps)")
    )
    print(
        f"{'case':>24} {'B':>3} {'L':>6} {'L_kept':>6} {'rows':>4} | {'kernel':>12} {'reference':>12} | "
        f"{'MB moved':>9} {'GB/s':>8} {'% peak':>7}"
    )
    for name, b, l, lk, rows in cases:
        gen = torch.Generator().manual_seed(l)
        hidden = torch.randn(b, l, d, generator=gen).to(device=device, dtype=torch.float16)
        index = torch.stack([torch.randperm(l, generator=gen)[:lk].sort().values for _ in range(b)]).to(device)
        pos = torch.arange(l, device=device).expand(rows, b, l).contiguous()
        pos = pos[0] if rows == 1 else pos
        mask = torch.ones(b, l, dtype=torch.long, device=device)
        t_k = timer(lambda: kernel(hidden, index, pos, mask))
        t_r = timer(lambda: ops.compact_reference(hidden, index, pos, mask))
        ok = all(
            torch.equal(x, y)
            for x, y in zip(kernel(hidden, index, pos, mask), ops.compact_reference(hidden, index, pos, mask))
        )
        moved = _compact_bytes(hidden, index, pos, mask)
        gbps = moved / t_k / 1e9
        share = gbps / (peak * 1e3) if peak else None
        print(
            f"{name:>24} {b:>3} {l:>6} {lk:>6} {rows:>4} | {_fmt_ms(t_k)} {_fmt_ms(t_r)} | {moved / 1e6:9.2f} "
            f"{gbps:8.1f} {f'{share:6.1%}' if share is not None else '    n/a'}" + ("" if ok else "  MISMATCH")
        )
        results.append(
            {
                "op": "compact",
                "case": name,
                "B": b,
                "L": l,
                "L_kept": lk,
                "rows": rows,
                "kernel_s": t_k,
                "reference_s": t_r,
                "bytes": moved,
                "GBps": gbps,
                "peak_share": share,
                "equal": ok,
            }
        )


def bench_merge(timer: Timer, device: str, cases, d: int, results: list) -> None:
    from vtprune.cuda.merge import merge as kernel

    print(f"\n## Merge (fp16, D = {d}, random targets, sizes given)")
    print(f"{'N':>6} {'k':>5} | {'kernel':>12} {'reference':>12} | max |diff|")
    for n, k in cases:
        gen = torch.Generator().manual_seed(n + k)
        hidden = torch.randn(1, n, d, generator=gen).to(device=device, dtype=torch.float16)
        keep = torch.randperm(n, generator=gen)[:k].sort().values[None].to(device)
        target = torch.randint(0, k, (1, n), generator=gen).to(device)
        target[0, keep[0]] = torch.arange(k, device=device)
        sizes = torch.rand(1, n, generator=gen).to(device) + 0.5
        t_k = timer(lambda: kernel(hidden, keep, target, sizes))
        t_r = timer(lambda: ops.merge_tokens_reference(hidden, keep, target, sizes))
        diff = (
            (
                kernel(hidden, keep, target, sizes)[0].float()
                - ops.merge_tokens_reference(hidden, keep, target, sizes)[0].float()
            )
            .abs()
            .max()
            .item()
        )
        print(f"{n:>6} {k:>5} | {_fmt_ms(t_k)} {_fmt_ms(t_r)} | {diff:.2e}")
        results.append({"op": "merge", "N": n, "k": k, "kernel_s": t_k, "reference_s": t_r, "max_abs_diff": diff})


def _goals(results: list, peak: float | None) -> list[str]:
    lines = []
    sel = [r for r in results if r["op"] == "greedy" and r["rule"] == "divprune" and r["N"] == 2880 and r["k"] == 640]
    if sel:
        ratio = sel[0]["official_s"] / sel[0]["kernel_s"]
        lines.append(
            f"selection N=2880 k=640: {ratio:.1f}x the official-style loop (goal >= {SELECTION_GOAL:.0f}x): "
            + ("PASS" if ratio >= SELECTION_GOAL else "MISS")
        )
    bw = [r for r in results if r["op"] == "compact" and r["case"] == "bandwidth"]
    if bw and peak:
        share = bw[0]["peak_share"]
        lines.append(
            f"compaction bandwidth: {share:.1%} of {peak:.2f} TB/s (goal >= {BANDWIDTH_GOAL:.0%}): "
            + ("PASS" if share >= BANDWIDTH_GOAL else "MISS")
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="run tiny shapes on CPU under Triton's interpreter (checks the script end to end)",
    )
    parser.add_argument("--peak-tbps", type=float, default=None, help="device peak DRAM bandwidth in TB/s")
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement (at most)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    if args.interpret:
        from vtprune.cuda import stdlib_interpreted

        if not stdlib_interpreted():
            # triton (imported by transformers, through vtprune) must see TRITON_INTERPRET=1 at its first import
            if os.environ.get("_VTPRUNE_BENCH_CHILD"):
                raise RuntimeError("TRITON_INTERPRET=1 did not reach triton's first import")
            env = dict(os.environ, TRITON_INTERPRET="1", _VTPRUNE_BENCH_CHILD="1")
            return subprocess.call([sys.executable, "-m", "benchmarks.bench_kernels", *argv], env=env)
        os.environ["TRITON_INTERPRET"] = "1"
        device, d, name = "cpu", 32, "cpu (Triton interpreter)"
        sel_cases = [(48, 4), (48, 8), (90, 10)]
        compact_cases = [("llava-1.5-like", 1, 60, 20, 1), ("qwen-mrope", 2, 50, 17, 3), ("bandwidth", 2, 64, 32, 1)]
        merge_cases = [(48, 8)]
        timer = Timer(device, reps=3, budget_s=0.5)
    else:
        if not torch.cuda.is_available():
            print("bench_kernels needs a CUDA device (none found); use --interpret for a CPU smoke run.")
            return 0
        from vtprune.cuda import triton_available

        if not triton_available():
            print("bench_kernels needs triton (pip install 'vtprune[triton]').")
            return 0
        device, d, name = "cuda", 4096, torch.cuda.get_device_name()
        sel_cases = [(576, 64), (576, 128), (576, 192), (2880, 320), (2880, 640)]
        pre, post = 35, 40  # system prompt before the image, question after it
        compact_cases = [(f"llava-1.5 k={k}", 1, pre + 576 + post, pre + k + post, 1) for k in (64, 128, 192)]
        compact_cases += [(f"llava-next k={k}", 1, pre + 2880 + post, pre + k + post, 1) for k in (320, 640)]
        compact_cases += [("qwen-mrope batch 8", 8, 4096, 1024, 3), ("bandwidth", 16, 4096, 2048, 1)]
        merge_cases = [(576, 192), (2880, 640)]
        timer = Timer(device, reps=args.reps, budget_s=2.0)
    peak = peak_tbps(name, args.peak_tbps)
    print(f"device: {name}; torch {torch.__version__}")

    results: list = []
    with torch.inference_mode():
        bench_selection(timer, device, sel_cases, d, results)
        bench_compaction(timer, device, compact_cases, d, peak, results)
        bench_merge(timer, device, merge_cases, d, results)
    goals = _goals(results, peak) if not args.interpret else []
    if goals:
        print("\n## Goals")
        print("\n".join(goals))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_tbps": peak, "results": results, "goals": goals}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
