"""Procedural video clips from the Sort-of-CLEVR scene family of ``eval/data/image.py``.

A clip is ``n_states`` scene states, each rendered once and shown for two consecutive frames (``2 * n_states``
frames, 8 by default).  Two frames per state is the temporal patch of Qwen2-VL-style towers, which merge frame
pairs: every state is then one temporal group the model sees whole, not a blend of two states.  Between states one
object moves (it crosses the vertical mid-line, in equal steps), one or two objects appear (at different states),
sometimes one disappears; the others stay put.  Deterministic given a seed: ``make_video_split(name, n, seed)``;
splits draw from disjoint seed streams (and are checked to share no clip).

Question types (``VIDEO_QUESTION_TYPES``); the first four need more than one frame (``MULTI_FRAME_TYPES``):

* ``moved``    -- "which object moved ?"                         -> colour of the mover
* ``frames``   -- "how many frames show the red object ?"         -> 2 / 4 / 6 / 8 (even: states are frame pairs)
* ``appeared`` -- "which object appeared last ?"                  -> colour of the latest newcomer
* ``ended``    -- "where did the red object end up ?"             -> left / right (the mover starts on the other side)
* ``shape``    -- "what shape is the red object ?"   (an object present and still in every frame: single-frame control)
* ``side``     -- "is the red object on the left or right ?"     (idem)

``blank_clip`` gives the blank-clip control (white frames); answers are single words, scored by ``data.score``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace

from PIL import Image

from .image import (
    HEIGHT,
    OBJECT_SIZE,
    SIDE_MARGIN,
    WIDTH,
    Scene,
    SceneObject,
    example_seed,
    random_scene,
    render,
)

DEFAULT_FRAMES = 8  # 4 states x 2 frames: the most the 4-8 frame range allows, 4 temporal groups of 150 tokens
MIN_FRAMES, MAX_FRAMES = 4, 8
MIN_MOVE = 30  # pixels the mover travels horizontally over the clip: a move is never a subtle one
MULTI_FRAME_TYPES = ("moved", "frames", "appeared", "ended")
SINGLE_FRAME_TYPES = ("shape", "side")
VIDEO_QUESTION_TYPES = MULTI_FRAME_TYPES + SINGLE_FRAME_TYPES
# Words of the video questions the image benchmark's vocabulary lacks (the video model's tokenizer adds them).
VIDEO_WORDS = ("which", "moved", "frames", "show", "appeared", "last", "where", "did", "end", "up", "clip")
CLIP_CAPTION_QUESTION = "describe the clip ."
# Offset of the per-example seed index: video examples hash differently from image examples of the same split.
_VIDEO_STREAM = 1 << 48


@dataclass
class Clip:
    """``states[g]`` is the scene shown in frames ``2g`` and ``2g + 1`` (objects absent from a state are not drawn)."""

    states: list[Scene]

    @property
    def n_frames(self) -> int:
        return 2 * len(self.states)

    def colours(self) -> list[str]:
        seen = []
        for s in self.states:
            seen += [o.colour for o in s.objects if o.colour not in seen]
        return seen

    def track(self, colour: str) -> list[SceneObject | None]:
        """The object of that colour in each state (None where absent)."""
        return [next((o for o in s.objects if o.colour == colour), None) for s in self.states]

    def frames_showing(self, colour: str) -> int:
        return 2 * sum(o is not None for o in self.track(colour))

    def first_state(self, colour: str) -> int:
        return next(g for g, o in enumerate(self.track(colour)) if o is not None)

    def movers(self) -> list[str]:
        return [c for c in self.colours() if len({(o.x, o.y) for o in self.track(c) if o is not None}) > 1]

    def still(self) -> list[str]:
        """Objects in every state at one place: any single frame answers questions about them."""
        return [c for c in self.colours() if None not in self.track(c) and c not in self.movers()]

    def appeared_last(self) -> str | None:
        """The object appearing latest (after the first state), or None if no object or several tie."""
        firsts = {c: self.first_state(c) for c in self.colours()}
        late = max(firsts.values())
        last = [c for c, g in firsts.items() if g == late]
        return last[0] if late > 0 and len(last) == 1 else None

    def end_side(self, colour: str) -> str:
        return [o for o in self.track(colour) if o is not None][-1].side

    def frames(self) -> list[Image.Image]:
        out = []
        for s in self.states:
            img = render(s)
            out += [img, img]
        return out

    def blank_frames(self) -> list[Image.Image]:
        return blank_clip(self.n_frames)

    def key(self) -> str:
        return "|".join(s.key() for s in self.states)


def blank_clip(n_frames: int = DEFAULT_FRAMES) -> list[Image.Image]:
    """The blank-clip control: white frames of the benchmark's size."""
    return [render(None) for _ in range(n_frames)]


