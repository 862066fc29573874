"""Fixtures shared by every test folder (helpers.py holds the functions)."""

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before triton is first
# imported (transformers imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The demo tests start a Gradio server: no usage reporting from test runs.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402

import vtprune  # noqa: E402
from helpers import cached_model, require  # noqa: E402
from vtprune.testing import FAMILIES  # noqa: E402

torch.set_num_threads(1)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        require(mark.kwargs["ok"], mark.kwargs["reason"])


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=["sdpa", "eager"])
def attn(request):
    return request.param


@pytest.fixture
def model(family, attn):
    m = cached_model(family, attn)
    yield m
    # A failed test must not leave a patch behind for the next one.
    if vtprune.is_patched(m):
        vtprune.remove_pruner(m)


@pytest.fixture
def patched():
    """Yields a function patching a model; removes the patch afterwards even when the test fails."""
    models = []

    def apply(model, schedule):
        if schedule is not None:
            vtprune.apply_pruner(model, schedule=schedule)
            models.append(model)
        return model

    yield apply
    for m in models:
        vtprune.remove_pruner(m)
