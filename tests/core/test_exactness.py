"""The exactness properties of the patch layer, on tiny random-weight models of every family."""

import pytest
import torch

import vtprune
from helpers import cached_model, make_batch, row

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def visual_count(model, batch):
    return (batch["input_ids"] == model.config.image_token_id).sum(1)


@torch.no_grad()
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("method,layer", [("random", 0), ("fastv", 2), ("visionzip", None)])
def test_keep_all_is_bit_identical(model, n, method, layer):
    """``visionzip`` runs inside the vision tower on LLaVA-1.5, on the LLM input elsewhere."""
    batch = make_batch(model.config.model_type, n)
    ref = model(**batch).logits
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0, layer=layer)
    out = model(**batch).logits
    stats = vtprune.get_stats(model)
    assert stats[0]["tokens_after"] == visual_count(model, batch).tolist()  # the gather path really ran
    assert torch.equal(out, ref)


@torch.no_grad()
@pytest.mark.parametrize("method", ["pool", "divprune", "visionzip", "vispruner"])
def test_cached_equals_uncached(model, method):
    """Methods that read the text (cdpruner, dart, fastv, pdrop) choose again at every uncached step, from the
    prompt plus the tokens generated so far: only text-blind methods keep the same tokens."""
    batch = make_batch(model.config.model_type, 2)
    vtprune.apply_pruner(model, method=method, keep_ratio=0.4)
    cached = model.generate(**batch, use_cache=True, **GEN)
    uncached = model.generate(**batch, use_cache=False, **GEN)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(
    "method,layer",
    [
        ("pool", 0),
        ("divprune", 0),
        ("fastv", 2),
        ("random", 1),
        ("visionzip", None),
        ("vispruner", None),
        ("cdpruner", 0),
        ("dart", 2),
    ],
)
def test_batched_equals_per_sample(model, method, layer):
    family = model.config.model_type
    batch = make_batch(family, 2)
    assert batch["attention_mask"].min() == 0  # really left padded
    vtprune.apply_pruner(model, method=method, keep_ratio=0.5, layer=layer)
    both = model(**batch).logits
    kept_both = vtprune.get_stats(model)[0]["kept_indices"]
    for i in range(2):
        alone = model(**row(batch, i)).logits
        kept = vtprune.get_stats(model)[0]["kept_indices"]
        k = kept.shape[1]
        assert torch.equal(kept_both[i, :k], kept[0])
        torch.testing.assert_close(both[i, -alone.shape[1] :], alone[0], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 1, 3])
def test_cache_holds_text_plus_kept(model, layer):
    batch = make_batch(model.config.model_type, 2)
    length = batch["input_ids"].shape[1]
    n_vis = visual_count(model, batch)
    vtprune.apply_pruner(model, method="random", keep_ratio=0.5, layer=layer)
    out = model(**batch, use_cache=True)
    kept = torch.tensor(vtprune.get_stats(model)[0]["tokens_after"])
    expected = int((length - n_vis + kept).max())  # rows are right-aligned to the longest
    for i, cached_layer in enumerate(out.cache.layers):
        assert cached_layer.keys.shape[-2] == (expected if i >= layer else length), i


