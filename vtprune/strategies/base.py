"""What a strategy receives, and the registry that maps method names to strategies.

A strategy is a pure tensor function ``fn(inputs: SelectionInputs, k: int, *, option=default, ...) ->
LongTensor [batch, k]`` returning indices into the ``N`` visual tokens of each row. Indices may come in pick order
(greedy methods); the engine sorts them before gathering. Strategies never see padding rows: the engine calls them
on groups of rows that share the same visual-token count.

``@register`` declares everything the rest of the library asks about a method, once: its options (read from the
function's keyword parameters: names, defaults and annotations, which are also how values are checked), its default
layer, what it needs from the model, its budget rule and the FLOPs its scoring costs.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

# What a strategy may ask the engine to provide, beyond ``features``.
NEEDS = ("attention", "queries", "projector", "grid", "pad_mask", "newline_mask", "text")
BUDGETS = ("plain", "layer_average")


@dataclass
class SelectionInputs:
    """Tensors describing the visual tokens entering one pruning stage, for ``batch`` rows of ``N`` tokens.

    features:      [batch, N, D] hidden states of the visual tokens (projected embeddings at layer 0).
    attention:     [batch, N] last-token attention to each visual token at layer K-1, mean over heads.
    queries:       [batch, N, H, d_head] query states of the visual tokens at layer K-1.
    pre_projector: [batch, N_pre, D_v] vision features entering the projector (LLaVA: N_pre == N;
                   Qwen: N_pre == 4 * N, the 2x2 patch groups in merger order).
    projector:     module mapping pre-projector rows to projected rows ([*, group * D_v] -> [*, D]) in float32,
                   with the model's current weights.
    grid:          one (height, width) per row: each frame's raster layout when the row's N tokens are an unpruned
                   grid of ``frames`` frames (N = frames * height * width), else None.
    frames:        one frame count per row (1 for images).
    kinds:         one "image" / "video" per row (what the row's tokens are).
    pad_mask:      [batch, N] bool, True for tokens that are mostly image padding (LLaVA pad-to-square).
    newline_mask:  [batch, N] bool, True for LLaVA-NeXT row-separator tokens.
    text:          [batch, T, D] hidden states of the row's text tokens (prompt order, left padded), or None.
    text_mask:     [batch, T] bool, False on the left padding of ``text``.
    seed:          seed for stochastic strategies (``None`` = draw from torch's global generator).
    backends:      filled by strategies with the path each op ran ({"greedy": "torch"}); the engine reports it.
    """

    features: torch.Tensor
    attention: Optional[torch.Tensor] = None
    queries: Optional[torch.Tensor] = None
    pre_projector: Optional[torch.Tensor] = None
    projector: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    grid: Optional[list] = None
    frames: Optional[list] = None
    kinds: Optional[list] = None
    pad_mask: Optional[torch.Tensor] = None
    newline_mask: Optional[torch.Tensor] = None
    text: Optional[torch.Tensor] = None
    text_mask: Optional[torch.Tensor] = None
    seed: Optional[int] = None
    backends: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


@dataclass(frozen=True)
class ScoringShape:
    """The shapes a method's scoring cost depends on, for one row.

    n visual tokens in, k kept, hidden width d (one strategy call: an image, a video or a frame); heads /
    head_dim of the language model; seq_len the row's sequence length at the stage; projector_row the FLOPs of
    one projector row and projector_dims its layer widths (d_in, d_hidden, d_out) where the adapter knows them;
    row_n the row's visual tokens entering the stage (for costs paid once per row, shared out by n / row_n).
    """

    n: int
    k: int
    d: int
    heads: int
    head_dim: int
    seq_len: int
    projector_row: int = 0
    projector_dims: Optional[tuple] = None
    row_n: Optional[int] = None


def _no_cost(shape: ScoringShape, **options) -> int:
    return 0


@dataclass(frozen=True)
class Method:
    """A registered strategy and what the library needs to know about it."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs: frozenset = frozenset()
    options: dict = field(default_factory=dict)  # option name -> default value (from the signature)
    types: dict = field(default_factory=dict)  # option name -> annotation (from the signature)
    layer: Union[int, Callable[[Any], int]] = 0  # default layer, or adapter -> layer
    min_layer: int = 0  # attention/query-scored methods need a layer before the stage
    budget: str = "plain"  # default budget convention ("layer_average": EntropyPrune's)
    budget_cap: Optional[Callable[..., int]] = None  # (k, pad_mask [n] or None, **options) -> k
    flops: Callable[..., int] = _no_cost  # (ScoringShape, **options) -> FLOPs of scoring one row
    validate: Optional[Callable[..., None]] = None  # (**options) -> None, raises ValueError on bad values
    description: str = ""
    needs_if: dict = field(default_factory=dict)  # need -> (**options) -> bool: needed under those options only
    family_options: Optional[Callable[[Any], dict]] = None  # adapter -> option defaults for that model family

    def defaults_for(self, adapter=None) -> dict:
        """Option defaults that the model family behind ``adapter`` sets in place of the signature's."""
        return {} if adapter is None or self.family_options is None else dict(self.family_options(adapter))

    def needs_for(self, options: dict) -> frozenset:
        """What a stage with these (merged) options needs: ``needs`` less those whose ``needs_if`` says no."""
        return frozenset(n for n in self.needs if n not in self.needs_if or self.needs_if[n](**options))

    def default_layer(self, adapter=None) -> int:
        return self.layer(adapter) if callable(self.layer) else self.layer

    def check(self, options: dict[str, Any]) -> dict[str, Any]:
        """User options merged over the defaults; unknown names and ill-typed values raise ValueError."""
        unknown = set(options) - set(self.options)
        if unknown:
            allowed = sorted(self.options) or "none"
            raise ValueError(f"unknown option(s) {sorted(unknown)} for method {self.name!r}; allowed: {allowed}")
        for key, value in options.items():
            allowed = _allowed(self.types.get(key, Any))
            if allowed is not None and not _matches(value, self.types[key]):
                raise ValueError(f"option {key}={value!r} of method {self.name!r} is not allowed; expected {allowed}")
        merged = {**self.options, **options}
        if self.validate is not None:
            self.validate(**merged)
        return merged


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, needs=(), layer: Union[int, Callable[[Any], int]] = 0, min_layer: int = 0,
             budget: str = "plain", budget_cap=None, flops=None, validate=None, description: str = "",
             needs_if: Optional[dict] = None, family_options: Optional[Callable[[Any], dict]] = None):
    """Decorator adding a strategy to the registry under ``name``.

    The strategy's options are its keyword parameters after ``(inputs, k)``: each needs a default, and its
    annotation (bool, int, float, str, Literal[...], Optional/unions of those) is how user values are checked.
    ``layer``: the default decoder layer (an int, or a function of the model's adapter). ``budget``: "plain" or
    "layer_average". ``budget_cap(k, pad_mask, **options)`` may lower a row's budget. ``flops(shape, **options)``
    gives the scoring FLOPs of one row (default 0). ``validate(**options)`` checks ranges. ``needs_if``: {need:
    predicate(**options)} for needs used only under some options, so the engine does not compute them otherwise.
    ``family_options(adapter)``: option defaults of a model family (options the user sets still win).
    """
    unknown = (set(needs) | set(needs_if or ())) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)} for method {name!r}; the engine provides: {list(NEEDS)}")
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        options, kinds = _signature_options(name, fn)
        _REGISTRY[name] = Method(name, fn, frozenset(needs), options, kinds, layer, min_layer, budget, budget_cap,
                                 flops or _no_cost, validate, description or (fn.__doc__ or "").split("\n")[0],
                                 dict(needs_if or {}), family_options)
        return fn

    return deco


