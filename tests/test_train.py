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