@torch.no_grad()
def test_generate_with_in_llm_stage_matches_uncached_prefix(model):
    """Decode steps at an in-LLM stage see a mask rebuilt for that layer's shorter cache."""
    batch = make_batch(model.config.model_type, 2)
    vtprune.apply_pruner(model, method="random", keep_ratio=0.5, layer=2, seed=3)
    out = model.generate(**batch, **GEN)
    # Greedy step t must equal a fresh prefill of the prompt + the t tokens generated before it, since random
    # with a fixed seed picks the same visual tokens whatever text follows.
    seq = out.sequences
    plen = batch["input_ids"].shape[1]
    for t in range(1, 4):
        extended = dict(batch)
        extended["input_ids"] = seq[:, : plen + t]
        extended["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(2, t, dtype=torch.long)], 1)
        if "mm_token_type_ids" in batch:
            extended["mm_token_type_ids"] = torch.cat(
                [batch["mm_token_type_ids"], torch.zeros(2, t, dtype=torch.long)], 1
            )
        logits = model(**extended).logits[:, -1]
        torch.testing.assert_close(logits, out.logits[t], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method", ["random", "pool"])
def test_pruned_equals_oracle_on_kept_tokens(model, method):
    """A layer-0 stage equals the unpatched language model run, sample by sample, on an input that already
    holds only the text and the kept visual tokens, at their original positions."""
    batch = make_batch(model.config.model_type, 2)
    lm = model.model.language_model
    seen = {}
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    model(**batch)  # unpatched: the full merged input of the language model
    full = dict(seen)
    if full.get("deepstack_visual_embeds") is not None:
        handle.remove()
        pytest.skip("the oracle needs the kept tokens' DeepStack features: tests/adapters/test_qwen3_vl.py builds it")
    vtprune.apply_pruner(model, method=method, keep_ratio=0.5)
    pruned = model(**batch).logits
    kept = vtprune.get_stats(model)[0]["kept_indices"]
    handle.remove()
    vtprune.remove_pruner(model)
    vis = batch["input_ids"] == model.config.image_token_id
    pos = full["position_ids"]
    if pos is None:
        pos = torch.arange(vis.shape[1]).expand(2, -1)
    for i in range(2):
        keep = batch["attention_mask"][i].bool() & ~vis[i]
        vis_pos = vis[i].nonzero().flatten()
        keep[vis_pos[kept[i][kept[i] >= 0]]] = True
        oracle = lm(
            inputs_embeds=full["inputs_embeds"][i : i + 1, keep],
            position_ids=pos[..., i : i + 1, keep],
            attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
        )
        logits = model.lm_head(oracle.last_hidden_state)
        torch.testing.assert_close(pruned[i, -logits.shape[1] :], logits[0], rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("layer", [1, 3])
def test_in_llm_stage_equals_manual_layer_loop(family, layer):
    """Layers from K on run, with their original rotary positions, on the kept hidden states only."""
    model = cached_model(family, "sdpa")
    batch = row(make_batch(family, 2), 1)  # one unpadded sample: sdpa's plain causal path is the reference
    lm = model.model.language_model
    entering = {}
    handle = lm.layers[layer].register_forward_pre_hook(
        lambda m, a, k: entering.update(k, hidden=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    model(**batch)
    handle.remove()
    if layer < len(getattr(model.config.vision_config, "deepstack_visual_indexes", ())):
        pytest.skip("DeepStack features are added after layer K: tests/adapters/test_qwen3_vl.py loops with them")
    vtprune.apply_pruner(model, method="random", keep_ratio=0.4, layer=layer, seed=5)
    pruned = model(**batch).logits
    kept = vtprune.get_stats(model)[0]["kept_indices"][0]
    vtprune.remove_pruner(model)
    vis = batch["input_ids"][0] == model.config.image_token_id
    keep = ~vis
    keep[vis.nonzero().flatten()[kept]] = True
    hidden = entering["hidden"][:, keep]
    cos, sin = entering["position_embeddings"]
    pos = entering.get("position_ids")
    for decoder_layer in lm.layers[layer:]:
        hidden = decoder_layer(
            hidden,
            attention_mask=None,
            position_embeddings=(cos[:, keep], sin[:, keep]),
            position_ids=None if pos is None else pos[..., keep],
        )
    logits = model.lm_head(lm.norm(hidden))
    torch.testing.assert_close(pruned, logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_two_in_llm_stages_equal_manual_layer_loop(family):
    """The second in-LLM stage gathers from the hidden states, cos/sin and positions the first one left."""
    model = cached_model(family, "sdpa")
    batch = row(make_batch(family, 2), 0)
    lm = model.model.language_model
    entering = {}
    handle = lm.layers[2].register_forward_pre_hook(
        lambda m, a, k: entering.update(k, hidden=a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    model(**batch)
    handle.remove()
    vtprune.apply_pruner(
        model,
        schedule=[
            dict(method="random", layer=2, keep_ratio=0.6, seed=1),
            dict(method="random", layer=3, keep_ratio=0.5, seed=2),
        ],
    )
    pruned = model(**batch).logits
    stats = vtprune.get_stats(model)
    vtprune.remove_pruner(model)
    vis = batch["input_ids"][0] == model.config.image_token_id
    hidden, (cos, sin), pos = entering["hidden"], entering["position_embeddings"], entering.get("position_ids")
    for j, s in zip((2, 3), stats):
        keep = ~vis
        keep[vis.nonzero().flatten()[s["kept_indices"][0]]] = True
        vis, hidden, cos, sin = vis[keep], hidden[:, keep], cos[:, keep], sin[:, keep]
        pos = None if pos is None else pos[..., keep]
        hidden = lm.layers[j](hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
    torch.testing.assert_close(pruned, model.lm_head(lm.norm(hidden)), rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method,layer", [("divprune", 0), ("fastv", 2)])
def test_beam_search(family, method, layer):
    model = cached_model(family, "sdpa")
    batch = make_batch(family, 2)
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    ref = model.generate(**batch, **beams)
    vtprune.apply_pruner(model, method=method, keep_ratio=1.0, layer=layer)
    try:
        assert torch.equal(model.generate(**batch, **beams), ref)  # keep-all: the stock beam search
        vtprune.apply_pruner(model, method=method, keep_ratio=0.4, layer=layer, replace=True)
        both = model.generate(**batch, **beams)
        kept = vtprune.get_stats(model)[0]["kept_indices"]  # prefill of 2 samples x 3 beams
        alone = [model.generate(**row(batch, i), **beams) for i in range(2)]
        model(**batch)  # a plain prefill of the 2 samples chooses what each sample's beams share
        plain = vtprune.get_stats(model)[0]["kept_indices"]
        # fastv re-chooses from each new last token when run without a cache, so only layer 0 compares there
        uncached = model.generate(**batch, use_cache=False, **beams) if layer == 0 else None
    finally:
        vtprune.remove_pruner(model)
    assert kept.shape[0] == 6 and all(torch.equal(kept[i], plain[i // 3]) for i in range(6))
    for i in range(2):
        n = alone[i].shape[1]
        assert torch.equal(both[2 * i : 2 * i + 2, -n:], alone[i])
    if uncached is not None:
        assert torch.equal(both, uncached)


@torch.no_grad()
@pytest.mark.parametrize(
    "settings",
    [
        dict(method="pool"),
        dict(method="divprune"),
        dict(method="zoo"),
        dict(method="random", positions="renumber"),
        dict(
            schedule=[dict(method="divprune", layer=0, keep_ratio=0.5), dict(method="fastv", layer=2, keep_ratio=0.5)]
        ),
    ],
)
def test_layer0_on_encoded_images_equals_full_sequence(settings):
    """Pre-encoded LLaVA images (generate()'s prefill): the layer-0 stage chooses from the features before the body
    embeds anything, and the body builds only the kept sequence. Same logits (dummy slots included), picks and
    caller's image outputs as pruning the full sequence; rows keep different counts (2 images vs 1)."""
    from helpers import cached_processor
    from vtprune.testing import image_prompt, tiny_images

    model, tag = cached_model("llava", "sdpa"), image_prompt("llava")
    text = [tag.replace("<image>", "<image> <image>"), image_prompt("llava", "is the square left ?")]
    batch = cached_processor("llava")(images=tiny_images(3), text=text, return_tensors="pt", padding=True)
    settings = dict(settings) if "schedule" in settings else dict(settings, keep_ratio=0.5)
    vtprune.apply_pruner(model, **settings)
    try:
        full = model(**batch)
        full_stats = vtprune.get_stats(model)
        encoded = {"image": model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)}
        lengths = []
        hook = model.model.language_model.embed_tokens.register_forward_pre_hook(
            lambda m, args: lengths.append(args[0].shape[1])
        )
        try:
            early = model(**{k: v for k, v in batch.items() if k != "pixel_values"}, mm_encoder_outputs=encoded)
        finally:
            hook.remove()
        stats = vtprune.get_stats(model)
    finally:
        vtprune.remove_pruner(model)
    assert len(lengths) == 1 and lengths[0] < batch["input_ids"].shape[1]  # only the kept sequence was embedded
    if len(stats) == 1:
        assert lengths[0] == full.logits.shape[1]
    assert torch.equal(early.logits, full.logits)
    assert early.image_outputs is encoded["image"]
    for a, b in zip(stats, full_stats):
        assert a["tokens_after"] == b["tokens_after"] and torch.equal(a["kept_indices"], b["kept_indices"])
