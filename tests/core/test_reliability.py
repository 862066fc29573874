"""Inputs that used to run silently wrong or crash with a message that did not say what to do: malformed strategy
outputs, budgets on any grid, option values that must be refused, misuse of apply_pruner, inputs users hold."""

import io
import math
import typing

import numpy as np
import pytest
import torch

import vtprune
from helpers import cached_model, cached_processor, make_batch, make_video_batch
from vtprune.strategies import SelectionInputs, get_method
from vtprune.strategies.base import RESERVED_OPTIONS
from vtprune.strategies.baselines import _grid_subsample_uncached
from vtprune.testing import tiny_images, tiny_videos

# --------------------------------------------------------------------------------------------- strategy outputs

BROKEN = {
    "duplicates": (lambda k, n, b: torch.zeros(b, k, dtype=torch.long), "index 0 twice in row 0"),
    "one_short": (lambda k, n, b: torch.arange(k - 1).expand(b, -1), r"shape \[2, 2\]"),
    "one_over": (lambda k, n, b: torch.arange(k + 1).expand(b, -1), r"shape \[2, 4\]"),
    "out_of_range": (lambda k, n, b: torch.arange(n - k + 1, n + 1).expand(b, -1), "index 16 in row 0, out of range"),
    "negative": (lambda k, n, b: torch.arange(-1, k - 1).expand(b, -1), "index -1 in row 0, out of range"),
    "float": (lambda k, n, b: torch.arange(k).float().expand(b, -1), "torch.float32 indices"),
    "bool": (lambda k, n, b: torch.ones(b, n, dtype=torch.bool), "torch.bool indices"),
    "list": (lambda k, n, b: [list(range(k))] * b, "list, not a tensor"),
    "none": (lambda k, n, b: None, "NoneType, not a tensor"),
    "flat": (lambda k, n, b: torch.arange(k), r"shape \[3\]"),
}


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_malformed_strategy_output_is_refused_by_name(name):
    make, message = BROKEN[name]

    @vtprune.register("test_broken")
    def broken(inputs: SelectionInputs, k: int) -> torch.Tensor:
        return make(k, inputs.num_tokens, inputs.batch)

    model = cached_model("llava", "sdpa")
    try:
        vtprune.apply_pruner(model, method="test_broken", keep_tokens=3)
        with pytest.raises(RuntimeError, match=f"method 'test_broken' returned .*{message}"):
            model(**make_batch("llava", 2))
    finally:
        vtprune.remove_pruner(model)
        vtprune.unregister("test_broken")


def test_the_check_passes_good_output_in_any_order_and_integer_type():
    inputs = SelectionInputs(features=torch.zeros(2, 6, 4))

    @vtprune.register("test_reversed")
    def reversed_picks(inputs: SelectionInputs, k: int) -> torch.Tensor:
        return torch.arange(k, dtype=torch.int32).flip(0).expand(inputs.batch, -1)

    try:
        picks = get_method("test_reversed").select(inputs, 3)
    finally:
        vtprune.unregister("test_reversed")
    assert picks.dtype == torch.long and picks.tolist() == [[0, 1, 2]] * 2


# --------------------------------------------------------------------------------------------- budgets on any grid


def test_grid_subsample_keeps_exactly_k_distinct_tokens_on_every_grid_up_to_32():
    for height in range(1, 33):
        for width in range(1, 33):
            n = height * width
            for k in range(n + 1):
                picks = _grid_subsample_uncached(height, width, k).numpy()
                assert picks.size == k and np.unique(picks).size == k, (height, width, k)
                assert k == 0 or 0 <= picks[0] and picks[-1] < n, (height, width, k)


# --------------------------------------------------------------------------------------------- option values


def _numeric_options():
    """(method, option, kind) for every int / float option of every registered method, from its annotation."""
    out = []
    for name in vtprune.list_methods():
        method = get_method(name)
        for option, hint in method.types.items():
            names = {getattr(a, "__name__", "") for a in typing.get_args(hint)} | {getattr(hint, "__name__", "")}
            flat = repr(hint)
            kind = (
                "float" if "float" in names or "float" in flat else "int" if "int" in names or "int" in flat else None
            )
            if kind:
                out.append((name, option, kind))
    return out


