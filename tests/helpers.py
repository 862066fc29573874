"""Inputs the condition tests build from the tiny models' batches: packed rows and continued generation."""
import torch

from conftest import make_batch, row

MEDIA_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images", "pixel_values_videos",
              "video_grid_thw")


def packed(model, samples: list) -> dict:
    """One row holding ``samples`` (unpadded single-sample batches, as ``conftest.row`` gives them) back to back,
    the padding-free way transformers supports: no attention mask, position ids restarting at 0 for each sample
    (for M-RoPE models a [4, 1, L] tensor whose first row is the text positions)."""
    out = {"input_ids": torch.cat([s["input_ids"] for s in samples], 1)}
    if "mm_token_type_ids" in samples[0]:
        out["mm_token_type_ids"] = torch.cat([s["mm_token_type_ids"] for s in samples], 1)
    for key in MEDIA_KEYS:
        if key in samples[0]:
            out[key] = torch.cat([s[key] for s in samples])
    text = torch.cat([torch.arange(s["input_ids"].shape[1]) for s in samples])[None]
    if "image_grid_thw" in samples[0]:
        rope = [model.model.get_rope_index(s["input_ids"], image_grid_thw=s["image_grid_thw"],
                                           mm_token_type_ids=s["mm_token_type_ids"])[0] for s in samples]
        out["position_ids"] = torch.cat([text[None], torch.cat(rope, -1)])
    else:
        out["position_ids"] = text
    return out


def packed_pair(model, family: str, second_seed: int = 0) -> dict:
    """Sample 0 of ``make_batch(family, 2)`` packed with sample 1 of ``make_batch(family, 2, seed=second_seed)``:
    the same sizes, other pixels when the seed differs."""
    return packed(model, [row(make_batch(family, 2), 0), row(make_batch(family, 2, seed=second_seed), 1)])


def continuation(batch: dict, sequences: torch.Tensor) -> dict:
    """The inputs that continue a generate() call from its returned cache: the prompt plus the tokens generated so
    far, the mask grown over them, no images."""
    extra = sequences.shape[1] - batch["input_ids"].shape[1]
    b = sequences.shape[0]
    out = {"input_ids": sequences,
           "attention_mask": torch.cat([batch["attention_mask"], torch.ones(b, extra, dtype=torch.long)], 1)}
    if "mm_token_type_ids" in batch:
        types = batch["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, torch.zeros(b, extra, dtype=types.dtype)], 1)
    return out
