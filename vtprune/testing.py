"""Tiny random-weight models of the supported families, with real processors built offline.

Used by the tests and the benchmarks; handy for users who want to try vtprune without downloading a checkpoint.
Every model is built from a config with the real Hugging Face classes.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

_WORDS = ["<pad>", "<unk>", "<s>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
          "<|vision_end|>", "USER:", "ASSISTANT:", "what", "colour", "shape", "is", "the", "red", "blue",
          "green", "circle", "square", "left", "right", "?", "a", "b", "c", "d", "e", "f", "g", "h"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": _WORDS[3:8]})
    return fast


def _text_cfg(kind: str, **over):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                eos_token_id=1, tie_word_embeddings=False)
    base.update(over)
    return base


def tiny_config(family: str, num_layers: int = 4):
    from transformers import (LlavaConfig, LlavaNextConfig, Qwen2_5_VLConfig, Qwen2VLConfig)

    vocab = {w: i for i, w in enumerate(_WORDS)}
    if family in ("llava", "llava_next"):
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=28, patch_size=7, projection_dim=32)
        text = dict(model_type="llama", **_text_cfg("llama", num_hidden_layers=num_layers))
        common = dict(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
        if family == "llava":
            return LlavaConfig(**common)
        return LlavaNextConfig(**common, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    vision = dict(depth=2, hidden_size=32, embed_dim=32, num_heads=4, intermediate_size=64, patch_size=7,
                  temporal_patch_size=1, spatial_merge_size=2, in_channels=3, out_hidden_size=32, hidden_act="silu")
    if family == "qwen2_5_vl":
        vision.update(fullatt_block_indexes=[1], window_size=28)
    text = _text_cfg("qwen", num_hidden_layers=num_layers, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    cls = Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen2VLConfig
    return cls(vision_config=vision, text_config=text, image_token_id=vocab["<|image_pad|>"],
               video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
               vision_end_token_id=vocab["<|vision_end|>"])


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 4):
    """A random-weight model of ``family`` (one of FAMILIES) in eval mode, float32."""
    from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)

    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
               "qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; allowed: {list(FAMILIES)}")
    cfg = tiny_config(family, num_layers)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = classes[family](cfg).eval()
    # Random init gives near-uniform attention; larger weights make token choices matter in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "multi_modal_projector" in name or "merger" in name:
                p.mul_(8.0)
    # Random weights would happily generate image placeholders, which re-enter uncached generation as images.
    model.generation_config.suppress_tokens = list(range(len(_WORDS[:8])))
    model.generation_config.pad_token_id = 0
    return model


def tiny_processor(family: str):
    """A real processor for ``family`` with a word-level tokenizer and pixel settings matching tiny_model."""
    from transformers import (LlavaImageProcessorPil, LlavaNextImageProcessorPil, LlavaNextProcessor,
                              LlavaProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor)

    tok = tiny_tokenizer()
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if family == "llava":
        ip = LlavaImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                    do_pad=True, do_center_crop=False, **norm)
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=7,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1)
    if family == "llava_next":
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
                                        do_center_crop=False, **norm)
        return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=7,
                                  vision_feature_select_strategy="default", image_token="<image>",
                                  num_additional_image_tokens=1)
    ip = Qwen2VLImageProcessorPil(patch_size=7, merge_size=2, temporal_patch_size=1,
                                  min_pixels=14 * 14, max_pixels=56 * 56, **norm)
    tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
    from transformers import Qwen2VLVideoProcessor  # needs torchvision (the `test` extra installs it)

    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor())


def image_prompt(family: str, question: str = "what colour is the circle ?") -> str:
    tag = "<|vision_start|> <|image_pad|> <|vision_end|>" if family.startswith("qwen") else "<image>"
    return f"USER: {tag} {question} ASSISTANT:"


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
