"""The core's contracts beyond exactness: one declaration per method, per-call state per thread, copies, misuse."""

import copy
import io
import pickle
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from helpers import cached_model, cached_processor, make_batch
from vtprune import flops
from vtprune.strategies import SelectionInputs
from vtprune.testing import FAMILIES, image_prompt, tiny_batch, tiny_images, tiny_model

COST_PER_TOKEN = 1000


@pytest.fixture
def corner_method():
    """A method registered from outside the package with one decorator: keeps the tokens nearest the top-left
    corner of the grid, and declares a scoring cost of COST_PER_TOKEN FLOPs per visual token."""

    @vtprune.register("test_corner", needs=("grid",), flops=lambda shape, scale=1.0: COST_PER_TOKEN * shape.n)
    def corner(inputs: SelectionInputs, k: int, scale: float = 1.0) -> torch.Tensor:
        """Tokens by distance from the top-left corner. features [batch, N, D] -> [batch, k]."""
        n = inputs.num_tokens
        rows = []
        for r in range(inputs.batch):
            h, w = inputs.grid[r] if inputs.grid and inputs.grid[r] else (1, n)
            idx = torch.arange(n)
            dist = (idx // w) ** 2 + (idx % w) ** 2 * scale
            rows.append(torch.sort(dist, stable=True).indices[:k])
        return torch.stack(rows).to(inputs.features.device)

    yield "test_corner"
    vtprune.unregister("test_corner")


@torch.no_grad()
def test_a_method_registered_outside_the_package_works_everywhere(corner_method):
    model, proc = cached_model("llava", "sdpa"), cached_processor("llava")
    batch = make_batch("llava", 2)
    assert corner_method in vtprune.list_methods()
    vtprune.apply_pruner(model, method=corner_method, keep_tokens=5, scale=2.0)
    try:
        model(**batch)
        stats = vtprune.get_stats(model)
        counted = flops.count_prefill(model, batch, stats)
    finally:
        vtprune.remove_pruner(model)
    # 4x4 grid, row² + 2·col²: 0 (0), 4 (1), 1 (2), 5 (3), 8 (4) — the option reached the strategy (scale=1 would
    # tie 2 with 8 and keep 2).
    assert stats[0]["kept_indices"].tolist() == [[0, 1, 4, 5, 8]] * 2
    assert counted["scoring"] == 2 * COST_PER_TOKEN * 16
    with pytest.raises(ValueError, match="option scale='x'"):
        vtprune.apply_pruner(model, method=corner_method, scale="x")

    from vtprune.demo import compare

    image = tiny_images(1)[0]
    c = compare(
        model,
        proc,
        image,
        "what colour is the circle ?",
        method=corner_method,
        keep_tokens=4,
        prompt=image_prompt("llava"),
        max_new_tokens=2,
    )
    assert c.pruned.visual_tokens == 4 and c.stats[0]["method"] == corner_method
    assert c.pruned.prefill_flops < c.original.prefill_flops

    from vtprune.eval import harness

    rows = harness.run_embedded(
        ["llava-tiny-sortofclevr"], [corner_method], [100, 25], limit=4, batch_size=4, progress=False
    )
    pruned = [r for r in rows if r["method"] == corner_method]
    assert len(pruned) == 1 and pruned[0]["kept_tokens"] == 36 and pruned[0]["flops_ratio"] < 1


def test_registration_refuses_what_the_engine_cannot_provide():
    with pytest.raises(ValueError, match="unknown needs \\['depth'\\]"):
        vtprune.register("test_depth", needs=("depth",))
    with pytest.raises(ValueError, match="needs a default"):
        vtprune.register("test_nodefault")(lambda inputs, k, alpha: None)
    assert "test_depth" not in vtprune.list_methods() and "test_nodefault" not in vtprune.list_methods()


@torch.no_grad()
def test_text_need_receives_the_text_hidden_states():
    seen = {}

    @vtprune.register("test_text", needs=("text",))
    def first_k(inputs: SelectionInputs, k: int) -> torch.Tensor:
        seen["text"], seen["mask"] = inputs.text, inputs.text_mask
        return torch.arange(k).expand(inputs.batch, k)

    model = cached_model("qwen2_vl", "sdpa")
    # Same image size (one strategy call for both rows), questions of different lengths (left padding).
    batch = tiny_batch("qwen2_vl", cached_processor("qwen2_vl"), tiny_images(2, sizes=[(28, 42)] * 2))
    lm_in = {}
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: lm_in.update(k), with_kwargs=True, prepend=True
    )
    try:
        vtprune.apply_pruner(model, method="test_text", keep_ratio=0.5)
        model(**batch)
    finally:
        h.remove()
        vtprune.remove_pruner(model)
        vtprune.unregister("test_text")
    # The instruction: the text after the image (the chat template's question and the assistant's turn).
    vis = batch["input_ids"] == model.config.image_token_id
    after = torch.arange(vis.shape[1]) > torch.where(vis, torch.arange(vis.shape[1]), -1).amax(1, keepdim=True)
    text = after & batch["attention_mask"].bool()
    for r in range(2):
        want = lm_in["inputs_embeds"][r][text[r]]
        assert torch.equal(seen["text"][r][seen["mask"][r]], want)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(method="random", seed="1"),
            "option seed='1' of method 'random' is not allowed; expected an integer or None",
        ),
        (dict(method="fastv", debias="loud"), "option debias='loud'.*one of None, 'position', 'sink', 'both'"),
        (dict(method="zoo", m=0), "option m=0 of method 'zoo' is not allowed; expected an integer >= 1"),
        (dict(method="zoo", h=-0.1), "option h=-0.1 of method 'zoo' is not allowed; expected a number > 0"),
        (dict(method="divprune", keep_newlines=1), "keep_newlines=1.*True or False"),
        (dict(schedule=[{"method": "pool", "options": "fast"}]), "options must be a dict, got 'fast'"),
        (dict(method="pool", schedule=[{"method": "random"}]), "schedule= replaces.*\\['method'\\]"),
        (dict(keep_ratio=0.5, schedule=[{"method": "random"}]), "schedule= replaces.*\\['keep_ratio'\\]"),
        (dict(method=3), "method must be a method name"),
    ],
)
def test_every_option_is_checked_when_applied(kwargs, match):
    model = cached_model("llava", "sdpa")
    with pytest.raises(ValueError, match=match):
        vtprune.apply_pruner(model, **kwargs)
    assert not vtprune.is_patched(model)


