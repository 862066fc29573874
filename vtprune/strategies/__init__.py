"""Selection strategies: pure tensor functions registered by name (importing this package registers them)."""
from . import base, baselines, debias, divprune, entropy, merge, zoo  # noqa: F401  (registration)
from . import stable  # noqa: F401  (registration: divprune_stable, zoo_stable)
from .base import Method, SelectionInputs, check_options, get_method, list_methods, register

__all__ = ["Method", "SelectionInputs", "check_options", "get_method", "list_methods", "register"]