def _clear(x: float, y: float, others: list[SceneObject]) -> bool:
    return all(max(abs(x - o.x), abs(y - o.y)) >= OBJECT_SIZE + 3 for o in others)


def _path(rng: random.Random, start: SceneObject, others: list[SceneObject], n: int) -> list[SceneObject] | None:
    """The mover's ``n`` positions: equal steps from its start to a point across the mid-line, overlapping nothing."""
    half = int(OBJECT_SIZE / 2) + 1
    for _ in range(200):
        x1 = rng.randint(half, WIDTH - half)
        y1 = rng.randint(half, HEIGHT - half)
        if (
            (x1 < WIDTH / 2) == (start.x < WIDTH / 2)
            or abs(x1 - WIDTH / 2) < SIDE_MARGIN
            or abs(x1 - start.x) < MIN_MOVE
        ):
            continue
        steps = [
            replace(start, x=start.x + (x1 - start.x) * g / (n - 1), y=start.y + (y1 - start.y) * g / (n - 1))
            for g in range(n)
        ]
        if all(_clear(p.x, p.y, others) for p in steps):
            return steps
    return None


def random_clip(rng: random.Random, n_frames: int = DEFAULT_FRAMES) -> Clip:
    """One mover, one or two newcomers, at most one leaver, at least one still object (so every type can be asked)."""
    if n_frames % 2 or not MIN_FRAMES <= n_frames <= MAX_FRAMES:
        raise ValueError(f"n_frames must be even, {MIN_FRAMES}..{MAX_FRAMES}; got {n_frames}")
    n = n_frames // 2
    while True:
        objs = list(random_scene(rng).objects)
        mover, rest = objs[0], objs[1:]
        path = _path(rng, mover, rest, n)
        if path is None:
            continue
        n_new = 2 if len(rest) >= 4 and n >= 3 else 1
        new, rest = rest[:n_new], rest[n_new:]
        arrive = dict(zip((o.colour for o in new), rng.sample(range(1, n), n_new)))
        leave = {}
        if len(rest) >= 2 and rng.random() < 0.7:
            leave[rest[0].colour] = rng.randint(1, n - 1)
        states = []
        for g in range(n):
            present = [path[g]] + [o for o in new if arrive[o.colour] <= g]
            present += [o for o in rest if leave.get(o.colour, n) > g]
            states.append(Scene(present))
        return Clip(states)


# ----------------------------------------------------------------------------------------------------------------------
# Questions


