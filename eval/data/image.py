"""Procedural Sort-of-CLEVR-style visual question answering set.

Every example is one scene (a few coloured shapes on a white, non-square canvas) with one question whose answer
depends on small regions of the image.  Everything is deterministic given a seed: ``make_split(name, n, seed)``
returns the same examples on every machine, and the train / validation / test splits draw from disjoint seed
streams (and are additionally checked to share no scene).

Question types (``QUESTION_TYPES``):

* ``shape``   -- "what shape is the red object ?"                      -> circle / square / triangle
* ``colour``  -- "what colour is the triangle ?" (a shape present once) -> one of ``COLOURS``
* ``side``    -- "is the red object on the left or right ?"             -> left / right
* ``count``   -- "how many circles are there ?"                         -> 0 .. 6
* ``nearest`` -- "what colour is the object nearest to the red object ?" -> one of ``COLOURS``

Scores are exact matches after ``strip().lower()`` on the fixed ``ANSWER_VOCAB``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------------------------------
# Fixed vocabulary of the benchmark

WIDTH, HEIGHT = 120, 80  # non-square: LLaVA's pad-to-square adds real padding tokens
BACKGROUND = (255, 255, 255)
OBJECT_SIZE = 16  # side of the square / diameter of the circle, in pixels
MIN_OBJECTS, MAX_OBJECTS = 4, 6
SIDE_MARGIN = 6  # object centres are at least this far from the vertical mid-line (side answers are unambiguous)
NEAREST_MARGIN = 4.0  # nearest object is closer than the runner-up by at least this many pixels

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 225),
    "yellow": (235, 205, 20),
    "purple": (150, 50, 200),
    "cyan": (0, 195, 205),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
COUNTS = tuple(str(i) for i in range(MAX_OBJECTS + 1))

QUESTION_TYPES = ("shape", "colour", "side", "count", "nearest")
ANSWER_VOCAB = tuple(COLOUR_NAMES) + SHAPES + SIDES + COUNTS
ANSWERS_BY_TYPE = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "side": SIDES,
    "count": COUNTS,
    "nearest": COLOUR_NAMES,
}

# Split name -> salt of its seed stream.  Different salts give disjoint streams of per-example seeds.
SPLITS = ("train", "validation", "test")
_SPLIT_SALT = {"train": 0x7A11, "validation": 0x5EED, "test": 0x7E57}


# ----------------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top

    @property
    def side(self) -> str:
        return "left" if self.x < WIDTH / 2 else "right"

    @property
    def vertical(self) -> str:
        return "top" if self.y < HEIGHT / 2 else "bottom"


@dataclass
class Scene:
    objects: list[SceneObject]
    width: int = WIDTH
    height: int = HEIGHT

    def by_colour(self, colour: str) -> SceneObject:
        for o in self.objects:
            if o.colour == colour:
                return o
        raise KeyError(colour)

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)

    def distances_from(self, colour: str) -> list[tuple[float, SceneObject]]:
        a = self.by_colour(colour)
        out = [(math.hypot(o.x - a.x, o.y - a.y), o) for o in self.objects if o.colour != colour]
        return sorted(out, key=lambda t: t[0])

    def nearest(self, colour: str) -> SceneObject:
        return self.distances_from(colour)[0][1]

    def nearest_is_clear(self, colour: str) -> bool:
        d = self.distances_from(colour)
        return len(d) < 2 or d[1][0] - d[0][0] >= NEAREST_MARGIN

    def unique_shapes(self) -> list[str]:
        return [s for s in SHAPES if self.count(s) == 1]

    def key(self) -> str:
        """A canonical string of the scene (used to check that splits share no scene)."""
        return ";".join(
            f"{o.colour}:{o.shape}:{o.x:.0f}:{o.y:.0f}" for o in sorted(self.objects, key=lambda o: o.colour)
        )


def random_scene(rng: random.Random) -> Scene:
    """Draw 4-6 non-overlapping objects with distinct colours."""
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    colours = rng.sample(COLOUR_NAMES, n)
    half = OBJECT_SIZE / 2
    placed: list[SceneObject] = []
    for colour in colours:
        for _ in range(1000):
            x = rng.randint(int(half) + 1, WIDTH - int(half) - 1)
            y = rng.randint(int(half) + 1, HEIGHT - int(half) - 1)
            if abs(x - WIDTH / 2) < SIDE_MARGIN:
                continue
            if all(max(abs(x - o.x), abs(y - o.y)) >= OBJECT_SIZE + 3 for o in placed):
                break
        else:  # pragma: no cover - the canvas always has room for 6 objects
            raise RuntimeError("could not place objects")
        placed.append(SceneObject(colour, rng.choice(SHAPES), float(x), float(y)))
    return Scene(placed)


def render(scene: Scene | None, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Render a scene to an RGB PIL image; ``None`` gives a blank canvas of the same size."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    if scene is None:
        return img
    draw = ImageDraw.Draw(img)
    h = OBJECT_SIZE / 2
    for o in scene.objects:
        fill = COLOURS[o.colour]
        box = (o.x - h, o.y - h, o.x + h - 1, o.y + h - 1)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(o.x, o.y - h), (o.x - h, o.y + h - 1), (o.x + h - 1, o.y + h - 1)], fill=fill)
    return img


# ----------------------------------------------------------------------------------------------------------------------
# Questions


def plural(shape: str) -> str:
    return shape + "s"


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) pair of the given type for the scene, or ``None`` if the scene cannot support it."""
    if qtype == "shape":
        o = rng.choice(scene.objects)
        return f"what shape is the {o.colour} object ?", o.shape
    if qtype == "colour":
        uniq = scene.unique_shapes()
        if not uniq:
            return None
        s = rng.choice(uniq)
        o = next(o for o in scene.objects if o.shape == s)
        return f"what colour is the {s} ?", o.colour
    if qtype == "side":
        o = rng.choice(scene.objects)
        return f"is the {o.colour} object on the left or right ?", o.side
    if qtype == "count":
        s = rng.choice(SHAPES)
        return f"how many {plural(s)} are there ?", str(scene.count(s))
    if qtype == "nearest":
        cands = [o for o in scene.objects if scene.nearest_is_clear(o.colour)]
        if not cands:
            return None
        o = rng.choice(cands)
        return f"what colour is the object nearest to the {o.colour} object ?", scene.nearest(o.colour).colour
    raise ValueError(f"unknown question type {qtype!r}")


