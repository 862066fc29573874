"""vtprune: training-free visual token pruning and merging for Hugging Face vision-language models.

    import vtprune
    vtprune.apply_pruner(model, method="divprune", keep_ratio=0.25)
    ...
    vtprune.remove_pruner(model)
"""
from ._version import __version__
from .api import apply_pruner, get_config, get_stats, remove_pruner
from .config import PrunerConfig, StageConfig
from .strategies import list_methods

__all__ = ["PrunerConfig", "StageConfig", "__version__", "apply_pruner", "get_config", "get_stats", "list_methods",
           "remove_pruner"]
