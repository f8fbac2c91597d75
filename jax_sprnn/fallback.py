"""Pure-JAX implementations of the three native operations, on the packed arrays.

They lower wherever no native kernel runs (an unsupported platform, or a layer that does not fit on
chip) and serve as the dense path of ``method="auto"`` (also chosen where the persistent kernel would
be slower, see :mod:`jax_sprnn.cost`). They rebuild the dense kernel from the packed arrays once per
call (a scatter of the nonzeros) and run XLA's dense matmul per step, which on a GPU beats a per-step
sparse library call at every size benchmarks/RESULTS.md measured (the ``bcsr``, ``bcoo`` and
``torch_csr`` peers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._checks import ACTIVATIONS
from .layout import lane_of_slot
from .planner import LayoutMeta
from .reference import dense_matvec, scan_cell, scan_recurrence


def slot_coordinates(indices, lane_row, meta: LayoutMeta):
    """(column j, row i, is_real) of every slot of a packed layout."""
    rows = lane_row[lane_of_slot(meta)]
    real = (indices >= 0) & (rows >= 0)
    return jnp.where(indices < 0, ~indices, indices), jnp.maximum(rows, 0), real


def dense_from_packed(values, indices, lane_row, meta: LayoutMeta):
    """The dense float32 kernel (Flax orientation, ``[column j, row i]``) of a packed layout:
    ``[H, H]``, or ``[H, G*H]`` for a gated kernel's forward layout.

    The packed arrays pass an optimization barrier first: where they are constants of the program
    (weights closed over by a jitted function), XLA would otherwise fold the whole scatter at compile
    time, element by element (8 s for a GRU kernel at H = 1024)."""
    values, indices, lane_row = lax.optimization_barrier((values, indices, lane_row))
    cols, rows, real = slot_coordinates(indices, lane_row, meta)
    vals = jnp.where(real, values, jnp.zeros((), values.dtype)).astype(jnp.float32)
    return jnp.zeros((meta.num_cols, meta.num_rows), jnp.float32).at[cols, rows].add(vals)


def storage_matvec(kernel, dtype):
    """``h @ kernel`` with float32 accumulation. For 16-bit storage the operands are exact in that
    dtype (the state is rounded to it every step, the values are stored in it), so a tensor-core
    matmul in the storage dtype gives the native kernels' exact products and float32 sums; float32
    storage keeps full-precision float32 (GPUs would otherwise round to TF32)."""
    if jnp.dtype(dtype).itemsize == 4:
        return dense_matvec(kernel)
    kernel16 = kernel.astype(dtype)
    return lambda h: jnp.dot(h.astype(dtype), kernel16, preferred_element_type=jnp.float32)


def forward(x, h0, values, indices, lane_row, lengths, *, activation, reverse, meta,
            batch_major=False):
    del batch_major  # the memory layout of x and y: XLA's business here
    kernel = dense_from_packed(values, indices, lane_row, meta)
    return scan_recurrence(x, h0, storage_matvec(kernel, x.dtype), lengths, activation=activation,
                           reverse=reverse)


_GRADS = {
    "tanh": lambda h: 1.0 - h * h,
    "relu": lambda h: (h > 0).astype(h.dtype),
    "identity": lambda h: jnp.ones_like(h),
}
assert _GRADS.keys() == ACTIVATIONS.keys()


def backward(y, h0, values_t, indices_t, lane_row_t, lengths, dy, dh_final, *, activation,
             reverse, meta):
    """The backward recurrence: returns ``(dx, dh0)``; ``dx`` is ``dL/dz`` per position."""
    T, B, H = y.shape
    dtype = y.dtype
    if T == 0:  # no step: the state's cotangent passes through (the scan below indexes y)
        return jnp.zeros_like(dy, dtype), dh_final.astype(dtype)
    # The transposed layout packs U^T: its dense form, read as [column, row], is kernel.T.
    kernel_t = dense_from_packed(values_t, indices_t, lane_row_t, meta)
    batch = jnp.arange(B)
    grad = _GRADS[activation]

    def step(dh, s):
        active = (s < lengths)[:, None]
        p = jnp.clip(jnp.where(reverse, lengths - 1 - s, s), 0, max(T - 1, 0))
        y_p = y[p, batch].astype(jnp.float32)
        dz = (dh + dy[p, batch].astype(jnp.float32)) * grad(y_p)
        dh_prev = jnp.dot(dz, kernel_t, precision=lax.Precision.HIGHEST)
        return jnp.where(active, dh_prev, dh), jnp.where(active, dz, 0.0).astype(dtype)

    dh0, dz_steps = lax.scan(step, dh_final.astype(jnp.float32), jnp.arange(T), reverse=True)
    pos = jnp.arange(T)[:, None]
    src = jnp.where(reverse, lengths[None, :] - 1 - pos, pos)
    dx = jnp.take_along_axis(dz_steps, jnp.clip(src, 0, max(T - 1, 0))[:, :, None], axis=0)
    dx = jnp.where((pos < lengths[None, :])[:, :, None], dx, jnp.zeros((), dtype))
    return dx, dh0.astype(dtype)


def states_before(y, h0, lengths, reverse):
    """``[T, B, H]``: the state each position's step started from (h0 for the first step)."""
    T = y.shape[0]
    if not reverse:
        return jnp.concatenate([h0[None], y], axis=0)[:T]  # (not y[:-1]: T may be 0)
    nxt = jnp.concatenate([y[1:], jnp.zeros_like(y[:1])], axis=0)
    first = (jnp.arange(T)[:, None] + 1 >= lengths[None, :])[:, :, None]
    return jnp.where(first, h0[None], nxt)


