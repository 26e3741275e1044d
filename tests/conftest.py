"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo_for_gpu_tests(request):
    """Dynamo counts recompilations of one code object (Qwen3Block.forward) over every model a process compiles, and
    its limit (8) is sized for one training run; the GPU tests compile many models (recipes, and batches with and
    without a document mask), so each starts from an empty Dynamo cache. CPU tests that need it reset themselves."""
    if request.node.get_closest_marker("gpu") is not None:
        torch._dynamo.reset()
