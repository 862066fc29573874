"""The one typed configuration: a pruner is a list of stages, each a method at a decoder layer with a budget."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .strategies.base import BUDGETS, ENGINE_OPTIONS, TOWER, get_method, plain

DEFAULT_METHOD = "divprune"
DEFAULT_KEEP_RATIO = 0.25  # what apply_pruner(model) keeps when no budget is given
POSITIONS = ("original", "renumber")
UNIT_MODES = ("each", "joint")  # each image/video chosen on its own, or one selection over the sample's units
TEMPORAL_MODES = ("clip", "frame")  # a video chosen over the whole clip, or with a budget per frame
DEFAULT_DECODE_LAYER = 3  # DyCoke's: decode steps attend to their chosen visual tokens from this layer on


@dataclass
class StageConfig:
    """One pruning stage: ``method`` chooses visual tokens entering decoder layer ``layer``.

    ``keep_ratio`` is the fraction of each image's (and video's) tokens entering this stage that is kept;
    ``keep_tokens`` an absolute count per sample, split across its images and videos in proportion to their sizes
    (largest remainder). ``video_keep_ratio`` / ``video_keep_tokens`` set videos apart (default: the image
    setting). ``options`` go to the method.
    """

    method: str = DEFAULT_METHOD
    layer: int | None = None  # None: the method's default (0 for input-stage methods)
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    options: dict = field(default_factory=dict)
    video_keep_ratio: float | None = None
    video_keep_tokens: int | None = None


@dataclass
class PrunerConfig:
    """Everything ``apply_pruner`` takes, validated when constructed. ``schedule`` (a list of stage dicts or
    StageConfig) replaces the single-stage fields ``method``/``layer``/``keep_ratio``/``keep_tokens``/``options``,
    which must then be left unset."""

    method: str | None = None  # None: divprune
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    layer: int | None = None
    schedule: list | None = None
    positions: str = "original"
    options: dict = field(default_factory=dict)
    video_keep_ratio: float | None = None
    video_keep_tokens: int | None = None

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {self.positions!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict, got {self.options!r}")
        if self.schedule is not None:
            given = {
                k: v
                for k, v in (
                    ("method", self.method),
                    ("keep_ratio", self.keep_ratio),
                    ("keep_tokens", self.keep_tokens),
                    ("layer", self.layer),
                    ("video_keep_ratio", self.video_keep_ratio),
                    ("video_keep_tokens", self.video_keep_tokens),
                )
                if v is not None
            }
            if given or self.options:
                raise ValueError(
                    f"schedule= replaces method/keep_ratio/keep_tokens/layer/options; got both "
                    f"schedule and {sorted(given) + (['options'] if self.options else [])}: put them "
                    "into the schedule's stages"
                )
        self.stages()  # every stage and option checked now, not at the first forward

    def stages(self, adapter=None) -> list[StageConfig]:
        """Validated stages; with ``adapter``, options the user left out take the model family's defaults."""
        if self.schedule is None:
            method = DEFAULT_METHOD if self.method is None else self.method  # "" is a name, and not one of ours
            raw = [
                StageConfig(
                    method,
                    self.layer,
                    self.keep_ratio,
                    self.keep_tokens,
                    dict(self.options),
                    self.video_keep_ratio,
                    self.video_keep_tokens,
                )
            ]
        else:
            if not isinstance(self.schedule, (list, tuple)) or not self.schedule:
                raise ValueError(f"schedule must be a non-empty list of stages, got {self.schedule!r}")
            raw = [_as_stage(s) for s in self.schedule]
        if adapter is not None:  # methods that prune at several layers become their stages (PyramidDrop)
            raw = [part for s in raw for part in _expanded(s, len(adapter.layers))]
        return [_validated(s, adapter) for s in raw]

    def resolved_stages(self, adapter) -> list[StageConfig]:
        """Stages with default layers filled in, validated against the model behind ``adapter``."""
        stages = [
            s if s.layer is not None else replace(s, layer=get_method(s.method).default_layer(adapter))
            for s in self.stages(adapter)
        ]
        last = len(adapter.layers) - 1
        stages = [
            replace(s, options={**s.options, "decode_layer": min(DEFAULT_DECODE_LAYER, last)})
            if s.options["decode_keep_ratio"] is not None and s.options["decode_layer"] is None
            else s
            for s in stages
        ]
        validate_against_model(self, stages, adapter)
        return stages


_NUMBERS = ("layer", "keep_ratio", "keep_tokens", "video_keep_ratio", "video_keep_tokens")
_STAGE_KEYS = ("method", "layer", "keep_ratio", "keep_tokens", "options", "video_keep_ratio", "video_keep_tokens")


