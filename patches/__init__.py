"""One family per file (its ``Adapter``, ``Cost`` and ``Tiny``), registered here by ``config.model_type``. Adding a
family is one file and one ``register_family`` line."""

from __future__ import annotations

from .base import Adapter, Compaction, Cost, Family, Tiny, Unit
from .llava import LLAVA
from .llava_next import LLAVA_NEXT
from .llava_onevision import LLAVA_ONEVISION
from .qwen2_vl import QWEN2_5_VL, QWEN2_VL
from .qwen3_vl import QWEN3_VL, QWEN3_VL_MOE

FAMILIES: dict[str, Family] = {}  # config.model_type -> Family


def register_family(family: Family) -> Family:
    """Serve every ``config.model_type`` in ``family.model_types`` with ``family``."""
    if not family.model_types:
        raise ValueError(f"family {family.name!r} declares no model_types")
    for model_type in family.model_types:
        if model_type in FAMILIES:
            raise ValueError(f"model_type {model_type!r} already belongs to family {FAMILIES[model_type].name!r}")
        FAMILIES[model_type] = family
    return family


for _family in (LLAVA, LLAVA_NEXT, QWEN2_VL, QWEN2_5_VL, LLAVA_ONEVISION, QWEN3_VL, QWEN3_VL_MOE):
    register_family(_family)


def family_of(config) -> Family:
    """The family of a model config (or a model), without needing the weights."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(f"vtprune does not support model_type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def adapter_class(config) -> type[Adapter]:
    return family_of(config).adapter


def cost_model(config) -> type[Cost]:
    """The FLOPs model of the config's family (``vtprune.flops`` counts with it)."""
    return family_of(config).cost


def get_adapter(model) -> Adapter:
    cls = adapter_class(getattr(model, "config", None))
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise NotImplementedError(
            f"{type(model).__name__}: pass the *ForConditionalGeneration model "
            "(with .model.language_model), as loaded by from_pretrained"
        )
    return cls(model)


__all__ = [
    "FAMILIES",
    "Adapter",
    "Compaction",
    "Cost",
    "Family",
    "Tiny",
    "Unit",
    "adapter_class",
    "cost_model",
    "family_of",
    "get_adapter",
    "register_family",
]
