"""Selection cost at scale: greedy max-min (DivPrune, ZOO's weighted form) and ZOO's sensitivity, side by side.

Greedy, on random LLaVA-like tokens (a few background directions plus noise and objects), keeping 64/576 of N:

- official: an official-style loop written here: the full N x N matrix (plus a diagonal-masked copy for the first
  pick) and, at every step, the minimum re-reduced over all picked rows, O(k^2 N);
- reference: ``ops.greedy_maxmin_reference`` (matrix + running minimum, the specification);
- matrix / rows: ``vtprune.greedy`` with the matrix, and without it (``max_matrix_bytes=0``).
Times are medians of interleaved rounds in this process; peak memory is the growth of the peak RSS of a fresh
process running one selection (Linux VmHWM after resetting it; tracemalloc does not see torch). Picks are checked
against the reference. N = 50 000 runs the rows path only (the matrix would be 10 GB).

ZOO sensitivity: the generic form (2 m N projector rows) against the MLP form, float32 and bfloat16 products, on
projector shapes of real and bench models; FLOPs from ``zoo_scoring_flops``, accuracy against float64.

    python -m benchmarks.bench_select [--dim 1024] [--threads 1] [--rounds 5,3,1] [--video-keep 1024]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time

import torch

from vtprune import greedy, ops
from vtprune.strategies import zoo

KEEP = 64 / 576


def tokens(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[1, n, d] LLaVA-like tokens: background directions plus noise, 5 % distinct objects."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, d, generator=g)[torch.randint(0, 8, (n,), generator=g)]
    x = x + 0.7 * torch.randn(n, d, generator=g)
    objects = torch.randperm(n, generator=g)[: n // 20]
    x[objects] = torch.randn(len(objects), d, generator=g)
    return x[None]


def official_style(x: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The official loops' shape: full matrix, re-reduce over every picked row each step. x [1, N, D] -> [1, k]."""
    dist = ops.pairwise_cosine_distance(x)[0]
    if weights is None:
        first = dist.clone().fill_diagonal_(math.inf).amin(dim=1).argmax()
    else:
        first = weights[0].argmax()
    picks = [int(first)]
    for _ in range(1, k):
        score = dist[picks].amin(dim=0)
        if weights is not None:
            score = score * weights[0]
        score[picks] = -math.inf
        picks.append(int(score.argmax()))
    return torch.tensor([picks])


VARIANTS = {
    "official": official_style,
    "reference": ops.greedy_maxmin_reference,
    "matrix": lambda x, k, w=None: greedy.maxmin_torch(x, k, w, max_matrix_bytes=1 << 62),
    "rows": lambda x, k, w=None: greedy.maxmin_torch(x, k, w, max_matrix_bytes=0),
}


def interleaved(fns: dict, rounds: int) -> dict:
    """name -> median seconds over ``rounds`` rounds, each running every fn once in turn (after one warm-up)."""
    times = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


_PEAK = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from benchmarks import bench_select as b
name, n, d, k, weighted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
x = b.tokens(n, d)
w = torch.rand(1, n, generator=torch.Generator().manual_seed(1)) if weighted else None
b.greedy.maxmin_torch(b.tokens(8, d), 2, w if w is None else w[:, :8])  # load the BLAS, NumPy paths first
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: imports no longer count
before = b.rss_kib("VmRSS")
t0 = time.perf_counter()
picks = b.VARIANTS[name](x, k, w)
print(json.dumps({"s": time.perf_counter() - t0, "grown": (b.rss_kib("VmHWM") - before) * 1024,
                  "picks": picks[0].tolist()}))