def _expanded(stage: StageConfig, num_layers: int) -> list[StageConfig]:
    method = get_method(stage.method) if isinstance(stage.method, str) else None
    if method is None or method.expand is None:
        return [stage]
    return method.expand(stage, num_layers)  # a stage given its layer is the method's to keep whole or refuse


def _as_stage(item: Any) -> StageConfig:
    if isinstance(item, StageConfig):
        return replace(item, options=dict(item.options))
    if not isinstance(item, dict):
        raise ValueError(f"each schedule stage must be a dict or StageConfig, got {item!r}")
    if not isinstance(item.get("options", {}), dict):
        raise ValueError(f"a stage's options must be a dict, got {item['options']!r}")
    unknown = set(item) - set(_STAGE_KEYS)
    if unknown:
        # Unrecognised keys are treated as method options, like apply_pruner's **options.
        opts = {k: item[k] for k in unknown}
        item = {k: v for k, v in item.items() if k not in unknown}
        item["options"] = {**item.get("options", {}), **opts}
    return StageConfig(**item)


def _validated(stage: StageConfig, adapter=None) -> StageConfig:
    # NumPy scalars are taken as the Python numbers they hold.
    stage = replace(stage, **{key: plain(getattr(stage, key)) for key in _NUMBERS})
    if not isinstance(stage.method, str):
        raise ValueError(f"method must be a method name (a string), got {stage.method!r}")
    method = get_method(stage.method)  # raises ValueError listing the methods
    if not isinstance(stage.options, dict):
        raise ValueError(f"a stage's options must be a dict, got {stage.options!r}")
    if stage.keep_ratio is not None and stage.keep_tokens is not None:
        raise ValueError(
            f"give keep_ratio or keep_tokens, not both (got keep_ratio={stage.keep_ratio}, "
            f"keep_tokens={stage.keep_tokens})"
        )
    if stage.keep_ratio is None and stage.keep_tokens is None:
        stage = replace(stage, keep_ratio=DEFAULT_KEEP_RATIO)
    if stage.video_keep_ratio is not None and stage.video_keep_tokens is not None:
        raise ValueError(
            f"give video_keep_ratio or video_keep_tokens, not both (got video_keep_ratio="
            f"{stage.video_keep_ratio}, video_keep_tokens={stage.video_keep_tokens})"
        )
    for prefix in ("", "video_"):
        ratio, tokens = getattr(stage, prefix + "keep_ratio"), getattr(stage, prefix + "keep_tokens")
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0
        ):
            raise ValueError(f"{prefix}keep_ratio must be a number in (0, 1], got {ratio!r}")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"{prefix}keep_tokens must be an integer >= 1, got {tokens!r}")
    if stage.layer is not None and (
        isinstance(stage.layer, bool) or not isinstance(stage.layer, int) or stage.layer < TOWER
    ):
        raise ValueError(
            f"layer must be an integer >= 0, or {TOWER} for a stage inside the vision tower; got {stage.layer!r}"
        )
    engine = {
        "merge": False,
        "budget": method.budget,
        "units": "each",
        "temporal": "clip",
        "tower_layer": None,
        "decode_keep_ratio": None,
        "decode_layer": None,
    }
    if method.decode is not None and "decode_keep_ratio" not in stage.options:
        engine["decode_keep_ratio"], engine["decode_layer"] = method.decode
    engine.update({k: plain(stage.options[k]) for k in stage.options if k in ENGINE_OPTIONS})
    rest = {**method.defaults_for(adapter), **{k: v for k, v in stage.options.items() if k not in ENGINE_OPTIONS}}
    options = {**engine, **method.check(rest)}
    if not isinstance(options["merge"], bool):
        raise ValueError(f"merge must be True or False, got {options['merge']!r}")
    for key, allowed in (("budget", BUDGETS), ("units", UNIT_MODES), ("temporal", TEMPORAL_MODES)):
        if options[key] not in allowed:
            raise ValueError(f"{key} must be one of {list(allowed)}, got {options[key]!r}")
    tower_layer = options["tower_layer"]
    if tower_layer is not None and (
        isinstance(tower_layer, bool) or not isinstance(tower_layer, int) or tower_layer < 0
    ):
        raise ValueError(f"tower_layer must be an integer >= 0 (a vision-tower layer) or None, got {tower_layer!r}")
    _check_decode(options)
    return replace(stage, options=options)


def _check_decode(options: dict) -> None:
    ratio, layer = options["decode_keep_ratio"], options["decode_layer"]
    if ratio is None:
        if layer is not None:
            raise ValueError(
                f"decode_layer={layer!r} was given without decode_keep_ratio: the decode stage needs the share of "
                "visual tokens each decoding step attends to, a number in (0, 1]"
            )
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"decode_keep_ratio must be a number in (0, 1] or None, got {ratio!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 1):
        raise ValueError(
            f"decode_layer must be an integer >= 1 (it scores with layer decode_layer-1), or None, got {layer!r}"
        )


