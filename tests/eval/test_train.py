"""The training recipe's dense targets (checked against the benchmark's own question answering) and a short run."""

import json

import pytest
import torch

from helpers import require
from training import train as T
from vtprune.eval.data import image as D


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
            assert attrs[t].tolist() == [
                D.COLOUR_NAMES.index(o.colour),
                D.SHAPES.index(o.shape),
                D.SIDES.index(side),
                D.COLOUR_NAMES.index(nearest),
            ]
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
    info = T.main(
        [
            "--model",
            "llava",
            "--a-steps",
            "2",
            "--a-batch",
            "4",
            "--b-steps",
            "2",
            "--b-batch",
            "2",
            "--eval-every",
            "0",
            "--val-size",
            "5",
            "--test-size",
            "5",
            "--out",
            str(out),
        ]
    )
    rec = json.loads((out / "training.json").read_text())
    assert rec["command"].startswith("python -m training.train --model llava")
    assert rec["visual_tokens_per_image"] == 144 and rec["test_accuracy"]["n"] == 5
    assert set(rec["time_s"]) == {"stage_a", "stage_b", "train_total", "eval"} and info["seed"] == 0
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == rec["parameters"]


def test_stage_b_trains_the_llm_and_projector_only(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    first, second = tmp_path / "a", tmp_path / "b"
    T.main(
        [
            "--model",
            "qwen",
            "--a-steps",
            "1",
            "--a-batch",
            "2",
            "--b-steps",
            "0",
            "--val-size",
            "5",
            "--test-size",
            "5",
            "--out",
            str(first),
        ]
    )
    T.main(
        [
            "--model",
            "qwen",
            "--init-from",
            str(first),
            "--a-steps",
            "0",
            "--b-steps",
            "2",
            "--b-batch",
            "2",
            "--b-projector-lr-scale",
            "0.5",
            "--eval-every",
            "0",
            "--val-size",
            "5",
            "--test-size",
            "5",
            "--out",
            str(second),
        ]
    )
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the checkpoint keeps Qwen2.5-VL's original layout: visual.* is the tower and its merger, the rest the LLM
    assert changed and not any(k.startswith("visual.") and not k.startswith("visual.merger.") for k in changed)
    assert any(k.startswith("visual.merger.") for k in changed) and any(k.startswith("model.layers.") for k in changed)
    assert json.loads((second / "training.json").read_text())["previous_run"]["args"]["b_steps"] == 0


@pytest.mark.parametrize("kind,name", [("llava", "llava-tiny-sortofclevr"), ("qwen", "qwen2_5_vl-tiny-sortofclevr")])
def test_recipe_replays_the_recorded_runs_of_the_shipped_model(kind, name):
    from vtprune.eval.catalog import is_available, training_info

    require(is_available(name), f"{name} not built")
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


def test_video_short_run_grows_the_vocabulary_and_keeps_the_tower(tmp_path):
    from safetensors.torch import load_file

    from training import train_video as TV
    from vtprune.eval.catalog import is_available, model_dir

    require(is_available(TV.BASE_MODEL), f"{TV.BASE_MODEL} not built")
    torch.set_num_threads(1)
    out = tmp_path / "v"
    info = TV.main(
        ["--steps", "2", "--batch", "2", "--eval-every", "0", "--val-size", "6", "--test-size", "6", "--out", str(out)]
    )
    rec = json.loads((out / "training.json").read_text())
    assert rec["command"].startswith("python -m training.train_video --steps 2")
    assert rec["visual_tokens_per_clip"] == 600 and rec["frames_per_clip"] == 8 and rec["test_accuracy"]["n"] == 6
    assert rec["base_model"] == TV.BASE_MODEL and rec["previous_run"] is None and info["seed"] == 0
    base, new = load_file(model_dir(TV.BASE_MODEL) / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(base[k], new[k]) for k in base if k.startswith("visual."))  # tower and merger frozen
    emb = [k for k in new if k.endswith("embed_tokens.weight")][0]
    n_old = base[emb].shape[0]
    assert new[emb].shape[0] == n_old + len(TV.VIDEO_WORDS) and not torch.equal(new[emb][:n_old], base[emb])
    from transformers import AutoTokenizer

    old_vocab = AutoTokenizer.from_pretrained(model_dir(TV.BASE_MODEL), local_files_only=True).get_vocab()
    new_vocab = AutoTokenizer.from_pretrained(out, local_files_only=True).get_vocab()
    assert {w: new_vocab[w] for w in old_vocab} == old_vocab and set(TV.VIDEO_WORDS) <= set(new_vocab)
    assert json.loads((out / "config.json").read_text())["vision_config"]["tokens_per_second"] == TV.TOKENS_PER_SECOND


def test_video_recipe_replays_the_recorded_runs_of_the_shipped_model():
    from training import train_video as TV
    from training.train_video import VIDEO_MODEL
    from vtprune.eval.catalog import is_available as is_video_model_available
    from vtprune.eval.catalog import training_info

    require(is_video_model_available(VIDEO_MODEL), f"{VIDEO_MODEL} not built")
    chain, run = [], training_info(VIDEO_MODEL)
    while run:
        chain.insert(0, run)
        run = run.get("previous_run")
    assert len(chain) == len(TV.RECIPES) and chain[0]["base_model"] == TV.BASE_MODEL
    defaults = vars(TV.parser().parse_args([]))
    for recorded, extra in zip(chain, TV.RECIPES):
        replay = vars(TV.parser().parse_args(extra.split()))
        for key in set(replay) - {"out", "init_from", "recipe"}:
            assert recorded["args"].get(key, defaults[key]) == replay[key], key
    assert chain[-1]["visual_tokens_per_clip"] >= 200 and chain[-1]["size_bytes"] < 20e6
