"""pytest fixtures and hooks. What tests share with the tools (random problems, tolerances,
rel_err) lives in :mod:`jax_sprnn.testing`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native
from jax_sprnn.testing import on_gpu

if not js._native.has_cpu_kernels():
    raise ImportError(
        f"jax_sprnn was imported from {js.__file__} without its compiled CPU module. Install it "
        "(pip install '.[test]') and run `pytest` (not `python -m pytest`, which puts the source "
        "tree first on sys.path), or use an editable install (pip install -e '.[test]').")


def pytest_collection_modifyitems(config, items):
    if on_gpu() and js._native.cuda_module() is not None:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and the jax_sprnn CUDA module")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_targets_registered(monkeypatch):
    """Lower as if the CUDA module were built (the lowering asks _native what it registered)."""
    names = {_constants.ffi_target(kind)
             for kind in _constants.PRODUCTION_TARGET_KINDS + _constants.TESTING_TARGET_KINDS}
    monkeypatch.setattr(_native, "_CUDA_TARGETS", frozenset(names))
    monkeypatch.setattr(_native, "initialize_cuda", lambda: None)


@pytest.fixture
def exact_matmuls():
    """GPUs run float32 matmuls at reduced precision by default; comparisons at 1e-5 need full."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
