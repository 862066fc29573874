"""The public entry points: apply_pruner, remove_pruner, get_stats."""
from __future__ import annotations

import functools
from typing import Optional

from .config import PrunerConfig
from .engine import Pruner

_ATTR = "_vtprune_pruner"
# generate() arguments whose decoding assumes cache length == input length, or re-feeds pruned prompts.
_REFUSED_GENERATE = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup (assisted) decoding",
    "assistant_early_exit": "self-speculative (assisted) decoding",
    "prefill_chunk_size": "chunked prefill",
}
_REFUSED_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "mamba", "quantized")


def apply_pruner(model, method: str = "divprune", keep_ratio: Optional[float] = None,
                 keep_tokens: Optional[int] = None, layer: Optional[int] = None, schedule: Optional[list] = None,
                 positions: str = "original", *, config: Optional[PrunerConfig] = None, replace: bool = False,
                 **options):
    """Patch this model instance so prefill and ``generate()`` run on the kept visual tokens. Returns ``model``.

    ``keep_ratio``: fraction of the visual tokens entering the stage that are kept (default 0.25 when neither it
    nor ``keep_tokens``, an absolute count per sample, is given). ``layer``: 0 prunes before the language model,
    K >= 1 inside it from decoder layer K on; None (default) is the method's own (0 for input-stage methods,
    2 for fastv, the family's entropy-collapse layer for entropy). ``schedule``: a list of stages (dicts with method, layer,
    keep_ratio/keep_tokens, options) for multi-stage pruning. ``positions``: "original" keeps each kept token's
    position ids, "renumber" makes them contiguous (LLaVA family). ``options`` go to the method.
    ``config``: a PrunerConfig instead of the keyword arguments. ``replace=True`` swaps an existing pruner.
    """
    from . import _compat

    _compat.check_transformers()
    if config is None:
        config = PrunerConfig(method=method, keep_ratio=keep_ratio, keep_tokens=keep_tokens, layer=layer,
                              schedule=schedule, positions=positions, options=dict(options))
    elif options or keep_ratio is not None or keep_tokens is not None or schedule is not None:
        raise ValueError("pass either config=PrunerConfig(...) or keyword settings, not both")
    if not isinstance(config, PrunerConfig):
        raise ValueError(f"config must be a vtprune.PrunerConfig, got {type(config).__name__}")
    existing = getattr(model, _ATTR, None)
    if existing is not None and not replace:
        raise ValueError("this model is already patched by vtprune; call vtprune.remove_pruner(model) first or "
                         "pass replace=True")
    return _install(model, config, existing)


def _install(model, config, existing):
    from .patches import get_adapter

    pruner = Pruner(model, get_adapter(model), config)  # validates before anything is touched
    if existing is not None:
        remove_pruner(model)
    pruner.install()
    setattr(model, _ATTR, pruner)
    model.generate = _guarded_generate(model, type(model).generate.__get__(model))
    return model


def _guarded_generate(model, generate):
    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        for key, what in _REFUSED_GENERATE.items():
            if kwargs.get(key) is not None:
                raise NotImplementedError(f"vtprune does not support {what} ({key}=...): pruned caches no longer "
                                          "match the input length; remove_pruner(model) first")
        gen_cfg = kwargs.get("generation_config") or model.generation_config
        impl = kwargs.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))
        if impl in _REFUSED_CACHES:
            raise NotImplementedError(f"vtprune does not support cache_implementation={impl!r}; "
                                      "use the default dynamic cache")
        for key in ("prompt_lookup_num_tokens", "prefill_chunk_size"):
            if getattr(gen_cfg, key, None) is not None:
                raise NotImplementedError(f"vtprune does not support generation_config.{key}")
        pruner = getattr(model, _ATTR)
        pruner.generate_call = {k: kwargs.get(k) for k in ("image_grid_thw", "image_sizes", "pixel_values")}
        try:
            return generate(*args, **kwargs)
        finally:
            pruner.generate_call = {}

    return wrapper


def remove_pruner(model):
    """Undo ``apply_pruner``: hooks removed, attention configs and ``generate`` restored. Returns ``model``."""
    pruner = getattr(model, _ATTR, None)
    if pruner is None:
        raise ValueError("this model is not patched by vtprune (nothing to remove)")
    pruner.remove()
    delattr(model, _ATTR)
    del model.generate  # the instance attribute; the class method shows through again
    return model


def get_stats(model) -> list[dict]:
    """One entry per stage of the last prefill: layer, method, tokens_before, tokens_after (lists, per row),
    kept_indices (LongTensor [batch, k] into the visual tokens entering the stage, ascending; rows keeping
    fewer tokens are padded with -1 on the right), select_time_s and backend."""
    pruner = getattr(model, _ATTR, None)
    if pruner is None:
        raise ValueError("this model is not patched by vtprune")
    return list(pruner.stats)


def get_config(model) -> PrunerConfig:
    pruner = getattr(model, _ATTR, None)
    if pruner is None:
        raise ValueError("this model is not patched by vtprune")
    return pruner.cfg


