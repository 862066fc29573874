"""Selection strategies: pure tensor functions registered by name (importing this package registers them)."""

from . import base, baselines, debias, divprune, entropy, stable, temporal, zoo  # noqa: F401  (registration)
from .base import Method, Range, ScoringShape, SelectionInputs, get_method, list_methods, register, unregister

__all__ = ["Method", "Range", "ScoringShape", "SelectionInputs", "get_method", "list_methods", "register", "unregister"]
