"""model_args of the vtprune lmms-eval wrappers: strings from ``key=value,...`` to checked Python values.

Kept apart from ``lmms_plugin`` so the parsing (and its errors) needs neither lmms-eval nor a model.
"""

from __future__ import annotations

import json
from typing import Any

import torch

UNPRUNED = ("none", "baseline", "unpruned")  # method values that run the model without a pruner
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


# ----------------------------------------------------------------------------------------------- argument parsing
def coerce(value: Any) -> Any:
    """A model_args string as Python: "true"/"false" -> bool, "none"/"null"/"" -> None, "12" -> 12,
    "0.25" -> 0.25, anything else unchanged. Non-strings pass through."""
    if not isinstance(value, str):
        return value
    s = value.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", ""):
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _as_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    value = coerce(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise ValueError(f"model_arg {name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"model_arg {name} must be >= {minimum}, got {value}")
    return value


def _as_float(name: str, value: Any) -> float | None:
    value = coerce(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"model_arg {name} must be a number, got {value!r}")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    value = coerce(value)
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise ValueError(f"model_arg {name} must be true or false, got {value!r}")


def _as_dtype(value: Any):
    value = coerce(value)
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"model_arg dtype must be one of auto, {', '.join(_DTYPES)}; got {value!r}")


def pruning_settings(
    method: Any = "divprune",
    keep_ratio: Any = None,
    keep_tokens: Any = None,
    layer: Any = None,
    positions: Any = "original",
    schedule: Any = None,
    **options,
) -> dict | None:
    """apply_pruner keyword arguments from (string) model_args; None for the unpruned model."""
    method = coerce(method)
    if method is None or (isinstance(method, str) and method.lower() in UNPRUNED):
        extra = {
            k: v
            for k, v in dict(
                keep_ratio=keep_ratio, keep_tokens=keep_tokens, layer=layer, schedule=schedule, **options
            ).items()
            if coerce(v) is not None
        }
        if extra:
            raise ValueError(f"method={method} runs the unpruned model; pruning settings {sorted(extra)} make no sense")
        return None
    if not isinstance(method, str):
        raise ValueError(f"model_arg method must be a method name, got {method!r}")
    schedule = coerce(schedule)
    if isinstance(schedule, str):
        try:
            schedule = json.loads(schedule)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model_arg schedule must be a JSON list of stage dicts: {exc}") from None
    return dict(
        method=method,
        keep_ratio=_as_float("keep_ratio", keep_ratio),
        keep_tokens=_as_int("keep_tokens", keep_tokens, minimum=1),
        layer=_as_int("layer", layer, minimum=0),
        positions=coerce(positions) or "original",
        schedule=schedule,
        **{k: coerce(v) for k, v in options.items()},
    )
