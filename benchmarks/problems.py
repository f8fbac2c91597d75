"""The layers and inputs every benchmark runs on: row-balanced random masks, device-side inputs."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_sprnn as js
from jax_sprnn import _native, planner, testing
from jax_sprnn.layout import LayoutMeta
from jax_sprnn.testing import DTYPES

SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def row_balanced_kernel(hidden: int, density: float, seed: int | None = None):
    """``(kernel, mask)``: every output unit (column of the Flax-oriented kernel) has
    ``round(density * H)`` inputs; gain 0.9 keeps the recurrence contractive."""
    rng = np.random.default_rng(hidden + int(density * 1000) if seed is None else seed)
    nnz_row = max(1, int(round(density * hidden)))
    # The nnz_row smallest of a random column are a uniform random subset of its rows.
    scores = np.ascontiguousarray(rng.random((hidden, hidden)).T)
    chosen = np.argpartition(scores, nnz_row - 1, axis=1)[:, :nnz_row] if nnz_row < hidden else None
    mask = np.ones((hidden, hidden), bool)
    if chosen is not None:
        mask[:] = False
        mask[chosen, np.arange(hidden)[:, None]] = True
    kernel = (rng.standard_normal((hidden, hidden)) * (0.9 / np.sqrt(nnz_row))).astype(np.float32)
    kernel[~mask] = 0
    return kernel, mask


def pack_timed(layer) -> js.SparseWeights:
    """``layer.kernel`` under ``layer.mask`` packed in ``layer.jnp_dtype``; the packing time goes to
    ``layer.pack_s``."""
    start = time.perf_counter()
    w = js.SparseWeights.from_dense(layer.kernel, layer.mask, dtype=layer.jnp_dtype)
    layer.pack_s = time.perf_counter() - start
    return w


@dataclasses.dataclass
class Layer:
    """One recurrent layer at one dtype. ``kernel`` is float32 holding the values as stored."""

    hidden: int
    density: float
    dtype: str
    kernel: np.ndarray
    mask: np.ndarray

    @classmethod
    def make(cls, hidden: int, density: float, dtype: str, *, base=None) -> "Layer":
        """A fresh layer, or ``base`` (a ``(kernel, mask)`` pair) cast to ``dtype``."""
        kernel, mask = base if base is not None else row_balanced_kernel(hidden, density)
        stored = np.asarray(jnp.asarray(kernel, DTYPES[dtype]).astype(jnp.float32))
        return cls(hidden, density, dtype, stored, mask)

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @functools.cached_property
    def plan_meta(self) -> LayoutMeta:
        """The layout the packer will choose (row-balanced rows plan exactly), without packing."""
        nnz_row = np.full(self.hidden, max(1, int(round(self.density * self.hidden))))
        device = _native.current_device_spec()
        return LayoutMeta.from_plan(planner.plan_layout(nnz_row, self.jnp_dtype, device))

    @functools.cached_property
    def weights(self) -> js.SparseWeights:
        return pack_timed(self)

    @functools.cached_property
    def dense_kernel(self) -> jax.Array:
        return jnp.asarray(self.kernel, self.jnp_dtype)

    @functools.cached_property
    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``U = kernel^T`` (so that ``h^T <- U @ h^T``) as CSR on the host: values (storage
        dtype), row of each value, column of each value, row pointers."""
        rows, cols = np.nonzero(self.mask.T)
        values = np.asarray(jnp.asarray(self.kernel.T[rows, cols], self.jnp_dtype))
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=self.hidden))])
        return values, rows.astype(np.int32), cols.astype(np.int32), indptr.astype(np.int32)

    def describe(self) -> dict:
        meta = self.plan_meta
        return dict(hidden=self.hidden, density=self.density, dtype=self.dtype, nnz=self.nnz,
                    K=meta.slots_per_lane, ctas=meta.num_ctas, warps_per_cta=meta.warps_per_cta,
                    reg_slots=meta.reg_slots, planner_fits=meta.fits)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw(seed, T, batch, hidden, dtype):
    kx, kh = jax.random.split(jax.random.key(seed, impl="rbg"))  # rbg: quick to compile
    x = jax.random.normal(kx, (T, batch, hidden), jnp.float32).astype(DTYPES[dtype])
    h0 = (0.5 * jax.random.normal(kh, (batch, hidden), jnp.float32)).astype(DTYPES[dtype])
    return x, h0


def make_inputs(T: int, batch: int, hidden: int, dtype: str, seed: int):
    """Time-major ``x [T, B, H]`` and ``h0 [B, H]`` drawn on the device (no host transfer)."""
    return jax.block_until_ready(_draw(seed, T, batch, hidden, dtype))


def rel_err(out, ref) -> float:
    """The tests' :func:`jax_sprnn.testing.rel_err`, NaN (recorded in the results) when ``out`` has
    non-finite values."""
    try:
        return testing.rel_err(out, ref)
    except AssertionError:
        return float("nan")
