"""Selection strategies: pure tensor functions registered by name (importing this package registers them)."""

from . import (  # noqa: F401  (registration)
    base,
    baselines,
    cdpruner,
    dart,
    debias,
    divprune,
    dycoke,
    entropy,
    fastvid,
    holitom,
    pdrop,
    stable,
    temporal,
    vidcom2,
    visionzip,
    vispruner,
    zoo,
)
from .base import (
    Merged,
    Method,
    Range,
    ScoringShape,
    SelectionInputs,
    get_method,
    list_methods,
    register,
    unregister,
)

__all__ = [
    "Merged",
    "Method",
    "Range",
    "ScoringShape",
    "SelectionInputs",
    "get_method",
    "list_methods",
    "register",
    "unregister",
]