def ask_video(clip: Clip, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) pair of the given type for the clip, or None if the clip cannot support it."""
    if qtype == "moved":
        movers = clip.movers()
        return ("which object moved ?", movers[0]) if len(movers) == 1 else None
    if qtype == "frames":
        by_count: dict[int, list[str]] = {}
        for c in clip.colours():
            by_count.setdefault(clip.frames_showing(c), []).append(c)
        k = rng.choice(sorted(by_count))  # balance the answers over the counts present, not over the objects
        return f"how many frames show the {rng.choice(by_count[k])} object ?", str(k)
    if qtype == "appeared":
        c = clip.appeared_last()
        return ("which object appeared last ?", c) if c else None
    if qtype == "ended":
        movers = clip.movers()
        return (f"where did the {movers[0]} object end up ?", clip.end_side(movers[0])) if len(movers) == 1 else None
    if qtype in ("shape", "side"):
        still = clip.still()
        if not still:
            return None
        o = clip.track(rng.choice(still))[0]
        if qtype == "shape":
            return f"what shape is the {o.colour} object ?", o.shape
        return f"is the {o.colour} object on the left or right ?", o.side
    raise ValueError(f"unknown video question type {qtype!r}")


def answer_video_question(clip: Clip, question: str) -> str:
    """Answer by parsing the question against the clip (an independent check of ``ask_video``)."""
    w = question.strip().lower().rstrip(" ?").split()
    if w == ["which", "object", "moved"]:
        (c,) = clip.movers()
        return c
    if w[:3] == ["how", "many", "frames"]:
        return str(clip.frames_showing(w[5]))
    if w == ["which", "object", "appeared", "last"]:
        return clip.appeared_last()
    if w[:2] == ["where", "did"]:
        return clip.end_side(w[3])
    if w[:3] == ["what", "shape", "is"]:
        return clip.track(w[4])[0].shape
    if w[:2] == ["is", "the"]:
        return clip.track(w[2])[0].side
    raise ValueError(f"cannot parse {question!r}")


def clip_caption(clip: Clip) -> str:
    """State by state (the order of the temporal groups), the objects left to right with shape, side and top/bottom.
    A training target: reading it off makes the LLM address each temporal group in turn."""
    return " . ".join(
        " , ".join(f"{o.colour} {o.shape} {o.side} {o.vertical}" for o in sorted(s.objects, key=lambda o: o.x))
        for s in clip.states
    )


# ----------------------------------------------------------------------------------------------------------------------
# Examples and splits


@dataclass
class VideoExample:
    uid: str
    split: str
    qtype: str
    question: str
    answer: str
    clip: Clip
    seed: int
    _frames: list[Image.Image] | None = field(default=None, repr=False, compare=False)

    @property
    def frames(self) -> list[Image.Image]:
        if self._frames is None:
            self._frames = self.clip.frames()
        return self._frames

    def blank_frames(self) -> list[Image.Image]:
        return self.clip.blank_frames()


def video_seed(split: str, seed: int, index: int) -> int:
    return example_seed(split, seed, _VIDEO_STREAM + index)


def make_video_example(split: str, seed: int, index: int, qtype: str, n_frames: int = DEFAULT_FRAMES) -> VideoExample:
    es = video_seed(split, seed, index)
    rng = random.Random(es)
    while True:
        clip = random_clip(rng, n_frames)
        qa = ask_video(clip, qtype, rng)
        if qa is not None:
            break
    return VideoExample(f"{split}-{seed}-{index}", split, qtype, qa[0], qa[1], clip, es)


def make_video_split(name: str, n: int, seed: int = 0, n_frames: int = DEFAULT_FRAMES) -> list[VideoExample]:
    """``n`` examples of split ``name``, question types balanced round-robin."""
    if name not in ("train", "validation", "test"):
        raise ValueError(f"unknown split {name!r}; expected train / validation / test")
    k = len(VIDEO_QUESTION_TYPES)
    return [make_video_example(name, seed, i, VIDEO_QUESTION_TYPES[i % k], n_frames) for i in range(n)]


def video_answer_prior(examples: list[VideoExample]) -> dict[str, float]:
    """Accuracy of always giving each type's most frequent answer: per type, multi-frame, single-frame, overall."""
    out, hits = {}, {}
    for t in VIDEO_QUESTION_TYPES:
        golds = [e.answer for e in examples if e.qtype == t]
        if golds:
            hits[t] = (Counter(golds).most_common(1)[0][1], len(golds))
            out[t] = hits[t][0] / hits[t][1]
    for name, types in (
        ("multi_frame", MULTI_FRAME_TYPES),
        ("single_frame", SINGLE_FRAME_TYPES),
        ("overall", VIDEO_QUESTION_TYPES),
    ):
        h = [hits[t] for t in types if t in hits]
        out[name] = sum(a for a, _ in h) / max(1, sum(b for _, b in h))
    return out
