"""One adapter per model family, looked up by ``config.model_type``. Adding a family is one adapter file and one
``register_adapter`` line here."""
from __future__ import annotations

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen25VLAdapter, Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Serve every ``config.model_type`` in ``cls.model_types`` with ``cls``."""
    if not cls.model_types:
        raise ValueError(f"{cls.__name__} declares no model_types")
    for model_type in cls.model_types:
        if model_type in ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has an adapter ({ADAPTERS[model_type].__name__})")
        ADAPTERS[model_type] = cls
    return cls


for _cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen25VLAdapter, LlavaOnevisionAdapter,
             Qwen3VLAdapter, Qwen3VLMoeAdapter):
    register_adapter(_cls)


def adapter_class(config) -> type[Adapter]:
    """The adapter class for a model config (or a model), without needing the weights."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(f"vtprune does not support model_type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]


def get_adapter(model) -> Adapter:
    cls = adapter_class(getattr(model, "config", None))
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise NotImplementedError(f"{type(model).__name__}: pass the *ForConditionalGeneration model "
                                  "(with .model.language_model), as loaded by from_pretrained")
    return cls(model)


__all__ = ["ADAPTERS", "Adapter", "adapter_class", "get_adapter", "register_adapter"]
