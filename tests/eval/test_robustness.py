"""The selection-stability report: perturbations, the pixel-to-token-cell mapping and the report's mechanics."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from vtprune.eval.data import make_split  # noqa: E402
from vtprune.eval.robustness import perturb as P  # noqa: E402
from vtprune.eval.robustness import run as R  # noqa: E402
from vtprune.testing import tiny_model, tiny_processor  # noqa: E402

_TEMPLATE = (
    "{% for message in messages %}{% for c in message['content'] %}{% if c['type'] == 'image' %}IMG "
    "{% endif %}{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}USER: "
    "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
_IMG = {"llava": "<image>", "qwen2_5_vl": "<|vision_start|> <|image_pad|> <|vision_end|>"}


def chat_processor(family):
    processor = tiny_processor(family)
    processor.chat_template = _TEMPLATE.replace("IMG", _IMG[family])  # predict() builds prompts from it
    return processor


def test_parse_perturbation_and_method():
    assert P.parse_perturbation("noise:1").name == "noise:1"
    assert P.parse_perturbation("patch-solid:24").box(120, 80) == (0, 0, 24, 24)
    for bad in ("noise", "blur:2", "patch-noise:1.5", "noise:-1"):
        with pytest.raises(ValueError, match="unknown perturbation"):
            P.parse_perturbation(bad)
    assert R.parse_method("divprune_stable:smooth=2,margin=0.05,tag=x") == (
        "divprune_stable",
        {"smooth": 2, "margin": 0.05, "tag": "x"},
    )
    with pytest.raises(ValueError, match="not key=value"):
        R.parse_method("zoo:m")


def test_perturb_is_seeded_8bit_and_local():
    img = make_split("test", 1)[0].image
    a = np.asarray(img).astype(int)
    n1 = np.asarray(P.perturb(img, P.parse_perturbation("noise:1"), seed=3, index=0)).astype(int)
    assert np.array_equal(n1, np.asarray(P.perturb(img, P.parse_perturbation("noise:1"), seed=3, index=0)))
    assert not np.array_equal(n1, np.asarray(P.perturb(img, P.parse_perturbation("noise:1"), seed=4, index=0)))
    assert 0 < np.abs(n1 - a).max() <= 6 and (n1 != a).mean() > 0.2  # integer steps of about 1/255
    assert np.array_equal(np.asarray(P.perturb(img, P.parse_perturbation("noise:0"), 0, 0)), a)
    patched = np.asarray(P.perturb(img, P.parse_perturbation("patch-solid:12"), 0, 0)).astype(int)
    assert (patched[:12, :12] == 0).all() and np.array_equal(patched[12:], a[12:])
    assert np.array_equal(patched[:, 12:], a[:, 12:])


def test_cell_coverage_on_the_embedded_llava_geometry():
    # 120x80 padded to 120x120 (20 rows above), 12x12 cells of 10 pixels; a 12x12 patch at the image's corner.
    cov = P.cell_coverage((0, -20, 120, 100), (12, 12), (0, 0, 12, 12)).view(12, 12)
    expect = torch.zeros(12, 12, dtype=torch.float64)
    expect[2:4, 0:2] = torch.tensor([[1.0, 0.2], [0.2, 0.04]])
    assert torch.allclose(cov, expect)
    assert P.cell_coverage((0, -20, 120, 100), (12, 12), (0, 0, 120, 80)).sum().item() == pytest.approx(96)


def _pixel_change(family, processor, clean, changed):
    """Per visual token, how much the processor's pixel values differ between two images."""
    a, b = (processor.image_processor(images=[im], return_tensors="pt") for im in (clean, changed))
    d = (a["pixel_values"] - b["pixel_values"]).abs()
    if family == "llava":
        p = 7
        d = d[0].sum(0)
        side = d.shape[0] // p
        return d.view(side, p, side, p).sum((1, 3)).flatten(), (side, side)
    _, h, w = a["image_grid_thw"][0].tolist()  # Qwen: 2x2 patch groups are consecutive rows, in token order
    return d.sum(-1).view(-1, 4).sum(-1), (h // 2, w // 2)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_token_frame_matches_the_processor(family):
    """Cells mostly inside a patch change in the processed pixels; cells away from it do not."""
    processor = tiny_processor(family)
    img = make_split("test", 1)[0].image
    pert = P.parse_perturbation("patch-noise:40")
    change, grid = _pixel_change(family, processor, img, P.perturb(img, pert, 0, 0))
    cov = P.cell_coverage(P.token_frame(processor, *img.size), grid, pert.box(*img.size))
    assert cov.numel() == change.numel()
    assert (change[cov > 0.5] > 0).all() and (cov > 0.5).any()
    assert int(change.argmax()) == int(cov.argmax())  # the most covered cell changes most
    near = torch.nn.functional.max_pool2d(cov.view(1, *grid).float(), 3, 1, 1).flatten() > 0  # resize blur
    assert (change[~near] == 0).all() and (~near).any()


@pytest.fixture(scope="module")
def tiny_llava():
    return tiny_model("llava"), chat_processor("llava")


def test_report_is_seeded_and_zero_noise_changes_nothing(tiny_llava):
    model, processor = tiny_llava
    examples = make_split("test", 6, seed=1)
    args = (["divprune", "divprune_stable:smooth=2", "random"], [25.0], ["noise:0", "noise:64", "patch-noise:60"])
    rows = R.measure(model, processor, examples, *args, seed=5, batch_size=4)
    assert rows == R.measure(model, processor, examples, *args, seed=5, batch_size=4)
    assert [(r["method"], r["perturbation"]) for r in rows[:3]] == [
        ("none", "noise:0"),
        ("none", "noise:64"),
        ("none", "patch-noise:60"),
    ]
    for r in rows:
        if r["perturbation"] == "noise:0":
            assert r["answer_change"] == 0 and r["accuracy"] == r["accuracy_clean"]
            assert r["method"] == "none" or r["jaccard"] == 1
    heavy = [r for r in rows if r["perturbation"] == "noise:64" and r["method"] == "divprune"]
    assert heavy[0]["jaccard"] < 1  # the measure does see a changed selection
    patch = [r for r in rows if r["perturbation"] == "patch-noise:60" and r["method"] != "none"]
    for r in patch:
        assert 0 < r["area_share"] < 1 and 0 <= r["pick_share"] <= 1
        assert r["attraction"] == pytest.approx(r["pick_share"] / r["area_share"])


def test_kept_sets_follow_every_stage():
    stats = [
        {"kept_indices": torch.tensor([[0, 2, 3, 5], [1, 4, -1, -1]])},
        {"kept_indices": torch.tensor([[1, 3], [0, -1]])},
    ]
    assert R.kept_sets(stats, [6, 6]) == [frozenset({2, 5}), frozenset({1})]


def test_write_results(tmp_path):
    rows = [
        {
            "model": "llava-x",
            "method": m,
            "budget_pct": b,
            "perturbation": "patch-noise:12",
            "jaccard": j,
            "answer_change": c,
            "accuracy": 0.7,
            "accuracy_clean": 0.8,
            "pick_share": 0.05,
            "pick_share_clean": 0.02,
            "area_share": 0.02,
            "attraction": 2.5,
            "attraction_clean": 1.0,
        }
        for m, b, j, c in [("none", 100, None, 0.0), ("divprune", 11, 0.5, 0.1), ("divprune", 25, 0.7, 0.05)]
    ]
    paths = R.write_results(rows, tmp_path)
    assert paths["csv"].read_text().count("\n") == 4 and paths["png"].stat().st_size > 5000
    assert (
        "| llava | divprune | 11 % | patch-noise:12 | 0.50 | 10.0 | 70.0 (80.0) | 5.0 (2.0) | 2.50 (1.00) |"
        in R.table(rows)
    )


def test_merge_keeps_one_control(tmp_path):
    base = {
        "model": "m",
        "budget_pct": 100,
        "perturbation": "noise:1",
        "n": 4,
        "seed": 0,
        "answer_change": 0.0,
        "accuracy": 1.0,
        "accuracy_clean": 1.0,
    }
    for name, method in (("a", "divprune"), ("b", "zoo")):
        (tmp_path / name).mkdir()
        rows = [dict(base, method="none"), dict(base, method=method, budget_pct=11, jaccard=0.9)]
        R.write_results(rows, tmp_path / name)
    merged = R.merge_runs([tmp_path / "a", tmp_path / "b"])
    assert [r["method"] for r in merged] == ["none", "divprune", "zoo"]
