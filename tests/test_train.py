"""The training recipe's dense targets (checked against the benchmark's own question answering) and a short run."""
import json

import pytest
import torch

from vtprune.eval import data as D
from vtprune.eval import train as T


@pytest.mark.parametrize("kind", ["llava", "qwen"])
def test_object_tokens_carry_every_answer(kind):
    rows, cols, cell, top = T.token_grid(kind)
    for e in D.make_split("test", 40, seed=0):
        region, attrs, count, obj_xy, is_obj, anchor, own = T.dense_targets(e.scene, kind)
        assert region.shape == (rows * cols,) and attrs.shape == (rows * cols, len(T.OBJECT_HEADS))
        assert int(anchor.sum()) == len(e.scene.objects)
        for o in e.scene.objects:
            t = int((o.y + top) // cell) * cols + int(o.x // cell)  # the token holding the object's centre
            assert anchor[t] == 1 and region[t] == T.REGIONS.index("object")
            nearest = D.answer_question(e.scene, f"what colour is the object nearest to the {o.colour} object ?")
            side = D.answer_question(e.scene, f"is the {o.colour} object on the left or right ?")
            assert attrs[t].tolist() == [D.COLOUR_NAMES.index(o.colour), D.SHAPES.index(o.shape),
                                         D.SIDES.index(side), D.COLOUR_NAMES.index(nearest)]
            assert torch.allclose(obj_xy[t], torch.tensor([o.x / D.WIDTH, o.y / D.HEIGHT]))
        assert ((attrs != -100).all(-1) == (region == 2)).all() and (is_obj.bool() == (region == 2)).all()
        for j, s in enumerate(D.SHAPES):
            assert (count[:, j] == int(D.answer_question(e.scene, f"how many {s}s are there ?"))).all()
    # LLaVA pads 120x80 to a square: its top and bottom token rows are padding; Qwen keeps the aspect ratio
    pad = (region.view(rows, cols) == T.REGIONS.index("padding")).all(1)
    assert pad.tolist() == ([True] * 2 + [False] * 8 + [True] * 2 if kind == "llava" else [False] * rows)
    assert torch.allclose(own.view(rows, cols, 2)[0, 0], torch.tensor([0.5 / cols, 0.5 / rows]))


def test_short_run_saves_a_loadable_model_and_its_record(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "m"
    info = T.main(["--model", "llava", "--a-steps", "2", "--a-batch", "4", "--b-steps", "2", "--b-batch", "2",
                   "--eval-every", "0", "--val-size", "5", "--test-size", "5", "--out", str(out)])
    rec = json.loads((out / "training.json").read_text())
    assert rec["command"].startswith("python -m vtprune.eval.train --model llava")
    assert rec["visual_tokens_per_image"] == 144 and rec["test_accuracy"]["n"] == 5
    assert set(rec["time_s"]) == {"stage_a", "stage_b", "train_total", "eval"} and info["seed"] == 0
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == rec["parameters"]


def test_stage_b_trains_the_llm_and_projector_only(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    first, second = tmp_path / "a", tmp_path / "b"
    T.main(["--model", "qwen", "--a-steps", "1", "--a-batch", "2", "--b-steps", "0", "--val-size", "5",
            "--test-size", "5", "--out", str(first)])
    T.main(["--model", "qwen", "--init-from", str(first), "--a-steps", "0", "--b-steps", "2", "--b-batch", "2",
            "--b-projector-lr-scale", "0.5", "--eval-every", "0", "--val-size", "5", "--test-size", "5",
            "--out", str(second)])
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the checkpoint keeps Qwen2.5-VL's original layout: visual.* is the tower and its merger, the rest the LLM
    assert changed and not any(k.startswith("visual.") and not k.startswith("visual.merger.") for k in changed)
    assert any(k.startswith("visual.merger.") for k in changed) and any(k.startswith("model.layers.") for k in changed)
    assert json.loads((second / "training.json").read_text())["previous_run"]["args"]["b_steps"] == 0


@pytest.mark.parametrize("kind,name", [("llava", "llava-tiny-sortofclevr"), ("qwen", "qwen2_5_vl-tiny-sortofclevr")])
def test_recipe_replays_the_recorded_runs_of_the_shipped_model(kind, name):
    from vtprune.eval.embedded import is_available, training_info

    if not is_available(name):
        pytest.skip(f"{name} not built")
    chain, run = [], training_info(name)
    while run:
        chain.insert(0, run)
        run = run.get("previous_run")
    assert len(chain) == len(T.RECIPES[kind])
    defaults = vars(T.parser().parse_args(["--model", kind]))
    for recorded, extra in zip(chain, T.RECIPES[kind]):
        replay = vars(T.parser().parse_args(["--model", kind, *extra.split()]))
        for key in set(replay) - {"out", "init_from", "recipe"}:
            assert recorded["args"].get(key, defaults[key]) == replay[key], (name, key)
    assert chain[-1]["test_accuracy"]["overall"] >= 0.85


def test_recipe_chains_its_runs(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    small = "--a-batch 2 --b-batch 2 --eval-every 0 --val-size 4 --test-size 4"
    monkeypatch.setitem(T.RECIPES, "llava", [f"--a-steps 1 --b-steps 1 {small}", f"--a-steps 0 --b-steps 1 {small}"])
    info = T.main(["--model", "llava", "--recipe", "--out", str(tmp_path / "m"), "--a-steps", "999"])
    assert info["init_from"] == str(tmp_path / "m" / "run1")
    assert info["previous_run"]["args"]["a_steps"] == 1 and info["args"]["a_steps"] == 0
    assert (tmp_path / "m" / "training.json").exists()
