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
import math
import numbers
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

import numpy as np
import torch

# What a strategy may ask the engine to provide, beyond ``features``.
NEEDS = ("attention", "queries", "keys", "projector", "grid", "pad_mask", "newline_mask", "text", "tower_attention")
TOWER = -1  # the ``layer`` of a stage inside the vision tower


def tower_or_input(adapter) -> int:
    """The default layer of a method scored by the tower's attention: inside the tower where the family allows a
    stage there (which also saves the tower's later layers), else the language model's input."""
    return TOWER if adapter is None or adapter.supports_tower_stage else 0


BUDGETS = ("plain", "layer_average")
# Options every method accepts: they change what the engine does around the selection, not the selection.
ENGINE_OPTIONS = ("merge", "budget", "units", "temporal", "tower_layer", "decode_keep_ratio", "decode_layer")
# Names a method's own options may not take: the engine's options and apply_pruner's keywords would swallow them
# (tests/test_core.py checks this list against apply_pruner's signature).
RESERVED_OPTIONS = ENGINE_OPTIONS + (
    "model",
    "method",
    "keep_ratio",
    "keep_tokens",
    "layer",
    "schedule",
    "positions",
    "video_keep_ratio",
    "video_keep_tokens",
    "config",
    "replace",
    "options",
)


