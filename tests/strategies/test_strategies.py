"""Strategies against independent naive implementations, on features with realistic redundancy."""

import math
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)

from vtprune import (  # noqa: E402
    budgets,
    calibrate,  # noqa: E402
    merge,
)
from vtprune.strategies import debias, entropy, get_method, zoo  # noqa: E402
from vtprune.strategies.base import SelectionInputs  # noqa: E402
from vtprune.strategies.baselines import fastv_select  # noqa: E402
from vtprune.strategies.divprune import divprune_select  # noqa: E402


def gen(seed):
    return torch.Generator().manual_seed(seed)


def redundant_features(b, n, d, n_objects, seed):
    """Rows of n tokens: near-duplicates of 3 background directions plus ``n_objects`` distinct objects.
    Returns (features [b, n, d], object positions [b, n_objects])."""
    g = gen(seed)
    bases = torch.randn(b, 3, d, generator=g)
    which = torch.randint(0, 3, (b, n), generator=g)
    x = bases[torch.arange(b)[:, None], which] + 0.05 * torch.randn(b, n, d, generator=g)
    objects = torch.stack([torch.randperm(n, generator=g)[:n_objects] for _ in range(b)])
    x[torch.arange(b)[:, None], objects] = torch.randn(b, n_objects, d, generator=g)
    return x, objects


def cosine_distance64(x):
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True)
    return 1 - x @ x.T


def naive_divprune(x, k):
    """The official loop: first pick by the second-smallest entry of each column, then re-reduce the
    minimum over all picked rows at every step. x: [N, D] -> list of k indices."""
    dist = cosine_distance64(x)
    picks = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            scores = dist[torch.tensor(picks)].min(dim=0).values
        picks.append(int(scores.argmax()))
    return picks


def naive_weighted_greedy(x, k, w):
    """ZOO-Prune selection written out: first = argmax w, then argmax over unpicked of w * min distance."""
    dist = cosine_distance64(x)
    w = w.double()
    picks = [int(w.argmax())]
    while len(picks) < k:
        score = w * dist[torch.tensor(picks)].min(dim=0).values
        score[torch.tensor(picks)] = -math.inf
        picks.append(int(score.argmax()))
    return picks


# --------------------------------------------------------------------------------------------- DivPrune


@pytest.mark.parametrize("k", [1, 5, 20, 60])
def test_divprune_matches_official_loop(k):
    x, _ = redundant_features(3, 150, 32, 6, seed=k)
    got = divprune_select(SelectionInputs(features=x), k)
    for row in range(3):
        assert got[row].tolist() == naive_divprune(x[row], k)


def test_divprune_keeps_every_distinct_object():
    x, objects = redundant_features(2, 200, 32, 6, seed=1)
    got = divprune_select(SelectionInputs(features=x), 9)
    for row in range(2):
        assert set(objects[row].tolist()) <= set(got[row].tolist())


def test_divprune_batched_equals_per_row():
    x, _ = redundant_features(4, 120, 16, 5, seed=3)
    batched = divprune_select(SelectionInputs(features=x), 30)
    for row in range(4):
        assert torch.equal(batched[row], divprune_select(SelectionInputs(features=x[row : row + 1]), 30)[0])


def test_divprune_keep_newlines():
    x, _ = redundant_features(2, 130, 16, 5, seed=4)
    mask = torch.zeros(2, 130, dtype=torch.bool)
    mask[:, 12::13] = True  # 10 newlines per row
    got = divprune_select(SelectionInputs(features=x, newline_mask=mask), 25, keep_newlines=True)
    assert got.shape == (2, 25)
    for row in range(2):
        newlines = mask[row].nonzero().flatten()
        free = (~mask[row]).nonzero().flatten()
        assert got[row, :10].tolist() == newlines.tolist()
        assert got[row, 10:].tolist() == free[naive_divprune(x[row, free], 15)].tolist()
    # Without the option newlines are ordinary tokens.
    plain = divprune_select(SelectionInputs(features=x, newline_mask=mask), 25)
    assert torch.equal(plain, divprune_select(SelectionInputs(features=x), 25))
    # Exactly as many slots as newlines keeps only the newlines.
    only = divprune_select(SelectionInputs(features=x, newline_mask=mask), 10, keep_newlines=True)
    assert torch.equal(only, mask.nonzero()[:, 1].reshape(2, 10))
    with pytest.raises(ValueError, match="newline"):
        divprune_select(SelectionInputs(features=x, newline_mask=mask), 9, keep_newlines=True)