def unregister(name: str) -> None:
    """Remove a method (for plugins and tests that register their own)."""
    get_method(name)
    del _REGISTRY[name]


def _signature_options(name: str, fn) -> tuple[dict, dict]:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise ValueError(f"strategy {name!r} must take (inputs, k, **options)")
    hints = typing.get_type_hints(fn)
    options, kinds = {}, {}
    for p in params[2:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"strategy {name!r}: options must be named keyword parameters, not *{p.name}")
        if p.default is p.empty:
            raise ValueError(f"strategy {name!r}: option {p.name!r} needs a default value")
        options[p.name] = p.default
        kinds[p.name] = hints.get(p.name, Any)
    return options, kinds


def _members(hint) -> Optional[list]:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return list(typing.get_args(hint))
    return None


def _matches(value, hint) -> bool:
    members = _members(hint)
    if members is not None:
        return any(_matches(value, m) for m in members)
    if typing.get_origin(hint) is typing.Literal:
        return any(value is v or (type(value) is type(v) and value == v) for v in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # Any, or an annotation too rich to check here


def _allowed(hint) -> Optional[str]:
    """How to name what ``hint`` admits in an error message; None when it admits anything."""
    members = _members(hint)
    if members is not None:
        parts = [_allowed(m) for m in members]
        return None if None in parts else " or ".join(parts)
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is float:
        return "a number"
    if isinstance(hint, type):
        return {bool: "True or False", int: "an integer", str: "a string"}.get(hint, hint.__name__)
    return None


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def check_options(method: Method, options: dict[str, Any]) -> dict[str, Any]:
    """Merge user options over the method's defaults, refusing unknown names and ill-typed values."""
    return method.check(options)
