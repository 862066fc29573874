"""The embedded benchmarks' data, generated offline and deterministically from seeds: Sort-of-CLEVR-style scenes
with one question each (``image``) and 8-frame clips of moving shapes (``video``)."""

from .image import HEIGHT, QUESTION_TYPES, WIDTH, Example, answer_prior, make_example, make_split, score
from .video import MULTI_FRAME_TYPES, SINGLE_FRAME_TYPES, VIDEO_QUESTION_TYPES, VideoExample, make_video_split

__all__ = [
    "HEIGHT",
    "MULTI_FRAME_TYPES",
    "QUESTION_TYPES",
    "SINGLE_FRAME_TYPES",
    "VIDEO_QUESTION_TYPES",
    "WIDTH",
    "Example",
    "VideoExample",
    "answer_prior",
    "make_example",
    "make_split",
    "make_video_split",
    "score",
]