@dataclass(frozen=True)
class Range:
    """The interval a numeric option must lie in, declared in its annotation (``m: Annotated[int, Range(ge=1)] =
    64``) and checked with its type when the pruner is applied, so a bad value never reaches a forward."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{op} {bound:g}" for op, bound in bounds if bound is not None)


@dataclass
class SelectionInputs:
    """Tensors describing the visual tokens entering one pruning stage, for ``batch`` rows of ``N`` tokens.

    features:      [batch, N, D] hidden states of the visual tokens (projected embeddings at layer 0).
    attention:     [batch, N] last-token attention to each visual token at layer K-1, mean over heads.
    queries:       [batch, N, H, d_head] query states of the visual tokens at layer K-1.
    keys:          [batch, N, Hkv * d_head] key states (before the rotary embedding) of the visual tokens at layer
                   K-1; with "text" also needed, text_keys [batch, T, Hkv * d_head] are the text tokens' (as ``text``).
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
    text:          [batch, T, D] hidden states of the instruction: the row's text tokens after the row's visual
                   tokens of this call (all its text when none follows; a packed row: its own sample's), prompt
                   order, left padded; or None.
    text_mask:     [batch, T] bool, False on the left padding of ``text``.
    tower_attention: [batch, N] (tower stages) the attention the visual tokens receive at the tower layer: the [CLS]
                   query's row where the tower has a [CLS] token, else the mean over all queries; mean over heads.
    tower_keys:    [batch, N, d_head] (tower stages) the tower layer's key states, mean over heads.
    backends:      filled by strategies with the path each op ran ({"greedy": "torch"}); the engine reports it.
    """

    features: torch.Tensor
    attention: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    pre_projector: torch.Tensor | None = None
    projector: Callable[[torch.Tensor], torch.Tensor] | None = None
    grid: list | None = None
    frames: list | None = None
    kinds: list | None = None
    pad_mask: torch.Tensor | None = None
    newline_mask: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    tower_attention: torch.Tensor | None = None
    tower_keys: torch.Tensor | None = None
    backends: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


@dataclass
class Merged:
    """A strategy's choice that merges, instead of indices alone: ``keep`` [rows, k] the kept tokens; ``target``
    [rows, N] the slot (a column of ``keep``) each token joins, -1 for a dropped token, each kept token in its own
    slot; ``rule`` how a slot combines its tokens: "mean" (size-weighted average, ToMe's) or "add_mean" (the kept token
    plus the mean of the others, VisionZip's contextual tokens). The engine checks it and merges the stage's
    features accordingly (``vtprune.merge.apply_plan``); methods that return one declare ``merges=True``."""

    keep: torch.Tensor
    target: torch.Tensor
    rule: str = "mean"


@dataclass(frozen=True)
class ScoringShape:
    """The shapes a method's scoring cost depends on, for one row.

    n visual tokens in, k kept, hidden width d (one strategy call: an image, a video or a frame); heads /
    head_dim of the language model; seq_len the row's sequence length at the stage; projector_row the FLOPs of
    one projector row and projector_dims its layer widths (d_in, d_hidden, d_out) where the adapter knows them;
    row_n the row's visual tokens entering the stage (for costs paid once per row, shared out by n / row_n); at a
    stage inside the vision tower, d / heads / head_dim / seq_len are the tower's and tower_cls its [CLS] tokens;
    tower_head_dim is the width of the tower's keys (a head's) wherever the stage runs; text_len the instruction
    tokens a method reading the text gets (the row's text after its last visual token, else all its text).
    """

    n: int
    k: int
    d: int
    heads: int
    head_dim: int
    seq_len: int
    projector_row: int = 0
    projector_dims: tuple | None = None
    row_n: int | None = None
    tower_cls: int = 0
    tower_head_dim: int = 0
    text_len: int = 0


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
    layer: int | Callable[[Any], int] = 0  # default layer, or adapter -> layer
    min_layer: int = 0  # attention/query-scored methods need a layer before the stage
    budget: str = "plain"  # default budget convention ("layer_average": EntropyPrune's)
    budget_cap: Callable[..., int] | None = None  # (k, pad_mask [n] or None, **options) -> k
    flops: Callable[..., int] = _no_cost  # (ScoringShape, **options) -> FLOPs of scoring one row
    validate: Callable[..., None] | None = None  # (**options) -> None, raises ValueError on bad values
    description: str = ""
    needs_if: dict = field(default_factory=dict)  # need -> (**options) -> bool: needed under those options only
    family_options: Callable[[Any], dict] | None = None  # adapter -> option defaults for that model family
    merges: bool = False  # the strategy may return a ``Merged`` plan
    expand: Callable | None = None  # (stage, num_layers) -> stages: a method that prunes at several layers
    decode: tuple | None = None  # (keep ratio, layer): the decode stage a method brings unless the user sets one

    def defaults_for(self, adapter=None) -> dict:
        """Option defaults that the model family behind ``adapter`` sets in place of the signature's."""
        return {} if adapter is None or self.family_options is None else dict(self.family_options(adapter))

    def needs_for(self, options: dict) -> frozenset:
        """What a stage with these (merged) options needs: ``needs`` less those whose ``needs_if`` says no."""
        return frozenset(n for n in self.needs if n not in self.needs_if or self.needs_if[n](**options))

    def default_layer(self, adapter=None) -> int:
        return self.layer(adapter) if callable(self.layer) else self.layer

    def check(self, options: dict[str, Any]) -> dict[str, Any]:
        """User options merged over the defaults; unknown names, ill-typed or out-of-range values raise ValueError.
        NumPy scalars become the Python numbers they hold."""
        unknown = set(options) - set(self.options)
        if unknown:
            allowed = sorted(self.options) or "none"
            raise ValueError(f"unknown option(s) {sorted(unknown)} for method {self.name!r}; allowed: {allowed}")
        clean = {}
        for key, value in options.items():
            value = plain(value)
            problem = _generic_problem(value) or _problem(value, self.types.get(key, Any))
            if problem is not None:
                raise ValueError(f"option {key}={value!r} of method {self.name!r} is not allowed; expected {problem}")
            clean[key] = value
        merged = {**self.options, **clean}
        if self.validate is not None:
            self.validate(**merged)
        return merged

    def select(self, inputs: SelectionInputs, k: int, **options):
        """The strategy as the engine runs it: ``0 <= k <= N`` checked, ``k == 0`` answered without a call,
        gradients off (choosing never needs them), and the output checked (``checked_indices``, ``checked_plan``).
        Returns [batch, k] long, ascending, or a checked ``Merged`` whose ``keep`` is so and ``target`` numbers
        slots in that order."""
        n = inputs.num_tokens
        if not 0 <= k <= n:
            raise ValueError(f"method {self.name!r}: budget k={k} is out of range; allowed: 0 <= k <= N={n}")
        if k == 0:
            return torch.empty(inputs.batch, 0, dtype=torch.long, device=inputs.features.device)
        with torch.no_grad():
            out = self.fn(inputs, k, **options)
        if isinstance(out, Merged):
            if not self.merges:
                raise RuntimeError(f"method {self.name!r} returned a merge plan but was registered without merges=True")
            return checked_plan(self.name, out, inputs.batch, n, k, inputs.features.device)
        return checked_indices(self.name, out, inputs.batch, n, k, inputs.features.device)


def shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split by ``weights`` (positive): floors of the quotas, then one more to the largest remainders
    (ties to the earlier part); equal shares when every weight underflowed to 0. The one apportionment: the
    engine's unit budgets (``budgets.largest_remainder``, which caps each part at its size) and the video methods'
    frame and segment budgets."""
    whole = sum(weights)
    if whole <= 0:
        weights, whole = [1.0] * len(weights), float(len(weights))
    quotas = [total * w / whole for w in weights]
    parts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def checked_plan(name: str, plan: Merged, rows: int, n: int, k: int, device=None) -> Merged:
    """``checked_indices`` for a merge plan's ``keep`` (then sorted, and ``target``'s slots renumbered to match), and
    ``target``: an integer tensor [rows, N] with values in [-1, k), each kept token in its own slot; ``rule`` known."""
    from ..merge import MERGE_RULES

    what = f"method {name!r} returned a merge plan whose"
    if plan.rule not in MERGE_RULES:
        raise RuntimeError(f"{what} rule is {plan.rule!r}; allowed: {list(MERGE_RULES)}")
    target = plan.target
    if not torch.is_tensor(target) or target.dtype == torch.bool or target.is_floating_point():
        raise RuntimeError(f"{what} target is not an integer tensor [rows, N] = [{rows}, {n}]")
    if tuple(target.shape) != (rows, n):
        raise RuntimeError(f"{what} target has shape {list(target.shape)}; expected [{rows}, {n}]")
    if not torch.is_tensor(plan.keep) or plan.keep.is_floating_point() or tuple(plan.keep.shape) != (rows, k):
        checked_indices(name, plan.keep, rows, n, k, device)  # raises with the reason
    raw = plan.keep.to(device=device, dtype=torch.long)
    keep = checked_indices(name, raw, rows, n, k, device)
    target = target.to(device=device, dtype=torch.long)
    if bool(((target < -1) | (target >= k)).any()):
        raise RuntimeError(f"{what} target holds a slot outside [-1, {k})")
    order = raw.argsort(dim=-1)  # slot s of the sorted keep was the strategy's slot order[:, s]
    renumber = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=order.device).expand_as(order))
    target = torch.where(target >= 0, renumber.gather(1, target.clamp_min(0)), target)
    own = target.gather(1, keep)
    if not torch.equal(own, torch.arange(k, device=own.device).expand_as(own)):
        raise RuntimeError(f"{what} target does not put every kept token in its own slot")
    return Merged(keep, target, plan.rule)


def checked_indices(name: str, out, rows: int, n: int, k: int, device=None) -> torch.Tensor:
    """A strategy's output as the engine may use it, or a RuntimeError naming the method and what is wrong: a
    tensor of integers of shape [rows, k], every index in [0, n) and no index twice in a row. Returns it as long on
    ``device``, each row ascending."""
    what = f"method {name!r} returned"
    expected = f"a LongTensor [rows, k] = [{rows}, {k}] of distinct token indices in [0, {n})"
    if not torch.is_tensor(out):
        raise RuntimeError(f"{what} {type(out).__name__}, not a tensor; a strategy must return {expected}")
    if out.dtype == torch.bool or out.is_floating_point() or out.is_complex():
        raise RuntimeError(f"{what} {out.dtype} indices; a strategy must return {expected}")
    if tuple(out.shape) != (rows, k):
        raise RuntimeError(f"{what} shape {list(out.shape)}; a strategy must return {expected}")
    picks = out.to(device=device, dtype=torch.long).sort(dim=-1).values
    repeat = picks[:, 1:] == picks[:, :-1]
    bad = (picks[:, 0] < 0) | (picks[:, -1] >= n) | repeat.any(dim=-1)
    if bool(bad.any()):  # one host sync when all is well; the diagnosis only on failure
        r = int(bad.nonzero()[0])
        if int(picks[r, 0]) < 0 or int(picks[r, -1]) >= n:
            wrong = picks[r][(picks[r] < 0) | (picks[r] >= n)][0]
            raise RuntimeError(f"{what} index {int(wrong)} in row {r}, out of range; a strategy must return {expected}")
        twice = picks[r, 1:][repeat[r]][0]
        raise RuntimeError(
            f"{what} index {int(twice)} twice in row {r} (it would count as two kept tokens); a "
            f"strategy must return {expected}"
        )
    return picks


_REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    *,
    needs=(),
    layer: int | Callable[[Any], int] = 0,
    min_layer: int = 0,
    budget: str = "plain",
    budget_cap=None,
    flops=None,
    validate=None,
    description: str = "",
    needs_if: dict | None = None,
    family_options: Callable[[Any], dict] | None = None,
    merges: bool = False,
    expand: Callable | None = None,
    decode: tuple | None = None,
):
    """Decorator adding a strategy to the registry under ``name``.

    The strategy's options are its keyword parameters after ``(inputs, k)``: each needs a default, and its
    annotation (bool, int, float, str, Literal[...], Optional/unions of those) is how user values are checked.
    ``layer``: the default decoder layer (an int, or a function of the model's adapter). ``budget``: "plain" or
    "layer_average". ``budget_cap(k, pad_mask, **options)`` may lower a row's budget. ``flops(shape, **options)``
    gives the scoring FLOPs of one row (default 0). ``validate(**options)`` checks ranges. ``needs_if``: {need:
    predicate(**options)} for needs used only under some options, so the engine does not compute them otherwise.
    ``family_options(adapter)``: option defaults of a model family (options the user sets still win).
    ``merges=True``: the strategy may return a ``Merged`` plan instead of indices. ``layer=TOWER`` (-1): the stage
    runs inside the vision tower (``tower_layer`` option), on the tower's hidden states. ``expand(stage,
    num_layers)``: the stages a stage of this method becomes (PyramidDrop's drops, HoliTom's merging inside the
    LLM), on the schedule machinery; it sees the user's layer (None when not given) and may refuse.
    ``decode=(keep_ratio, layer)``: the decode stage (``decode_keep_ratio``, ``decode_layer``) a stage of this
    method brings by default (DyCoke's KV pruning while decoding).
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
        _REGISTRY[name] = Method(
            name,
            fn,
            frozenset(needs),
            options,
            kinds,
            layer,
            min_layer,
            budget,
            budget_cap,
            flops or _no_cost,
            validate,
            description or (fn.__doc__ or "").split("\n")[0],
            dict(needs_if or {}),
            family_options,
            merges,
            expand,
            decode,
        )
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
    hints = typing.get_type_hints(fn, include_extras=True)
    options, kinds = {}, {}
    for p in params[2:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"strategy {name!r}: options must be named keyword parameters, not *{p.name}")
        if p.default is p.empty:
            raise ValueError(f"strategy {name!r}: option {p.name!r} needs a default value")
        if p.name in RESERVED_OPTIONS:
            raise ValueError(
                f"strategy {name!r}: an option may not be called {p.name!r}, which apply_pruner or the "
                f"engine takes itself (reserved: {list(RESERVED_OPTIONS)}); rename it"
            )
        options[p.name] = p.default
        kinds[p.name] = hints.get(p.name, Any)
    return options, kinds


def _members(hint) -> list | None:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return list(typing.get_args(hint))
    return None


def plain(value):
    """NumPy scalars as the Python numbers they hold (``np.int64(3)`` is accepted wherever ``3`` is)."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and isinstance(value, np.floating):
        return float(value)
    return value


def _generic_problem(value) -> str | None:
    """What no numeric option may be, whatever its annotation: an integer beyond 64 bits (torch cannot hold it) or a
    float that is not finite."""
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return "an integer within 64 bits"
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    return None


_INT64 = (-(1 << 63), (1 << 63) - 1)


def _problem(value, hint) -> str | None:
    """None when ``value`` fits the annotation ``hint``, else how to name what it admits (for the error)."""
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        problem = _problem(value, base)
        if problem is not None:
            return problem
        for rule in meta:
            if isinstance(rule, Range) and not rule.contains(value):
                return f"{_describe(base)} {rule}"
        return None
    members = _members(hint)
    if members is not None:
        problems = [_problem(value, m) for m in members]
        return None if None in problems else " or ".join(dict.fromkeys(problems))
    if typing.get_origin(hint) is typing.Literal:
        if any(value is v or (type(value) is type(v) and value == v) for v in typing.get_args(hint)):
            return None
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }
    if hint in ok:
        return None if ok[hint] else _describe(hint)
    if hint is Any or not isinstance(hint, type):
        return None  # Any, or an annotation too rich to check here
    return None if isinstance(value, hint) else _describe(hint)


def _describe(hint) -> str:
    return {
        type(None): "None",
        bool: "True or False",
        int: "an integer",
        float: "a number",
        str: "a string",
        torch.Tensor: "a tensor",
        os.PathLike: "a path",
    }.get(hint, getattr(hint, "__name__", str(hint)))


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    return sorted(_REGISTRY)
