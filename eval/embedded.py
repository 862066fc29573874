"""The small VLMs embedded in the package (trained by ``eval/train.py`` on the ``eval/data.py`` benchmark).

``load_embedded(name)`` returns ``(model, processor)`` loaded offline from ``eval/models/<name>/``;
``evaluate_accuracy`` measures exact-match accuracy (overall and per question type) with batched, left-padded,
greedy ``model.generate``.
"""

from __future__ import annotations

import torch

from .catalog import EMBEDDED_MODELS, MODELS_DIR, VIDEO_MODELS, is_available, model_dir, training_info  # noqa: F401
from .data import QUESTION_TYPES, Example, make_split, score

DEFAULT_EVAL_SIZE = 1000  # examples of a named split when no list and no limit is given
MAX_NEW_TOKENS = 3


def load_embedded(name: str, dtype: torch.dtype = torch.float32):
    """Load an embedded model and its processor from the package folder (no network).

    ``name`` is any model ``vtprune models`` lists: ``"llava-tiny-sortofclevr"`` (``LlavaForConditionalGeneration``,
    144 visual tokens per image) or ``"qwen2_5_vl-tiny-sortofclevr"`` (``Qwen2_5_VLForConditionalGeneration``, 150)
    answer questions about ``vtprune.eval.data`` scenes (``make_split("test", n)[i].image`` / ``.question``);
    ``"qwen2_5_vl-tiny-sortofclevr-video"`` about ``vtprune.eval.video_data`` clips (600 visual tokens per clip).
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    if name not in EMBEDDED_MODELS + VIDEO_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {EMBEDDED_MODELS + VIDEO_MODELS}")
    d = model_dir(name)
    if not is_available(name):
        raise FileNotFoundError(f"embedded model {name!r} is not present under {d}; run eval/train.py to build it")
    processor = AutoProcessor.from_pretrained(d, local_files_only=True)
    if name in EMBEDDED_MODELS:
        # the PIL image backend is the one the image models were trained with (torchvision's resizes slightly
        # differently); the video model was trained through its video processor, which it keeps
        processor.image_processor = AutoImageProcessor.from_pretrained(d, local_files_only=True, backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True, dtype=dtype)
    model.eval()
    return model, processor


def build_prompt(processor, question: str, n_images: int = 1, n_videos: int = 0) -> str:
    """The prompt string for one question (the processor's chat template: the images, then the videos, then the
    question)."""
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def count_visual_tokens(model, input_ids: torch.Tensor) -> list[int]:
    """Image tokens per row of ``input_ids``, as vtprune's adapter for the model's family finds them."""
    from vtprune.patches import get_adapter

    return get_adapter(model).visual_mask(input_ids).sum(1).tolist()


def _as_examples(split, limit):
    if isinstance(split, str):
        return make_split(split, limit or DEFAULT_EVAL_SIZE, seed=0)
    ex = list(split)
    return ex[:limit] if limit else ex


def generate_answers(model, tok, inputs, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers of one left-padded batch, decoded and stripped."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [s.strip() for s in tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


@torch.no_grad()
def predict_batches(model, processor, examples, batch_size: int, media_and_prompts,
                    max_new_tokens: int = MAX_NEW_TOKENS, on_batch=None) -> list[str]:
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


def predict(model, processor, examples: list[Example], batch_size: int = 16, blank: bool = False,
            max_new_tokens: int = MAX_NEW_TOKENS, on_batch=None) -> list[str]:
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
