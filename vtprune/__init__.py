"""vtprune: training-free visual token pruning and merging for Hugging Face vision-language models.

import vtprune
vtprune.apply_pruner(model, method="divprune", keep_ratio=0.25)
...
vtprune.remove_pruner(model)
"""

import os as _os

from ._version import __version__ as __version__

# In a clone run from its root, Python imports this folder rather than the installed copy (the working directory comes
# first on sys.path), and there the other subpackages sit beside it (patches/, cuda/, eval/: setup.py's package_dir).
# The clone's root joins the package path so they are found as installed, whatever was pip-installed last.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_ROOT, "setup.py")) and _os.path.isfile(
    _os.path.join(_ROOT, "patches", "__init__.py")
):
    __path__.append(_ROOT)

# The public names load on first use (PEP 562): importing torch costs seconds, which `vtprune --help` should not pay.
_LAZY = {
    "apply_pruner": "api",
    "get_config": "api",
    "get_pruner": "api",
    "get_stats": "api",
    "is_patched": "api",
    "paused": "api",
    "remove_pruner": "api",
    "PrunerConfig": "config",
    "StageConfig": "config",
    "StageStats": "stats",
    "UnitStats": "stats",
    "list_methods": "strategies",
    "register": "strategies",
    "unregister": "strategies",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vtprune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
