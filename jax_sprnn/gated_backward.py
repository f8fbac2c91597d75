"""The backward pass of the gated layers (LSTM, GRU) from the forward pass's outputs, in XLA.

Differentiating the XLA scan of the layer would run the whole recurrence again, forward, before
the backward recurrence. The forward outputs already hold every state the backward pass needs:

* the state each step started from is ``h0`` or the previous step's output;
* so the recurrent products ``u_s = h_{s-1} @ kernel`` of every step are one matmul, in parallel;
* the LSTM's cell states follow from them by an elementwise scan (no matmul in its loop).

What remains sequential is the backward recurrence itself: per step, the cell's local derivative
(``jax.vjp`` of the same cell functions the forward paths use, so the math cannot drift) and one
product with the transposed kernel. The weight gradient is one matmul after the scan.

On a CPU with jax_sprnn's CPU module, that recurrence runs in the C++ kernel instead
(``jax_sprnn_gated_backward``): the same derivative and rounding points, and the product over the
sparse transposed layout rather than the dense kernel (XLA runs that per-step product at a few
GFLOP/s on a CPU).

Numerics are those of differentiating XLA's dense path: the carry's cotangents are rounded to the
storage dtype between steps, sums are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import functools

import numpy as np

from . import _native, fallback
from .dispatch import GATED_BACKWARD
from .reference import in_step_order


def _cell(gates: int, dtype):
    """``f(state, x_s, u_s, hn_bias) -> (new_state, y_s)``: the cell with the recurrent product
    ``u_s`` given (so its local derivative leaves the matmul out)."""
    def f(state, x_s, u_s, hn_bias):
        matvec = lambda _h: u_s  # noqa: E731  (the product is an input here)
        if gates == 4:
            return fallback.lstm_cell(matvec, dtype)(state, x_s)
        return fallback.gru_cell(matvec, dtype, hn_bias)(state, x_s)
    return f


def _lstm_cells_before(x_steps, u_steps, c0, active, dtype):
    """``[T, B, H]``: the LSTM's cell state each step started from (c0 first), held past a
    sequence's end, rounded to ``dtype`` as in the forward pass."""
    z = x_steps.astype(jnp.float32) + u_steps
    i, f, g, _ = jnp.split(z, 4, axis=-1)
    forget, write = jax.nn.sigmoid(f), jax.nn.sigmoid(i) * jnp.tanh(g)

    def step(c, xs):
        forget_s, write_s, active_s = xs
        new = (forget_s * c.astype(jnp.float32) + write_s).astype(dtype)
        return jnp.where(active_s[:, None], new, c), c
    _, before = lax.scan(step, c0.astype(dtype), (forget, write, active))
    return before


def _xla_recurrence(sequences, active, lengths, dstate0, kernel, bias, weights, *, gates: int):
    """The backward recurrence as an XLA scan: ``(dcarry0, dx_steps, du_steps, dbias)``;
    ``sequences``: ``(states_before, x_steps, u_steps, dy_steps)`` in step order."""
    del lengths, weights  # (the native recurrence's operands)
    dtype = sequences[1].dtype
    cell = _cell(gates, dtype)
    kernel_t = kernel.astype(dtype if jnp.dtype(dtype).itemsize < 4 else jnp.float32).T

    def step(dstate, xs):
        state, x_s, u_s, dy_s, active_s = xs
        _, vjp = jax.vjp(cell, state, x_s, u_s, bias)
        dprev, dx_s, du_s, db_s = vjp((dstate, dy_s))
        dh = dprev[-1].astype(jnp.float32) + jnp.dot(du_s.astype(kernel_t.dtype), kernel_t,
                                                     preferred_element_type=jnp.float32,
                                                     precision=lax.Precision.HIGHEST)
        dprev = (*dprev[:-1], dh.astype(dstate[-1].dtype))
        keep = active_s[:, None]
        dstate = tuple(jnp.where(keep, n, o) for n, o in zip(dprev, dstate))
        zero = lambda a: jnp.where(keep, a, jnp.zeros((), a.dtype))  # noqa: E731
        return dstate, (zero(dx_s), zero(du_s), jnp.where(keep, db_s, 0.0))

    dcarry0, (dx_steps, du_steps, db_steps) = lax.scan(step, dstate0, (*sequences, active), reverse=True)
    return dcarry0, dx_steps, du_steps, jnp.sum(db_steps, axis=(0, 1))


