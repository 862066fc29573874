"""One adapter per model family, looked up by ``config.model_type``."""
from __future__ import annotations

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen25VLAdapter, Qwen2VLAdapter

ADAPTERS = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter, "qwen2_vl": Qwen2VLAdapter,
            "qwen2_5_vl": Qwen25VLAdapter}


def get_adapter(model) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(f"vtprune does not support model_type {model_type!r} "
                                  f"({type(model).__name__}); supported: {sorted(ADAPTERS)}")
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise NotImplementedError(f"{type(model).__name__}: pass the *ForConditionalGeneration model "
                                  "(with .model.language_model), as loaded by from_pretrained")
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "Adapter", "get_adapter"]
