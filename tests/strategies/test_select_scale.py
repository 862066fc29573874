"""Selection at scale: greedy max-min without the N x N matrix, and ZOO's MLP form, against the references."""

import copy
import math

import pytest
import torch

torch.set_num_threads(1)

import vtprune  # noqa: E402
from helpers import make_batch  # noqa: E402
from vtprune import greedy, ops  # noqa: E402
from vtprune.strategies import zoo  # noqa: E402
from vtprune.testing import tiny_model  # noqa: E402


def gen(seed):
    return torch.Generator().manual_seed(seed)


def realistic(b, n, d, seed, duplicates=0):
    """Tokens near a few background directions plus distinct objects, and ``duplicates`` exact copies of other
    tokens (exact ties in every distance row). Returns [b, n, d]."""
    g = gen(seed)
    bases = torch.randn(b, 4, d, generator=g)
    x = bases[torch.arange(b)[:, None], torch.randint(0, 4, (b, n), generator=g)]
    x = x + 0.1 * torch.randn(b, n, d, generator=g)
    objects = torch.randperm(n, generator=g)[: max(1, n // 20)]
    x[:, objects] = torch.randn(b, len(objects), d, generator=g)
    if duplicates:
        src, dst = torch.randperm(n, generator=g)[: 2 * duplicates].chunk(2)
        x[:, dst] = x[:, src]
    return x


CASES = [  # b, n, d, k, duplicates
    (1, 1, 4, 1, 0),
    (2, 37, 19, 37, 0),  # k = N
    (2, 300, 64, 60, 0),
    (1, 577, 128, 200, 40),  # many exact duplicates
    (3, 130, 16, 130, 30),
]


@pytest.fixture(params=[False, True], ids=["numpy-loop", "tensor-loop"])
def loop(request, monkeypatch):
    monkeypatch.setattr(greedy, "_FORCE_TORCH_LOOP", request.param)


@pytest.mark.parametrize("weighted", [False, True], ids=["divprune", "zoo"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_both_paths_pick_as_the_reference(case, weighted, loop):
    b, n, d, k, dup = case
    x = realistic(b, n, d, seed=n + k, duplicates=dup)
    w = torch.rand(b, n, generator=gen(1)) if weighted else None
    want = ops.greedy_maxmin_reference(x, k, w)
    assert torch.equal(greedy.maxmin_torch(x, k, w), want)  # matrix path: the reference's matrix, bit for bit
    # rows path with blocks of 7 rows (not a divisor of N): several nearest-neighbour blocks
    got = greedy.maxmin_torch(x, k, w, max_matrix_bytes=0, block_bytes=4 * n * 7)
    assert_same_up_to_float_ties(got, want, x, w)


def assert_same_up_to_float_ties(got, want, x, w, tol=2e-6):
    """got equals want, or first differs at a step where the reference scores got's pick within ``tol`` of its
    own (a near-tie that last-bit rounding of another BLAS call may swap; after the swap the paths diverge)."""
    dist = ops.pairwise_cosine_distance(x)
    for r in range(x.shape[0]):
        diff = (got[r] != want[r]).nonzero()
        if len(diff) == 0:
            continue
        step = int(diff[0])
        picked = want[r, :step]
        if step == 0:
            score = dist[r].fill_diagonal_(math.inf).amin(dim=-1) if w is None else w[r].float()
        else:
            score = dist[r, picked].amin(dim=0) * (1 if w is None else w[r].float())
            score[picked] = -math.inf
        gap = float(score[want[r, step]] - score[got[r, step]])
        assert 0 <= gap <= tol, f"row {r} step {step}: rows path picked {int(got[r, step])}, gap {gap:.2e}"


def test_rows_path_identical_on_llava_like_features():
    # LLaVA-like scale: D = 1024, 576 tokens, 64..192 kept: no near-ties at float32 resolution, so identical.
    x = realistic(1, 576, 1024, seed=11, duplicates=20)
    x += 0.5 * torch.randn(x.shape, generator=gen(12))
    w = torch.rand(1, 576, generator=gen(13))
    for k in (64, 192):
        for weights in (None, w):
            want = ops.greedy_maxmin_reference(x, k, weights)
            assert torch.equal(greedy.maxmin_torch(x, k, weights, max_matrix_bytes=0, block_bytes=1 << 20), want)


def test_duplicates_tie_to_the_lowest_index():
    # Token 5 is copied to 2, 9 and 14: all four have the same distances to everything. The reference picks the
    # lowest index among them; so must both paths, including when the first pick is one of them.
    x = torch.randn(1, 20, 8, generator=gen(3))
    x[0, [2, 9, 14]] = x[0, 5].clone()
    w = torch.ones(1, 20)
    w[0, [2, 5, 9, 14]] = 2.0  # the four copies are the heaviest: a four-way tie for the first pick
    for weights in (None, w):
        want = ops.greedy_maxmin_reference(x, 20, weights)
        if weights is not None:
            assert want[0, 0] == 2
        for limit in (None, 0):
            assert torch.equal(greedy.maxmin_torch(x, 20, weights, max_matrix_bytes=limit), want)


def test_rows_path_never_builds_the_matrix(monkeypatch):
    x = realistic(2, 200, 32, seed=4)
    want = ops.greedy_maxmin_reference(x, 40)
    monkeypatch.setattr(ops, "pairwise_cosine_distance", lambda *_: pytest.fail("built the N x N matrix"))
    picks, ran = ops.greedy_maxmin(x, 40, max_matrix_bytes=4 * 200 * 200 - 1, with_backend=True)
    assert torch.equal(picks, want) and ran == "torch"
    assert greedy.choose_path(200, 4 * 200 * 200) == "matrix" and greedy.choose_path(200, 4 * 200 * 200 - 1) == "rows"
    assert greedy.choose_path(16384) == "matrix" and greedy.choose_path(16385) == "rows"


def test_k_zero_and_empty_batch():
    x = torch.randn(2, 5, 3)
    assert greedy.maxmin_torch(x, 0).shape == (2, 0)
    assert greedy.maxmin_torch(torch.randn(0, 5, 3), 2).shape == (0, 2)


def test_rows_path_memory_is_linear_in_n():
    # N = 12000, D = 64: the matrix alone is 549 MiB. Peak RSS growth of one selection in a fresh process (the
    # allocator's memory is invisible to tracemalloc): the rows path holds the normalised copy (3 MB), 64 MB
    # blocks and a few N-vectors; the matrix path must show the matrix, or the measurement is broken.
    from benchmarks.bench_select import peak

    n = 12000
    rows, matrix = peak("rows", n, 64, 8, False), peak("matrix", n, 64, 8, False)
    assert rows["picks"] == matrix["picks"]
    assert matrix["grown"] > 4 * n * n and rows["grown"] < 4 * n * n / 4, (rows["grown"], matrix["grown"])


# --------------------------------------------------------------------------------------------- ZOO, MLP form


def llava_projector(din, d, seed, act="gelu"):
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=din, num_attention_heads=1),
        text_config=dict(model_type="llama", hidden_size=d, num_attention_heads=1),
        projector_hidden_act=act,
    )
    torch.manual_seed(seed)
    return LlavaMultiModalProjector(cfg).eval()


def qwen_mlp(din, d, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(din, din), torch.nn.GELU(), torch.nn.Linear(din, d)).eval()


PROJECTORS = {
    "llava": lambda: llava_projector(24, 40, seed=0),
    "qwen": lambda: qwen_mlp(48, 20, seed=1),
    "llava-relu": lambda: llava_projector(24, 40, seed=2, act="relu"),
}


def float64_sensitivity(pre, projector, m, h, seed):
    """The definition, in float64, on a float64 copy of the projector: [b, N]."""
    p = copy.deepcopy(projector).double()
    u = zoo.random_directions(m, pre.shape[-1], seed).double() * h
    x = pre.double()
    with torch.no_grad():
        return sum((p(x + u[j]) - p(x - u[j])).norm(dim=-1) for j in range(m)) / (2 * h * m)


@pytest.mark.parametrize("chunk_rows", [2, 9, 100, 8192])
@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_mlp_form_equals_generic_form(name, chunk_rows):
    proj = PROJECTORS[name]()
    assert zoo.mlp_parts(proj) is not None
    pre = 2 * torch.randn(2, 30, proj[0].in_features if name == "qwen" else 24, generator=gen(5))
    generic = zoo.zoo_sensitivity(pre, proj, m=7, seed=3, form="generic")
    mlp = zoo.zoo_sensitivity(pre, proj, m=7, seed=3, chunk_rows=chunk_rows)
    torch.testing.assert_close(mlp, generic, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_mlp_form_is_at_least_as_accurate(name):
    proj = PROJECTORS[name]()
    din = proj[0].in_features if name == "qwen" else 24
    pre = 3 * torch.randn(1, 200, din, generator=gen(6))
    ref = float64_sensitivity(pre, proj, m=16, h=0.01, seed=0)

    def err(s):
        return ((s.double() - ref).abs() / ref).mean().item()

    generic = err(zoo.zoo_sensitivity(pre, proj, m=16, form="generic"))
    mlp = err(zoo.zoo_sensitivity(pre, proj, m=16))
    bf16 = err(zoo.zoo_sensitivity(pre, proj, m=16, precision="bfloat16"))
    assert mlp <= generic and mlp < 1e-5, (mlp, generic)
    assert bf16 < 5e-3, bf16  # bfloat16 products: about 8 bits; still far from noise


def test_mlp_form_reads_a_live_module_without_calling_or_changing_it():
    proj = llava_projector(24, 40, seed=0)
    live = copy.deepcopy(proj).to(torch.bfloat16)  # the model's own module, in its own dtype, with a hook
    before = {k: v.clone() for k, v in live.state_dict().items()}
    calls = []
    live.register_forward_pre_hook(lambda *_: calls.append(1))
    pre = torch.randn(1, 25, 24, generator=gen(7))
    got = zoo.zoo_sensitivity(pre, live, m=5)
    assert not calls and all(torch.equal(v, live.state_dict()[k]) for k, v in before.items())
    # float32 arithmetic on the bf16 weights: equals the generic form on a float32 copy of them
    want = zoo.zoo_sensitivity(pre, copy.deepcopy(live).float(), m=5, form="generic")
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


def test_other_projectors_get_the_generic_form(monkeypatch):
    monkeypatch.setattr(zoo, "_mlp_norms", lambda *_: pytest.fail("MLP form used"))
    lin = torch.nn.Linear(8, 8)
    others = [
        torch.tanh,
        torch.nn.Sequential(lin, torch.nn.Softmax(-1), torch.nn.Linear(8, 4)),
        torch.nn.Sequential(lin, torch.nn.GELU(), torch.nn.Linear(8, 4), torch.nn.GELU()),
        torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GELU(), lin),
    ]
    for p in others:
        assert zoo.mlp_parts(p) is None
        zoo.zoo_sensitivity(torch.randn(1, 5, 8), p, m=3)
    with pytest.raises(ValueError, match="form='mlp'"):
        zoo.zoo_sensitivity(torch.randn(1, 5, 8), torch.tanh, m=3, form="mlp")
    with pytest.raises(ValueError, match="precision"):
        zoo.zoo_sensitivity(torch.randn(1, 5, 8), torch.tanh, precision="fp8")


def test_scoring_flops_match_the_counted_products():
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("llava", "qwen"):
        proj = PROJECTORS[name]()
        shapes = zoo.mlp_shapes(proj)
        pre = torch.randn(1, 30, shapes[0])
        for form in ("mlp", "generic"):
            with FlopCounterMode(display=False) as counter:
                zoo.zoo_sensitivity(pre, proj, m=6, form=form)
            assert counter.get_total_flops() == zoo.zoo_scoring_flops(30, 6, shapes, form), (name, form)
    # the embedded-model shapes of the issue: the reduction factor at N = 576, m = 64
    ratio = zoo.zoo_scoring_flops(576, 64, (1024, 4096, 4096), "generic") / zoo.zoo_scoring_flops(
        576, 64, (1024, 4096, 4096)
    )
    assert math.isclose(ratio, 2.49, rel_tol=0.01)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_same_picks_on_tiny_models(family, monkeypatch):
    model = tiny_model(family)
    batch = make_batch(family, 2)

    def kept():
        vtprune.apply_pruner(model, method="zoo", keep_ratio=0.3, m=16)
        try:
            model(**batch)
            return [s["kept_indices"] for s in vtprune.get_stats(model)]
        finally:
            vtprune.remove_pruner(model)

    used = []
    real = zoo._mlp_norms
    monkeypatch.setattr(zoo, "_mlp_norms", lambda *a: used.append(1) or real(*a))
    fast = kept()
    assert used, "the model's projector was not recognised as an MLP"
    monkeypatch.setattr(zoo, "mlp_parts", lambda _: None)
    slow = kept()
    assert len(fast) == len(slow) and all(
        torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for f, s in zip(fast, slow) for a, b in zip(f, s)
    )