def test_divprune_newline_counts_differ_between_rows():
    x, _ = redundant_features(2, 100, 16, 4, seed=5)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, 9::10] = True
    mask[1, 19::20] = True
    got = divprune_select(SelectionInputs(features=x, newline_mask=mask), 20, keep_newlines=True)
    for row in range(2):
        one = SelectionInputs(features=x[row : row + 1], newline_mask=mask[row : row + 1])
        assert torch.equal(got[row], divprune_select(one, 20, keep_newlines=True)[0])


def test_the_engine_entry_point_checks_k_once_for_every_method():
    x, _ = redundant_features(1, 20, 8, 2, seed=0)
    method = get_method("divprune")
    with pytest.raises(ValueError, match="method 'divprune': budget k=21 is out of range"):
        method.select(SelectionInputs(features=x), 21)
    assert method.select(SelectionInputs(features=x), 0).shape == (1, 0)


# --------------------------------------------------------------------------------------------- ZOO-Prune


def small_projector(din, d, seed):
    g = gen(seed)
    w1, w2 = torch.randn(din, 48, generator=g) / din**0.5, torch.randn(48, d, generator=g) / 48**0.5
    seen = []

    def project(rows):
        seen.append(rows.dtype)
        return torch.nn.functional.gelu(rows @ w1) @ w2

    return project, seen


def naive_sensitivity(pre, project, m, h, seed):
    u = torch.randn(m, pre.shape[-1], generator=gen(seed))
    u = u / u.norm(dim=-1, keepdim=True)
    total = torch.zeros(pre.shape[:2])
    for j in range(m):
        total += (project(pre + h * u[j]) - project(pre - h * u[j])).norm(dim=-1) / (2 * h)
    return total / m


