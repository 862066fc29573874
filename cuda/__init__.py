"""Triton kernels for the token-level ops of ``vtprune.ops``: one kernel and its host wrapper per file.

- ``compact.py``: fused compaction, kept hidden states + position ids + attention mask in one launch.
- ``merge.py``: size-weighted merge of pruned tokens into kept tokens (a scatter-reduce), one launch.
- ``greedy.py``: greedy max-min diversity selection (DivPrune) and its weighted variant (ZOO-Prune),
  one program per sample, one launch.

This file never imports Triton (``import vtprune.cuda`` works without it; ``triton_available()`` says whether the
kernels can run); the kernel modules do, and ``vtprune.ops`` imports them only when it is about to use them. The
kernels run compiled on CUDA tensors, or under Triton's interpreter (``TRITON_INTERPRET=1``) on any tensors, CPU
included.

Triton decides between compiling and interpreting when ``@triton.jit`` is applied, reading ``TRITON_INTERPRET`` at
that moment. So that the mode of our kernels does not depend on which module first imported a kernel file, they are
plain functions wrapped by ``lazy_jit``: the decoration happens at launch time, once per mode, using the value of
``TRITON_INTERPRET`` then. Triton's own helpers in ``triton.language`` (``tl.max``, ``tl.argmax``, ``tl.zeros``, ...)
are decorated when ``triton`` is first imported, though, so the interpreter only works in a process where
``TRITON_INTERPRET=1`` was set before that import (and compiled kernels only where it was not); ``lazy_jit`` raises a
clear error on a mismatch instead of Triton's "Cannot call @triton.jit'd outside of the scope of a kernel".
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

__all__ = ["triton_available", "interpret_mode", "stdlib_interpreted", "lazy_jit", "check_device", "on_device"]


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (it is not attempted until asked)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken (or blocked) install counts as absent
        return False
    return True


def interpret_mode() -> bool:
    """Whether Triton's interpreter is selected now (``TRITON_INTERPRET`` set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class lazy_jit:
    """``triton.jit`` applied at first launch, once per interpreter mode: ``kernel = lazy_jit(fn); kernel[grid](...)``.

    The wrapped function must only call Triton builtins (no other jitted helpers), since those would be
    decorated at import time.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict[bool, object] = {}
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid):
        mode = interpret_mode()
        kernel = self._compiled.get(mode)
        if kernel is None:
            import triton

            if stdlib_interpreted() != mode:
                raise RuntimeError(
                    f"TRITON_INTERPRET is {'set' if mode else 'unset'} now but was "
                    f"{'set' if not mode else 'unset'} when triton was first imported in this process; Triton's "
                    "own helpers (tl.max, tl.argmax, ...) follow the value at import time. Set TRITON_INTERPRET "
                    "before anything imports triton (or run in a fresh process)."
                )
            kernel = self._compiled[mode] = triton.jit(self.fn)
        return kernel[grid]


def stdlib_interpreted() -> bool:
    """Whether ``triton.language``'s own jitted helpers were built for the interpreter (``TRITON_INTERPRET=1`` when
    triton was first imported)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.standard.max, JITFunction)


def check_device(*tensors) -> None:
    """Raise a clear error when a kernel is asked to run on tensors it cannot reach."""
    if interpret_mode():
        return
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(
                "vtprune Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                "(Triton's interpreter) or use vtprune.ops.set_backend('torch')"
            )


def on_device(t):
    """Make ``t``'s GPU the current one for a launch (layers may sit on several GPUs under ``device_map="auto"``)."""
    if t.is_cuda:
        import torch

        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
