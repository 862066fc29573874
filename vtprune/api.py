"""The public entry points: apply_pruner, remove_pruner, get_stats."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch

from .config import PrunerConfig
from .engine import Pruner
from .patches.base import CALL_KEYS

_ATTR = "_vtprune_pruner"
# generate() arguments whose decoding assumes cache length == input length, or re-feeds pruned prompts.
_REFUSED_GENERATE = {
    "assistant_model": "assisted decoding",
    "prompt_lookup_num_tokens": "prompt-lookup (assisted) decoding",
    "assistant_early_exit": "self-speculative (assisted) decoding",
    "prefill_chunk_size": "chunked prefill",
}
_REFUSED_CACHES = ("static", "offloaded_static", "sliding_window", "hybrid", "mamba", "quantized")


def apply_pruner(
    model,
    method: str | None = None,
    keep_ratio: float | None = None,
    keep_tokens: int | None = None,
    layer: int | None = None,
    schedule: list | None = None,
    positions: str = "original",
    *,
    video_keep_ratio: float | None = None,
    video_keep_tokens: int | None = None,
    config: PrunerConfig | None = None,
    replace: bool = False,
    **options,
):
    """Patch this model instance so prefill and ``generate()`` run on the kept visual tokens. Returns ``model``.

    ``method``: a registered method name (default ``"divprune"``; ``vtprune.list_methods()``).
    ``keep_ratio``: fraction of each image's (and video's) visual tokens entering the stage that is kept (default
    0.25 when neither it nor ``keep_tokens`` is given); ``keep_tokens``: an absolute count per sample, split across
    its images and videos in proportion to their sizes. ``video_keep_ratio`` / ``video_keep_tokens``: the same for
    videos alone (default: the image setting). ``layer``: 0 prunes before the language model,
    K >= 1 inside it from decoder layer K on; None (default) is the method's own (0 for input-stage methods,
    2 for fastv, the family's entropy-collapse layer for entropy). ``schedule``: a list of stages (dicts with method,
    layer, keep_ratio/keep_tokens, options) for multi-stage pruning. ``positions``: "original" keeps each kept token's
    position ids, "renumber" makes them contiguous (LLaVA family). ``options`` go to the method.
    ``config``: a PrunerConfig instead of the keyword arguments. ``replace=True`` swaps an existing pruner.
    """
    from . import _compat

    _compat.check_transformers()
    _check_model(model)
    if config is None:
        config = PrunerConfig(
            method=method,
            keep_ratio=keep_ratio,
            keep_tokens=keep_tokens,
            layer=layer,
            schedule=schedule,
            positions=positions,
            options=dict(options),
            video_keep_ratio=video_keep_ratio,
            video_keep_tokens=video_keep_tokens,
        )
    elif (
        options
        or method is not None
        or keep_ratio is not None
        or keep_tokens is not None
        or layer is not None
        or schedule is not None
        or positions != "original"
        or video_keep_ratio is not None
        or video_keep_tokens is not None
    ):
        raise ValueError("pass either config=PrunerConfig(...) or keyword settings, not both")
    if not isinstance(config, PrunerConfig):
        raise ValueError(f"config must be a vtprune.PrunerConfig, got {type(config).__name__}")
    config = copy.deepcopy(config)  # the caller's object stays theirs: editing it later changes nothing here
    existing = get_pruner(model)
    if existing is not None and not replace:
        raise ValueError(
            "this model is already patched by vtprune; call vtprune.remove_pruner(model) first or pass replace=True"
        )
    return _install(model, config, existing)


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            "apply_pruner needs a Hugging Face vision-language model (a torch.nn.Module with a .config, "
            f"as from_pretrained returns it), got {type(model).__name__}"
        )
    offloaded = next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if offloaded is not None:
        raise NotImplementedError(
            f"this model's weights are on the meta device ({offloaded}, ...): it is offloaded (accelerate's "
            "cpu_offload / disk_offload, or a device_map with 'cpu'/'disk' offload), and vtprune reads the weights "
            "a method scores with directly. Load it on real devices (device_map='auto' onto GPUs, or the CPU) "
            "before apply_pruner"
        )


def _install(model, config, existing):
    from .patches import get_adapter

    pruner = Pruner(model, get_adapter(model), config)  # validates before anything is touched
    if existing is not None:
        remove_pruner(model)
    pruner.install()
    setattr(model, _ATTR, pruner)
    model.generate = _GuardedGenerate(model)
    return model


class _GuardedGenerate:
    """``model.generate`` of a patched instance: refuses decoding modes the pruned cache breaks, and hands the
    call's image metadata to the pruner. An object holding the model (not a closure), so that ``copy.deepcopy``
    of the model gives a copy whose generate() runs the copy."""

    def __init__(self, model):
        self.model = model
        self.__wrapped__ = type(model).generate
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args, **kwargs):
        model = self.model
        for key, what in _REFUSED_GENERATE.items():
            if kwargs.get(key) is not None:
                raise NotImplementedError(
                    f"vtprune does not support {what} ({key}=...): pruned caches no longer "
                    "match the input length; remove_pruner(model) first"
                )
        gen_cfg = kwargs.get("generation_config") or model.generation_config
        impl = kwargs.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))
        if impl in _REFUSED_CACHES:
            raise NotImplementedError(
                f"vtprune does not support cache_implementation={impl!r}; use the default dynamic cache"
            )
        for key in ("prompt_lookup_num_tokens", "prefill_chunk_size"):
            if getattr(gen_cfg, key, None) is not None:
                raise NotImplementedError(f"vtprune does not support generation_config.{key}")
        pruner = get_pruner(model)
        expand = max(
            kwargs.get("num_beams") or gen_cfg.num_beams or 1,
            kwargs.get("num_return_sequences") or gen_cfg.num_return_sequences or 1,
        )
        if pruner.has_tower_stage and expand > 1:
            # generate() would split the shortened image features by the prompt's (full) placeholder counts
            raise NotImplementedError(
                "vtprune: a stage inside the vision tower does not support num_beams or "
                "num_return_sequences > 1; prune at layer 0 or later for beam search"
            )
        if pruner.decode_stage is not None and not kwargs.get("use_cache", getattr(gen_cfg, "use_cache", True)):
            warnings.warn(
                "vtprune: use_cache=False runs no decoding steps on a cache, so the decode stage "
                f"(decode_keep_ratio={pruner.decode_stage[0]}) does nothing in this generate(); only the prefill "
                "stages apply",
                stacklevel=2,
            )
        pruner.set_generate_call({k: kwargs.get(k) for k in CALL_KEYS})
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            pruner.set_generate_call({})


def remove_pruner(model):
    """Undo ``apply_pruner``: hooks removed, attention configs and ``generate`` restored. Returns ``model``."""
    pruner = get_pruner(model)
    if pruner is None:
        raise ValueError("this model is not patched by vtprune (nothing to remove)")
    pruner.remove()
    delattr(model, _ATTR)
    del model.generate  # the instance attribute; the class method shows through again
    return model


def get_stats(model) -> list:
    """What the calling thread's last prefill on ``model`` did: one ``StageStats`` per stage (readable as a dict):
    layer, method, tokens_before, tokens_after (lists, per row), kept_indices (LongTensor [batch, k] into the
    visual tokens entering the stage, ascending; rows keeping fewer tokens are padded with -1 on the right),
    select_time_s, budget, merged and backend. Calls made in other threads do not change it."""
    return _require(model).last_stats()


def get_config(model) -> PrunerConfig:
    """A copy of the configuration ``model`` was patched with (editing it changes nothing; apply_pruner with
    ``replace=True`` does)."""
    return copy.deepcopy(_require(model).cfg)


def is_patched(model) -> bool:
    return get_pruner(model) is not None


def get_pruner(model):
    """The ``Pruner`` patched on ``model`` (its ``stages``, ``methods``, ``adapter``), or None."""
    return getattr(model, _ATTR, None)


@contextlib.contextmanager
def paused(model):
    """``with vtprune.paused(model):`` runs the patched model unpruned in this thread (calibration, references)."""
    with _require(model).paused():
        yield model


def _require(model):
    pruner = get_pruner(model)
    if pruner is None:
        raise ValueError("this model is not patched by vtprune")
    return pruner
