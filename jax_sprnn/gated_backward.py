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
from .stacked import sprnn_gru_backward_pair_p, sprnn_lstm_backward_pair_p
from .reference import in_step_order


def _recurrence_operands(x_tm, carry0: tuple, kernel, hn_bias, lengths, y_tm, cotangents, *,
                        gates: int, reverse: bool, weights, cells=None):
    """The backward recurrence primitive's operands (in step order), and what
    :func:`_gradients` needs afterwards."""
    dtype = x_tm.dtype
    T = x_tm.shape[0]
    dy, dfinal = cotangents
    h0 = carry0[-1]
    order = lambda a: in_step_order(a, lengths, reverse)             # noqa: E731  (its own inverse)
    x_steps, y_steps, dy_steps = order(x_tm), order(y_tm), order(dy)
    # The state each step starts from; [:T], not steps[:-1], so that T = 0 gives no step.
    before = lambda first, steps: jnp.concatenate([first[None].astype(dtype), steps], axis=0)[:T]  # noqa: E731

    h_before = before(h0, y_steps)
    matvec = fallback.storage_matvec(kernel, dtype)
    u_steps = matvec(h_before.astype(jnp.float32))                   # [T, B, G*H], one matmul
    dfinal = tuple(d.astype(dtype) for d in dfinal)
    layout = (weights.transposed_values(), weights.indices_t, weights.lane_row_t)
    lengths = lengths.astype(jnp.int32)
    if gates == 4:
        if cells is None:
            raise ValueError("gated_backward: the LSTM needs its forward pass's cells [T, B, H]")
        c_before = before(carry0[0], order(cells))
        dc_final, dh_final = dfinal
        operands = (x_steps, u_steps, h_before, c_before, dy_steps, dh_final, dc_final, *layout,
                    lengths, kernel)
    else:
        (dh_final,) = dfinal
        operands = (x_steps, u_steps, h_before, dy_steps, dh_final, hn_bias.astype(jnp.float32),
                    *layout, lengths, kernel)
    active = jnp.arange(T)[:, None] < lengths[None, :]               # [T, B]
    return operands, dict(gates=gates, order=order, h_before=h_before, active=active,
                          hidden=h0.shape[-1])


def _gradients(outs, done: dict):
    """``(dx, dcarry0, dkernel, dhn_bias)`` from the backward recurrence's results."""
    if done["gates"] == 4:
        dx_steps, du_steps, dh0, dc0 = outs
        dcarry0, dbias = (dc0, dh0), None
    else:
        dx_steps, du_steps, dh0 = outs
        # (du is 0 wherever an example does not run: the sum needs no mask)
        dcarry0, dbias = (dh0,), jnp.sum(du_steps[..., 2 * done["hidden"]:], axis=(0, 1))
    dkernel = jnp.einsum("tbj,tbi->ji", done["h_before"].astype(jnp.float32), du_steps,
                         precision=lax.Precision.HIGHEST)
    dx = jnp.where(done["active"][:, :, None], done["order"](dx_steps), jnp.zeros((), dx_steps.dtype))
    return dx, dcarry0, dkernel, dbias


def _primitive(gates: int):
    return sprnn_lstm_backward_p if gates == 4 else sprnn_gru_backward_p


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
    operands, done = _recurrence_operands(x_tm, carry0, kernel, hn_bias, lengths, y_tm, cotangents,
                                          gates=gates, reverse=reverse, weights=weights, cells=cells)
    outs = _primitive(gates).bind(*operands, meta=weights.meta_t, method=method)
    return _gradients(outs, done)


def gated_backward_pair(directions, *, gates: int, method: str = "auto"):
    """Both directions of a bidirectional layer: :func:`gated_backward`'s results per direction.
    ``directions``: two dicts of :func:`gated_backward`'s arguments (the forward direction, then
    the reverse one, each with ``reverse`` and ``weights``). Where their transposed layouts agree,
    the two backward recurrences are one pair call (one launch on a GPU), else two calls."""
    prepared = [_recurrence_operands(**d, gates=gates) for d in directions]
    metas = [d["weights"].meta_t for d in directions]
    if metas[0] == metas[1]:
        pair = sprnn_lstm_backward_pair_p if gates == 4 else sprnn_gru_backward_pair_p
        lengths_at = len(prepared[0][0]) - 2  # (the lengths, shared; once in a pair call)
        operands = [o for i, ops in enumerate(zip(*(p for p, _ in prepared)))
                    for o in (ops[:1] if i == lengths_at else ops)]
        outs = pair.bind(*operands, reverse=(False, False), meta=metas[0], method=method)
        per = [outs[q::2] for q in range(2)]
    else:
        per = [_primitive(gates).bind(*ops, meta=m, method=method)
               for (ops, _), m in zip(prepared, metas)]
    return [_gradients(outs, done) for outs, (_, done) in zip(per, prepared)]
