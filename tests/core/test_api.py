"""Undo, isolation, unpruned paths, stats, schedules and the errors users get."""

import pytest
import torch

import vtprune
from helpers import cached_processor, make_batch
from vtprune.testing import NEWLINE_FAMILIES, tiny_model


@torch.no_grad()
def test_remove_restores_and_other_models_unaffected(family):
    a, b = tiny_model(family, seed=1), tiny_model(family, seed=1)
    batch = make_batch(family, 2)
    ref = a(**batch).logits
    ref_gen = a.generate(**batch, max_new_tokens=3, do_sample=False)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    hooks = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in a.named_modules()}
    vtprune.apply_pruner(a, method="fastv", keep_ratio=0.3, layer=1)
    assert a(**batch).logits.shape[1] < ref.shape[1]
    assert torch.equal(b(**batch).logits, ref)  # same class, other instance: untouched
    vtprune.remove_pruner(a)
    assert torch.equal(a(**batch).logits, ref)
    assert torch.equal(a.generate(**batch, max_new_tokens=3, do_sample=False), ref_gen)
    assert "generate" not in vars(a)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    attn = a.model.language_model.layers[0].self_attn
    assert attn.config is a.model.language_model.config
    assert hooks == {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in a.named_modules()}


@torch.no_grad()
def test_text_only_and_no_image_calls_run_unpruned(family):
    m = tiny_model(family)
    proc = cached_processor(family)
    text = proc.tokenizer(["what colour is the circle ?", "is the square left ?"], return_tensors="pt", padding=True)
    ref = m(**text).logits
    ref_gen = m.generate(**text, max_new_tokens=3, do_sample=False)
    vtprune.apply_pruner(m, method="random", keep_ratio=0.2)
    assert torch.equal(m(**text).logits, ref)
    assert torch.equal(m.generate(**text, max_new_tokens=3, do_sample=False), ref_gen)
    assert vtprune.get_stats(m) == []


@torch.no_grad()
@pytest.mark.parametrize("anyres_family", NEWLINE_FAMILIES)
def test_anyres_rows_with_different_visual_counts(anyres_family):
    m = tiny_model(anyres_family)
    batch = make_batch(anyres_family, 2)
    counts = (batch["input_ids"] == m.config.image_token_id).sum(1).tolist()
    assert counts[0] != counts[1]
    vtprune.apply_pruner(m, method="random", keep_ratio=0.5)
    out = m.generate(**batch, max_new_tokens=3, do_sample=False)
    stats = vtprune.get_stats(m)[0]
    assert stats["tokens_before"] == counts
    assert stats["tokens_after"] == [round(c / 2) for c in counts]
    short = min(range(2), key=lambda r: stats["tokens_after"][r])
    assert (stats["kept_indices"][short] == -1).sum() == abs(stats["tokens_after"][0] - stats["tokens_after"][1])
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


@torch.no_grad()
def test_stats_describe_each_stage_of_a_schedule():
    m = tiny_model("llava")
    batch = make_batch("llava", 2)
    vtprune.apply_pruner(
        m,
        schedule=[
            {"method": "pool", "layer": 0, "keep_ratio": 0.5},
            {"method": "random", "layer": 2, "keep_tokens": 3, "seed": 1},
        ],
    )
    m(**batch)
    s0, s1 = vtprune.get_stats(m)
    assert (s0["layer"], s0["method"], s0["tokens_before"], s0["tokens_after"]) == (0, "pool", [16, 16], [8, 8])
    assert (s1["layer"], s1["tokens_before"], s1["tokens_after"]) == (2, [8, 8], [3, 3])
    for s in (s0, s1):
        k = s["kept_indices"]
        assert k.dtype == torch.long and k.shape == (2, s["tokens_after"][0])
        assert (k.diff(dim=1) > 0).all() and int(k.max()) < s["tokens_before"][0]
        assert s["select_time_s"] >= 0
    # Generation works through both stages and matches a fresh prefill of the extended prompt.
    out = m.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ext = dict(
        batch,
        input_ids=out.sequences[:, :-1],
        attention_mask=torch.cat([batch["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1),
    )
    torch.testing.assert_close(m(**ext).logits[:, -1], out.logits[-1], rtol=0, atol=1e-5)


@torch.no_grad()
def test_fastv_picks_top_last_token_attention():
    """The captured attention (under sdpa) must rank tokens as eager attention weights do."""
    m = tiny_model("llava", "eager")
    batch = make_batch("llava", 2)
    k_layer = 2
    att = m(**batch, output_attentions=True).attentions[k_layer - 1]  # [B, H, L, L]
    vis = batch["input_ids"] == m.config.image_token_id
    scores = att[:, :, -1].mean(1)[vis].view(2, -1)
    expected = scores.topk(5, dim=-1).indices.sort(-1).values
    sdpa = tiny_model("llava", "sdpa")
    vtprune.apply_pruner(sdpa, method="fastv", keep_tokens=5, layer=k_layer)
    sdpa(**batch)
    assert torch.equal(vtprune.get_stats(sdpa)[0]["kept_indices"], expected)


@torch.no_grad()
def test_renumber_gives_contiguous_positions():
    m = tiny_model("llava")
    batch = make_batch("llava", 1)
    lm = m.model.language_model
    seen = {}
    handle = lm.layers[0].register_forward_pre_hook(lambda mod, a, k: seen.update(k), with_kwargs=True)
    vtprune.apply_pruner(m, method="pool", keep_ratio=0.25, positions="renumber")
    pruned = m(**batch).logits
    kept_len = batch["input_ids"].shape[1] - 16 + 4
    assert seen["position_ids"].tolist() == [list(range(kept_len))]
    m.generate(**batch, max_new_tokens=3, do_sample=False)
    assert seen["position_ids"].tolist() == [[kept_len + 1]]  # second decode step, renumbered numbering
    handle.remove()
    # Same as the unpatched language model on the kept embeddings with default (contiguous) positions.
    grab = {}
    h = lm.register_forward_pre_hook(lambda mod, a, k: grab.update(k), with_kwargs=True)
    m(**batch)
    h.remove()
    vtprune.remove_pruner(m)
    oracle = m.lm_head(lm(inputs_embeds=grab["inputs_embeds"]).last_hidden_state)
    torch.testing.assert_close(pruned, oracle, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep_ratio=0.0), "keep_ratio must be a number in \\(0, 1\\], got 0.0"),
        (dict(keep_ratio=1.5), "keep_ratio must be a number in \\(0, 1\\], got 1.5"),
        (dict(keep_tokens=0), "keep_tokens must be an integer >= 1, got 0"),
        (dict(keep_ratio=0.5, keep_tokens=4), "not both"),
        (dict(method="nope"), "unknown method 'nope'; available methods: \\[.*'divprune'.*'random'"),
        (dict(layer=9), "layer must be in \\[0, 3\\] for this model \\(4 decoder layers\\), got layer=9"),
        (dict(layer=-2), "layer must be an integer >= 0, or -1 for a stage inside the vision tower; got -2"),
        (dict(method="fastv", layer=0), "needs layer >= 1, got layer=0"),
        (dict(method="random", sed=3), "unknown option\\(s\\) \\['sed'\\] for method 'random'; allowed: \\['seed'\\]"),
        (dict(positions="shuffle"), "positions must be one of \\['original', 'renumber'\\], got 'shuffle'"),
        (dict(schedule=[{"method": "pool", "layer": 2}, {"method": "random", "layer": 1}]), "strictly increasing"),
    ],
)
def test_bad_settings_name_the_value(kwargs, match):
    m = tiny_model("llava")
    with pytest.raises(ValueError, match=match):
        vtprune.apply_pruner(m, **kwargs)
    assert not hasattr(m, "_vtprune_pruner")  # nothing half-installed


