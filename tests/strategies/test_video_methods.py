"""The video baselines against naive transcriptions of their published selection, on fixed random clips.

Each ``naive_*`` is written from the paper's description in plain loops and shares no code with
``vtprune.strategies``; the strategy, run as the engine runs it (``Method.select``, merge plans applied by
``vtprune.merge``), must keep the same tokens and, for merging methods, give the same rows.
"""

import math

import pytest
import torch

from vtprune.merge import apply_plan
from vtprune.strategies import SelectionInputs, get_method

T, H, W, D = 4, 3, 4, 12
P = H * W


def _clip(seed, static=()):
    """[1, T * P, D] tokens; the positions in ``static`` barely change from frame to frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, P, D, generator=g)
    for pos in static:
        x[:, pos] = x[0, pos] + 0.01 * torch.randn(T, D, generator=g)
    return x.reshape(1, T * P, D)


def _inputs(x, frames=T):
    return SelectionInputs(features=x, grid=[(H, W)], frames=[frames], kinds=["video"])


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _dist(a, b):
    return float((a - b).norm()) / D**0.5


def _largest_remainder(total, weights):
    quotas = [total * w / sum(weights) for w in weights]
    parts = [math.floor(q) for q in quotas]
    for i in sorted(range(len(weights)), key=lambda i: (-(quotas[i] - parts[i]), i))[: total - sum(parts)]:
        parts[i] += 1
    return parts


# ------------------------------------------------------------------------------------------- VidCom2


def naive_vidcom2(x, k, temperature):
    frames = [x[t * P : (t + 1) * P] for t in range(T)]
    clip = x.mean(0)
    means = [f.mean(0) for f in frames]
    u = [(1 - _cos(m, clip)) / temperature for m in means]
    weights = [math.exp(v - max(u)) for v in u]
    budgets, left, open_ = [0] * T, k, list(range(T))
    while left:
        for t, s in zip(list(open_), _largest_remainder(left, [weights[t] for t in open_])):
            take = min(s, P - budgets[t])
            budgets[t], left = budgets[t] + take, left - take
            if budgets[t] == P:
                open_.remove(t)
    kept = []
    for t, f in enumerate(frames):
        score = [(1 - _cos(tok, means[t])) + (1 - _cos(tok, clip)) for tok in f]
        kept += [t * P + i for i in sorted(range(P), key=lambda i: (-score[i], i))[: budgets[t]]]
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k,temperature", [(10, 0.01), (30, 0.1), (47, 1.0), (5, 0.05)])
def test_vidcom2_matches_its_description(seed, k, temperature):
    x = _clip(seed)
    picks = get_method("vidcom2").select(_inputs(x), k, temperature=temperature)
    assert picks[0].tolist() == naive_vidcom2(x[0], k, temperature)


# ------------------------------------------------------------------------------------------- FastVID, HoliTom


def naive_segments(x, threshold, cuts):
    means = [x[t * P : (t + 1) * P].mean(0) for t in range(T)]
    sims = [_cos(means[t], means[t + 1]) for t in range(T - 1)]
    bounds = {t + 1 for t in sorted(range(T - 1), key=lambda t: (sims[t], t))[:cuts]}
    bounds |= {t + 1 for t in range(T - 1) if sims[t] < threshold}
    edges = [0] + sorted(bounds) + [T]
    return list(zip(edges[:-1], edges[1:]))


def naive_peaks(x, pool, k, neighbours=5):
    """DPC-kNN over the tokens ``pool`` (indices into x): their density peaks, as indices into x."""
    if k >= len(pool):
        return list(pool)
    dist = {(i, j): _dist(x[i], x[j]) for i in pool for j in pool}
    m = max(1, min(neighbours, len(pool) - 1))
    density = {i: math.exp(-sum(d**2 for d in sorted(dist[i, j] for j in pool)[1 : m + 1]) / m) for i in pool}
    score = {}
    for i in pool:
        denser = [dist[i, j] for j in pool if density[j] > density[i]]
        score[i] = density[i] * (min(denser) if denser else max(dist[i, j] for j in pool))
    return sorted(sorted(pool, key=lambda i: (-score[i], pool.index(i)))[:k])


def naive_join(x, members, kept):
    """{kept token: the tokens (of ``members``) whose nearest kept token it is}, ties to the earlier kept token."""
    groups = {c: [] for c in kept}
    for i in members:
        c = min(kept, key=lambda c: (_dist(x[i], x[c]), kept.index(c))) if i not in kept else i
        groups[c].append(i)
    return groups


def naive_fastvid(x, k, threshold=0.9, cuts=7):
    segs = [(a * P, b * P) for a, b in naive_segments(x, threshold, cuts)]
    budgets = _largest_remainder(k, [b - a for a, b in segs])
    out = {}
    for (a, b), budget in zip(segs, budgets):
        if budget:
            out.update(naive_join(x, list(range(a, b)), naive_peaks(x, list(range(a, b)), budget)))
    return out


def naive_holitom(x, k, threshold=0.9, cuts=7, merge_threshold=0.8):
    segs = naive_segments(x, threshold, cuts)
    rep = list(range(T * P))
    candidates = []
    for a, b in segs:
        if b - a >= 2:
            for pos in range(P):
                red = min(_cos(x[f * P + pos], x[a * P + pos]) for f in range(a + 1, b))
                if red >= merge_threshold:
                    candidates.append((-red, a, pos, b))
    left = T * P
    for _, a, pos, b in sorted(candidates):
        if left - (b - a - 1) >= k:
            for f in range(a + 1, b):
                rep[f * P + pos] = a * P + pos
            left -= b - a - 1
    pools = [[i for i in range(a * P, b * P) if rep[i] == i] for a, b in segs]
    out = {}
    for pool, budget in zip(pools, _largest_remainder(k, [len(p) for p in pools])):
        if budget:
            for c, group in naive_join(x, pool, naive_peaks(x, pool, budget)).items():
                out[c] = [i for i in range(T * P) if rep[i] in group]
    return out


def _check_merge(method, x, k, want, **options):
    plan = get_method(method).select(_inputs(x), k, **options)
    rows, sizes = apply_plan(x, plan.keep, plan.target, plan.rule)
    assert plan.keep[0].tolist() == sorted(want)
    for slot, c in enumerate(sorted(want)):
        torch.testing.assert_close(rows[0, slot], x[0, want[c]].mean(0), rtol=1e-5, atol=1e-6)
        assert sizes[0, slot] == len(want[c])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k,threshold,cuts", [(12, 0.9, 7), (7, 0.0, 1), (20, 0.5, 0)])
def test_fastvid_matches_its_description(seed, k, threshold, cuts):
    x = _clip(seed)
    _check_merge("fastvid", x, k, naive_fastvid(x[0], k, threshold, cuts), threshold=threshold, cuts=cuts)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k,cuts", [(12, 0), (24, 1), (6, 3)])
def test_holitom_matches_its_description(seed, k, cuts):
    x = _clip(seed, static=(0, 5, 7))  # three positions static through the clip: merged over time first
    want = naive_holitom(x[0], k, -1.0, cuts)
    assert any(len(g) >= T for g in want.values()) or cuts == 3  # temporal merging really happened
    _check_merge("holitom", x, k, want, threshold=-1.0, cuts=cuts)


def test_segments_cut_where_frames_change():
    from vtprune.strategies.video import segments

    x = _clip(3).view(T, P, D)
    x[2:] = x[1] + 0.001  # frames 1, 2, 3 nearly the same
    assert segments(x, threshold=0.9, cuts=0) == [(0, 1), (1, 4)]
    assert segments(x, threshold=-1.0, cuts=1) == [(0, 1), (1, 4)]  # the least similar transition first
    assert segments(x, threshold=-1.0, cuts=0) == [(0, 4)]


# ------------------------------------------------------------------------------------------- DyCoke


def naive_dycoke(x, k, frames):
    """Windows of four frames: the second and fourth frames against the frame before, the third against the first;
    the first frames whole, the others sharing the rest equally, each keeping its positions least like its
    reference's. Under the first frames' total, those share k on an even raster and the others keep nothing."""
    refs = {}
    for w in range(0, frames, 4):
        for f, r in ((w + 1, w), (w + 2, w), (w + 3, w + 2)):
            if f < frames:
                refs[f] = r
    firsts = [f for f in range(frames) if f not in refs]
    kept = []
    if k < len(firsts) * P:
        for f, m in zip(firsts, _largest_remainder(k, [1] * len(firsts))):
            kept += [f * P + int((j + 0.5) * P / m) for j in range(m)]
        return sorted(kept)
    for f in firsts:
        kept += range(f * P, (f + 1) * P)
    pruned = sorted(refs)
    for f, m in zip(pruned, _largest_remainder(k - len(firsts) * P, [1] * len(pruned))):
        sims = [(_cos(x[f * P + p], x[refs[f] * P + p]), p) for p in range(P)]
        kept += [f * P + p for _, p in sorted(sims)[:m]]
    return sorted(kept)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("frames,k", [(4, 30), (4, 13), (4, 5), (6, 40), (6, 25), (6, 9), (2, 17)])
def test_dycoke_matches_its_description(seed, frames, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames * P, D, generator=g)
    picks = get_method("dycoke").select(_inputs(x, frames), k)
    assert picks[0].tolist() == naive_dycoke(x[0], k, frames)
