"""The pruner's changes to a model instance, declared as a list and applied by one install and one remove path.

Each item's ``install()`` changes the model and returns the callable that undoes exactly that change; the pruner
keeps those callables and runs them in reverse order on ``remove_pruner``. Nothing else in vtprune touches the
model's modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Hook:
    """A forward hook on ``module``: before its forward (``when="pre"``, with the call's keyword arguments) or
    after it (``"post"``, with its output)."""

    module: torch.nn.Module
    when: str
    fn: Callable
    with_kwargs: bool = True
    prepend: bool = False  # before the module's other hooks (transformers records hidden states with hooks)

    def install(self) -> Callable[[], None]:
        if self.when == "pre":
            handle = self.module.register_forward_pre_hook(self.fn, with_kwargs=self.with_kwargs, prepend=self.prepend)
        else:
            handle = self.module.register_forward_hook(self.fn, with_kwargs=self.with_kwargs, prepend=self.prepend)
        return handle.remove


@dataclass
class Patch:
    """Any other change: ``apply()`` makes it and returns its undo (the attention capture's config swap, an
    adapter's instance-level wrappers)."""

    apply: Callable[[], Callable[[], None]]

    def install(self) -> Callable[[], None]:
        return self.apply()


def install_all(items: list) -> list[Callable[[], None]]:
    """Install ``items`` in order; if one fails, undo those already installed and re-raise."""
    undo: list = []
    try:
        for item in items:
            undo.append(item.install())
    except BaseException:
        remove_all(undo)
        raise
    return undo


def remove_all(undo: list[Callable[[], None]]) -> None:
    for fn in reversed(undo):
        fn()
