"""What a strategy receives, and the registry that maps method names to strategies.

A strategy is a pure tensor function ``fn(inputs: SelectionInputs, k: int, **options) -> LongTensor [batch, k]``
returning indices into the ``N`` visual tokens of each row. Indices may come in pick order (greedy methods);
the engine sorts them before gathering. Strategies never see padding rows: the engine calls them on groups of
rows that share the same visual-token count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# What a strategy may ask the engine to provide, beyond ``features``.
NEEDS = ("attention", "queries", "projector", "grid", "pad_mask", "newline_mask", "text")


@dataclass
class SelectionInputs:
    """Tensors describing the visual tokens entering one pruning stage, for ``batch`` rows of ``N`` tokens.

    features:      [batch, N, D] hidden states of the visual tokens (projected embeddings at layer 0).
    attention:     [batch, N] last-token attention to each visual token at layer K-1, mean over heads.
    queries:       [batch, N, H, d_head] query states of the visual tokens at layer K-1.
    pre_projector: [batch, N_pre, D_v] vision features entering the projector (LLaVA: N_pre == N;
                   Qwen: N_pre == 4 * N, the 2x2 patch groups in merger order).
    projector:     callable mapping pre-projector rows to projected rows ([*, group * D_v] -> [*, D]).
    grid:          one (height, width) per row, the spatial layout of its N tokens in raster order, or None.
    pad_mask:      [batch, N] bool, True for tokens that are mostly image padding (LLaVA pad-to-square).
    newline_mask:  [batch, N] bool, True for LLaVA-NeXT row-separator tokens.
    text:          [batch, T, D] hidden states of the text tokens (for text-aware methods), or None.
    seed:          seed for stochastic strategies (``None`` = draw from torch's global generator).
    """

    features: torch.Tensor
    attention: Optional[torch.Tensor] = None
    queries: Optional[torch.Tensor] = None
    pre_projector: Optional[torch.Tensor] = None
    projector: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    grid: Optional[list] = None
    pad_mask: Optional[torch.Tensor] = None
    newline_mask: Optional[torch.Tensor] = None
    text: Optional[torch.Tensor] = None
    seed: Optional[int] = None

    @property
    def batch(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


@dataclass(frozen=True)
class Method:
    """A registered strategy: its function, what it needs from the model, and the options it accepts."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs: frozenset = frozenset()
    options: dict = field(default_factory=dict)  # option name -> default value
    min_layer: int = 0  # attention/query-scored methods need a layer before the stage
    description: str = ""


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, needs=(), options=None, min_layer: int = 0, description: str = ""):
    """Decorator adding ``fn`` to the registry under ``name``."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)} for method {name!r}; allowed: {list(NEEDS)}")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = Method(name, fn, frozenset(needs), dict(options or {}), min_layer, description)
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def check_options(method: Method, options: dict[str, Any]) -> dict[str, Any]:
    """Merge user options over the method's defaults, refusing names the method does not accept."""
    unknown = set(options) - set(method.options)
    if unknown:
        allowed = sorted(method.options) or "none"
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {method.name!r}; allowed: {allowed}")
    return {**method.options, **options}
