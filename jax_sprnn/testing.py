"""What the tests, the tools (``tools/soak.py``, ``tools/sanitizer_case.py``) and the benchmarks share:
random problems reproducible from a seed, the tolerances of each storage dtype and the error measure
they bound. Not imported by ``jax_sprnn`` itself; it needs nothing beyond jax and numpy."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from .weights import SparseWeights

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

#: Relative error of a forward pass against the float32 reference on the same (rounded) inputs. The
#: native kernels and the reference both round the state to the storage dtype each step, so the gap
#: is summation order plus the occasional rounding flip: a few ulps of the storage dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 3e-3}

#: The same for gradients: two recurrences (forward and backward), a few times the forward bound.
GRAD_TOLERANCE = {dtype: 4 * tol for dtype, tol in TOLERANCE.items()}


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def transpose_ops(compiled_text: str) -> list[str]:
    """The transpose and copy instructions of a compiled program's text (the kernels that would move
    a sequence operand between the [B, T, .] and [T, B, .] layouts)."""
    return re.findall(r"%(\S*(?:transpose|copy)\S*) = ", compiled_text)


def rel_err(out, ref) -> float:
    """``|out - ref| / |ref|`` (Frobenius norms, in float64; ``|out - ref|`` when ``ref`` is zero).

    Raises AssertionError, as ``numpy.testing`` does, when ``out`` has non-finite values: a NaN
    would otherwise compare as "not above the tolerance" in a careless check."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), "output has non-finite values"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def random_kernel(rng: np.random.Generator, hidden: int, density: float, *, gain: float = 0.9,
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel, mask)``: a masked float32 kernel whose recurrence is contractive (so errors do
    not grow with T); the mask is drawn with ``density`` unless given."""
    if mask is None:
        mask = rng.random((hidden, hidden)) < density
    nnz_per_col = max(1.0, float(mask.mean()) * hidden)
    kernel = rng.standard_normal((hidden, hidden)).astype(np.float32) * (gain / np.sqrt(nnz_per_col))
    return np.where(mask, kernel, 0.0).astype(np.float32), mask


def make_problem(seed: int, hidden: int, batch: int, steps: int, density: float,
                 dtype: str = "float32", *, mask: np.ndarray | None = None, scale: float = 1.0,
                 **packing):
    """``(dense, weights, x, h0)`` from ``seed``: the float32 kernel as stored in ``dtype`` (masked),
    its packed :class:`SparseWeights` (``packing``: more options of ``from_dense``, e.g.
    ``matvec``), inputs ``x [batch, steps, hidden]`` and ``h0``."""
    rng = np.random.default_rng(seed)
    kernel, mask = random_kernel(rng, hidden, density, mask=mask)
    dt = DTYPES[dtype]
    kernel_d = np.asarray(jnp.asarray(kernel, dt).astype(jnp.float32))  # as stored
    weights = SparseWeights.from_dense(kernel_d, mask, dtype=dt, **packing)
    x = jnp.asarray(rng.standard_normal((batch, steps, hidden)).astype(np.float32) * scale, dt)
    h0 = jnp.asarray(rng.standard_normal((batch, hidden)).astype(np.float32) * 0.5, dt)
    return kernel_d * mask, weights, x, h0


def make_twin_problem(seed: int, hidden: int, batch: int, steps: int, density: float,
                      dtype: str = "float32") -> tuple[tuple, tuple]:
    """Two directions' :func:`make_problem` tuples whose weights share one layout (one ``meta``,
    so that a bidirectional call runs them as one stacked call): the backward mask is the forward
    one with its rows and columns permuted, another pattern with the same row and column counts."""
    fwd = make_problem(seed, hidden, batch, steps, density, dtype)
    rng = np.random.default_rng(seed + 1)
    mask = fwd[1].mask()[rng.permutation(hidden)][:, rng.permutation(hidden)]
    bwd = make_problem(seed + 2, hidden, batch, steps, density, dtype, mask=mask)
    if fwd[1].meta != bwd[1].meta or fwd[1].meta_t != bwd[1].meta_t:  # (the planner's business)
        raise AssertionError(f"the permuted mask packed to another layout: {fwd[1].meta} and "
                             f"{bwd[1].meta}")
    return fwd, bwd


def random_lengths(batch: int, steps: int, seed: int) -> jax.Array:
    """``[batch]`` int32 sequence lengths in ``[0, steps]`` from ``seed``: the first example runs
    every step and, in a batch of three or more, the second none."""
    lengths = np.random.default_rng(seed).integers(0, steps + 1, batch).astype(np.int32)
    lengths[0] = steps
    if batch > 2:
        lengths[1] = 0
    return jnp.asarray(lengths)


def normal(seed: int, shape) -> jax.Array:
    """A float32 array of standard normals, reproducible from ``seed``."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def make_gated_problem(seed: int, gates: int, hidden: int, batch: int, steps: int, density: float,
                       dtype: str = "float32", *, device=None, load_bytes: int | None = None,
                       matvec: str = "auto", plan_batch: int | None = None, exchange: str = "auto"):
    """``(weights, x, c0, h0, hn_bias)`` of an LSTM (``gates=4``) or GRU (3) from ``seed``: a
    ``[hidden, gates*hidden]`` kernel at ``density`` (scaled so the gates stay out of saturation),
    packed with ``from_dense``'s ``device``, ``load_bytes``, ``matvec``, ``exchange`` and ``batch``
    (``plan_batch``), inputs
    ``x [batch, steps, gates*hidden]``, a carry and a float32 ``hn_bias`` (the GRU's)."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    scale = 1.5 / np.sqrt(max(1.0, density * hidden))
    kernel = rng.standard_normal((hidden, gates * hidden)).astype(np.float32) * scale
    weights = SparseWeights.from_dense(kernel, density=density, dtype=dt, device=device,
                                       load_bytes=load_bytes, matvec=matvec, batch=plan_batch,
                                       exchange=exchange)
    x = jnp.asarray(rng.standard_normal((batch, steps, gates * hidden)) * 0.8, dt)
    c0 = jnp.asarray(rng.standard_normal((batch, hidden)) * 0.5, dt)
    h0 = jnp.asarray(np.tanh(rng.standard_normal((batch, hidden))), dt)
    hn_bias = jnp.asarray(rng.standard_normal(hidden) * 0.3, jnp.float32)
    return weights, x, c0, h0, hn_bias


def make_gated_twin_problem(seed: int, gates: int, hidden: int, batch: int, steps: int,
                            density: float, dtype: str = "float32") -> tuple[tuple, tuple]:
    """Two directions' :func:`make_gated_problem` tuples whose weights share one layout (one
    ``meta``, so that a bidirectional call runs them as one stacked call): the backward pattern is
    the forward one with the kernel's rows permuted and its units permuted alike in every gate."""
    fwd = make_gated_problem(seed, gates, hidden, batch, steps, density, dtype)
    rng = np.random.default_rng(seed + 1)
    units = rng.permutation(hidden)
    columns = (np.arange(gates)[:, None] * hidden + units[None, :]).ravel()
    mask = fwd[0].mask()[rng.permutation(hidden)][:, columns]
    bwd = make_gated_problem(seed + 2, gates, hidden, batch, steps, density, dtype)
    kernel = rng.standard_normal(mask.shape).astype(np.float32) * 1.5 / np.sqrt(max(1.0, density * hidden))
    w_b = SparseWeights.from_dense(np.where(mask, kernel, 0.0), mask, dtype=DTYPES[dtype])
    if fwd[0].meta != w_b.meta:  # (the planner's business)
        raise AssertionError(f"the permuted pattern packed to another layout: {fwd[0].meta} and "
                             f"{w_b.meta}")
    return fwd, (w_b,) + bwd[1:]


