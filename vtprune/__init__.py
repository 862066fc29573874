"""vtprune: training-free visual token pruning and merging for Hugging Face vision-language models.

    import vtprune
    vtprune.apply_pruner(model, method="divprune", keep_ratio=0.25)
    ...
    vtprune.remove_pruner(model)
"""
from ._version import __version__
from .api import apply_pruner, get_config, get_pruner, get_stats, is_patched, paused, remove_pruner
from .config import PrunerConfig, StageConfig
from .stats import StageStats, UnitStats
from .strategies import list_methods, register, unregister

__all__ = ["PrunerConfig", "StageConfig", "StageStats", "UnitStats", "__version__", "apply_pruner", "get_config", "get_pruner",
           "get_stats", "is_patched", "list_methods", "paused", "register", "remove_pruner", "unregister"]