def test_config_validates_when_constructed():
    with pytest.raises(ValueError, match="option m=2.5"):
        vtprune.PrunerConfig(method="zoo", options={"m": 2.5})
    with pytest.raises(ValueError, match="positions must be one of"):
        vtprune.PrunerConfig(positions="shuffled")
    assert vtprune.PrunerConfig(method="zoo", options={"m": 8}).stages()[0].options["m"] == 8


# --------------------------------------------------------------------------------------------- threads


def _in_threads(work, n: int) -> list:
    """Run work(0..n-1) in n threads; the exceptions they raised (an error in a thread must fail the test, not
    vanish)."""
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def _generate_and_keep(model, batch):
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    return out, vtprune.get_stats(model)[0]["kept_indices"].clone()


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,layer", [("divprune", 0), ("fastv", 2), ("visionzip", None)])
def test_threads_on_one_patched_model_do_not_see_each_other(family, method, layer):
    model = tiny_model(family)  # its own instance: other tests share the cached ones
    proc = cached_processor(family)
    # Each thread its own images, sizes and batch size, so any mixing of state shows up.
    batches = [tiny_batch(family, proc, tiny_images(1 + t % 2, seed=10 + t)) for t in range(4)]
    vtprune.apply_pruner(model, method=method, keep_ratio=0.4, layer=layer)
    want = [[_generate_and_keep(model, batches[t]) for _ in range(3)] for t in range(4)]
    got = [[None] * 3 for _ in range(4)]
    start = threading.Barrier(4)

    def work(t):
        start.wait()
        for i in range(3):
            got[t][i] = _generate_and_keep(model, batches[t])

    errors = _in_threads(work, 4)
    vtprune.remove_pruner(model)
    assert not errors, errors
    for t in range(4):
        for i in range(3):
            assert torch.equal(got[t][i][0], want[t][i][0]) and torch.equal(got[t][i][1], want[t][i][1])


@torch.no_grad()
def test_get_stats_is_the_calling_threads_last_call():
    model = tiny_model("llava")
    small, large = make_batch("llava", 1), make_batch("llava", 2)
    vtprune.apply_pruner(model, method="pool", keep_tokens=3)
    model(**large)
    other = threading.Thread(target=lambda: model(**small))
    other.start()
    other.join()
    assert len(vtprune.get_stats(model)[0]["tokens_before"]) == 2  # not the other thread's batch of 1


