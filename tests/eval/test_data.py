"""The embedded Sort-of-CLEVR benchmark (vtprune.eval.data) and the embedded small VLMs (vtprune.eval.models)."""

import collections

import pytest
import torch

from helpers import require
from vtprune.eval.catalog import EMBEDDED_MODELS, is_available
from vtprune.eval.data import image as D
from vtprune.eval.harness import evaluate_accuracy
from vtprune.eval.models import load_embedded

torch.set_num_threads(1)


def test_deterministic():
    a = D.make_split("test", 40, seed=0)
    b = D.make_split("test", 40, seed=0)
    assert [(e.question, e.answer, e.scene.key()) for e in a] == [(e.question, e.answer, e.scene.key()) for e in b]
    assert a[3].image.tobytes() == b[3].image.tobytes()
    c = D.make_split("test", 40, seed=1)
    assert [e.scene.key() for e in a] != [e.scene.key() for e in c]


def test_splits_disjoint():
    keys = {s: {e.scene.key() for e in D.make_split(s, 500, seed=0)} for s in D.SPLITS}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    with pytest.raises(ValueError):
        D.make_split("dev", 3)


def test_non_square_images_and_blank():
    e = D.make_split("validation", 1)[0]
    assert e.image.size == (D.WIDTH, D.HEIGHT) and D.WIDTH != D.HEIGHT
    assert e.image.mode == "RGB"
    blank = e.blank_image()
    assert blank.size == e.image.size and blank.tobytes() == bytes(D.BACKGROUND) * (D.WIDTH * D.HEIGHT)


def test_answers_in_vocabulary_and_types_balanced():
    ex = D.make_split("test", 250, seed=0)
    assert collections.Counter(e.qtype for e in ex) == {t: 50 for t in D.QUESTION_TYPES}
    for e in ex:
        assert e.answer in D.ANSWER_VOCAB
        assert e.answer in D.ANSWERS_BY_TYPE[e.qtype]
    # no question type is answerable from the prior alone
    prior = D.answer_prior(ex)
    assert all(prior[t] < 0.7 for t in D.QUESTION_TYPES)


def test_answers_consistent_with_scene():
    for e in D.make_split("train", 300, seed=0):
        objs = e.scene.objects
        assert D.MIN_OBJECTS <= len(objs) <= D.MAX_OBJECTS
        assert len({o.colour for o in objs}) == len(objs)
        assert e.answer == D.answer_question(e.scene, e.question)
        for o in objs:  # on canvas, away from the mid-line, no overlaps
            assert D.OBJECT_SIZE / 2 <= o.x <= D.WIDTH - D.OBJECT_SIZE / 2
            assert D.OBJECT_SIZE / 2 <= o.y <= D.HEIGHT - D.OBJECT_SIZE / 2
            assert abs(o.x - D.WIDTH / 2) >= D.SIDE_MARGIN
            for p in objs:
                if p is not o:
                    assert max(abs(o.x - p.x), abs(o.y - p.y)) >= D.OBJECT_SIZE
        if e.qtype == "colour":
            shape = e.question.split()[-2]
            assert e.scene.count(shape) == 1
        if e.qtype == "nearest":
            assert e.scene.nearest_is_clear(e.question.split()[-3])
        # the rendered pixel at an object's centre has the object's colour
        for o in objs:
            assert e.image.getpixel((int(o.x), int(o.y))) == D.COLOURS[o.colour]


def test_score():
    assert D.score(" Red ", "red") == 1.0
    assert D.score("red circle", "red") == 0.0


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_embedded_model_accuracy(name):
    require(is_available(name), f"{name} not trained yet")
    from vtprune.eval.catalog import training_info
    from vtprune.eval.models import build_prompt

    model, processor = load_embedded(name)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    ex = D.make_split("test", 60, seed=0)
    inputs = processor(images=[ex[0].image], text=[build_prompt(processor, ex[0].question)], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() >= 144
    res = evaluate_accuracy(model, processor, ex, batch_size=30)
    blank = evaluate_accuracy(model, processor, ex, batch_size=30, blank=True)
    assert res["n"] == 60
    # the model reads the image: clearly better than with a blank image
    assert res["overall"] >= blank["overall"] + 0.15, (res, blank)
    assert res["overall"] >= 0.85, res
    recorded = training_info(name)
    assert recorded["test_accuracy"]["overall"] >= 0.85 and recorded["test_accuracy"]["n"] == 1000