def weight_grad(y, h0, dz, indices, lane_row, lengths, *, groups, reverse, meta):
    """``[groups, S]`` float32: each group's sum of ``h_before[j] * dz[i]`` on the real slots.

    ``dz`` is zero at inactive positions, so summing over every position is exact.
    """
    T, B, H = y.shape
    hb = states_before(y, h0, lengths, reverse).astype(jnp.float32).reshape(T, groups, B // groups, H)
    dzg = dz.astype(jnp.float32).reshape(T, groups, B // groups, H)
    dense = jnp.einsum("tgbj,tgbi->gji", hb, dzg, precision=lax.Precision.HIGHEST)
    cols, rows, real = slot_coordinates(indices, lane_row, meta)
    return jnp.where(real[None], dense[:, cols, rows], 0.0)


# ---- the gated cells (docs/gated.md): one step of every example, Flax's math --------------------

def lstm_cell(matvec, dtype):
    """One LSTM step ``((c, h), x_s) -> ((c', h'), h')``: gates i, f, g, o of ``x_s + h @ kernel``
    (``matvec``, float32 out); c' and h' rounded to ``dtype``, h' computed from the rounded c'."""
    def cell(state, x_s):
        c, h = state
        z = x_s.astype(jnp.float32) + matvec(h.astype(jnp.float32))
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c_new = (jax.nn.sigmoid(f) * c.astype(jnp.float32)
                 + jax.nn.sigmoid(i) * jnp.tanh(g)).astype(dtype)
        h_new = (jax.nn.sigmoid(o) * jnp.tanh(c_new.astype(jnp.float32))).astype(dtype)
        return (c_new, h_new), h_new
    return cell


def gru_cell(matvec, dtype, hn_bias):
    """One GRU step ``((h,), x_s) -> ((h',), h')``: gates r, z, n; ``hn_bias`` (float32 ``[H]``)
    sits inside the reset gate's product; h' rounded to ``dtype``."""
    def cell(state, x_s):
        (h,) = state
        h32 = h.astype(jnp.float32)
        x_r, x_z, x_n = jnp.split(x_s.astype(jnp.float32), 3, axis=-1)
        u_r, u_z, u_n = jnp.split(matvec(h32), 3, axis=-1)
        r = jax.nn.sigmoid(x_r + u_r)
        z = jax.nn.sigmoid(x_z + u_z)
        n = jnp.tanh(x_n + r * (u_n + hn_bias))
        h_new = ((1.0 - z) * n + z * h32).astype(dtype)
        return (h_new,), h_new
    return cell


def gated_scan(x_tm, carry: tuple, matvec, lengths, hn_bias, *, gates: int, reverse: bool):
    """The gated layer over a sequence: ``(y_tm, final carry)``, carry ``(c, h)`` (LSTM) or
    ``(h,)`` (GRU)."""
    dtype = x_tm.dtype
    cell = lstm_cell(matvec, dtype) if gates == 4 else gru_cell(matvec, dtype, hn_bias)
    return scan_cell(x_tm, carry, cell, lengths, reverse=reverse)


def lstm_forward(x, h0, c0, values, indices, lane_row, lengths, *, reverse, meta):
    """XLA's dense path of the LSTM primitives: ``(y, h_final, c_final, cells)``, ``cells`` the cell
    state after each position (zero past a sequence's end, like y)."""
    kernel = dense_from_packed(values, indices, lane_row, meta)
    cell = lstm_cell(storage_matvec(kernel, x.dtype), x.dtype)

    def with_cells(state, x_s):  # y and c side by side, so scan_cell places and masks both
        (c, h), y = cell(state, x_s)
        return (c, h), jnp.concatenate([y, c], axis=-1)
    yc, (c, h) = scan_cell(x, (c0, h0), with_cells, lengths, reverse=reverse)
    y, cells = jnp.split(yc, 2, axis=-1)
    return y, h, c, cells


def gru_forward(x, h0, values, indices, lane_row, lengths, hn_bias, *, reverse, meta):
    """XLA's dense path of the GRU primitive: ``(y, h_final)``."""
    kernel = dense_from_packed(values, indices, lane_row, meta)
    y, (h,) = gated_scan(x, (h0,), storage_matvec(kernel, x.dtype), lengths, hn_bias, gates=3,
                         reverse=reverse)
    return y, h


def _cell_given_products(gates: int, dtype):
    """``f(state, x_s, u_s, hn_bias) -> (new_state, y_s)``: the gated cell with the recurrent
    product ``u_s`` given (so its local derivative leaves the matmul out)."""
    def f(state, x_s, u_s, hn_bias):
        matvec = lambda _h: u_s  # noqa: E731  (the product is an input here)
        if gates == 4:
            return lstm_cell(matvec, dtype)(state, x_s)
        return gru_cell(matvec, dtype, hn_bias)(state, x_s)
    return f


def gated_backward(x, u, h_before, c_before, dy, dh_final, dc_final, hn_bias, lengths, kernel, *,
                   gates: int):
    """The gated cells' backward recurrence as an XLA scan: ``(dx, du, dh0, dc0)`` (``dc0`` None
    for the GRU), operands in step order (:mod:`jax_sprnn.gated_backward`). Per step, from the last
    to the first: the cell's local derivative (``jax.vjp`` of the forward's own cell functions, so
    the math cannot drift) and one product with the transposed dense ``kernel``. The carry's
    cotangents are rounded to the storage dtype between steps, sums are float32. ``c_before`` and
    ``dc_final``: the LSTM's, None for the GRU; ``hn_bias``: the GRU's ``[H]``, None for the LSTM."""
    T = x.shape[0]
    dtype = x.dtype
    lstm = gates == 4
    cell = _cell_given_products(gates, dtype)
    kernel_t = kernel.astype(dtype if jnp.dtype(dtype).itemsize < 4 else jnp.float32).T
    active = jnp.arange(T)[:, None] < lengths[None, :]
    states_before = (c_before, h_before) if lstm else (h_before,)
    dstate0 = (dc_final, dh_final) if lstm else (dh_final,)

    def step(dstate, xs):
        state, x_s, u_s, dy_s, active_s = xs
        # (hn_bias's gradient is du's n columns, summed by the caller: not differentiated here)
        _, vjp = jax.vjp(lambda st, xv, uv: cell(st, xv, uv, hn_bias), state, x_s, u_s)
        dprev, dx_s, du_s = vjp((dstate, dy_s))
        dh = dprev[-1].astype(jnp.float32) + jnp.dot(du_s.astype(kernel_t.dtype), kernel_t,
                                                     preferred_element_type=jnp.float32,
                                                     precision=lax.Precision.HIGHEST)
        dprev = (*dprev[:-1], dh.astype(dstate[-1].dtype))
        keep = active_s[:, None]
        dstate = tuple(jnp.where(keep, n, o) for n, o in zip(dprev, dstate))
        zero = lambda a: jnp.where(keep, a, jnp.zeros((), a.dtype))  # noqa: E731
        return dstate, (zero(dx_s), zero(du_s))

    dcarry0, (dx, du) = lax.scan(step, dstate0, (states_before, x, u, dy, active), reverse=True)
    return dx, du, dcarry0[-1], dcarry0[0] if lstm else None
