"""Gated recurrent layers on packed kernels: :func:`sparse_lstm` and :func:`sparse_gru`.

The math is Flax's (``nn.LSTMCell`` / ``nn.OptimizedLSTMCell``, ``nn.GRUCell``), so a Flax
checkpoint keeps its meaning (docs/gated.md). The recurrent kernel ``[H, G*H]`` holds the G gates'
kernels side by side, as Flax fuses them: column ``g*H + i`` is gate ``g`` of unit ``i``
(:meth:`SparseWeights.from_dense` packs it, docs/format.md).

No native gated kernel is built yet (issue 17): ``method="auto"`` runs XLA's dense path on every
platform (the packed kernel scattered to dense once per call, one dense matmul per step, as
``sparse_rnn``'s dense fallback does), with a one-time warning on a GPU; ``"native"`` is an error
that says so. Gradients, ``vmap`` and ``jax.export`` come from JAX's own transformations of that
path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import dispatch, fallback, primitives
from ._checks import as_array, check_method, check_sequence_args, check_weights, is_concrete
from .api import _poison_bad_lengths
from .reference import dense_matvec, scan_cell
from .weights import SparseWeights


@dataclasses.dataclass(frozen=True)
class _Cell:
    """What the checks and messages say about a gated cell."""

    name: str
    function: str
    gates: int
    gate_order: str


LSTM = _Cell("LSTM", "sparse_lstm", 4, "i, f, g, o")
GRU = _Cell("GRU", "sparse_gru", 3, "r, z, n")


def _matvec(weights: SparseWeights, method: str, cell: _Cell):
    """``h @ kernel`` (float32 in and out) for this call's path, or the error of
    ``method="native"``."""
    check_method(method)
    kernel = fallback.dense_from_packed(weights.values, weights.indices, weights.lane_row,
                                       weights.meta)
    if method == "reference":
        return dense_matvec(kernel)
    platform = jax.default_backend()
    why = f"jax_sprnn has no native {cell.name} kernel yet on {platform} (issue 17)"
    warning = (f"jax_sprnn: {cell.function} uses the dense XLA path on the GPU: {why}"
               if platform == "gpu" else None)
    decision = dispatch._fallback(method, f"the native {cell.name} kernel cannot run", why, warning)
    primitives._warn_once(decision.warning)
    return fallback.storage_matvec(kernel, weights.dtype)


def _scan(x_tm, carry: tuple, cell, lengths, seq_lengths, reverse: bool):
    """:func:`jax_sprnn.reference.scan_cell`, and ``sparse_rnn``'s treatment of traced lengths:
    clipped for the scan, and NaN for the examples whose length is out of range."""
    T = x_tm.shape[0]
    checked = seq_lengths is None or is_concrete(seq_lengths)
    y, final = scan_cell(x_tm, carry, cell, lengths if checked else jnp.clip(lengths, 0, T),
                         reverse=bool(reverse))
    if not checked:
        y, stacked = _poison_bad_lengths(y, jnp.stack(final), lengths, T)
        final = tuple(stacked)
    return y, final


def _batch_major(y_tm, time_major: bool):
    return y_tm if time_major else jnp.swapaxes(y_tm, 0, 1)


def sparse_lstm(inputs, carry, weights: SparseWeights, *, time_major: bool = False,
                reverse: bool = False, seq_lengths=None, method: str = "auto"):
    """Run a sparse LSTM layer over a whole sequence (the math of Flax's ``nn.LSTMCell``).

    Per step, with ``z = x_t + h @ kernel`` split into its gates ``i, f, g, o``::

        i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);  g = tanh(z_g)
        c' = f * c + i * g;  h' = o * tanh(c')

    Args:
      inputs: the input projection, biases included, ``[B, T, 4H]`` (``[T, B, 4H]`` when
        ``time_major``), gates in the order i, f, g, o; float32, bfloat16 or float16, the dtype of
        ``weights``.
      carry: ``(c0, h0)``, each ``[B, H]``, same dtype (Flax's carry order).
      weights: the recurrent kernel ``[H, 4H]`` as :class:`SparseWeights`.
      time_major, reverse, seq_lengths, method: as :func:`jax_sprnn.sparse_rnn` (past its length an
        example's outputs are zero and its carry is held). ``method``: ``"auto"`` (XLA's dense path
        until the native gated kernels exist; a one-time warning on a GPU), ``"native"`` (an error
        for now), ``"reference"`` (pure JAX at float32 HIGHEST precision).

    Returns:
      ``(outputs, (c_T, h_T))``: outputs ``h`` at every position, laid out like ``inputs`` with
      ``H`` features. Accumulation is float32; ``c`` and ``h`` are rounded to the storage dtype
      after every step (``h'`` is computed from the rounded ``c'``).
    """
    check_weights(weights, LSTM.gates)
    if not (isinstance(carry, (tuple, list)) and len(carry) == 2):
        raise TypeError(f"carry must be a pair (c0, h0) of [B, H] arrays, got "
                        f"{type(carry).__name__}" + (f" of length {len(carry)}"
                                                     if isinstance(carry, (tuple, list)) else ""))
    dtype = weights.dtype
    x_tm, (c0, h0), lengths = check_sequence_args(
        inputs, {"carry[0] (c0)": carry[0], "carry[1] (h0)": carry[1]}, weights.hidden,
        inputs_dtype=dtype, time_major=time_major, seq_lengths=seq_lengths, gates=LSTM.gates,
        gate_order=LSTM.gate_order)
    matvec = _matvec(weights, method, LSTM)

    def cell(state, x_s):
        c, h = state
        z = x_s.astype(jnp.float32) + matvec(h.astype(jnp.float32))
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c_new = (jax.nn.sigmoid(f) * c.astype(jnp.float32)
                 + jax.nn.sigmoid(i) * jnp.tanh(g)).astype(dtype)
        h_new = (jax.nn.sigmoid(o) * jnp.tanh(c_new.astype(jnp.float32))).astype(dtype)
        return (c_new, h_new), h_new

    y, (c, h) = _scan(x_tm, (c0, h0), cell, lengths, seq_lengths, reverse)
    return _batch_major(y, time_major), (c, h)


def _check_hn_bias(hn_bias, hidden: int):
    """``hn_bias`` as a float32 ``[H]`` array (zeros when None), or an error naming it."""
    if hn_bias is None:
        return jnp.zeros((hidden,), jnp.float32)
    hn_bias = as_array(hn_bias)
    if tuple(hn_bias.shape) != (hidden,):
        raise ValueError(f"hn_bias must be [H] = ({hidden},) (the bias of the recurrent n-gate term, "
                         f"Flax GRUCell's hn/bias), got shape {tuple(hn_bias.shape)}")
    if not jnp.issubdtype(hn_bias.dtype, jnp.floating):
        raise TypeError(f"hn_bias must be a floating-point array, got {hn_bias.dtype}")
    return hn_bias.astype(jnp.float32)


def sparse_gru(inputs, h0, weights: SparseWeights, *, hn_bias=None, time_major: bool = False,
               reverse: bool = False, seq_lengths=None, method: str = "auto"):
    """Run a sparse GRU layer over a whole sequence (the math of Flax's ``nn.GRUCell``).

    Per step, with ``u = h @ kernel`` split into its gates ``r, z, n``::

        r = sigmoid(x_r + u_r);  z = sigmoid(x_z + u_z)
        n = tanh(x_n + r * (u_n + hn_bias));  h' = (1 - z) * n + z * h

    Args:
      inputs: the input projection, biases included, ``[B, T, 3H]`` (``[T, B, 3H]`` when
        ``time_major``), gates in the order r, z, n; float32, bfloat16 or float16, the dtype of
        ``weights``.
      h0: the initial state ``[B, H]``, same dtype.
      weights: the recurrent kernel ``[H, 3H]`` as :class:`SparseWeights`.
      hn_bias: optional ``[H]`` bias of the recurrent n term (inside the reset gate's product, so it
        cannot be folded into ``inputs``), any floating dtype; added in float32. Default zero.
      time_major, reverse, seq_lengths, method: as :func:`sparse_lstm`.

    Returns:
      ``(outputs, h_T)``, outputs laid out like ``inputs`` with ``H`` features. Accumulation is
      float32; the state is rounded to the storage dtype after every step.
    """
    check_weights(weights, GRU.gates)
    dtype = weights.dtype
    x_tm, (h0,), lengths = check_sequence_args(
        inputs, {"h0": h0}, weights.hidden, inputs_dtype=dtype, time_major=time_major,
        seq_lengths=seq_lengths, gates=GRU.gates, gate_order=GRU.gate_order)
    b_hn = _check_hn_bias(hn_bias, weights.hidden)
    matvec = _matvec(weights, method, GRU)

    def cell(state, x_s):
        (h,) = state
        h32 = h.astype(jnp.float32)
        x_r, x_z, x_n = jnp.split(x_s.astype(jnp.float32), 3, axis=-1)
        u_r, u_z, u_n = jnp.split(matvec(h32), 3, axis=-1)
        r = jax.nn.sigmoid(x_r + u_r)
        z = jax.nn.sigmoid(x_z + u_z)
        n = jnp.tanh(x_n + r * (u_n + b_hn))
        h_new = ((1.0 - z) * n + z * h32).astype(dtype)
        return (h_new,), h_new

    y, (h,) = _scan(x_tm, (h0,), cell, lengths, seq_lengths, reverse)
    return _batch_major(y, time_major), h


__all__ = ["sparse_lstm", "sparse_gru"]
