"""The Triton kernels of vtprune.cuda against the PyTorch references in vtprune.ops.

Where the kernels run: with ``TRITON_INTERPRET=1``, or when it is unset and there is no CUDA device, on CPU tensors
under Triton's interpreter; with ``TRITON_INTERPRET=0``, or unset on a CUDA machine, compiled, on the GPU.

TRITON_INTERPRET and a shared pytest process: Triton applies the variable when ``@triton.jit`` runs. The kernels of
vtprune.cuda are decorated lazily at launch (``vtprune.cuda.lazy_jit``), so for them the value while a test runs is
what counts, but triton.language's own helpers (``tl.max``, ``tl.argmax``, ``tl.zeros``) are decorated when triton is
first imported. Hence: this module sets ``TRITON_INTERPRET=1`` at its top, before importing triton, and then puts the
environment back as it found it (an autouse fixture sets it again around each of its tests), so it does not switch
test modules collected after it. If another module imported triton before this one without the variable, the
interpreter cannot run in this process: the tests here are then skipped and ``test_in_fresh_process`` runs this file
in a subprocess with the variable set from the start, failing if any test there fails.

Tolerances: compaction and selection are exact (bitwise-equal tensors, identical indices). Merge accumulates in
float32 like the reference but in another order: float32 atol = rtol = 1e-5; float16 1e-3 and bfloat16 1.6e-2 (one
rounding step of the final cast); merged sizes (float32) 1e-5.
"""

import os

import torch

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
if _PREVIOUS_INTERPRET is None:
    INTERPRET = not torch.cuda.is_available()
else:
    INTERPRET = _PREVIOUS_INTERPRET.strip().lower() in ("1", "true", "on", "yes")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (importing torch does not import it)

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from vtprune import ops  # noqa: E402
from vtprune.cuda import compact as kcompact  # noqa: E402
from vtprune.cuda import greedy as kgreedy  # noqa: E402
from vtprune.cuda import interpret_mode, stdlib_interpreted, triton_available  # noqa: E402
from vtprune.cuda import merge as kmerge  # noqa: E402

if _PREVIOUS_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

torch.set_num_threads(1)

# triton was imported earlier in this process with the other mode: run this file in a fresh process instead
NEEDS_FRESH_PROCESS = stdlib_interpreted() != INTERPRET
if NEEDS_FRESH_PROCESS and os.environ.get("VTPRUNE_KERNEL_TESTS_CHILD"):
    raise RuntimeError("triton imported with the wrong TRITON_INTERPRET even in a fresh process")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MERGE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _kernel_mode(request, monkeypatch):
    if NEEDS_FRESH_PROCESS and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported before this module chose TRITON_INTERPRET; see test_in_fresh_process")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if INTERPRET else "0")
    yield
    ops.set_backend(None)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype).to(DEVICE)


def _keep_index(b, n, k, seed=0, sort=True):
    rows = [torch.randperm(n, generator=_gen(seed + i))[:k] for i in range(b)]
    rows = [r.sort().values if sort else r for r in rows]
    return torch.stack(rows).to(DEVICE)


# ----------------------------------------------------------------------------------------------- compaction

