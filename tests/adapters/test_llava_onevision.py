"""LLaVA-OneVision specifics the parametrized suites do not reach: the token layout, the anyres_max downscale,
multi-image samples (base crop only), SigLIP's pooling head in the FLOPs count, and videos next to images.
The tiny model's images are packed without downscaling; ``anyres_max_1`` here makes every anyres image exceed
the cap, so the bilinear downscale runs."""

import functools

import numpy as np
import pytest
import torch

import vtprune
from helpers import cached_model, cached_processor, check_prefill, row
from vtprune.patches import FAMILIES
from vtprune.patches.llava_onevision import crop_counts
from vtprune.testing import tiny_batch, tiny_images, tiny_tokenizer

FAMILY = "llava_onevision"
OV = FAMILIES[FAMILY]


@functools.cache
def capped(attn="sdpa", use_head=False):
    """A tiny OneVision model and processor whose anyres_max cap is one crop's worth of tokens."""
    cfg = OV.tiny.config(vision_aspect_ratio="anyres_max_1")
    cfg.vision_config.vision_use_head = use_head
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = OV.tiny.model_class()(cfg).eval()
    with torch.no_grad():  # as vtprune.testing.tiny_model: weights that make token choices matter
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "multi_modal_projector" in name:
                p.mul_(8.0)
    return model, OV.tiny.processor(tiny_tokenizer(), vision_aspect_ratio="anyres_max_1")


def lm_input(model, batch):
    """The merged language-model inputs of a forward, as they are before any pruning hook runs."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(k), with_kwargs=True, prepend=True
    )
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen


def projector_inputs(model, batch):
    """The projector's input of each run of a forward, in run order."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        model(**batch)
    finally:
        handle.remove()
    return seen


@pytest.fixture
def unpatch():
    """Yields a function marking a model to be unpatched after the test, even when it fails."""
    models = []
    yield models.append
    for m in models:
        if hasattr(m, "_vtprune_pruner"):
            vtprune.remove_pruner(m)


@pytest.fixture
def patched(unpatch):
    """test_flops.check_prefill's patcher: apply a schedule (None: leave unpatched)."""

    def apply(model, schedule):
        if schedule is not None:
            unpatch(model)
            vtprune.apply_pruner(model, schedule=schedule)
        return model

    return apply


@torch.no_grad()
def test_a_wide_image_gives_base_crop_plus_newline_rows():
    """28x56 (h x w): 16 base-crop tokens, then the two crops side by side as 4 rows of 8 plus a newline each."""
    model = cached_model(FAMILY, "sdpa")
    batch = tiny_batch(FAMILY, cached_processor(FAMILY), tiny_images(1, sizes=[(56, 28)]))
    vis = batch["input_ids"] == model.config.image_token_id
    assert int(vis.sum()) == 52
    embeds = lm_input(model, batch)["inputs_embeds"]
    newline = OV.adapter(model).newline_mask(embeds, vis)[vis]
    assert newline.nonzero().flatten().tolist() == [16 + 9 * r + 8 for r in range(4)]


