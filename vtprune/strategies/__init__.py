"""Selection strategies: pure tensor functions registered by name (importing this package registers them)."""
from . import base, baselines, debias, divprune, entropy, merge, stable, temporal, zoo  # noqa: F401  (registration)
from .base import Method, ScoringShape, SelectionInputs, check_options, get_method, list_methods, register, unregister

__all__ = ["Method", "ScoringShape", "SelectionInputs", "check_options", "get_method", "list_methods", "register",
           "unregister"]