def validate_against_model(cfg: PrunerConfig, stages: list[StageConfig], adapter) -> None:
    """Checks that need the model: layer range, stage order, position mode."""
    num_layers = len(adapter.layers)
    if "video" not in adapter.visual_token_ids(adapter.model.config):
        asked = [
            key for s in stages for key in ("video_keep_ratio", "video_keep_tokens") if getattr(s, key) is not None
        ]
        if asked:
            raise ValueError(
                f"{asked[0]} was given, but {type(adapter.model).__name__} takes no videos; use "
                "keep_ratio / keep_tokens"
            )
    if cfg.positions == "renumber" and adapter.position_kind != "1d":
        raise ValueError(
            f"positions='renumber' is defined for 1-D RoPE models (LLaVA family); "
            f"{type(adapter.model).__name__} gives visual tokens {adapter.position_kind} positions, "
            "so use positions='original'"
        )
    for i, s in enumerate(stages):
        method = get_method(s.method)
        if s.layer == TOWER or "tower_attention" in method.needs:
            _check_tower_stage(s, method, i, adapter)
            continue
        if s.options["tower_layer"] is not None:
            raise ValueError(
                f"tower_layer is for a stage inside the vision tower (layer={TOWER}); method "
                f"{s.method!r} runs at layer {s.layer}"
            )
        min_layer = method.min_layer
        if s.layer < min_layer:
            raise ValueError(
                f"method {s.method!r} scores tokens with layer K-1 and needs layer >= {min_layer}, got layer={s.layer}"
            )
        if "projector" in get_method(s.method).needs and s.layer != 0:
            raise ValueError(
                f"method {s.method!r} scores tokens through the projector and runs at layer 0 only, got layer={s.layer}"
            )
        if s.layer >= num_layers:
            raise ValueError(
                f"layer must be in [0, {num_layers - 1}] for this model ({num_layers} decoder "
                f"layers), got layer={s.layer}"
            )
    layers = [s.layer for s in stages]
    if layers != sorted(set(layers)):
        raise ValueError(f"schedule stages must be at strictly increasing layers, got {layers}")
    decoding = [s for s in stages if s.options["decode_keep_ratio"] is not None]
    if len(decoding) > 1:
        raise ValueError(
            f"one decode stage per pruner: stages {[s.method for s in decoding]} each set decode_keep_ratio "
            "(a method such as dycoke brings one: give the others none)"
        )
    if decoding:
        layer = decoding[0].options["decode_layer"]
        # Decode steps read layer decode_layer-1's cache, which must hold the last stage's sequence.
        floor = max(layers[-1] + 1, 1)
        if not floor <= layer < num_layers:
            raise ValueError(
                f"decode_layer must be in [{floor}, {num_layers - 1}] for this model ({num_layers} decoder "
                f"layers, last stage at layer {layers[-1]}): the decode stage scores with layer decode_layer-1, "
                f"after every prefill stage; got decode_layer={layer}"
            )


def _check_tower_stage(stage: StageConfig, method, index: int, adapter) -> None:
    """A stage inside the vision tower: the first of the schedule, on a family whose tower allows it, at a tower layer
    the model's features come from or before, with a method that scores with what the tower provides."""
    name = type(adapter.model).__name__
    if stage.layer not in (TOWER, 0):
        raise ValueError(
            f"method {stage.method!r} scores with the vision tower's attention: it runs inside the tower "
            f"(layer={TOWER}) or on the language model's input (layer=0), got layer={stage.layer}"
        )
    if index != 0:
        raise ValueError(f"a stage reading the vision tower (layer={stage.layer}) must be the schedule's first")
    if stage.layer == TOWER and not adapter.supports_tower_stage:
        hint = " (layer=0, its default here, reads the tower's attention on the prompt's tokens)"
        raise NotImplementedError(
            f"a stage inside the vision tower (layer={TOWER}) is supported on LLaVA-1.5; {name} "
            f"({adapter.family}) is not: {adapter.tower_refusal}" + (hint if adapter.tower_scores else "")
        )
    if stage.layer == 0 and "tower_attention" in method.needs and not adapter.tower_scores:
        raise NotImplementedError(f"{name} ({adapter.family}) is not: its tower's attention is not located")
    last = adapter.tower_feature_layer
    layer = stage.options["tower_layer"]
    if layer is not None and not 0 <= layer <= last:
        raise ValueError(
            f"tower_layer must be in [0, {last}] for {name} (the model reads its image features after "
            f"tower layer {last}), got tower_layer={layer}"
        )
    lacking = {"attention", "queries", "keys", "projector", "text"} & set(method.needs)
    if lacking and stage.layer == TOWER:
        raise ValueError(
            f"method {stage.method!r} needs {sorted(lacking)}, which a stage inside the vision tower "
            "does not have; run it at layer 0 or later"
        )