def run_gated(gates: int, x, c0, h0, weights, hn_bias, **kw):
    """``sparse_lstm`` (``gates=4``) or ``sparse_gru`` (3) as ``(y, final states)``: ``(y, c, h)``
    or ``(y, h)``; ``kw`` goes to the call (``seq_lengths``, ``reverse``, ``method``, ...)."""
    from .gated import sparse_gru, sparse_lstm
    if gates == 4:
        y, (c, h) = sparse_lstm(x, (c0, h0), weights, **kw)
        return y, c, h
    return sparse_gru(x, h0, weights, hn_bias=hn_bias, **kw)


def _public_calls() -> dict:
    from . import bidirectional, gated, gated_bidirectional
    from .api import sparse_rnn
    return {
        "rnn": (1, lambda x, h, w, **kw: sparse_rnn(x, h, w, **kw)),
        "lstm": (4, lambda x, h, w, **kw: gated.sparse_lstm(x, (h, 2 * h), w, **kw)),
        "gru": (3, lambda x, h, w, **kw: gated.sparse_gru(x, h, w, **kw)),
        "rnn_bidirectional": (1, lambda x, h, w, reverse=False, **kw:
                              bidirectional.sparse_rnn_bidirectional((x, x), (h, 2 * h), (w, w), **kw)),
        "lstm_bidirectional": (4, lambda x, h, w, reverse=False, **kw:
                               gated_bidirectional.sparse_lstm_bidirectional(
                                   (x, x), ((h, 2 * h), (h, h)), (w, w), **kw)),
        "gru_bidirectional": (3, lambda x, h, w, reverse=False, **kw:
                              gated_bidirectional.sparse_gru_bidirectional((x, x), (h, 2 * h), (w, w),
                                                                           **kw)),
    }


