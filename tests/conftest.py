"""Shared fixtures: fresh random problems with explicit seeds, tolerances per dtype, GPU marker."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js

if not js._native.has_cpu_kernels():
    raise ImportError(
        f"jax_sprnn was imported from {js.__file__} without its compiled CPU module. Install it "
        "(pip install '.[test]') and run `pytest` (not `python -m pytest`, which puts the source "
        "tree first on sys.path), or use an editable install (pip install -e '.[test]').")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Relative error against the float32 reference on the same (rounded) inputs. The native kernels and
# the reference both round the state to the storage dtype each step, so the gap is summation order
# plus the occasional rounding flip: a few ulps of the storage dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 3e-3}


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def pytest_collection_modifyitems(config, items):
    if on_gpu() and js._native.cuda_module() is not None:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and the jax_sprnn CUDA module")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), "output has non-finite values"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def random_kernel(rng, hidden, density, *, gain=0.9, mask=None):
    """A masked kernel whose recurrence is contractive (so errors do not grow with T)."""
    if mask is None:
        mask = rng.random((hidden, hidden)) < density
    nnz_per_col = max(1.0, float(mask.mean()) * hidden)
    kernel = rng.standard_normal((hidden, hidden)).astype(np.float32) * (gain / np.sqrt(nnz_per_col))
    return np.where(mask, kernel, 0.0).astype(np.float32), mask


def make_problem(seed, hidden, batch, steps, density, dtype="float32", *, mask=None, scale=1.0):
    rng = np.random.default_rng(seed)
    kernel, mask = random_kernel(rng, hidden, density, mask=mask)
    dt = DTYPES[dtype]
    kernel_d = np.asarray(jnp.asarray(kernel, dt).astype(jnp.float32))  # as stored
    weights = js.SparseWeights.from_dense(kernel_d, mask, dtype=dt)
    x = jnp.asarray(rng.standard_normal((batch, steps, hidden)).astype(np.float32) * scale, dt)
    h0 = jnp.asarray(rng.standard_normal((batch, hidden)).astype(np.float32) * 0.5, dt)
    return kernel_d * mask, weights, x, h0


def normal(seed, shape):
    """A float32 array of standard normals, reproducible from ``seed``."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.fixture
def exact_matmuls():
    """GPUs run float32 matmuls at reduced precision by default; comparisons at 1e-5 need full."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