@pytest.mark.parametrize("method,option,kind", _numeric_options())
def test_non_finite_and_out_of_64_bit_numbers_are_refused_for_every_numeric_option(method, option, kind):
    model = cached_model("llava", "sdpa")
    bad = [math.nan, math.inf, -math.inf] if kind == "float" else [2**70, -(2**70)]
    for value in bad:
        with pytest.raises(ValueError, match=f"option {option}=.* of method '{method}' is not allowed"):
            vtprune.apply_pruner(model, method=method, **{option: value})
        assert not vtprune.is_patched(model)


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(method="zoo_stable", m=0), "option m=0 of method 'zoo_stable'.*>= 1"),
        (dict(method="zoo_stable", h=0.0), "option h=0.0 of method 'zoo_stable'.*> 0"),
        (dict(method="divprune_stable", quantum=-1.0), "quantum=-1.0.*>= 0"),
        (dict(method="divprune_stable", margin=1.0), "margin=1.0.*>= 0 and < 1"),
        (dict(method="divprune_stable", cells=0), "cells=0.*>= 1"),
        (dict(method="random", seed=2**70), "seed=.*integer within 64 bits"),
        (dict(method="fastv", debias="position", debias_curve=torch.tensor([1.0, -1.0])), "finite and positive"),
        (dict(method=""), "unknown method ''"),
        (
            dict(method="pool", video_keep_ratio=0.2),
            "video_keep_ratio was given, but LlavaForConditionalGeneration takes no videos",
        ),
    ],
)
def test_values_that_would_fail_at_the_first_forward_are_refused_when_applied(settings, match):
    model = cached_model("llava", "sdpa")
    with pytest.raises(ValueError, match=match):
        vtprune.apply_pruner(model, **settings)
    assert not vtprune.is_patched(model)


@pytest.mark.parametrize("option", RESERVED_OPTIONS)
def test_an_option_named_like_an_engine_option_or_keyword_is_refused_at_register(option):
    fn = eval(f"lambda inputs, k, {option}=False: None")  # a strategy with that one option
    with pytest.raises(ValueError, match=f"may not be called '{option}'"):
        vtprune.register("test_reserved")(fn)
    assert "test_reserved" not in vtprune.list_methods()


def test_reserved_names_are_apply_pruners_keywords_and_the_engine_options():
    import inspect

    from vtprune.strategies.base import ENGINE_OPTIONS

    keywords = {p for p in inspect.signature(vtprune.apply_pruner).parameters if p != "options"}
    assert set(RESERVED_OPTIONS) == keywords | set(ENGINE_OPTIONS) | {"options"}


@torch.no_grad()
def test_numpy_scalars_are_taken_wherever_python_numbers_are():
    model = cached_model("llava", "sdpa")
    batch = make_batch("llava", 2)
    vtprune.apply_pruner(
        model,
        method="zoo",
        keep_tokens=np.int64(5),
        layer=np.int32(0),
        m=np.int64(4),
        h=np.float32(0.01),
        merge=np.bool_(False),
    )
    try:
        model(**batch)
        cfg = vtprune.get_config(model)
        assert type(cfg.stages()[0].options["m"]) is int and vtprune.get_stats(model)[0].tokens_after == [5, 5]
    finally:
        vtprune.remove_pruner(model)


def test_debias_curve_takes_a_tensor_or_a_saved_file(tmp_path):
    from vtprune.strategies.debias import save_curve

    model = cached_model("llava", "sdpa")
    curve = torch.linspace(1.0, 3.0, 16)
    save_curve(tmp_path / "curve.json", curve)
    for given in (curve, str(tmp_path / "curve.json"), tmp_path / "curve.json"):
        vtprune.apply_pruner(model, method="fastv", debias="position", debias_curve=given, keep_ratio=0.5)
        try:
            with torch.no_grad():
                model(**make_batch("llava", 1))
        finally:
            vtprune.remove_pruner(model)
    with pytest.raises(FileNotFoundError):
        vtprune.apply_pruner(model, method="fastv", debias="position", debias_curve=str(tmp_path / "missing.json"))