#: Every public sequence function as ``name: (gates, call(x, h, w, **kw) -> (outputs, final))``:
#: ``x`` is ``[B, T, G*H]``, ``w`` packs ``[H, G*H]``, and the carry parts are built from ``h`` as
#: ``k * h`` with ``k`` 1 or 2 (so an empty sequence's final carry tells them apart); the
#: bidirectional calls take no ``reverse``.
PUBLIC_CALLS = _public_calls()


def gated_backward_problem(seed: int, gates: int, hidden: int, batch: int, steps: int, density: float,
                           dtype: str = "float32", *, device=None, load_bytes: int | None = None,
                           cotangent_scale: float = 0.3, plan_batch: int | None = None):
    """The operands of a gated layer's backward recurrence (``sprnn_lstm_backward`` /
    ``sprnn_gru_backward``), in step order, from a real forward pass (XLA's scan) on ragged lengths
    (example 0 runs every step, example 1 none when ``batch > 1``), with random cotangents of
    standard deviation ``cotangent_scale``:
    ``(weights, kernel, operands, lengths)``; ``operands`` leave out the layout and the kernel."""
    from . import fallback
    w, x, c0, h0, hn_bias = make_gated_problem(seed, gates, hidden, batch, steps, density, dtype,
                                               device=device, load_bytes=load_bytes,
                                               plan_batch=plan_batch)
    rng = np.random.default_rng(seed + 1)
    x_steps = jnp.swapaxes(x, 0, 1)
    lengths = rng.integers(0, steps + 1, batch).astype(np.int32)
    lengths[0] = steps
    if batch > 1:
        lengths[1] = 0
    lengths = jnp.asarray(lengths)
    kernel = fallback.dense_from_packed(w.values, w.indices, w.lane_row, w.meta)
    matvec = fallback.storage_matvec(kernel, x.dtype)
    if gates == 4:
        y, _, _, cells = fallback.lstm_forward(x_steps, h0, c0, w.values, w.indices, w.lane_row,
                                               lengths, reverse=False, meta=w.meta)
    else:
        y, _ = fallback.gated_scan(x_steps, (h0,), matvec, lengths, hn_bias, gates=3, reverse=False)
    h_before = jnp.concatenate([h0[None], y[:-1]], axis=0)
    u = matvec(h_before.astype(jnp.float32))
    cotangent = lambda *shape: jnp.asarray(rng.standard_normal(shape) * cotangent_scale, x.dtype)  # noqa: E731
    dy, dh_final = cotangent(steps, batch, hidden), cotangent(batch, hidden)
    if gates == 4:
        c_before = jnp.concatenate([c0[None], cells[:-1]], axis=0)
        operands = (x_steps, u, h_before, c_before, dy, dh_final, cotangent(batch, hidden))
    else:
        operands = (x_steps, u, h_before, dy, dh_final, hn_bias)
    return w, kernel, operands, lengths


def run_gated_backward(gates: int, weights, kernel, operands, lengths, *, xla: bool = False,
                       method: str = "auto", **hooks):
    """The backward primitive on :func:`gated_backward_problem`'s operands (``xla``: its XLA scan,
    the fallback, instead): ``(dx, du, dh0, dc0)`` (LSTM) or ``(dx, du, dh0)`` (GRU). ``hooks`` go to
    the primitive (``exchange_mode``, ...)."""
    from . import primitives
    prim, scan = ((primitives.sprnn_lstm_backward_p, primitives._lstm_backward_fallback) if gates == 4
                  else (primitives.sprnn_gru_backward_p, primitives._gru_backward_fallback))
    args = (*operands, weights.transposed_values(), weights.indices_t, weights.lane_row_t, lengths,
            kernel)
    if xla:
        return tuple(scan(*args, meta=weights.meta_t))
    return tuple(prim.bind(*args, meta=weights.meta_t, method=method, **hooks))
