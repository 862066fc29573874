"""Greedy short answers of the embedded models over left-padded batches, and exact-match accuracy (overall, per
question type, and for clips multi-frame and single-frame)."""

from __future__ import annotations

import torch

from ..data import QUESTION_TYPES, Example, make_split, score
from ..data.video import MULTI_FRAME_TYPES, SINGLE_FRAME_TYPES, VIDEO_QUESTION_TYPES, VideoExample
from ..models import build_prompt, build_video_prompt

DEFAULT_EVAL_SIZE = 1000  # examples of a named split when no list and no limit is given
MAX_NEW_TOKENS = 3


def _as_examples(split, limit):
    if isinstance(split, str):
        return make_split(split, limit or DEFAULT_EVAL_SIZE, seed=0)
    ex = list(split)
    return ex[:limit] if limit else ex


def generate_answers(model, tok, inputs, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of one left-padded batch, decoded and stripped."""
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return [s.strip() for s in tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


@torch.no_grad()
def predict_batches(
    model, processor, examples, batch_size: int, media_and_prompts, max_new_tokens: int = MAX_NEW_TOKENS, on_batch=None
) -> list[str]:
    """Greedy answers over left-padded batches; ``media_and_prompts(chunk)`` gives the processor's media keyword
    arguments (``images=`` / ``videos=``) and the prompts of a chunk of examples."""
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    preds: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            media, texts = media_and_prompts(chunk)
            inputs = processor(text=texts, padding=True, return_tensors="pt", **media)
            inputs = {k: (v.to(model.dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
            preds.extend(generate_answers(model, tok, inputs, max_new_tokens))
            if on_batch is not None:
                on_batch(inputs, chunk)
    finally:
        tok.padding_side = old_side
    return preds


def predict(
    model,
    processor,
    examples: list[Example],
    batch_size: int = 16,
    blank: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    on_batch=None,
) -> list[str]:
    """Greedy short answers for a list of examples (left-padded batches). ``on_batch(inputs, chunk)`` is called
    after each batch is generated (the harness reads pruning stats and FLOPs there)."""

    def media_and_prompts(chunk):
        images = [e.blank_image() if blank else e.image for e in chunk]
        return {"images": images}, [build_prompt(processor, e.question) for e in chunk]

    return predict_batches(model, processor, examples, batch_size, media_and_prompts, max_new_tokens, on_batch)


def evaluate_accuracy(model, processor, split="test", limit=None, batch_size: int = 16, blank: bool = False) -> dict:
    """Exact-match accuracy: ``{"overall": acc, "n": n, "<qtype>": acc, ...}``.

    ``split`` is a split name (``make_split(split, limit or 1000, seed=0)``) or a list of ``Example``.
    ``blank=True`` replaces every image by an empty canvas of the same size (measures the answer prior the model
    falls back to when it cannot see anything)."""
    examples = _as_examples(split, limit)
    preds = predict(model, processor, examples, batch_size=batch_size, blank=blank)
    res: dict = {"n": len(examples)}
    hits = [score(p, e.answer) for p, e in zip(preds, examples)]
    res["overall"] = sum(hits) / max(1, len(hits))
    for t in QUESTION_TYPES:
        h = [x for x, e in zip(hits, examples) if e.qtype == t]
        if h:
            res[t] = sum(h) / len(h)
    return res


def predict_video(
    model,
    processor,
    examples: list[VideoExample],
    batch_size: int = 16,
    blank: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    on_batch=None,
) -> list[str]:
    """Greedy short answers (left-padded batches); ``blank=True`` shows every clip as white frames;
    ``on_batch(inputs, chunk)`` after each batch (``harness.predict``'s hook)."""

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