def answer_question(scene: Scene, question: str) -> str:
    """Answer a question by parsing it against the scene metadata (an independent check of ``ask``)."""
    w = question.strip().lower().rstrip(" ?").split()
    if w[:3] == ["what", "shape", "is"]:
        return scene.by_colour(w[4]).shape
    if w[:3] == ["what", "colour", "is"] and w[4] in SHAPES:
        (o,) = [o for o in scene.objects if o.shape == w[4]]
        return o.colour
    if w[:2] == ["is", "the"]:
        return scene.by_colour(w[2]).side
    if w[:2] == ["how", "many"]:
        return str(scene.count(w[2][:-1]))
    if "nearest" in w:
        return scene.nearest(w[-2]).colour
    raise ValueError(f"cannot parse {question!r}")


def caption(scene: Scene) -> str:
    """A dense description: objects left to right with side / top-bottom / nearest neighbour, then the counts."""
    parts = []
    for o in sorted(scene.objects, key=lambda o: (o.x, o.y)):
        parts.append(f"{o.colour} {o.shape} {o.side} {o.vertical} near {scene.nearest(o.colour).colour}")
    counts = " ".join(f"{plural(s)} {scene.count(s)}" for s in SHAPES)
    return " , ".join(parts) + " . " + counts


CAPTION_QUESTION = "describe the scene ."


# ----------------------------------------------------------------------------------------------------------------------
# Examples and splits


@dataclass
class Example:
    uid: str
    split: str
    qtype: str
    question: str
    answer: str
    scene: Scene
    seed: int
    _image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = render(self.scene)
        return self._image

    def blank_image(self) -> Image.Image:
        return render(None, self.scene.width, self.scene.height)


def example_seed(split: str, seed: int, index: int) -> int:
    """Per-example seed: a hash of (split salt, split seed, index); disjoint streams per split."""
    h = hashlib.sha256(f"{_SPLIT_SALT[split]}:{seed}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def make_example(split: str, seed: int, index: int, qtype: str | None = None) -> Example:
    es = example_seed(split, seed, index)
    rng = random.Random(es)
    if qtype is None:
        qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        scene = random_scene(rng)
        qa = ask(scene, qtype, rng)
        if qa is not None:
            break
    q, a = qa
    return Example(uid=f"{split}-{seed}-{index}", split=split, qtype=qtype, question=q, answer=a, scene=scene, seed=es)


def make_split(name: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples of split ``name`` (train / validation / test), question types balanced round-robin.

    Splits draw their per-example seeds from disjoint hash streams (different salts), so they share no scene."""
    if name not in _SPLIT_SALT:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return [make_example(name, seed, i, QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(n)]


def score(pred: str, gold: str) -> float:
    """Exact match after strip/lower."""
    return float(pred.strip().lower() == gold.strip().lower())


def answer_prior(examples: list[Example]) -> dict[str, float]:
    """Accuracy of always answering the most frequent answer of each question type (and overall)."""
    from collections import Counter

    out = {}
    total = 0
    for t in QUESTION_TYPES:
        golds = [e.answer for e in examples if e.qtype == t]
        if golds:
            best = Counter(golds).most_common(1)[0][1]
            out[t] = best / len(golds)
            total += best
    out["overall"] = total / max(1, len(examples))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Prompt format: the first turn is the processor's chat template (``eval/train.py: chat_template``, saved with each
# model: image first, then " question : <q> answer :"); training sequences continue with further turns in the same
# words.


def turn_text(question: str) -> str:
    """A follow-up question turn of a training sequence (the first turn comes from the chat template)."""
    return f" question : {question} answer :"