def test_double_patch_and_unsupported():
    m = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="renumber"):
        vtprune.apply_pruner(m, positions="renumber")
    vtprune.apply_pruner(m, method="random")
    with pytest.raises(ValueError, match="already patched"):
        vtprune.apply_pruner(m, method="pool")
    vtprune.apply_pruner(m, method="pool", replace=True)
    assert vtprune.get_config(m).method == "pool"
    with pytest.raises(NotImplementedError, match="model_type 'llama'"):
        from transformers import LlamaConfig, LlamaForCausalLM

        vtprune.apply_pruner(
            LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=10
                )
            )
        )
    with pytest.raises(ValueError, match="not patched"):
        vtprune.remove_pruner(tiny_model("llava"))


@torch.no_grad()
@pytest.mark.parametrize(
    "gen_kwargs,match",
    [
        (dict(cache_implementation="static"), "cache_implementation='static'"),
        (dict(prompt_lookup_num_tokens=3), "assisted"),
        (dict(assistant_model="draft"), "assisted decoding"),
    ],
)
def test_refused_decoding_modes(gen_kwargs, match):
    m = tiny_model("llava")
    batch = make_batch("llava", 1)
    vtprune.apply_pruner(m, method="random")
    with pytest.raises(NotImplementedError, match=match):
        m.generate(**batch, max_new_tokens=2, **gen_kwargs)


def test_transformers_version_gate():
    from vtprune._compat import check_transformers

    check_transformers("5.24.0")
    for bad in ("4.57.6", "5.19.1", "6.0.0"):
        with pytest.raises(ImportError, match=f"supports transformers >= 5.20, < 6.0; found {bad}"):
            check_transformers(bad)


@torch.no_grad()
def test_images_into_a_non_empty_cache_are_refused():
    m = tiny_model("llava")
    batch = make_batch("llava", 1)
    vtprune.apply_pruner(m, method="random")
    out = m(**batch, use_cache=True)
    with pytest.raises(NotImplementedError, match="non-empty cache"):
        m(**batch, past_key_values=out.cache, use_cache=True)


def test_labels_are_refused():
    m = tiny_model("llava")
    batch = make_batch("llava", 1)
    vtprune.apply_pruner(m, method="random")
    with pytest.raises(NotImplementedError, match="labels"):
        m(**batch, labels=batch["input_ids"])


@torch.no_grad()
def test_config_object_equals_keywords():
    m = tiny_model("qwen2_5_vl")
    batch = make_batch("qwen2_5_vl", 2)
    vtprune.apply_pruner(m, config=vtprune.PrunerConfig(method="pool", keep_ratio=0.5, layer=1))
    via_config = m(**batch).logits
    vtprune.apply_pruner(m, method="pool", keep_ratio=0.5, layer=1, replace=True)
    assert torch.equal(m(**batch).logits, via_config)
    with pytest.raises(ValueError, match="not both"):
        vtprune.apply_pruner(m, config=vtprune.PrunerConfig(), keep_ratio=0.3, replace=True)


@torch.no_grad()
def test_stats_records_answer_in_and_iterate_like_mappings():
    from helpers import cached_model

    model = cached_model("llava", "sdpa")
    vtprune.apply_pruner(model, method="pool", keep_ratio=0.5)
    try:
        model(**make_batch("llava", 1))
        stats = vtprune.get_stats(model)[0]
    finally:
        vtprune.remove_pruner(model)
    assert "units" in stats and "nope" not in stats and 0 not in stats
    assert list(stats) == list(stats.keys()) and dict(stats.units[0][0].as_dict())["kind"] == "image"
