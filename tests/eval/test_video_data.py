"""The embedded video benchmark (vtprune.eval.data.video) and the embedded video model."""

import collections

import pytest
import torch

from helpers import needs
from vtprune.eval.catalog import VIDEO_MODELS
from vtprune.eval.catalog import is_available as is_video_model_available
from vtprune.eval.data import image as D
from vtprune.eval.data import video as V
from vtprune.eval.harness import evaluate_video
from vtprune.eval.models import load_embedded as load_video_model

VIDEO_MODEL = VIDEO_MODELS[0]

torch.set_num_threads(1)


def obj(colour, shape, x, y):
    return D.SceneObject(colour, shape, float(x), float(y))


def hand_clip():
    """red moves left -> right; blue appears in state 1, yellow in state 2; green leaves after state 0; cyan stays."""
    cyan, green = obj("cyan", "triangle", 100, 60), obj("green", "square", 90, 15)
    reds = [obj("red", "circle", x, 20) for x in (20, 40, 60, 80)]
    blue, yellow = obj("blue", "square", 25, 60), obj("yellow", "circle", 50, 45)
    return V.Clip(
        [
            D.Scene([reds[0], cyan, green]),
            D.Scene([reds[1], cyan, blue]),
            D.Scene([reds[2], cyan, blue, yellow]),
            D.Scene([reds[3], cyan, blue, yellow]),
        ]
    )


def test_hand_built_clip_answers():
    c = hand_clip()
    a = V.answer_video_question
    assert a(c, "which object moved ?") == "red" and c.movers() == ["red"]
    assert a(c, "where did the red object end up ?") == "right"  # it started on the left
    assert a(c, "which object appeared last ?") == "yellow"
    counts = {k: a(c, f"how many frames show the {k} object ?") for k in ("red", "cyan", "blue", "yellow", "green")}
    assert counts == {"red": "8", "cyan": "8", "blue": "6", "yellow": "4", "green": "2"}
    assert (
        V.clip_caption(c).split(" . ")[1]
        == "blue square left bottom , red circle left top , cyan triangle right bottom"
    )
    assert c.still() == ["cyan"]  # the mover and the objects that come or go are not single-frame material
    assert (
        a(c, "what shape is the cyan object ?") == "triangle"
        and a(c, "is the cyan object on the left or right ?") == "right"
    )
    for t in V.VIDEO_QUESTION_TYPES:  # the generator's questions on this clip agree with the parser
        q, ans = V.ask_video(c, t, __import__("random").Random(1))
        assert ans == a(c, q)
    # two newcomers in the same state: no "last" one, the question is not asked
    tie = V.Clip(c.states[:2] + [D.Scene(c.states[2].objects), D.Scene(c.states[2].objects)])
    tie.states[1] = D.Scene([o for o in tie.states[1].objects if o.colour != "blue"])
    assert tie.appeared_last() is None and V.ask_video(tie, "appeared", __import__("random").Random(0)) is None


def test_frames_hold_each_state_for_two_frames_and_blank_clip():
    c = hand_clip()
    frames = c.frames()
    assert len(frames) == c.n_frames == 8 and all(f.size == (D.WIDTH, D.HEIGHT) for f in frames)
    assert all(frames[2 * g].tobytes() == frames[2 * g + 1].tobytes() for g in range(4))
    assert frames[0].tobytes() != frames[2].tobytes()
    assert frames[6].getpixel((80, 20)) == D.COLOURS["red"] and frames[0].getpixel((80, 20)) == D.BACKGROUND
    blank = V.blank_clip(6)
    assert len(blank) == 6 and all(f.tobytes() == bytes(D.BACKGROUND) * (D.WIDTH * D.HEIGHT) for f in blank)
    assert len(c.blank_frames()) == 8
    with pytest.raises(ValueError):
        V.random_clip(__import__("random").Random(0), 5)


def test_deterministic_and_seeded():
    a, b = V.make_video_split("test", 24, seed=0), V.make_video_split("test", 24, seed=0)
    assert [(e.question, e.answer, e.clip.key()) for e in a] == [(e.question, e.answer, e.clip.key()) for e in b]
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a[5].frames, b[5].frames))
    assert [e.clip.key() for e in a] != [e.clip.key() for e in V.make_video_split("test", 24, seed=1)]


