"""The backward pass of the gated layers (LSTM, GRU) from the forward pass's outputs.

Differentiating the XLA scan of the layer would run the whole recurrence again, forward, before
the backward recurrence. The forward outputs already hold every state the backward pass needs:

* the state each step started from is ``h0`` or the previous step's output;
* so the recurrent products ``u_s = h_{s-1} @ kernel`` of every step are one matmul, in parallel;
* the LSTM's cell states are an output of its forward pass (``sprnn_lstm_with_cells``).

What remains sequential is the backward recurrence itself: per step, the cell's local derivative
and one product with the transposed kernel. It is a primitive (``sprnn_lstm_backward`` /
``sprnn_gru_backward``, :mod:`jax_sprnn.primitives`): the persistent CUDA kernel on a GPU, the C++
kernel on a CPU (both on the sparse transposed layout), or an XLA scan of ``jax.vjp`` of the same
cell functions the forward paths use (:func:`jax_sprnn.fallback.gated_backward`). The weight
gradient is one matmul after it, and the GRU's ``hn_bias`` gradient a sum of ``du``'s n columns.

Numerics are those of differentiating XLA's dense path: the carry's cotangents are rounded to the
storage dtype between steps, sums are float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import fallback
from .primitives import sprnn_gru_backward_p, sprnn_lstm_backward_p
from .reference import in_step_order


def gated_backward(x_tm, carry0: tuple, kernel, hn_bias, lengths, y_tm, cotangents, *, gates: int,
                   reverse: bool, weights, method: str = "auto", cells=None):
    """``(dx, dcarry0, dkernel, dhn_bias)`` of the gated layer whose forward pass gave ``y_tm``.

    ``x_tm``: ``[T, B, G*H]``; ``carry0``: ``(c0, h0)`` (LSTM) or ``(h0,)`` (GRU); ``kernel``: the
    dense float32 ``[H, G*H]`` kernel; ``hn_bias``: float32 ``[H]`` (GRU) or None; ``lengths``:
    ``[B]`` int32 in ``[0, T]``; ``cotangents``: ``(dy, dcarry_final)`` like the forward's results.
    ``dkernel`` is dense float32 (the caller keeps the pattern's entries). ``weights``: the layer's
    :class:`SparseWeights`, whose transposed layout the native recurrences read; ``method``: the
    forward's (``"native"`` makes a GPU that cannot run the backward kernel an error); ``cells``:
    the LSTM's cell state after each position ``[T, B, H]``, as its forward pass gave it.
    """
    dtype = x_tm.dtype
    T = x_tm.shape[0]
    dy, dfinal = cotangents
    h0 = carry0[-1]
    active = jnp.arange(T)[:, None] < lengths[None, :]               # [T, B]
    order = lambda a: in_step_order(a, lengths, reverse)             # noqa: E731  (its own inverse)
    x_steps, y_steps, dy_steps = order(x_tm), order(y_tm), order(dy)
    before = lambda first, steps: jnp.concatenate([first[None].astype(dtype), steps[:-1]], axis=0)  # noqa: E731

    h_before = before(h0, y_steps)
    matvec = fallback.storage_matvec(kernel, dtype)
    u_steps = matvec(h_before.astype(jnp.float32))                   # [T, B, G*H], one matmul
    dfinal = tuple(d.astype(dtype) for d in dfinal)
    layout = (weights.transposed_values(), weights.indices_t, weights.lane_row_t)
    params = dict(meta=weights.meta_t, method=method)
    lengths = lengths.astype(jnp.int32)
    if gates == 4:
        if cells is None:
            raise ValueError("gated_backward: the LSTM needs its forward pass's cells [T, B, H]")
        c_before = before(carry0[0], order(cells))
        dc_final, dh_final = dfinal
        dx_steps, du_steps, dh0, dc0 = sprnn_lstm_backward_p.bind(
            x_steps, u_steps, h_before, c_before, dy_steps, dh_final, dc_final, *layout, lengths,
            kernel, **params)
        dcarry0, dbias = (dc0, dh0), None
    else:
        (dh_final,) = dfinal
        dx_steps, du_steps, dh0 = sprnn_gru_backward_p.bind(
            x_steps, u_steps, h_before, dy_steps, dh_final, hn_bias.astype(jnp.float32), *layout,
            lengths, kernel, **params)
        H = h0.shape[-1]
        # (du is 0 wherever an example does not run: the sum needs no mask)
        dcarry0, dbias = (dh0,), jnp.sum(du_steps[..., 2 * H:], axis=(0, 1))
    dkernel = jnp.einsum("tbj,tbi->ji", h_before.astype(jnp.float32), du_steps,
                         precision=lax.Precision.HIGHEST)
    dx = jnp.where(active[:, :, None], order(dx_steps), jnp.zeros((), dx_steps.dtype))
    return dx, dcarry0, dkernel, dbias