COMPACT_SHAPES = [  # B, L, L', D
    (1, 1, 1, 1),
    (2, 37, 11, 19),  # nothing a power of two
    (3, 130, 65, 64),  # L' not a multiple of BLOCK_T
    (1, 300, 300, 130),  # keep everything, D just above a power of two
    (2, 700, 129, 8),  # tiny D: tall tiles
    (2, 5, 3, 4096),  # large D, several D-tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", COMPACT_SHAPES, ids=str)
def test_compact_matches_reference(shape, dtype):
    b, l, lk, d = shape
    hidden = _randn(b, l, d, dtype=dtype, seed=1)
    index = _keep_index(b, l, lk, seed=2)
    pos = (torch.arange(l).expand(3, b, l) + torch.arange(3).view(3, 1, 1) * 1000).to(DEVICE)
    mask = (torch.rand(b, l, generator=_gen(3)) > 0.2).to(DEVICE)
    got = kcompact.compact(hidden, index, pos, mask)
    want = ops.compact_reference(hidden, index, pos, mask)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


@pytest.mark.parametrize("mask_kind", ["none", "long", "bool"])
@pytest.mark.parametrize("pos_kind", ["none", "1d", "mrope3", "mrope4", "strided"])
def test_compact_position_ids_and_mask(pos_kind, mask_kind):
    b, l, lk, d = 2, 45, 17, 24
    hidden = _randn(b, l, d, seed=4)
    index = _keep_index(b, l, lk, seed=5)
    base = torch.randint(0, 10_000, (4, b, l), generator=_gen(6)).to(DEVICE)
    pos = {
        "none": None,
        "1d": base[0].contiguous(),
        "mrope3": base[:3].contiguous(),
        "mrope4": base,
        "strided": base.transpose(0, 1).contiguous().transpose(0, 1)[1:],
    }[pos_kind]  # [3, B, L], not contiguous
    m = torch.rand(b, l, generator=_gen(7)).to(DEVICE) > 0.5
    mask = {"none": None, "long": m.long(), "bool": m}[mask_kind]
    got = kcompact.compact(hidden, index, pos, mask)
    want = ops.compact_reference(hidden, index, pos, mask)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def test_compact_strided_hidden_int32_unsorted_index():
    big = _randn(3, 40, 50, dtype=torch.float16, seed=8)
    hidden = big[1:, ::2, 3:40]  # non-contiguous in every dim but the last
    index = _keep_index(2, 20, 13, seed=9, sort=False).to(torch.int32)
    got, _, _ = kcompact.compact(hidden, index)
    assert torch.equal(got, ops.gather_tokens_reference(hidden, index.long()))
    hidden_t = _randn(2, 16, 20, seed=10).transpose(1, 2)  # [2, 20, 16] with stride 1 along L
    index = _keep_index(2, 20, 7, seed=11)
    assert torch.equal(kcompact.compact(hidden_t, index)[0], ops.gather_tokens_reference(hidden_t, index))


def test_compact_empty_and_bad_input():
    hidden = _randn(2, 10, 8, seed=12)
    out, pos, mask = kcompact.compact(hidden, torch.empty(2, 0, dtype=torch.long, device=DEVICE))
    assert out.shape == (2, 0, 8) and pos is None and mask is None
    with pytest.raises(ValueError):
        kcompact.compact(hidden, torch.zeros(3, 4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError):
        kcompact.compact(
            hidden,
            torch.zeros(2, 4, dtype=torch.long, device=DEVICE),
            position_ids=torch.zeros(2, 11, dtype=torch.long, device=DEVICE),
        )
    if DEVICE == "cpu":
        with pytest.raises(IndexError):
            kcompact.compact(hidden, torch.full((2, 3), 10, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------- merge

MERGE_SHAPES = [  # B, N, k, D
    (1, 1, 1, 1),
    (2, 50, 7, 33),
    (3, 130, 1, 16),  # everything into one slot
    (1, 67, 67, 24),  # nothing merged (k = N)
    (1, 9, 4, 4096),  # large D (64 programs: the interpreter runs them one by one)
    (1, 300, 40, 8),  # N spans several BLOCK_N tiles
]


def _merge_inputs(b, n, k, d, dtype, seed):
    hidden = _randn(b, n, d, dtype=dtype, seed=seed)
    keep = _keep_index(b, n, k, seed=seed + 1)
    target = torch.randint(0, k, (b, n), generator=_gen(seed + 2)).to(DEVICE)
    target.scatter_(1, keep, torch.arange(k, device=DEVICE).expand(b, k).contiguous())  # kept -> own slot
    return hidden, keep, target


@pytest.mark.parametrize("weighted", [False, True], ids=["ones", "sizes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=str)
def test_merge_matches_reference(shape, dtype, weighted):
    hidden, keep, target = _merge_inputs(*shape, dtype, seed=20)
    sizes = (torch.rand(shape[0], shape[1], generator=_gen(23)) * 3 + 0.5).to(DEVICE) if weighted else None
    got, got_sizes = kmerge.merge(hidden, keep, target, sizes)
    want, want_sizes = ops.merge_tokens_reference(hidden, keep, target, sizes)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tol = MERGE_TOL[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_sizes, want_sizes, atol=1e-5, rtol=1e-5)


def test_merge_int32_target_strided_hidden():
    big = _randn(2, 60, 40, seed=30)
    hidden = big[:, ::2, 5:35]
    _, keep, target = _merge_inputs(2, 30, 6, 30, torch.float32, seed=31)
    got, tot = kmerge.merge(hidden, keep, target.to(torch.int32))
    want, want_tot = ops.merge_tokens_reference(hidden, keep, target)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tot, want_tot)


# ------------------------------------------------------------------------------------------------ selection

GREEDY_CASES = [  # B, N, D, k
    (1, 1, 4, 1),
    (2, 37, 19, 1),  # k = 1: only the first pick
    (2, 37, 19, 37),  # k = N
    (3, 130, 64, 20),
    (1, 257, 16, 100),  # N just past a power of two
    (1, 600, 32, 64),  # several row tiles in the first pick
    (2, 6, 4096, 6),  # large D
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["divprune", "zoo"])
@pytest.mark.parametrize("case", GREEDY_CASES, ids=str)
def test_greedy_matches_reference(case, weighted, dtype):
    b, n, d, k = case
    features = _randn(b, n, d, dtype=dtype, seed=40 + n)
    weights = torch.rand(b, n, generator=_gen(41)).to(DEVICE) if weighted else None
    want = ops.greedy_maxmin_reference(features, k, weights)
    got = kgreedy.maxmin_kernel(ops.pairwise_cosine_distance(features), k, weights)
    assert got.dtype == torch.long and got.shape == (b, k)
    assert torch.equal(got, want)
    assert all(len(set(row)) == k for row in got.tolist())


def test_greedy_strided_distance_and_half_weights():
    features = _randn(2, 50, 12, seed=50)
    dist = ops.pairwise_cosine_distance(features)
    dist_t = dist.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
    weights = torch.rand(2, 50, generator=_gen(51)).to(torch.float16).to(DEVICE)
    for w in (None, weights):
        want = ops.maxmin_on_distances(dist, 30, w)
        assert torch.equal(kgreedy.maxmin_kernel(dist_t, 30, w), want)


def test_greedy_k_zero_and_bad_input():
    dist = ops.pairwise_cosine_distance(_randn(2, 5, 3, seed=52))
    assert kgreedy.maxmin_kernel(dist, 0).shape == (2, 0)
    with pytest.raises(ValueError):
        kgreedy.maxmin_kernel(dist[:, :, :4], 2)


# ------------------------------------------------------------------------------------------------- dispatch


def test_ops_dispatch_records_path():
    hidden = _randn(2, 20, 8, seed=60)
    index = _keep_index(2, 20, 6, seed=61)
    pos = torch.arange(20, device=DEVICE).expand(3, 2, 20)
    _, keep, target = _merge_inputs(2, 20, 6, 8, torch.float32, seed=62)
    for backend in ("triton", "torch"):
        ops.set_backend(backend)
        g, *ran_g = ops.gather_tokens(hidden, index, with_backend=True)
        *c, ran_c = ops.compact(hidden, index, pos, None, with_backend=True)
        *m, ran_m = ops.merge_tokens(hidden, keep, target, with_backend=True)
        m = tuple(m)
        s, ran_s = ops.greedy_maxmin(hidden, 5, None, with_backend=True)
        assert [*ran_g, ran_c, ran_m, ran_s] == [backend] * 4
        assert torch.equal(g, ops.gather_tokens_reference(hidden, index))
        assert torch.equal(c[0], g) and torch.equal(c[1], ops.gather_last(pos, index)) and c[2] is None
        torch.testing.assert_close(m, ops.merge_tokens_reference(hidden, keep, target), atol=1e-5, rtol=1e-5)
        assert torch.equal(s, ops.greedy_maxmin_reference(hidden, 5))
    ops.set_backend(None)
    assert ops.gather_tokens(hidden, index, with_backend=True)[1] == ("triton" if hidden.is_cuda else "torch")
    with pytest.raises(ValueError):
        ops.set_backend("cuda")


def test_forcing_triton_without_triton_fails_clearly(monkeypatch):
    import vtprune.cuda

    monkeypatch.setattr(vtprune.cuda, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not importable"):
        ops.set_backend("triton")
    assert not ops._use_kernel(torch.zeros(1))


def test_interpret_flag_and_device_check(monkeypatch):
    assert triton_available()
    assert interpret_mode() == INTERPRET
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpret_mode()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):  # CPU tensors need the interpreter
        kcompact.compact(torch.zeros(1, 2, 3), torch.zeros(1, 1, dtype=torch.long))


# Child-process scripts load cuda/ as a stand-alone package "vtcuda", so that they test these files alone, without
# what the rest of vtprune imports (transformers, which imports triton itself).
_LOAD_CUDA = r"""
import importlib.util, sys
def load_cuda(path):
    spec = importlib.util.spec_from_file_location("vtcuda", path + "/__init__.py", submodule_search_locations=[path])
    module = sys.modules["vtcuda"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
"""
_CUDA_DIR = os.path.dirname(kcompact.__file__)


def _run_child(script, **env_extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **env_extra)
    env.pop("TRITON_INTERPRET", None)
    code = _LOAD_CUDA + f"CUDA_DIR = {_CUDA_DIR!r}\n" + script
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr[-4000:]


def test_import_without_triton():
    _run_child(r"""
sys.modules["triton"] = None  # any "import triton" now raises ImportError
cuda = load_cuda(CUDA_DIR)
assert cuda.triton_available() is False
print("ok")
""")


def test_late_interpret_flag_gives_clear_error():
    _run_child(r"""
import os, torch
load_cuda(CUDA_DIR)
import vtcuda.compact, vtcuda.greedy  # import triton while TRITON_INTERPRET is unset
os.environ["TRITON_INTERPRET"] = "1"  # too late for triton.language's own helpers
try:
    vtcuda.greedy.maxmin_kernel(torch.rand(1, 4, 4), 2)
except RuntimeError as e:
    assert "before anything imports triton" in str(e), e
    print("ok")
""")


def test_in_fresh_process():
    if not NEEDS_FRESH_PROCESS:
        pytest.skip("this process can run the kernels: the tests above ran here")
    # --noconftest: the project's conftest imports transformers (and so triton); not needed by these tests
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
        TRITON_INTERPRET="1" if INTERPRET else "0",
        VTPRUNE_KERNEL_TESTS_CHILD="1",
    )
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-6000:] + res.stderr[-2000:]
    print(res.stdout.strip().splitlines()[-1])


_COMPILE_SM90 = r"""
import inspect, os
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, compile
load_cuda(CUDA_DIR)
from vtcuda import compact, greedy, merge

def build(fn, ptrs, consts, num_warps):
    names = inspect.signature(fn).parameters
    sig = {n: ptrs.get(n, "constexpr" if n in consts else "i32") for n in names}
    kernel = compile(ASTSource(triton.jit(fn), sig, consts), target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": num_warps})
    assert kernel.asm["cubin"]

unit = dict(s_hd=1, s_il=1, s_pl=1, s_ml=1, s_tn=1, s_wn=1, s_dc=1)
for h, p, m, r in (("fp16", "i64", "u8", 3), ("bf16", "i64", "i64", 1), ("fp32", "i32", "i32", 4)):
    ptrs = dict(h_ptr="*" + h, out_ptr="*" + h, idx_ptr="*i64", pos_ptr="*" + p, pos_out_ptr="*" + p,
                msk_ptr="*" + m, msk_out_ptr="*" + m)
    consts = {k: v for k, v in unit.items() if k in ("s_hd", "s_il", "s_pl", "s_ml")}
    build(compact._compact_kernel, ptrs, dict(consts, R=r, HAS_POS=True, HAS_MASK=r != 1, BLOCK_T=4,
                                              BLOCK_D=1024), 4)
for h, has_w in (("bf16", True), ("fp16", False), ("fp32", True)):
    ptrs = dict(h_ptr="*" + h, out_ptr="*" + h, tgt_ptr="*i64", w_ptr="*fp32", acc_ptr="*fp32", tot_ptr="*fp32")
    build(merge._merge_kernel, ptrs, dict(s_hd=1, s_tn=1, s_wn=1, HAS_W=has_w, BLOCK_N=128, BLOCK_K=128,
                                          BLOCK_D=32), 4)
for weighted in (False, True):
    ptrs = dict(dist_ptr="*fp32", w_ptr="*fp32", out_ptr="*i64")
    build(greedy._greedy_kernel, ptrs, dict(s_dc=1, s_wn=1, WEIGHTED=weighted, BLOCK_N=4096, BLOCK_R=4), 16)
print("ok")
"""


def test_kernels_compile_for_sm90():
    # The interpreter does not type-check the way the compiler does: build each kernel for an H100 (sm_90: Triton
    # to PTX, then ptxas) without a GPU, in a process where triton was imported in compiled mode.
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    _run_child(_COMPILE_SM90)


def test_bench_script_runs_under_interpreter(capsys):
    from benchmarks import bench_kernels as bench

    assert bench.peak_tbps("NVIDIA H100 80GB HBM3", None) == 3.35
    assert bench.peak_tbps("NVIDIA H100 PCIe", None) == 2.0
    assert bench.peak_tbps("NVIDIA GH200 480GB", None) == 4.0
    assert bench.peak_tbps("NVIDIA A100-SXM4-40GB", None) == 1.555
    assert bench.peak_tbps("NVIDIA L4", 0.25) == 0.25
    fake = [
        {"op": "greedy", "rule": "divprune", "N": 2880, "k": 640, "kernel_s": 1e-3, "official_s": 2e-2},
        {"op": "compact", "case": "bandwidth", "peak_share": 0.75},
    ]
    assert [line.endswith("PASS") for line in bench._goals(fake, 3.35)] == [True, True]
    if not INTERPRET:
        pytest.skip("the --interpret smoke run is for CPU-only processes")
    assert bench.main(["--interpret", "--reps", "3"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "False" not in out and "## Merge" in out