def test_splits_disjoint():
    keys = {s: {e.clip.key() for e in V.make_video_split(s, 120, seed=0)} for s in D.SPLITS}
    assert len(keys["test"]) == 120
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    with pytest.raises(ValueError):
        V.make_video_split("dev", 2)


def test_generated_clips_are_well_formed():
    ex = V.make_video_split("train", 120, seed=0)
    assert collections.Counter(e.qtype for e in ex) == {t: 20 for t in V.VIDEO_QUESTION_TYPES}
    for e in ex:
        c = e.clip
        assert e.answer == V.answer_video_question(c, e.question)
        (m,) = c.movers()
        track = c.track(m)
        assert None not in track and track[0].side != track[-1].side  # the mover crosses the mid-line
        assert abs(track[-1].x - D.WIDTH / 2) >= D.SIDE_MARGIN and c.still()
        for s in c.states:  # no overlaps in any state, distinct colours
            assert len({o.colour for o in s.objects}) == len(s.objects)
            for o in s.objects:
                assert all(max(abs(o.x - p.x), abs(o.y - p.y)) >= D.OBJECT_SIZE for p in s.objects if p is not o)
    prior = V.video_answer_prior(V.make_video_split("test", 300, seed=0))
    assert all(prior[t] < 0.7 for t in V.VIDEO_QUESTION_TYPES), prior


@needs(is_video_model_available(VIDEO_MODEL), f"{VIDEO_MODEL}'s weights are missing")
def test_video_model_accuracy():
    from vtprune.eval.models import build_video_prompt

    model, processor = load_video_model(VIDEO_MODEL)  # offline, from the package folder
    assert sum(p.numel() for p in model.parameters()) < 5e6
    ex = V.make_video_split("test", 48, seed=0)
    inputs = processor(videos=[ex[0].frames], text=[build_video_prompt(processor, ex[0].question)], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.video_token_id).sum() == 600 >= 200
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
    )
    video = inputs["input_ids"][0] == model.config.video_token_id
    assert pos[0, 0, video].unique().numel() == 4  # the four temporal groups have distinct time ids
    res = evaluate_video(model, processor, ex, batch_size=24)
    blank = evaluate_video(model, processor, ex, batch_size=24, blank=True)
    # test split (600 clips): 88.75 % multi-frame, 100 % single-frame; these 48 clips: 87.5 % and 100 %, so the bounds
    # leave about two standard errors of a 32-question sample below the measured rate
    assert res["n"] == 48 and res["multi_frame"] >= 0.75 and res["single_frame"] >= 0.9, res
    assert blank["multi_frame"] <= 0.5, blank  # without the clip it cannot answer


def test_probe_targets_of_the_hand_built_clip():
    from training import train as T
    from training.train_video import PROBES, probe_targets

    c = hand_clip()
    t = probe_targets(c).view(4, 150, len(PROBES))
    rows, cols, cell, _ = T.token_grid("qwen")
    at = lambda g, o: t[g, int(o.y // cell) * cols + int(o.x // cell)].tolist()  # noqa: E731 - the centre's token
    red, cyan = c.track("red"), c.track("cyan")[0]
    # moved, frames (2/4/6/8 -> 0..3), first state, appeared last, ends right, right-side share (x4: red is on the
    # left at x = 20, 40 and on the right at 60, 80 of the 120-pixel width)
    assert at(0, red[0]) == at(3, red[3]) == [1, 3, 0, 0, 1, 2]
    assert at(2, cyan) == [0, 3, 0, 0, 1, 4]
    assert at(2, c.track("yellow")[2]) == [0, 1, 2, 1, 0, 0] and at(0, c.track("green")[0]) == [0, 0, 0, 0, 1, 4]
    assert at(1, c.track("blue")[1]) == [0, 2, 1, 0, 0, 0]
    assert (t[0, 0] == -100).all()  # background