def _native_recurrence(sequences, active, lengths, dstate0, kernel, bias, weights, *, gates: int):
    """The same recurrence in the C++ kernel, on the sparse transposed layout (CPU only)."""
    del active, kernel  # (the XLA recurrence's operands)
    states_before, x_steps, u_steps, dy_steps = sequences
    T, B, width = x_steps.shape
    H = width // gates
    dtype = x_steps.dtype
    lstm = gates == 4
    none, none32 = jnp.zeros((0,), dtype), jnp.zeros((0,), jnp.float32)
    c_before, h_before = states_before if lstm else (none, states_before[0])
    dc_final, dh_final = dstate0 if lstm else (none, dstate0[0])
    shapes = (jax.ShapeDtypeStruct((T, B, width), dtype),
              jax.ShapeDtypeStruct((T, B, width), jnp.float32),
              jax.ShapeDtypeStruct((B, H), dtype),
              jax.ShapeDtypeStruct((B, H) if lstm else (0,), dtype),
              jax.ShapeDtypeStruct((0,) if lstm else (H,), jnp.float32))
    call = jax.ffi.ffi_call(GATED_BACKWARD, shapes, vmap_method="sequential")
    dx_steps, du_steps, dh0, dc0, dbias = call(
        x_steps, u_steps.astype(jnp.float32), h_before, c_before, dy_steps, dh_final, dc_final,
        none32 if lstm else bias[0], weights.transposed_values(), weights.indices_t,
        weights.lane_row_t, lengths.astype(jnp.int32), gates=np.int64(gates),
        slots_per_lane=np.int64(weights.meta_t.slots_per_lane))
    if lstm:  # (no bias; the shape of the XLA recurrence's unused sum)
        dbias = jnp.zeros((1,), jnp.float32)
    return ((dc0, dh0) if lstm else (dh0,)), dx_steps, du_steps, dbias


def gated_backward(x_tm, carry0: tuple, kernel, hn_bias, lengths, y_tm, cotangents, *, gates: int,
                   reverse: bool, weights=None):
    """``(dx, dcarry0, dkernel, dhn_bias)`` of the gated layer whose forward pass gave ``y_tm``.

    ``x_tm``: ``[T, B, G*H]``; ``carry0``: ``(c0, h0)`` (LSTM) or ``(h0,)`` (GRU); ``kernel``: the
    dense float32 ``[H, G*H]`` kernel; ``hn_bias``: float32 ``[H]`` (GRU) or None; ``lengths``:
    ``[B]`` int32 in ``[0, T]``; ``cotangents``: ``(dy, dcarry_final)`` like the forward's results.
    ``dkernel`` is dense float32 (the caller keeps the pattern's entries). ``weights``: the
    layer's :class:`SparseWeights`; with it, a CPU runs the recurrence in the C++ kernel.
    """
    dtype = x_tm.dtype
    T = x_tm.shape[0]
    dy, dfinal = cotangents
    h0 = carry0[-1]
    steps = jnp.arange(T)
    active = steps[:, None] < lengths[None, :]                       # [T, B]
    order = lambda a: in_step_order(a, lengths, reverse)             # noqa: E731  (its own inverse)
    x_steps, y_steps, dy_steps = order(x_tm), order(y_tm), order(dy)

    h_before = jnp.concatenate([h0[None].astype(dtype), y_steps[:-1]], axis=0)
    matvec = fallback.storage_matvec(kernel, dtype)
    u_steps = matvec(h_before.astype(jnp.float32))                   # [T, B, G*H], one matmul
    if gates == 4:
        c_before = _lstm_cells_before(x_steps, u_steps, carry0[0], active, dtype)
        states_before = (c_before, h_before)
    else:
        states_before = (h_before,)
    # The GRU's bias per example, so that its cotangent can be masked per example before the sum.
    B, H = h0.shape
    bias = (jnp.broadcast_to(hn_bias, (B, H)) if hn_bias is not None
            else jnp.zeros((B, 1), jnp.float32))
    dstate0 = tuple(d.astype(dtype) for d in dfinal)
    sequences = (states_before, x_steps, u_steps, dy_steps)
    if weights is not None and GATED_BACKWARD in _native.cpu_targets():
        dcarry0, dx_steps, du_steps, dbias = lax.platform_dependent(
            sequences, active, lengths, dstate0, kernel, bias, weights,
            cpu=functools.partial(_native_recurrence, gates=gates),
            default=functools.partial(_xla_recurrence, gates=gates))
    else:
        dcarry0, dx_steps, du_steps, dbias = _xla_recurrence(
            sequences, active, lengths, dstate0, kernel, bias, weights, gates=gates)
    dkernel = jnp.einsum("tbj,tbi->ji", h_before.astype(jnp.float32), du_steps.astype(jnp.float32),
                         precision=lax.Precision.HIGHEST)
    dx = jnp.where(active[:, :, None], order(dx_steps), jnp.zeros((), dx_steps.dtype))
    dbias = None if hn_bias is None else dbias
    return dx, dcarry0, dkernel, dbias