@torch.no_grad()
def test_downscaled_images_are_pruned_exactly(unpatch):
    """With the cap exceeded: keep-all is bit-identical, a layer-0 stage equals the unpatched language model on
    text + kept tokens, and each sample of a padded batch gets what it gets alone."""
    model, proc = capped()
    batch = tiny_batch(FAMILY, proc, tiny_images(2))
    full = lm_input(model, batch)
    vis = batch["input_ids"] == model.config.image_token_id
    # 56x56 -> 2x2 crops = 8x8 features, twice the cap's 4x4 per side: downscaled to 4x4 (+4 newlines, +16 base)
    assert int(vis[0].sum()) == 16 + 4 * 5
    ref = model(**batch).logits
    unpatch(model)
    vtprune.apply_pruner(model, method="divprune", keep_ratio=1.0)
    assert torch.equal(model(**batch).logits, ref)
    vtprune.apply_pruner(model, method="divprune", keep_ratio=0.4, replace=True)
    pruned = model(**batch).logits
    kept = vtprune.get_stats(model)[0]["kept_indices"]
    for i in range(2):
        keep = batch["attention_mask"][i].bool() & ~vis[i]
        keep[vis[i].nonzero().flatten()[kept[i][kept[i] >= 0]]] = True
        with vtprune.paused(model):
            oracle = model.model.language_model(
                inputs_embeds=full["inputs_embeds"][i : i + 1, keep],
                position_ids=torch.arange(keep.shape[0])[keep][None],
                attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
            )
        logits = model.lm_head(oracle.last_hidden_state)
        torch.testing.assert_close(pruned[i, -logits.shape[1] :], logits[0], rtol=0, atol=1e-5)
        alone = model(**row(batch, i)).logits
        torch.testing.assert_close(pruned[i, -alone.shape[1] :], alone[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_projector_rows_of_downscaled_images(unpatch):
    """ZOO's projector rows: one per non-newline token; exact for the base crop (no interpolation there) and for
    an image under the cap, an interpolation of the inputs for the downscaled part."""
    model, proc = capped()
    batch = tiny_batch(FAMILY, proc, tiny_images(1, sizes=[(56, 56)]))
    unpatch(model)
    vtprune.apply_pruner(model, method="zoo", keep_ratio=0.5, m=2)
    pruner = model._vtprune_pruner
    embeds = lm_input(model, batch)["inputs_embeds"]
    rows = pruner.adapter.projector_rows(projector_inputs(model, batch), pruner.state.call)["image"]
    vis = batch["input_ids"] == model.config.image_token_id
    tokens = embeds[vis & ~pruner.adapter.newline_mask(embeds, vis)]
    assert rows.shape[0] == tokens.shape[0] == 16 + 16
    torch.testing.assert_close(pruner.projector()(rows[:16]), tokens[:16], rtol=1e-5, atol=1e-4)
    assert vtprune.get_stats(model)[0]["tokens_after"] == [round(0.5 * int(vis.sum()))]


def multi_image_batch(proc, images_per_sample):
    """One prompt per entry of images_per_sample, each with that many <image> tags, left padded."""
    images = tiny_images(sum(images_per_sample), seed=2)
    nested, start = [], 0
    for n in images_per_sample:
        nested.append(images[start : start + n])
        start += n
    text = [
        f"USER: {' '.join(['<image>'] * n)} what colour is the circle {'?' * n} ASSISTANT:" for n in images_per_sample
    ]
    return proc(images=nested, text=text, return_tensors="pt", padding=True)


@torch.no_grad()
def test_multi_image_sample_runs_base_crops(unpatch, patched):
    """A sample with two images runs each image's base crop only (16 + 1 newline); the other sample's single
    image is anyres. Keep-all is bit-identical, ZOO's projector rows give back the visual embeddings, and the
    FLOPs count the crops the model really ran."""
    model, proc = cached_model(FAMILY, "eager"), cached_processor(FAMILY)
    batch = multi_image_batch(proc, [2, 1])
    vis = batch["input_ids"] == model.config.image_token_id
    assert vis[0].sum() == 2 * 17 and vis[1].sum() > 17
    ref = model(**batch).logits
    unpatch(model)
    vtprune.apply_pruner(model, method="zoo", keep_ratio=1.0, m=2)
    assert torch.equal(model(**batch).logits, ref)
    pruner = model._vtprune_pruner
    embeds = lm_input(model, batch)["inputs_embeds"]
    rows = pruner.adapter.projector_rows(projector_inputs(model, batch), pruner.state.call)["image"]
    tokens = embeds[vis & ~pruner.adapter.newline_mask(embeds, vis)]
    torch.testing.assert_close(pruner.projector()(rows), tokens, rtol=1e-5, atol=1e-4)
    vtprune.remove_pruner(model)
    check_prefill(model, batch, None, patched)
    check_prefill(model, batch, [dict(method="pool", layer=0, keep_ratio=0.5)], patched)


@pytest.mark.parametrize("use_head", [False, True])
def test_flops_with_downscale_and_pooling_head(use_head, patched):
    """The bilinear downscale is not a matmul (FlopCounterMode counts none); SigLIP's pooling head, when the
    config enables it, runs on every crop and is counted."""
    model, proc = capped("eager", use_head)
    batch = tiny_batch(FAMILY, proc, tiny_images(2))
    check_prefill(model, batch, None, patched)
    check_prefill(
        model,
        batch,
        [dict(method="divprune", layer=0, keep_ratio=0.5), dict(method="random", layer=2, keep_ratio=0.5)],
        patched,
    )


@torch.no_grad()
def test_pooling_head_flops_exactly():
    """The head's share alone (the whole-model comparison above has a 2 % tolerance): the count with the head
    minus the count without equals FlopCounterMode on the head over the same crops."""
    from torch.utils.flop_counter import FlopCounterMode

    model, proc = capped("eager", use_head=True)
    batch = tiny_batch(FAMILY, proc, tiny_images(2))
    with_head = vtprune.flops.vision_flops(model.config, batch["pixel_values"], image_sizes=batch["image_sizes"])
    no_head = vtprune.flops.vision_flops(
        capped("eager")[0].config, batch["pixel_values"], image_sizes=batch["image_sizes"]
    )
    crops = sum(crop_counts(model.config, batch["image_sizes"]))
    vc = model.config.vision_config
    tokens = torch.randn(crops, (vc.image_size // vc.patch_size) ** 2, vc.hidden_size)
    with FlopCounterMode(display=False) as fc:
        model.model.vision_tower.head(tokens)
    assert with_head - no_head == fc.get_total_flops()


def video_and_image_batch(proc, frames=4):
    """One sample with a video (frames pooled 4x4 -> 2x2, one newline) and an image."""
    video = np.random.default_rng(5).integers(0, 255, (frames, 28, 28, 3), dtype=np.uint8)
    return proc(
        images=tiny_images(1),
        videos=[video],
        text=["USER: <video> <image> what colour is the circle ? ASSISTANT:"],
        return_tensors="pt",
    )


@torch.no_grad()
def test_image_and_video_units_are_pruned_exactly(unpatch):
    """An image and a video (frames pooled to 2x2, one newline after the clip) are two units with their own
    rates; keep-all is bit-identical, and a layer-0 stage equals the unpatched language model on text + kept
    tokens; cached and uncached generation agree."""
    model, proc = cached_model(FAMILY, "sdpa"), cached_processor(FAMILY)
    batch = video_and_image_batch(proc)
    vis = OV.adapter(model).visual_mask(batch["input_ids"])[0]
    n_video = int((batch["input_ids"][0] == model.config.video_token_id).sum())
    assert n_video == 4 * 2 * 2 + 1
    full = lm_input(model, batch)
    ref = model(**batch).logits
    unpatch(model)
    vtprune.apply_pruner(model, method="pool", keep_ratio=1.0)
    assert torch.equal(model(**batch).logits, ref)
    vtprune.apply_pruner(model, method="divprune", keep_ratio=0.5, video_keep_ratio=0.25, replace=True)
    pruned = model(**batch).logits
    stats = vtprune.get_stats(model)[0]
    units = stats["units"][0]
    assert [(u.kind, u.tokens_before, u.tokens_after) for u in units] == [
        ("video", n_video, round(0.25 * n_video)),
        ("image", int(vis.sum()) - n_video, round(0.5 * (int(vis.sum()) - n_video))),
    ]
    kept = stats["kept_indices"][0]
    keep = ~vis
    keep[vis.nonzero().flatten()[kept]] = True
    with vtprune.paused(model):
        oracle = model.model.language_model(
            inputs_embeds=full["inputs_embeds"][:, keep], position_ids=torch.arange(keep.shape[0])[keep][None]
        )
    torch.testing.assert_close(pruned[0], model.lm_head(oracle.last_hidden_state)[0], rtol=0, atol=1e-5)
    gen = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    cached, uncached = model.generate(**batch, **gen), model.generate(**batch, use_cache=False, **gen)
    assert torch.equal(cached.sequences, uncached.sequences)


def test_video_flops_match_the_flop_counter(patched):
    """The tower and projector run once per video frame too; the 2x pooling is not a matmul (not counted)."""
    model, batch = cached_model(FAMILY, "eager"), video_and_image_batch(cached_processor(FAMILY))
    check_prefill(model, batch, None, patched)
    check_prefill(model, batch, [dict(method="pool", layer=0, keep_ratio=0.5)], patched)