def test_get_config_and_apply_pruner_copy_the_config():
    model = cached_model("llava", "sdpa")
    cfg = vtprune.PrunerConfig(method="random", keep_ratio=0.5, options={"seed": 1})
    vtprune.apply_pruner(model, config=cfg)
    try:
        cfg.options["seed"] = 2  # the caller's object is theirs
        got = vtprune.get_config(model)
        got.keep_ratio = 0.1
        assert vtprune.get_config(model).options == {"seed": 1} and vtprune.get_config(model).keep_ratio == 0.5
        assert vtprune.get_pruner(model).stages[0].keep_ratio == 0.5
    finally:
        vtprune.remove_pruner(model)


# --------------------------------------------------------------------------------------------- misuse


@pytest.mark.parametrize("thing", [None, object(), torch.nn.Linear(2, 2)])
def test_apply_pruner_on_something_that_is_not_a_vlm_says_so(thing):
    with pytest.raises((TypeError, NotImplementedError), match="Hugging Face vision-language model|model_type"):
        vtprune.apply_pruner(thing)


def test_an_offloaded_model_is_refused():
    from accelerate import cpu_offload

    from vtprune.testing import tiny_model

    model = cpu_offload(tiny_model("llava"))
    with pytest.raises(NotImplementedError, match="meta device.*offloaded"):
        vtprune.apply_pruner(model)
    assert not vtprune.is_patched(model)


@torch.no_grad()
def test_find_collapse_layer_on_video_only_batches():
    from vtprune.calibrate import layer_entropies

    model = cached_model("qwen2_5_vl", "sdpa")
    batch = cached_processor("qwen2_5_vl")(
        videos=tiny_videos(2),
        text=["USER: <|vision_start|> <|video_pad|> <|vision_end|> what moved ? ASSISTANT:"] * 2,
        return_tensors="pt",
        padding=True,
    )
    values = layer_entropies(model, [batch])
    assert len(values) == 5 and all(0 < v <= 1 for v in values)


# --------------------------------------------------------------------------------------------- what users hold


def test_demo_reads_images_in_the_forms_users_hold_them(tmp_path):
    from vtprune.demo import as_image

    img = tiny_images(1)[0]
    arr = np.array(img)
    img.save(tmp_path / "a.png")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    forms = [
        img,
        str(tmp_path / "a.png"),
        tmp_path / "a.png",
        buf.getvalue(),
        arr,
        torch.from_numpy(arr),
        torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
    ]
    for form in forms:
        assert np.array_equal(np.asarray(as_image(form)), arr), type(form)
    with pytest.raises(ValueError, match="cannot read an image from a dict"):
        as_image({})


@torch.no_grad()
def test_demo_compare_takes_a_path(tmp_path):
    from vtprune.demo import compare
    from vtprune.testing import image_prompt

    tiny_images(1)[0].save(tmp_path / "a.png")
    c = compare(
        cached_model("llava", "sdpa"),
        cached_processor("llava"),
        str(tmp_path / "a.png"),
        "what colour ?",
        method="pool",
        keep_tokens=4,
        prompt=image_prompt("llava"),
        max_new_tokens=1,
    )
    assert c.pruned.visual_tokens == 4


def test_every_listed_model_name_loads_everywhere_a_name_is_taken():
    from vtprune.demo import load_model
    from vtprune.eval import catalog
    from vtprune.eval.models import load_embedded

    for row in catalog.describe():
        for load in (load_embedded, load_model):
            model, processor = load(row["name"])
            assert type(model).__name__ == row["class"] and processor is not None


@torch.no_grad()
@pytest.mark.parametrize("method", ["pool", "temporal"])
def test_a_video_at_a_low_ratio_keeps_its_budget(method):
    """Grid subsampling of a 3-frame clip at 10 % (it kept 3 of 16 while the stats said 2)."""
    model = cached_model("qwen2_5_vl", "sdpa")
    batch = make_video_batch("qwen2_5_vl", 2)
    vtprune.apply_pruner(model, method=method, keep_ratio=0.5, video_keep_ratio=0.1)
    try:
        model(**batch)
        units = vtprune.get_stats(model)[0].units
    finally:
        vtprune.remove_pruner(model)
    for row in units:
        assert [u.tokens_after for u in row] == [
            max(1, int(u.tokens_before * r + 0.5)) for u, r in zip(row, (0.5, 0.1))
        ]