def test_compare_from_several_threads():
    from vtprune.demo import compare

    model, proc = tiny_model("qwen2_vl"), cached_processor("qwen2_vl")
    images = tiny_images(3, seed=5)
    results = [None] * 3

    def work(i):
        results[i] = compare(
            model,
            proc,
            images[i],
            "what shape is the square ?",
            method="pool",
            keep_tokens=2,
            prompt=image_prompt("qwen2_vl"),
            max_new_tokens=2,
        )

    errors = _in_threads(work, 3)
    assert not errors, errors
    alone = compare(
        model,
        proc,
        images[1],
        "what shape is the square ?",
        method="pool",
        keep_tokens=2,
        prompt=image_prompt("qwen2_vl"),
        max_new_tokens=2,
    )
    assert results[1].pruned.text == alone.pruned.text and results[1].original.text == alone.original.text
    assert not vtprune.is_patched(model)


# --------------------------------------------------------------------------------------------- copies


@torch.no_grad()
def test_deepcopy_gives_an_independent_patched_copy():
    model = tiny_model("llava")
    batch, other = make_batch("llava", 2), make_batch("llava", 1, seed=3)
    vtprune.apply_pruner(model, method="divprune", keep_ratio=0.3)
    before = model.generate(**batch, max_new_tokens=4, do_sample=False)
    clone = copy.deepcopy(model)
    clone.lm_head.weight.mul_(-1)  # the copy's own weights must drive the copy's generate()
    mine = clone.generate(**other, max_new_tokens=4, do_sample=False)
    # Reference: the same weights patched afresh.
    ref_model = tiny_model("llava")
    ref_model.lm_head.weight.data.mul_(-1)
    vtprune.apply_pruner(ref_model, method="divprune", keep_ratio=0.3)
    assert torch.equal(mine, ref_model.generate(**other, max_new_tokens=4, do_sample=False))
    assert vtprune.get_stats(clone)[0]["tokens_before"] == [16]
    assert vtprune.get_stats(model)[0]["tokens_before"] == [16, 16]  # the original's own last call
    vtprune.remove_pruner(clone)
    assert vtprune.is_patched(model) and torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), before)
    vtprune.remove_pruner(model)
    assert not model._forward_pre_hooks and not model.model.language_model._forward_pre_hooks


def test_pickling_a_patched_model_names_remove_pruner():
    model = tiny_model("qwen2_vl")
    vtprune.apply_pruner(model, method="random")
    with pytest.raises(TypeError, match="remove_pruner"):
        torch.save(model, io.BytesIO())
    with pytest.raises(TypeError, match="remove_pruner"):
        pickle.dumps(model)
    vtprune.remove_pruner(model)
    torch.save(model, io.BytesIO())  # restored models save as usual


# --------------------------------------------------------------------------------------------- ZOO weights


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_zoo_scores_with_the_projector_weights_at_call_time(family):
    model = tiny_model(family)
    batch = make_batch(family, 2)
    vtprune.apply_pruner(model, method="zoo", keep_ratio=0.3, m=4)
    pruner = vtprune.get_pruner(model)
    assert pruner.projector() is pruner.adapter.projector_mlp()  # float32: no copy at all
    model(**batch)
    first = vtprune.get_stats(model)[0]["kept_indices"]
    torch.manual_seed(1)
    for p in pruner.adapter.projector_mlp().parameters():
        p.copy_(torch.randn_like(p) * p.abs().mean())
    model(**batch)
    after = vtprune.get_stats(model)[0]["kept_indices"]
    fresh = tiny_model(family)
    fresh.load_state_dict(model.state_dict())
    vtprune.apply_pruner(fresh, method="zoo", keep_ratio=0.3, m=4)
    fresh(**batch)
    assert torch.equal(after, vtprune.get_stats(fresh)[0]["kept_indices"])
    assert not torch.equal(after, first)


@torch.no_grad()
def test_zoo_scores_a_half_precision_projector_with_its_current_weights_however_they_change():
    """The float32 projector a bfloat16 model's zoo scores through follows every kind of weight change, the ones
    a version counter misses (writes through ``.data``, a swapped ``.data``) included, and copies the projector
    alone, not the model its capture hook belongs to."""
    model = tiny_model("llava").to(torch.bfloat16)
    vtprune.apply_pruner(model, method="zoo")
    pruner, live = vtprune.get_pruner(model), vtprune.get_pruner(model).adapter.projector_mlp()
    try:
        first = pruner.projector()
        assert next(first.parameters()).dtype == torch.float32
        assert sum(p.numel() for p in first.parameters()) == sum(p.numel() for p in live.parameters())
        live.linear_1.weight.data.mul_(2)  # in place through .data: no version bump
        torch.testing.assert_close(pruner.projector().linear_1.weight, live.linear_1.weight.float())
        live.linear_2.weight.data = torch.ones_like(live.linear_2.weight)  # a new tensor behind the parameter
        assert bool((pruner.projector().linear_2.weight == 1).all())
    finally:
        vtprune.remove_pruner(model)


