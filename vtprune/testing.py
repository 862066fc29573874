"""Tiny random-weight models of the supported families, with real processors built offline.

Used by the tests and the benchmarks; handy for users who want to try vtprune without downloading a checkpoint.
Every model is built from a config with the real Hugging Face classes.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .patches import FAMILIES as _REGISTRY
from .patches import Adapter
from .patches.base import TINY_IDS, TINY_SPECIAL, TINY_VOCAB

FAMILIES = tuple(_REGISTRY)  # the model_types of every registered family
# Anyres families (their adapters find newline tokens): rows of a batch hold different visual-token counts.
NEWLINE_FAMILIES = tuple(f for f in FAMILIES if _REGISTRY[f].adapter.newline_mask is not Adapter.newline_mask)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", padding_side="left"
    )
    fast.add_special_tokens({"additional_special_tokens": TINY_SPECIAL})
    return fast


def _tiny(family: str):
    if family not in _REGISTRY:
        raise ValueError(f"unknown family {family!r}; allowed: {list(FAMILIES)}")
    return _REGISTRY[family].tiny


def tiny_config(family: str, num_layers: int = 4):
    return _tiny(family).config(num_layers)


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 4):
    """A random-weight model of ``family`` (one of FAMILIES) in eval mode, float32."""
    cls = _tiny(family)
    cfg = cls.config(num_layers)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls.model_class()(cfg).eval()
    # Random init gives near-uniform attention; larger weights make token choices matter in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "multi_modal_projector" in name or "merger" in name:
                p.mul_(8.0)
    # Random weights would happily generate image placeholders, which re-enter uncached generation as images.
    model.generation_config.suppress_tokens = [0, 1, 2] + [TINY_IDS[w] for w in TINY_SPECIAL]
    model.generation_config.pad_token_id = 0
    return model


def tiny_processor(family: str):
    """A real processor for ``family`` with a word-level tokenizer and pixel settings matching tiny_model."""
    return _tiny(family).processor(tiny_tokenizer())


def image_prompt(family: str, question: str = "what colour is the circle ?") -> str:
    return f"USER: {_tiny(family).prompt_tag} {question} ASSISTANT:"


def video_prompt(family: str, question: str = "what moved ?", images: int = 0) -> str:
    """A prompt with ``images`` image placeholders, then one video placeholder."""
    cls = _tiny(family)
    if cls.video_tag is None:
        raise ValueError(f"family {family!r} takes no videos")
    tags = " ".join([cls.prompt_tag] * images + [cls.video_tag])
    return f"USER: {tags} {question} ASSISTANT:"


def tiny_videos(n: int, frames: int = 3, seed: int = 0, sizes=None) -> list:
    """``n`` random RGB clips as uint8 arrays [frames, height, width, 3]; ``sizes`` (width, height) per clip."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(42 - 14 * (i % 2), 28) for i in range(n)]
    return [rng.integers(0, 255, (frames, h, w, 3), dtype=np.uint8) for w, h in sizes[:n]]


def tiny_images(n: int, seed: int = 0, sizes=None) -> list:
    """``n`` random RGB images; ``sizes`` is a list of (width, height), default varied non-square sizes."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(56 - 7 * (i % 3), 42 + 14 * ((i + 1) % 2)) for i in range(n)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def tiny_batch(family: str, processor, images, questions=None):
    """Processor output for one image per prompt, left padded (questions of different lengths)."""
    questions = questions or ["what colour is the circle ?", "is the square left ?"][: len(images)]
    questions = [questions[i % len(questions)] for i in range(len(images))]
    text = [image_prompt(family, q) for q in questions]
    return processor(images=images, text=text, return_tensors="pt", padding=True)