"""


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak(name: str, n: int, d: int, k: int, weighted: bool) -> dict:
    """One selection in a fresh process: its time, peak RSS growth (bytes) and picks."""
    res = subprocess.run(
        [sys.executable, "-c", _PEAK, name, str(n), str(d), str(k), str(int(weighted))],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def greedy_table(dim: int, sizes: list[int], rounds: list[int], video_n: int, video_keep: int) -> list[str]:
    lines = [
        f"Greedy max-min, D = {dim}, k = round(N * 64 / 576), medians of interleaved rounds; peak = growth of "
        "peak RSS in a fresh process",
        "",
        "| method | N | k | rounds | official ms | reference ms | matrix ms | rows ms | official / matrix | "
        "reference / matrix | rows / matrix | peak MB official / reference / matrix / rows | same picks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in zip(sizes, rounds):
        k = round(n * KEEP)
        x = tokens(n, dim)
        for method, w in (("divprune", None), ("zoo", torch.rand(1, n, generator=torch.Generator().manual_seed(1)))):
            want = ops.greedy_maxmin_reference(x, k, w)
            same = all(torch.equal(VARIANTS[v](x, k, w), want) for v in VARIANTS)
            t = interleaved({v: (lambda f=f: f(x, k, w)) for v, f in VARIANTS.items()}, r)
            mem = [peak(v, n, dim, k, w is not None)["grown"] / 2**20 for v in VARIANTS]
            lines.append(
                f"| {method} | {n} | {k} | {r} | "
                + " | ".join(f"{t[v] * 1e3:.1f}" for v in VARIANTS)
                + f" | {t['official'] / t['matrix']:.2f}x | {t['reference'] / t['matrix']:.2f}x | "
                f"{t['rows'] / t['matrix']:.2f}x | "
                + " / ".join(f"{m:.0f}" for m in mem)
                + f" | {'yes' if same else 'NO'} |"
            )
    n = video_n
    lines += [
        "",
        f"N = {n}, rows path only, one run in a fresh process; the matrix alone would be {4 * n * n / 2**30:.1f} GiB",
        "",
        "| method | N | k | D | seconds | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for method, weighted in (("divprune", False), ("zoo", True)):
        p = peak("rows", n, dim, video_keep, weighted)
        lines.append(f"| {method} | {n} | {video_keep} | {dim} | {p['s']:.1f} | {p['grown'] / 2**20:.0f} |")
    return lines


ZOO_SHAPES = {  # name -> (Din, H, D) of Linear -> GELU -> Linear
    "LLaVA-1.5-7B": (1024, 4096, 4096),
    "Qwen2.5-VL-7B": (5120, 5120, 3584),
    "bench_prefill model": (64, 1024, 1024),
    "embedded LLaVA": (128, 128, 128),
    "embedded Qwen2.5-VL": (256, 256, 128),
}


def zoo_table(n_time: int, n_acc: int, m: int, rounds: int) -> list[str]:
    lines = [
        f"ZOO sensitivity, m = {m}: time at N = {n_time} tokens (medians of {rounds} interleaved rounds), "
        f"accuracy at N = {n_acc} against the float64 generic form (max relative error over tokens)",
        "",
        "| projector (Din-H-D) | FLOPs generic / MLP (N = 576) | generic ms | MLP f32 ms | MLP bf16 ms | "
        "generic / MLP f32 | generic / MLP bf16 | err generic | err MLP f32 | err MLP bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (din, hid, dout) in ZOO_SHAPES.items():
        torch.manual_seed(0)
        proj = torch.nn.Sequential(torch.nn.Linear(din, hid), torch.nn.GELU(), torch.nn.Linear(hid, dout))
        pre = torch.randn(1, n_time, din)
        t = interleaved(
            {
                f"{form}-{prec}": (
                    lambda form=form, prec=prec: zoo.zoo_sensitivity(pre, proj, m=m, form=form, precision=prec)
                )
                for form, prec in (("generic", "float32"), ("mlp", "float32"), ("mlp", "bfloat16"))
            },
            rounds,
        )
        small = pre[:, :n_acc]
        u = zoo.random_directions(m, din, 0).double() * 0.01
        p64 = copy.deepcopy(proj).double()
        with torch.no_grad():
            ref = sum((p64(small.double() + u[j]) - p64(small.double() - u[j])).norm(dim=-1) for j in range(m))
        ref = ref / (2 * 0.01 * m)
        err = {
            key: float(((zoo.zoo_sensitivity(small, proj, m=m, form=f, precision=p).double() - ref).abs() / ref).max())
            for key, f, p in (("g", "generic", "float32"), ("m", "mlp", "float32"), ("b", "mlp", "bfloat16"))
        }
        ratio = zoo.zoo_scoring_flops(576, m, (din, hid, dout), "generic") / zoo.zoo_scoring_flops(
            576, m, (din, hid, dout)
        )
        g, f, b = t["generic-float32"], t["mlp-float32"], t["mlp-bfloat16"]
        lines.append(
            f"| {name} ({din}-{hid}-{dout}) | {ratio:.2f}x | {g * 1e3:.0f} | {f * 1e3:.0f} | {b * 1e3:.0f} | "
            f"{g / f:.2f}x | {g / b:.2f}x | {err['g']:.1e} | {err['m']:.1e} | {err['b']:.1e} |"
        )
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1024, help="token width D for the greedy tables")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", default="576,2880,11520", help="N of the greedy table")
    ap.add_argument("--rounds", default="5,3,1", help="interleaved rounds at each of --sizes")
    ap.add_argument("--video-n", type=int, default=50_000, help="N of the rows-path-only run")
    ap.add_argument("--video-keep", type=int, default=1024, help="k at N = 50 000")
    ap.add_argument("--zoo-tokens", type=int, default=128)
    ap.add_argument("--zoo-rounds", type=int, default=3)
    ap.add_argument("--skip", choices=("greedy", "zoo"), default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    if args.skip != "greedy":
        print(
            "\n".join(
                greedy_table(
                    args.dim,
                    [int(n) for n in args.sizes.split(",")],
                    [int(r) for r in args.rounds.split(",")],
                    args.video_n,
                    args.video_keep,
                )
            ),
            "\n",
            flush=True,
        )
    if args.skip != "zoo":
        print("\n".join(zoo_table(args.zoo_tokens, 16, 64, args.zoo_rounds)))


if __name__ == "__main__":
    main()