# --------------------------------------------------------------------------------------------- misuse


def _square_with_band(top: int, bottom: int, size: int = 28):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    arr[:top] = 128  # the processor's pad colour (the image mean, 0.5)
    if bottom:
        arr[size - bottom :] = 128
    return Image.fromarray(arr)


@torch.no_grad()
@pytest.mark.parametrize("top,bottom,capped", [(14, 0, False), (7, 0, False), (7, 14, False), (7, 7, True)])
def test_sink_debias_only_caps_pad_to_square_geometry(top, bottom, capped):
    """A square image has no pad-to-square border: a band of the mean colour on one side (or two unequal bands)
    is content and keeps the whole budget; equal bands on opposite sides look exactly like padding."""
    model = cached_model("llava", "sdpa")
    batch = tiny_batch("llava", cached_processor("llava"), [_square_with_band(top, bottom)])
    vtprune.apply_pruner(model, method="fastv", layer=1, keep_tokens=16, debias="sink")
    try:
        model(**batch)
        kept = vtprune.get_stats(model)[0]["tokens_after"][0]
    finally:
        vtprune.remove_pruner(model)
    assert kept == (8 if capped else 16)


@torch.no_grad()
def test_find_collapse_layer_on_a_patched_model():
    from vtprune import calibrate

    model = tiny_model("llava")
    batches = [make_batch("llava", 2), make_batch("llava", 1, seed=4)]
    want = calibrate.layer_entropies(model, batches)
    vtprune.apply_pruner(model, method="divprune", keep_ratio=0.25)
    assert calibrate.layer_entropies(model, batches) == want
    calibrate.find_collapse_layer(model, batches)
    model(**batches[0])  # still pruning after calibration
    assert vtprune.get_stats(model)[0]["tokens_after"] == [4, 4]


@torch.no_grad()
def test_inputs_embeds_only_prefill_warns_once():
    model = tiny_model("llava")
    batch = make_batch("llava", 1)
    vtprune.apply_pruner(model, method="pool", keep_tokens=4)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    hits = [w for w in caught if "nothing was pruned" in str(w.message)]
    assert len(hits) == 1


@torch.no_grad()
def test_readme_add_your_own_method_runs():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Add your own method", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0]
    model = tiny_model("llava")
    try:
        exec(code, {"model": model})
        model(**make_batch("llava", 1))
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.unregister("l2")
    assert stats["method"] == "l2" and stats["tokens_after"] == [4]


@torch.no_grad()
def test_a_method_of_your_own_may_return_a_merge_plan():
    """A method registered from outside with ``merges=True`` returns ``strategies.Merged``: the language model gets,
    at each kept token's place, the mean of the tokens the plan joins to it (here: pairs of neighbours)."""
    from vtprune.patches import get_adapter
    from vtprune.strategies import Merged

    @vtprune.register("test_pairs", merges=True)
    def pairs(inputs: SelectionInputs, k: int) -> Merged:
        """Tokens 0, 2, 4, ... each with its right neighbour merged in; the rest dropped. -> Merged plan."""
        b, n = inputs.batch, inputs.num_tokens
        idx = torch.arange(min(2 * k, n), device=inputs.features.device)
        target = torch.full((b, n), -1, dtype=torch.long, device=idx.device)
        target[:, idx] = idx // 2
        return Merged((torch.arange(k, device=idx.device) * 2).expand(b, -1), target, rule="mean")

    model = cached_model("llava", "sdpa")
    batch = make_batch("llava", 1)
    lm, seen = model.model.language_model, {}
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(full=k["inputs_embeds"]), with_kwargs=True)
    model(**batch)
    handle.remove()
    try:
        vtprune.apply_pruner(model, method="test_pairs", keep_ratio=0.25)
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(pruned=k["inputs_embeds"]), with_kwargs=True)
        model(**batch)
        handle.remove()
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.remove_pruner(model)
        vtprune.unregister("test_pairs")
    vis = get_adapter(model).visual_mask(batch["input_ids"])[0]
    at = vis.nonzero().flatten()
    k = stats.tokens_after[0]
    assert stats.merged and k == int(len(at) * 0.25 + 0.5)
    want = seen["full"][0, at[: 2 * k]].view(k, 2, -1).mean(1)
    first = int(at[0])  # the text before the image is unchanged, so the kept tokens start at the same place
    torch.testing.assert_close(seen["pruned"][0, first : first + k], want, rtol=0, atol=1e-6)
