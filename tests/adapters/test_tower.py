"""The vision tower's attention as stages read it: captured without changing the tower's output, equal to the
attention computed by hand, and placed on the prompt's visual tokens where the model places what each tower token
became; a stage inside the LLaVA-1.5 tower equals the stock model run on the kept patches."""

import sys

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from helpers import cached_model, make_batch, make_video_batch
from vtprune import capture
from vtprune.patches import FAMILIES as REGISTRY
from vtprune.patches import get_adapter
from vtprune.patches.base import CALL_KEYS
from vtprune.testing import FAMILIES

VIDEO_FAMILIES = [f for f in FAMILIES if REGISTRY[f].tiny.video_tag is not None]


class Sink:
    """Stands in for the pruner: records every capture."""

    tower_cls = 0

    def __init__(self, cls):
        self.tower_cls, self.seen = cls, []

    def wants_tower_attention(self):
        return True

    def record_tower_attention(self, attention, keys, seconds):
        self.seen.append((attention, keys))


def _outputs(module, store):
    def hook(m, args, kwargs, output):
        store.append(output[0] if isinstance(output, tuple) else output)

    return module.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_tower_rows_put_each_tower_token_where_its_feature_goes(family):
    """The tower layer the model reads its features from, captured row by row and placed by ``tower_rows``: for
    the LLaVA families these rows are the projector's inputs, placed as ``projector_rows`` places them; for Qwen
    each token is the mean of its 2x2 patches, in the order the merger's outputs reach the prompt."""
    model = cached_model(family, "sdpa")
    adapter = get_adapter(model)
    batch = make_batch(family, 2)
    tower, projector_in, embeds = [], [], {}
    hooks = [
        _outputs(adapter.tower_layers[adapter.tower_feature_layer], tower),
        adapter.projector_module().register_forward_pre_hook(lambda m, a: projector_in.append(a[0])),
        model.model.language_model.register_forward_pre_hook(lambda m, a, k: embeds.update(k), with_kwargs=True),
    ]
    try:
        model(**batch)
    finally:
        for h in hooks:
            h.remove()
    call = {k: batch.get(k) for k in CALL_KEYS}
    rows = adapter.tower_rows([t if t.dim() == 3 else t[None] for t in tower], call)["image"]
    if adapter.family.startswith("qwen"):
        # Label every patch by its index: each token must average the 4 patches the merger turned into it.
        labels = torch.arange(tower[0].shape[0], dtype=torch.float32)[None, :, None]
        groups = ((adapter.tower_rows([labels], call)["image"][:, 0] - 1.5) / 4).round().long()
        merged = adapter.projector_module()(tower[0])  # the merger in the tower's own order
        if hasattr(model.model.visual, "window_size"):  # Qwen2.5-VL: window order until after the merger
            merged = model.model.visual.merger(tower[0])
        vis = batch["input_ids"] == model.config.image_token_id
        torch.testing.assert_close(merged[groups], embeds["inputs_embeds"][vis], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows, tower[0].view(-1, 4, tower[0].shape[-1])[groups].mean(1))
    else:
        torch.testing.assert_close(rows, adapter.projector_rows(projector_in, call)["image"].to(rows.dtype))


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_captured_tower_attention_is_the_layers_attention(family):
    """The capture at the feature layer, against the softmax of that layer's own queries and keys rebuilt by hand
    from its input (eager attention's weights for CLIP / SigLIP, the rotary-embedded qkv for Qwen's blocks); the
    tower's output is unchanged by it."""
    model = cached_model(family, "sdpa")
    adapter = get_adapter(model)
    batch = make_batch(family, 1)
    layer = adapter.tower_feature_layer
    attn = adapter.tower_attention(layer)
    inputs, plain = {}, []
    h = attn.register_forward_pre_hook(lambda m, a, k: inputs.update(args=a, kwargs=k), with_kwargs=True)
    h2 = _outputs(adapter.tower_layers[layer], plain)
    model(**batch)
    h.remove()
    sink = Sink(adapter.tower_prefix_tokens)
    detach = capture.attach(attn, sink, capture.TOWER_CAPTURE_IMPL)
    try:
        model(**batch)
    finally:
        detach()
        h2.remove()
    assert torch.equal(plain[0], plain[1])  # capturing changes nothing
    attention = torch.cat([a.reshape(-1) for a, _ in sink.seen])
    hidden = inputs["kwargs"].get("hidden_states", inputs["args"][0] if inputs["args"] else None)
    if adapter.family.startswith("qwen"):
        q, k = _qwen_qk(attn, hidden, inputs["kwargs"])
        bounds = inputs["kwargs"]["cu_seqlens"].tolist()
        want = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            probs = ((q[:, start:end] @ k[:, start:end].transpose(-1, -2)) * attn.scaling).softmax(-1)
            want.append(probs.mean(1).mean(0))
        want = torch.cat(want)
    else:
        crops = hidden.shape[0]
        q = attn.q_proj(hidden).view(crops, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(crops, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
        want = (probs[:, :, 0] if adapter.tower_prefix_tokens else probs.mean(2)).mean(1).reshape(-1)
    torch.testing.assert_close(attention, want, rtol=1e-4, atol=1e-6)


def _qwen_qk(attn, hidden, kwargs):
    """[heads, patches, d] queries and keys of a Qwen vision block, as its attention computes them."""
    n = hidden.shape[0]
    q, k, _ = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = kwargs["position_embeddings"]
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q.transpose(0, 1).float(), k.transpose(0, 1).float()


@torch.no_grad()
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_tower_scored_stage_takes_videos(family):
    """Images and videos in one batch: the tower's captures cover both kinds, each unit keeps its budget."""
    model = cached_model(family, "sdpa")
    batch = make_video_batch(family, 2)
    vtprune.apply_pruner(model, method="visionzip", keep_ratio=0.5)
    try:
        model(**batch)
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.remove_pruner(model)
    for units in stats["units"]:
        assert [u.kind for u in units] == ["image", "video"]
        assert all(u.tokens_after == int(u.tokens_before * 0.5 + 0.5) for u in units)


# ------------------------------------------------------------------------------------------- the tower stage


@torch.no_grad()
def test_tower_stage_equals_the_stock_model_on_the_kept_patches():
    """LLaVA-1.5, a stage inside the tower after layer j: the kept patches' later tower layers run on them alone,
    so the model's output equals the stock model given those features directly (``mm_encoder_outputs`` built from a
    manual tower run over the kept patches), with the placeholders of the dropped ones removed."""
    model = cached_model("llava", "sdpa")
    adapter = get_adapter(model)
    batch = make_batch("llava", 2)
    vtprune.apply_pruner(model, method="vispruner", keep_ratio=0.5, tower_layer=0)
    try:
        pruned = model(**batch).logits
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.remove_pruner(model)
    assert stats["layer"] == -1 and stats["tower_layer"] == 0
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    hidden = vm.pre_layrnorm(vm.embeddings(batch["pixel_values"]))
    hidden = adapter.tower_layers[0](hidden, None)
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    kept = torch.stack([u.kept_indices for (u,) in stats["units"]])  # [images, k] per image, ascending
    hidden = torch.cat([hidden[:, :1], hidden[:, 1:].gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))], 1)
    for layer in adapter.tower_layers[1 : adapter.tower_feature_layer + 1]:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    features = model.model.multi_modal_projector(hidden[:, 1:])
    vis = batch["input_ids"] == model.config.image_token_id
    for i in range(2):
        keep = ~vis[i]
        keep[vis[i].nonzero().flatten()[kept[i]]] = True
        keep &= batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i : i + 1, keep]
        pos = batch["attention_mask"][i].cumsum(0)[keep][None] - 1
        oracle = model(
            input_ids=ids,
            position_ids=pos,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(features[i],))},
            attention_mask=torch.ones_like(ids),
        ).logits
        torch.testing.assert_close(pruned[i, -oracle.shape[1] :], oracle[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_tower_stage_several_images_batched_cached_and_undone():
    model = cached_model("llava", "sdpa")
    proc = sys.modules["helpers"].cached_processor("llava")
    from vtprune.testing import tiny_images

    text = ["USER: <image> <image> which is red ? ASSISTANT:", "USER: <image> <image> what ? ASSISTANT:"]
    images = tiny_images(4, seed=3)
    batch = proc(images=images, text=text, return_tensors="pt", padding=True)
    rows = [proc(images=images[2 * i : 2 * i + 2], text=text[i : i + 1], return_tensors="pt") for i in range(2)]
    gen = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(**batch, **gen)
    vtprune.apply_pruner(model, method="visionzip", keep_ratio=1.0)
    try:
        assert torch.equal(model.generate(**batch, **gen).sequences, ref.sequences)
        vtprune.apply_pruner(model, method="visionzip", keep_ratio=0.4, replace=True)
        cached = model.generate(**batch, **gen)
        stats = vtprune.get_stats(model)[0]
        uncached = model.generate(**batch, use_cache=False, **gen)
        alone = [model(**rows[i]).logits for i in range(2)]
        both = model(**batch).logits
    finally:
        vtprune.remove_pruner(model)
    assert all(len(units) == 2 and units[0].tokens_after == 6 for units in stats["units"])  # 16 patches, 0.4
    assert torch.equal(cached.sequences, uncached.sequences)
    for i in range(2):
        torch.testing.assert_close(both[i, -alone[i].shape[1] :], alone[i][0], rtol=0, atol=1e-5)
    assert torch.equal(model.generate(**batch, **gen).sequences, ref.sequences)  # undone
