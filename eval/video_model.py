"""The embedded video model (trained by ``eval/train_video.py`` on the clips of ``eval/video_data.py``).

``load_video_model()`` returns ``(model, processor)`` loaded offline from ``eval/models/<name>/``;
``evaluate_video`` measures exact-match accuracy (overall, multi-frame, single-frame and per question type) with
batched, left-padded, greedy ``model.generate`` on ``processor(videos=[frames, ...], text=[prompt, ...])``.
"""

from __future__ import annotations

import torch

from .catalog import VIDEO_MODELS
from .data import score
from .embedded import MAX_NEW_TOKENS, is_available, load_embedded, predict_batches
from .video_data import MULTI_FRAME_TYPES, SINGLE_FRAME_TYPES, VIDEO_QUESTION_TYPES, VideoExample

VIDEO_MODEL = VIDEO_MODELS[0]


def is_video_model_available(name: str = VIDEO_MODEL) -> bool:
    return is_available(name)


def load_video_model(name: str = VIDEO_MODEL, dtype: torch.dtype = torch.float32):
    """Load the video model and its processor from the package folder (no network): ``load_embedded``."""
    return load_embedded(name, dtype)


def build_video_prompt(processor, question: str) -> str:
    """The prompt for one question about a clip (the processor's chat template: the video first, then the question)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def predict_video(model, processor, examples: list[VideoExample], batch_size: int = 16, blank: bool = False,
                  max_new_tokens: int = MAX_NEW_TOKENS, on_batch=None) -> list[str]:
    """Greedy short answers (left-padded batches); ``blank=True`` shows every clip as white frames;
    ``on_batch(inputs, chunk)`` after each batch (``eval/embedded.predict``'s hook)."""

    def media_and_prompts(chunk):
        videos = [e.blank_frames() if blank else e.frames for e in chunk]
        return {"videos": videos}, [build_video_prompt(processor, e.question) for e in chunk]

    return predict_batches(model, processor, examples, batch_size, media_and_prompts, max_new_tokens, on_batch)


def video_accuracy(preds: list[str], examples: list[VideoExample]) -> dict:
    """``{"n", "overall", "multi_frame", "single_frame", "<qtype>": ...}`` from predictions."""
    hits = [(score(p, e.answer), e.qtype) for p, e in zip(preds, examples)]
    res: dict = {"n": len(hits)}
    groups = {"overall": VIDEO_QUESTION_TYPES, "multi_frame": MULTI_FRAME_TYPES, "single_frame": SINGLE_FRAME_TYPES}
    groups.update({t: (t,) for t in VIDEO_QUESTION_TYPES})
    for name, types in groups.items():
        h = [x for x, t in hits if t in types]
        if h:
            res[name] = round(sum(h) / len(h), 4)
    return res


def evaluate_video(model, processor, examples: list[VideoExample], batch_size: int = 16, blank: bool = False) -> dict:
    return video_accuracy(predict_video(model, processor, examples, batch_size, blank), examples)
