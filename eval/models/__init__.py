"""The small VLMs embedded in the package, one folder each beside this file (weights, processor, ``training.json``).

``load_embedded(name)`` returns ``(model, processor)`` for any name ``vtprune models`` lists, offline; the prompt
builders give the chat-template prompt each benchmark asks with.
"""

from __future__ import annotations

import torch

from ..catalog import EMBEDDED_MODELS, VIDEO_MODELS, is_available, model_dir

MODELS = EMBEDDED_MODELS + VIDEO_MODELS  # every name load_embedded takes


def load_embedded(name: str, dtype: torch.dtype = torch.float32):
    """Load an embedded model and its processor from the package folder (no network).

    ``name`` is any model ``vtprune models`` lists: ``"llava-tiny-sortofclevr"`` (``LlavaForConditionalGeneration``,
    144 visual tokens per image) or ``"qwen2_5_vl-tiny-sortofclevr"`` (``Qwen2_5_VLForConditionalGeneration``, 150)
    answer questions about ``vtprune.eval.data`` scenes (``make_split("test", n)[i].image`` / ``.question``);
    ``"qwen2_5_vl-tiny-sortofclevr-video"`` about ``vtprune.eval.data.video`` clips (600 visual tokens per clip).
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    if name not in MODELS:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {MODELS}")
    d = model_dir(name)
    if not is_available(name):
        raise FileNotFoundError(f"embedded model {name!r} is not present under {d}; retrain it with python -m training.train (training/ in a clone)")
    processor = AutoProcessor.from_pretrained(d, local_files_only=True)
    if name in EMBEDDED_MODELS:
        # the PIL image backend is the one the image models were trained with (torchvision's resizes slightly
        # differently); the video model was trained through its video processor, which it keeps
        processor.image_processor = AutoImageProcessor.from_pretrained(d, local_files_only=True, backend="pil")
    model = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True, dtype=dtype)
    # An answer ends with </s>; a new "question" turn is never part of one: stop there too (the models were trained on
    # several question turns per sequence, and a free-form question can otherwise run on to max_new_tokens).
    tok = processor.tokenizer
    stops = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("question")) if i is not None and i != tok.unk_token_id]
    model.generation_config.eos_token_id = stops
    model.eval()
    return model, processor


def build_prompt(processor, question: str, n_images: int = 1, n_videos: int = 0) -> str:
    """The prompt string for one question (the processor's chat template: the images, then the videos, then the
    question)."""
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def build_video_prompt(processor, question: str) -> str:
    """The prompt for one question about a clip (the processor's chat template: the video first, then the question)."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def count_visual_tokens(model, input_ids: torch.Tensor) -> list[int]:
    """Image tokens per row of ``input_ids``, as vtprune's adapter for the model's family finds them."""
    from vtprune.patches import get_adapter

    return get_adapter(model).visual_mask(input_ids).sum(1).tolist()