@pytest.mark.parametrize("chunk_rows", [2, 7, 130, 10**9])
def test_zoo_sensitivity_chunked_matches_naive(chunk_rows):
    pre = torch.randn(2, 40, 12, generator=gen(0)) * 2
    project, _ = small_projector(12, 16, seed=1)
    want = naive_sensitivity(pre, project, m=9, h=0.01, seed=3)
    got = zoo.zoo_sensitivity(pre, project, m=9, h=0.01, seed=3, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_zoo_sensitivity_bounds_live_rows():
    pre = torch.randn(1, 30, 8, generator=gen(0))
    sizes = []

    def project(rows):
        sizes.append(rows.shape[0])
        return torch.tanh(rows)

    zoo.zoo_sensitivity(pre, project, m=5, h=0.01, chunk_rows=17)
    assert max(sizes) <= 17 and sum(sizes) == 2 * 5 * 30


def test_zoo_sensitivity_tracks_nonlinearity():
    # tanh saturates for large inputs: tokens in the linear regime must be the sensitive ones.
    small = 0.1 * torch.randn(1, 20, 8, generator=gen(0))
    pre = torch.cat([small, small.sign() * 3 + small], dim=1)
    s = zoo.zoo_sensitivity(pre, torch.tanh, m=16, h=0.01)
    assert s[0, :20].min() > 5 * s[0, 20:].max()


def test_zoo_computes_in_float32():
    pre = torch.randn(1, 30, 12, generator=gen(0)).bfloat16()
    project, seen = small_projector(12, 16, seed=1)
    got = zoo.zoo_sensitivity(pre, project, m=4, seed=0)
    assert set(seen) == {torch.float32} and got.dtype == torch.float32
    torch.testing.assert_close(got, naive_sensitivity(pre.float(), project, 4, 0.01, 0), rtol=1e-4, atol=1e-5)


def test_zoo_select_matches_naive_pipeline():
    x, _ = redundant_features(2, 80, 16, 5, seed=7)
    pre = torch.randn(2, 80, 12, generator=gen(8)) * 2
    project, _ = small_projector(12, 16, seed=9)
    inputs = SelectionInputs(features=x, pre_projector=pre, projector=project)
    got = zoo.zoo_select(inputs, 20, m=8, seed=2, chunk_rows=100)
    s = naive_sensitivity(pre, project, 8, 0.01, 2)
    w = (s - s.amin(dim=1, keepdim=True)) / (s.amax(dim=1, keepdim=True) - s.amin(dim=1, keepdim=True))
    for row in range(2):
        assert got[row].tolist() == naive_weighted_greedy(x[row], 20, w[row])
    # Batched equals per-row: directions are shared, nothing else couples the rows.
    for row in range(2):
        one = SelectionInputs(features=x[row : row + 1], pre_projector=pre[row : row + 1], projector=project)
        assert torch.equal(got[row], zoo.zoo_select(one, 20, m=8, seed=2, chunk_rows=100)[0])


def test_zoo_groups_qwen_patches_and_is_seeded():
    x, _ = redundant_features(1, 30, 16, 3, seed=1)
    grouped = torch.randn(1, 30, 4 * 6, generator=gen(2))
    project, _ = small_projector(24, 16, seed=3)
    a = zoo.zoo_select(SelectionInputs(features=x, pre_projector=grouped, projector=project), 10, m=6)
    flat = SelectionInputs(features=x, pre_projector=grouped.reshape(1, 120, 6), projector=project)
    assert torch.equal(a, zoo.zoo_select(flat, 10, m=6))
    s0 = zoo.zoo_sensitivity(grouped, project, m=6, seed=0)
    assert torch.equal(s0, zoo.zoo_sensitivity(grouped, project, m=6, seed=0))
    assert not torch.equal(s0, zoo.zoo_sensitivity(grouped, project, m=6, seed=1))


def test_zoo_rejects_bad_inputs():
    x, _ = redundant_features(1, 10, 8, 2, seed=0)
    with pytest.raises(ValueError, match="pre_projector"):
        zoo.zoo_select(SelectionInputs(features=x), 3)
    bad = SelectionInputs(features=x, pre_projector=torch.randn(1, 15, 4), projector=torch.tanh)
    with pytest.raises(ValueError, match="expected"):
        zoo.zoo_select(bad, 3)
    with pytest.raises(ValueError, match="chunk_rows=1"):
        zoo.zoo_sensitivity(torch.randn(1, 4, 4), torch.tanh, chunk_rows=1)


# --------------------------------------------------------------------------------------------- EntropyPrune


def naive_entropy(queries, normalize=False):
    """Per token: -sum(l log l) / log H over the eigenvalues of the d_head x d_head covariance of the head-centred
    query states, taken as they are (EntropyPrune's released code) or normalised to sum 1."""
    b, n, heads, _ = queries.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        for t in range(n):
            r = queries[i, t].double()
            r = r - r.mean(dim=0)
            lam = torch.linalg.eigvalsh(r.T @ r / heads).clamp(min=0)
            p = lam / lam.sum() if normalize else lam
            p = p[p > 0]
            out[i, t] = -(p * p.log()).sum() / math.log(heads)
    return out


def structured_queries(b, n, heads, dh, seed):
    """Most tokens have nearly rank-1 head states (heads agree), a few have independent heads."""
    g = gen(seed)
    shared = torch.randn(b, n, 1, dh, generator=g) * torch.randn(b, n, heads, 1, generator=g)
    q = shared + 0.05 * torch.randn(b, n, heads, dh, generator=g)
    rich = torch.stack([torch.randperm(n, generator=g)[:6] for _ in range(b)])
    q[torch.arange(b)[:, None], rich] = torch.randn(b, 6, heads, dh, generator=g)
    return q, rich


@pytest.mark.parametrize("heads,dh", [(8, 16), (16, 4), (4, 4)])
@pytest.mark.parametrize("normalize", [False, True])
def test_entropy_dual_gram_matches_covariance(heads, dh, normalize):
    q, _ = structured_queries(2, 30, heads, dh, seed=heads)
    q = q * 3  # eigenvalues above and below 1, where the released (unnormalised) score and the normalised differ
    torch.testing.assert_close(entropy.entropy_scores(q, normalize), naive_entropy(q, normalize), rtol=0, atol=1e-9)


def test_released_and_normalised_entropy_pick_differently():
    q, _ = structured_queries(2, 40, 8, 16, seed=3)
    q = q * torch.rand(2, 40, 1, 1, generator=gen(4)) * 4  # token magnitudes vary, as real query states do
    feats = torch.zeros(2, 40, 4)
    released = entropy.entropy_select(SelectionInputs(features=feats, queries=q), 10)
    normalised = entropy.entropy_select(SelectionInputs(features=feats, queries=q), 10, normalize=True)
    assert not torch.equal(released, normalised)
    want = torch.sort(naive_entropy(q), dim=1, descending=True, stable=True).indices[:, :10].sort(dim=1).values
    assert torch.equal(released, want)


def test_entropy_select_top_k_and_batching():
    q, rich = structured_queries(3, 60, 8, 16, seed=0)
    feats = torch.zeros(3, 60, 4)
    got = entropy.entropy_select(SelectionInputs(features=feats, queries=q.half()), 6, normalize=True)
    for row in range(3):
        assert got[row].tolist() == sorted(rich[row].tolist())
        one = SelectionInputs(features=feats[row : row + 1], queries=q[row : row + 1].half())
        assert torch.equal(got[row], entropy.entropy_select(one, 6, normalize=True)[0])
    for normalize in (False, True):
        want = torch.sort(naive_entropy(q.half(), normalize), dim=1, descending=True, stable=True).indices[:, :20]
        assert torch.equal(
            entropy.entropy_select(SelectionInputs(features=feats, queries=q.half()), 20, normalize=normalize),
            want.sort(dim=1).values,
        )


def test_entropy_ties_go_to_earlier_tokens():
    q = torch.randn(1, 1, 4, 8, generator=gen(0)).expand(1, 10, 4, 8)
    assert entropy.entropy_select(SelectionInputs(features=torch.zeros(1, 10, 2), queries=q), 3).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize(
    "args,want",
    [
        ((32, 2, 576, 192), 166),
        ((32, 2, 576, 128), 98),
        ((32, 2, 576, 64), 29),
        ((32, 0, 576, 64), 64),
        ((28, 1, 1000, 100), 66),
        ((32, 2, 576, 30), 1),
        ((32, 2, 576, 576), 576),
        ((32, 2, 576, 128.5), 98),
    ],
)
def test_layer_average_keep(args, want):
    assert budgets.layer_average_keep(*args) == want


@pytest.mark.parametrize(
    "args", [(32, 32, 576, 64), (32, -1, 576, 64), (32, 2, 576, 0), (32, 2, 576, 600), (0, 0, 576, 64), (32, 2, 0, 1)]
)
def test_layer_average_keep_rejects(args):
    with pytest.raises(ValueError):
        budgets.layer_average_keep(*args)


def test_matrix_entropy_hand_cases():
    v = torch.randn(16, generator=gen(0))
    assert entropy.matrix_entropy(torch.randn(10, 1, generator=gen(1)) * v) == pytest.approx(0, abs=1e-9)
    basis = torch.eye(16)[:8]  # centred: 7 equal eigenvalues
    assert entropy.matrix_entropy(basis) == pytest.approx(math.log(7) / math.log(8), abs=1e-9)
    # A common offset and a global scale change nothing; iid tokens are close to isotropic.
    x = torch.randn(20, 12, generator=gen(2))
    assert entropy.matrix_entropy(x) > 0.8
    moved = x * 100 + torch.randn(12, generator=gen(4))
    assert entropy.matrix_entropy(moved) == pytest.approx(entropy.matrix_entropy(x), abs=1e-6)
    # Both sides of the Gram trick agree (N > D uses the D x D matrix).
    tall = torch.randn(40, 6, generator=gen(3))
    y = tall.double() - tall.double().mean(0)
    y = y / y.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(y @ y.T).clamp(min=0)
    p = lam[lam > 1e-12] / lam.sum()
    assert entropy.matrix_entropy(tall) == pytest.approx(float(-(p * p.log()).sum() / math.log(6)), abs=1e-9)
    with pytest.raises(ValueError):
        entropy.matrix_entropy(torch.randn(1, 5))


def test_collapse_layer():
    assert entropy.collapse_layer([0.9, 0.85, 0.8, 0.3, 0.28]) == 3
    assert entropy.collapse_layer([1.0, 0.5, 0.0]) == 1  # equal drops: the earliest
    assert entropy.collapse_layer([0.2, 0.5, 0.6, 0.1]) == 3
    with pytest.raises(ValueError):
        entropy.collapse_layer([0.5])


class FakeVLM(torch.nn.Module):
    """Hidden states whose visual tokens are full rank before hidden_states[collapse_at] and rank 2 from it on;
    text tokens do the opposite, so counting them would move the answer."""

    def __init__(self, layers=6, image_token_id=7, collapse_at=3):
        super().__init__()
        self.config = SimpleNamespace(image_token_id=image_token_id)
        self.layers, self.collapse_at, self.calls = layers, collapse_at, 0

    def forward(self, input_ids, pixel_values=None, output_hidden_states=False, **_):
        assert output_hidden_states
        self.calls += 1
        g = gen(int(input_ids.sum()))
        b, s = input_ids.shape
        visual = (input_ids == self.config.image_token_id)[..., None]
        states = []
        for layer in range(self.layers + 1):
            full = torch.randn(b, s, 32, generator=g)
            low = torch.randn(b, s, 2, generator=g) @ torch.randn(2, 32, generator=g)
            low = low + 0.01 * torch.randn(b, s, 32, generator=g)
            vis, txt = (full, low) if layer < self.collapse_at else (low, full)
            states.append(torch.where(visual, vis, txt))
        return SimpleNamespace(hidden_states=tuple(states))


def calibration_batches():
    ids = torch.full((2, 60), 3)
    ids[:, 5:45] = 7
    text_only = torch.full((1, 20), 3)
    return [{"input_ids": ids, "pixel_values": torch.zeros(2, 3)}, {"input_ids": text_only}]


def test_find_collapse_layer_and_cache():
    model = FakeVLM()
    ent = calibrate.layer_entropies(model, calibration_batches())
    assert len(ent) == 7 and min(ent[:3]) > max(ent[3:]) + 0.3
    assert calibrate.find_collapse_layer(model, calibration_batches()) == 3
    # The last hidden state (after the final norm) is not a candidate.
    late = FakeVLM(layers=4, collapse_at=4)
    assert calibrate.find_collapse_layer(late, calibration_batches(), cache=False) in (1, 2, 3)
    assert model._vtprune_collapse_layer == 3
    calls = model.calls
    assert calibrate.find_collapse_layer(model, []) == 3 and model.calls == calls  # cached, nothing run
    with pytest.raises(ValueError, match="image or video tokens"):
        calibrate.find_collapse_layer(model, [], cache=False)


# --------------------------------------------------------------------------------------------- debiasing


def planted_scores(b, n, sigma, boost, n_planted, seed):
    """Attention with an exponential recency trend, lognormal noise and planted salient tokens."""
    g = gen(seed)
    x = torch.arange(n) / n
    s = 1e-3 * torch.exp(sigma * x + 0.3 * torch.randn(b, n, generator=g))
    planted = torch.stack([torch.randperm(n, generator=g)[:n_planted] for _ in range(b)])
    s[torch.arange(b)[:, None], planted] *= boost
    return s, planted


def recall(index, planted):
    return sum(len(set(i.tolist()) & set(p.tolist())) for i, p in zip(index, planted)) / planted.numel()


def test_position_debias_recovers_planted_tokens():
    s, planted = planted_scores(6, 576, 2.5, 3.0, 24, seed=0)
    raw = recall(s.topk(24).indices, planted)
    fixed = recall(debias.debias_position(s).topk(24).indices, planted)
    assert fixed >= 0.75 and fixed > raw + 0.3
    _, slope = debias.fit_log_trend(s)
    assert (slope - 2.5).abs().max() < 0.3
    # The fit ignores padding marked invalid.
    pad = torch.zeros_like(s, dtype=torch.bool)
    pad[:, :100] = True
    _, slope_pad = debias.fit_log_trend(debias.zero_padding(s, pad), valid=~pad)
    assert (slope_pad - 2.5).abs().max() < 0.3


def test_position_curve_fit_save_load_and_resample(tmp_path):
    calib, _ = planted_scores(8, 576, 2.0, 3.0, 24, seed=1)
    curve = debias.fit_position_curve([calib[:3], calib[3]] + list(calib[4:]))
    assert curve.shape == (576,)
    assert math.log(curve[-1] / curve[0]) == pytest.approx(2.0, abs=0.2)
    path = tmp_path / "curve.json"
    debias.save_curve(path, curve)
    torch.testing.assert_close(debias.load_curve(path), curve)
    s, planted = planted_scores(4, 576, 2.0, 3.0, 24, seed=2)
    assert (
        recall(debias.debias_position(s, curve).topk(24).indices, planted) > recall(s.topk(24).indices, planted) + 0.2
    )
    # A curve fitted at another resolution is resampled exactly (it is an exponential).
    half = curve[::2].clone()
    torch.testing.assert_close(debias._resample_curve(half, 576), curve, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="same N"):
        debias.fit_position_curve([torch.rand(10), torch.rand(11)])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a vtprune position curve"):
        debias.load_curve(tmp_path / "other.json")


def test_suppress_sinks_rule():
    s, planted = planted_scores(2, 300, 0.0, 4.0, 10, seed=3)
    sinks = torch.tensor([[0, 1, 150], [5, 200, 299]])
    s[torch.arange(2)[:, None], sinks] = 1.0  # ~1000x the median
    out = debias.suppress_sinks(s)
    med = s.median(dim=1).values
    for row in range(2):
        assert torch.equal(out[row, sinks[row]], med[row].expand(3))
    untouched = torch.ones_like(s, dtype=torch.bool)
    untouched[torch.arange(2)[:, None], sinks] = False
    assert torch.equal(out[untouched], s[untouched])  # planted 4x tokens are not sinks
    flat = torch.full((1, 50), 0.02)
    flat[0, 7] = 0.1
    assert torch.equal(debias.suppress_sinks(flat), flat)  # min_ratio floor


def test_padding_helpers():
    pad = torch.zeros(2, 576, dtype=torch.bool)
    pad[0, :100] = True
    pad[1, -150:] = True
    assert debias.padding_cap(pad, 500) == 426
    assert debias.padding_cap(pad, 100) == 100
    assert debias.padding_cap(None, 64) == 64
    assert debias.padding_cap(torch.ones(1, 10, dtype=torch.bool), 5) == 1
    s = torch.rand(2, 576, generator=gen(0))
    z = debias.zero_padding(s, pad)
    assert (z[pad] == 0).all() and torch.equal(z[~pad], s[~pad])


def fastv_inputs(seed):
    s, planted = planted_scores(3, 576, 2.5, 3.0, 24, seed=seed)
    pad = torch.zeros(3, 576, dtype=torch.bool)
    pad[0, :96] = True
    pad[0, -96:] = True
    pad[1, :48] = True
    s[pad] = 5e-3  # padding patches still draw attention
    s[2, 10] = 1.0  # a sink
    return SelectionInputs(features=torch.zeros(3, 576, 4), attention=s, pad_mask=pad), planted


def test_fastv_debias_modes():
    inputs, planted = fastv_inputs(seed=4)
    s = inputs.attention
    plain = fastv_select(inputs, 24)
    assert torch.equal(plain, s.topk(24).indices.sort().values)  # default unchanged
    both = fastv_select(inputs, 24, debias="both")
    assert not inputs.pad_mask.gather(1, both).any()
    assert 10 not in both[2].tolist() and 10 in plain[2].tolist()
    assert recall(both, planted) > recall(plain, planted) + 0.3
    position = fastv_select(inputs, 24, debias="position")
    assert torch.equal(position, debias.debias_position(s).topk(24).indices.sort().values)
    assert 10 not in fastv_select(inputs, 24, debias="sink")[2].tolist()
    with pytest.raises(ValueError, match="'bogus'"):
        fastv_select(inputs, 24, debias="bogus")


def test_fastv_debias_curve_path_and_batching(tmp_path):
    inputs, _ = fastv_inputs(seed=5)
    curve = debias.fit_position_curve([inputs.attention])
    debias.save_curve(tmp_path / "c.json", curve)
    from_path = fastv_select(inputs, 24, debias="both", debias_curve=str(tmp_path / "c.json"))
    assert torch.equal(from_path, fastv_select(inputs, 24, debias="both", debias_curve=curve))
    for mode in (None, "position", "sink", "both"):
        batched = fastv_select(inputs, 24, debias=mode)
        for row in range(3):
            one = SelectionInputs(
                features=inputs.features[row : row + 1],
                attention=inputs.attention[row : row + 1],
                pad_mask=inputs.pad_mask[row : row + 1],
            )
            assert torch.equal(batched[row], fastv_select(one, 24, debias=mode)[0])


# --------------------------------------------------------------------------------------------- merging


def naive_merge(x, keep, sizes):
    n, k = x.shape[0], keep.numel()
    target = []
    for t in range(n):
        if t in keep.tolist():
            target.append(keep.tolist().index(t))
            continue
        sims = [float(torch.cosine_similarity(x[t].double(), x[j].double(), dim=0)) for j in keep.tolist()]
        target.append(max(range(k), key=lambda s: (sims[s], -s)))
    merged = torch.zeros(k, x.shape[1], dtype=torch.float64)
    total = torch.zeros(k, dtype=torch.float64)
    for t, slot in enumerate(target):
        merged[slot] += sizes[t] * x[t].double()
        total[slot] += sizes[t]
    return torch.tensor(target), merged / total[:, None], total


def test_merge_matches_naive_loop():
    x, objects = redundant_features(2, 60, 16, 4, seed=6)
    keep = divprune_select(SelectionInputs(features=x), 10).sort(dim=1).values
    sizes = torch.rand(2, 60, generator=gen(1)) + 0.5
    target = merge.assign_to_kept(x, keep)
    merged, total = merge.merge_pruned(x, keep, sizes)
    for row in range(2):
        t, m, tot = naive_merge(x[row], keep[row], sizes[row])
        assert torch.equal(target[row], t)
        torch.testing.assert_close(merged[row].double(), m, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(total[row].double(), tot, rtol=1e-6, atol=1e-6)
        one_m, one_t = merge.merge_pruned(x[row : row + 1], keep[row : row + 1], sizes[row : row + 1])
        torch.testing.assert_close(one_m[0], merged[row])
    assert torch.equal(merge.merge_pruned(x, keep)[1].sum(dim=1), torch.full((2,), 60.0))


def test_merge_kept_duplicates_keep_their_own_slot():
    x = torch.randn(1, 8, 4, generator=gen(0))
    x[0, 5] = x[0, 2]
    keep = torch.tensor([[1, 2, 5]])
    target = merge.assign_to_kept(x, keep)
    assert target[0, keep[0]].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        merge.assign_to_kept(x, keep[:, :0])
