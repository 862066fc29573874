"""The round-3 baselines against naive transcriptions of their published selection, on fixed random tensors.

Each ``naive_*`` below is written the way the method's paper and released code describe it (index lists, Python
loops, one row at a time) and shares no code with ``vtprune.strategies``; the strategy, run as the engine runs it
(``Method.select``: checked output, merge plans applied by ``vtprune.merge``), must give the same tokens and, for
merging methods, the same rows.
"""

import itertools
import math

import pytest
import torch

from vtprune.capture import tower_attention
from vtprune.merge import apply_plan
from vtprune.strategies import SelectionInputs, get_method
from vtprune.strategies.pdrop import drop_layers, ratio_for_average

SEEDS = [0, 1, 2]


def _rand(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------------------- VisionZip


def naive_visionzip(hidden, cls_attention, keys, dominant_num, contextual_num):
    """VisionZip as released: the dominant patches by [CLS] attention (kept in sequence order), then among the
    rest every step-th is a target and the others join the target of most similar key; a contextual token is its
    target plus the mean of those that joined it. Returns {patch index: output row}."""
    n = hidden.shape[0]
    dominant = cls_attention.topk(dominant_num).indices.tolist()
    out = {i: hidden[i] for i in dominant}
    rest = [i for i in range(n) if i not in dominant]
    if contextual_num == 0:
        return out
    step = max(1, len(rest) // contextual_num)
    targets = [rest[j] for j in range(0, len(rest), step)][:contextual_num]
    joined = {t: [] for t in targets}
    for i in rest:
        if i in targets:
            continue
        sims = [_cos(keys[i], keys[t]) for t in targets]
        joined[targets[max(range(len(sims)), key=lambda j: (sims[j], -j))]].append(i)
    for t in targets:
        extra = torch.stack([hidden[i] for i in joined[t]]).mean(0) if joined[t] else torch.zeros_like(hidden[t])
        out[t] = hidden[t] + extra
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k", [(36, 12), (36, 32), (20, 3)])
def test_visionzip_matches_its_release(seed, n, k):
    hidden, keys = _rand(seed, 2, n, 16), _rand(seed + 10, 2, n, 8)
    attention = _rand(seed + 20, 2, n).softmax(-1)
    inputs = SelectionInputs(features=hidden, tower_attention=attention, tower_keys=keys, grid=[(6, 6)] * 2)
    plan = get_method("visionzip").select(inputs, k)
    rows, _ = apply_plan(hidden, plan.keep, plan.target, plan.rule)
    contextual = int(k * 5 / 32 + 0.5)
    for b in range(2):
        want = naive_visionzip(hidden[b], attention[b], keys[b], k - contextual, contextual)
        assert plan.keep[b].tolist() == sorted(want)
        torch.testing.assert_close(rows[b], torch.stack([want[i] for i in sorted(want)]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- VisPruner


def naive_vispruner(features, cls_attention, k, important_share=0.5):
    """VisPruner: the important patches by [CLS] attention; the rest of the budget from the other patches by
    removing duplicates in rounds: alternate tokens form two sets, the first set's tokens most similar to some
    token of the second leave (half of that set per round at most)."""
    important_num = min(k, math.floor(k * important_share + 0.5))
    important = cls_attention.topk(important_num).indices.tolist()
    residual = [i for i in range(features.shape[0]) if i not in important]
    while len(residual) > k - important_num:
        first, second = residual[0::2], residual[1::2]
        best = [max((_cos(features[a], features[b]) for b in second), default=-1.0) for a in first]
        remove = min(len(residual) - (k - important_num), max(1, len(first) // 2))
        ranked = sorted(range(len(first)), key=lambda j: -best[j])  # stable: ties keep the earlier token
        gone = {first[j] for j in ranked[:remove]}
        residual = [i for i in residual if i not in gone]
    return sorted(important + residual)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k", [(36, 12), (36, 30), (17, 4)])
def test_vispruner_matches_its_description(seed, n, k):
    features, attention = _rand(seed, 2, n, 16), _rand(seed + 5, 2, n).softmax(-1)
    inputs = SelectionInputs(features=features, tower_attention=attention, tower_keys=features, grid=[None] * 2)
    picks = get_method("vispruner").select(inputs, k)
    for b in range(2):
        assert picks[b].tolist() == naive_vispruner(features[b], attention[b], k)


# ------------------------------------------------------------------------------------------- DART


def naive_dart(hidden, keys, text, text_keys, k, image_pivots=4, text_pivots=4):
    """DART: pivots by the L1 norm of their keys (visual and instruction tokens); the visual pivots are kept and
    each pivot in turn (visual first, each group in sequence order) takes its share of the rest of the budget, the
    remaining visual tokens of lowest cosine similarity to it."""
    img = sorted(keys.abs().sum(-1).topk(min(image_pivots, k)).indices.tolist())
    txt = sorted(text_keys.abs().sum(-1).topk(min(text_pivots, text.shape[0])).indices.tolist())
    pivots = [hidden[i] for i in img] + [text[i] for i in txt]
    kept, valid = list(img), [i for i in range(hidden.shape[0]) if i not in img]
    left = k - len(kept)
    for p, vector in enumerate(pivots):
        share = left // len(pivots) + (1 if p < left % len(pivots) else 0)
        ranked = sorted(valid, key=lambda i: (_cos(vector, hidden[i]), i))[:share]
        kept += ranked
        valid = [i for i in valid if i not in ranked]
    return sorted(kept)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,k,t", [(30, 10, 7), (30, 27, 3), (12, 4, 9)])
def test_dart_matches_its_release(seed, n, k, t):
    hidden, keys = _rand(seed, 2, n, 16), _rand(seed + 1, 2, n, 12)
    text, text_keys = _rand(seed + 2, 2, t, 16), _rand(seed + 3, 2, t, 12)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, :2] = False  # the second row's instruction is two tokens shorter (left padding)
    inputs = SelectionInputs(features=hidden, keys=keys, text=text, text_keys=text_keys, text_mask=mask)
    picks = get_method("dart").select(inputs, k)
    for b in range(2):
        want = naive_dart(hidden[b], keys[b], text[b][mask[b]], text_keys[b][mask[b]], k)
        assert picks[b].tolist() == want


# ------------------------------------------------------------------------------------------- CDPruner


def naive_greedy_dpp(kernel, k):
    """Greedy MAP of a DPP by definition: each step adds the item that makes the chosen submatrix's determinant
    largest."""
    chosen = []
    for _ in range(k):
        rest = [j for j in range(kernel.shape[0]) if j not in chosen]
        dets = [float(torch.linalg.det(kernel[chosen + [j]][:, chosen + [j]])) for j in rest]
        chosen.append(rest[max(range(len(rest)), key=lambda i: (dets[i], -i))])
    return chosen


def naive_cdpruner(visual, text, k, theta):
    """CDPruner: L = diag(q) S diag(q), S the cosine similarities of the visual tokens, q = exp(theta * r), r the
    mean cosine similarity to the instruction tokens, min-max normalised."""
    n = visual.shape[0]
    r = torch.tensor([sum(_cos(visual[i], text[j]) for j in range(text.shape[0])) / text.shape[0] for i in range(n)])
    r = (r - r.min()) / (r.max() - r.min())
    q = torch.exp(theta * r.double())
    kernel = torch.tensor([[q[i] * _cos(visual[i], visual[j]) * q[j] for j in range(n)] for i in range(n)])
    return naive_greedy_dpp(kernel.double(), k)


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_map_adds_the_largest_determinant(seed):
    from vtprune.strategies.cdpruner import greedy_map

    x = _rand(seed, 14, 20, dtype=torch.float64)
    kernel = x @ x.T
    assert greedy_map(kernel, 7).tolist() == naive_greedy_dpp(kernel, 7)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("theta", [0.5, 1.0, 3.0])  # at 0 the kernel's diagonal is all ones: a tie by rounding
def test_cdpruner_matches_its_definition(seed, theta):
    visual, text = _rand(seed, 1, 12, 24), _rand(seed + 7, 1, 5, 24)
    inputs = SelectionInputs(features=visual, text=text, text_mask=torch.ones(1, 5, dtype=torch.bool))
    picks = get_method("cdpruner").select(inputs, 5, theta=theta)
    assert picks[0].tolist() == sorted(naive_cdpruner(visual[0], text[0], 5, theta))


# ------------------------------------------------------------------------------------------- PyramidDrop


def naive_layer_average(layers, num_layers, ratio):
    """The share of the visual tokens a decoder layer holds, averaged over the layers, counted layer by layer."""
    held, share = [], 1.0
    for layer in range(num_layers):
        if layer in layers:
            share *= ratio
        held.append(share)
    return sum(held) / num_layers


@pytest.mark.parametrize("num_layers,drops", [(32, 3), (28, 3), (6, 2), (4, 3)])
@pytest.mark.parametrize("target", [0.25, 0.5, 0.8])
def test_pdrop_lambda_gives_the_asked_layer_average(num_layers, drops, target):
    layers = drop_layers(num_layers, drops)
    assert layers == sorted(set(layers)) and all(0 < x < num_layers for x in layers)
    if num_layers == 32 and drops == 3:
        assert layers == [8, 16, 24]  # the released LLaVA-1.5 schedule
    if naive_layer_average(layers, num_layers, 0.0) > target:  # the layers before the first drop hold it all
        with pytest.raises(ValueError, match=f"at least {naive_layer_average(layers, num_layers, 0.0):.3f}"):
            ratio_for_average(layers, num_layers, target)
        return
    ratio = ratio_for_average(layers, num_layers, target)
    assert naive_layer_average(layers, num_layers, ratio) == pytest.approx(target, abs=1e-9)


def test_pdrop_ranks_by_the_last_instruction_tokens_attention():
    attention = _rand(3, 2, 25).softmax(-1)
    picks = get_method("pdrop").select(SelectionInputs(features=_rand(4, 2, 25, 8), attention=attention), 9)
    for b in range(2):
        assert picks[b].tolist() == sorted(attention[b].topk(9).indices.tolist())


# ------------------------------------------------------------------------------------------- tower attention


def naive_tower_attention(query, key, scaling, cls):
    """The attention each token receives, mean over heads: the [CLS] row, or the mean of all rows."""
    probs = ((query @ key.transpose(-1, -2)) * scaling).softmax(-1)  # [B, H, T, T]
    return (probs[:, :, 0] if cls else probs.mean(2)).mean(1)


@pytest.mark.parametrize("cls,block", [(1, 256), (0, 256), (0, 3)])
def test_tower_attention_is_the_cls_row_or_the_column_mean(cls, block):
    query, key = _rand(0, 2, 4, 10, 8), _rand(1, 2, 4, 10, 8)
    got = tower_attention(query, key, 8**-0.5, cls, block=block)
    torch.testing.assert_close(got, naive_tower_attention(query, key, 8**-0.5, cls), rtol=1e-5, atol=1e-6)


def test_every_baseline_is_registered():
    for name in ("visionzip", "vispruner", "dart", "pdrop", "cdpruner"):
        assert get_method(name).description
    assert list(itertools.islice(SEEDS, 1)) == [0]
