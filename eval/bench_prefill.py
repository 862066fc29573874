"""Prefill speed of a pruned model against the FLOPs-ideal and against the oracle, measured side by side.

A LLaVA-1.5-shaped model scaled to this CPU: 576 visual tokens (24x24), a few wide decoder layers. The image
features are encoded once and passed as ``mm_encoder_outputs`` so every timing is the language-model prefill:

- pruned: the patched model, selection included, on the full prompt;
- oracle: the unpatched model on an input that already holds only the kept tokens (at their positions);
- ideal: unpruned time divided by the FLOPs ratio of the language-model prefill.

Timings interleave the variants round by round and report medians, because this machine is noisy.

    python -m vtprune.eval.bench_prefill [--layers 4] [--hidden 1024] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtprune
from vtprune.flops import llm_prefill_flops


def build(hidden: int, layers: int, seed: int = 0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=336, patch_size=14, projection_dim=64)
    text = dict(model_type="llama", vocab_size=1000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                max_position_embeddings=2048)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def median_times(fns: dict, repeats: int) -> dict:
    """fns: name -> (setup, fn). setup (untimed) patches or unpatches the model before fn runs."""
    for setup, fn in fns.values():  # warm-up
        setup()
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (setup, fn) in fns.items():
            setup()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _unpatch(model):
    if hasattr(model, "_vtprune_pruner"):
        vtprune.remove_pruner(model)


@torch.no_grad()
def run(hidden=1024, layers=4, repeats=7, text_before=35, text_after=20, budgets=(192, 128, 64)):
    model = build(hidden, layers)
    n, image_token = 576, model.config.image_token_id
    ids = torch.cat([torch.randint(0, 900, (1, text_before)), torch.full((1, n), image_token),
                     torch.randint(0, 900, (1, text_after))], dim=1)
    length = ids.shape[1]
    features = model.model.get_image_features(pixel_values=torch.randn(1, 3, 336, 336), vision_feature_layer=-1,
                                              vision_feature_select_strategy="default", return_dict=True)
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_encoder_outputs={"image": features},
                use_cache=False)
    base_flops = llm_prefill_flops(model.config.text_config, length)["total"]
    rows = []
    for k in (n, *budgets):
        for method in ("pool", "random") if k < n else ("pool",):
            settings = dict(method=method, keep_tokens=k)
            vtprune.apply_pruner(model, **settings)
            model(**call)
            kept = vtprune.get_stats(model)[0]["kept_indices"][0]
            vtprune.remove_pruner(model)
            # The oracle: the same entry point, given only the kept tokens at their original positions.
            keep = torch.ones(length, dtype=torch.bool)
            keep[text_before:text_before + n] = False
            keep[kept + text_before] = True
            kept_features = type(features)(pooler_output=[features.pooler_output[0][kept]])
            oracle_call = dict(input_ids=ids[:, keep], attention_mask=torch.ones(1, int(keep.sum()), dtype=torch.long),
                               position_ids=torch.arange(length)[keep][None],
                               mm_encoder_outputs={"image": kept_features}, use_cache=False)
            select_times = []

            def pruned():
                model(**call)
                select_times.append(vtprune.get_stats(model)[0]["select_time_s"])

            t = median_times({"full": (lambda: _unpatch(model), lambda: model(**call)),
                              "pruned": (lambda: vtprune.apply_pruner(model, replace=True, **settings), pruned),
                              "oracle": (lambda: _unpatch(model), lambda: model(**oracle_call))}, repeats)
            _unpatch(model)
            rows.append({"method": method, "kept": k, "full_s": t["full"], "pruned_s": t["pruned"],
                         "oracle_s": t["oracle"], "select_s": statistics.median(select_times),
                         "ideal_speedup": base_flops / llm_prefill_flops(model.config.text_config,
                                                                           int(keep.sum()))["total"]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.hidden, args.layers, args.repeats)
    print(f"LLaVA-1.5-shaped LM prefill, hidden {args.hidden}, {args.layers} layers, 576 visual tokens, "
          f"{args.threads} threads, medians of {args.repeats} interleaved rounds")
    print("| method | kept | full ms | pruned ms | oracle ms | speedup | ideal (FLOPs) | of ideal | pruned/oracle "
          "| choosing / pruned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = r["full_s"] / r["pruned_s"]
        print(f"| {r['method']} | {r['kept']} | {r['full_s'] * 1e3:.1f} | {r['pruned_s'] * 1e3:.1f} | "
              f"{r['oracle_s'] * 1e3:.1f} | {speed:.2f}x | {r['ideal_speedup']:.2f}x | "
              f"{speed / r['ideal_speedup']:.2f} | {r['pruned_s'] / r['oracle_s']:.3f} | "
              f"{100 * r['select_s'] / r['pruned_s']:.2f} % |")


if __name__ == "__main__":
    main()
