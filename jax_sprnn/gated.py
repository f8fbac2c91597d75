"""Gated recurrent layers on packed kernels: :func:`sparse_lstm` and :func:`sparse_gru`.

The math is Flax's (``nn.LSTMCell`` / ``nn.OptimizedLSTMCell``, ``nn.GRUCell``), so a Flax
checkpoint keeps its meaning (docs/gated.md). The recurrent kernel ``[H, G*H]`` holds the G gates'
kernels side by side, as Flax fuses them: column ``g*H + i`` is gate ``g`` of unit ``i``
(:meth:`SparseWeights.from_dense` packs it, docs/format.md).

The forward pass is a primitive (``sprnn_lstm`` / ``sprnn_gru``, :mod:`jax_sprnn.primitives`): the
persistent CUDA kernel on a GPU, the C++ kernel on a CPU, or XLA's dense path. Gradients come from
a VJP (``forward_mode.custom_vjp``) whose backward pass runs from the forward's outputs
(:mod:`jax_sprnn.gated_backward`: its recurrence in the persistent CUDA kernel on a GPU, the C++
kernel on a CPU, an XLA scan elsewhere), so every path gets the same gradients;
``vmap`` and ``jax.export`` work through the primitives' rules.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from . import fallback, forward_mode
from ._checks import as_array, check_method, check_sequence_args, check_weights, is_concrete
from .api import _float0_like, _poison_bad_lengths
from .gated_backward import gated_backward
from .planner import LayoutMeta
from .primitives import sprnn_gru_p, sprnn_lstm_p, sprnn_lstm_with_cells_p
from .reference import dense_matvec
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


@dataclasses.dataclass(frozen=True)
class _Config:
    gates: int
    reverse: bool
    method: str
    meta: LayoutMeta
    full_lengths: bool = False  # no seq_lengths (primitives._persistent_cuda)
    batch_major: bool = False  # the caller's x and y are [B, T, .] (primitives._gated_cuda)


def _bind(x, carry, values, w: SparseWeights, hn_bias, lengths, cfg: _Config, *,
          with_cells: bool = False):
    """The forward primitive: ``(y, final carry, cells)``, carry ``(c, h)`` (LSTM) or ``(h,)``
    (GRU); ``cells``: the LSTM's cell state after each position where ``with_cells`` asks for it
    (what its backward pass reads), else None."""
    params = dict(reverse=cfg.reverse, meta=cfg.meta, method=cfg.method, full_lengths=cfg.full_lengths,
                  batch_major=cfg.batch_major)
    if cfg.gates == 4:
        c0, h0 = carry
        operands = (x, h0, c0, values, w.indices, w.lane_row, lengths)
        if with_cells:
            y, h, c, cells = sprnn_lstm_with_cells_p.bind(*operands, **params)
            return y, (c, h), cells
        y, h, c = sprnn_lstm_p.bind(*operands, **params)
        return y, (c, h), None
    (h0,) = carry
    y, h = sprnn_gru_p.bind(x, h0, values, w.indices, w.lane_row, lengths, hn_bias, **params)
    return y, (h,), None


@functools.partial(forward_mode.custom_vjp, nondiff_argnums=(5,))
def _gated(x, carry, w, hn_bias, lengths, cfg):
    return _bind(x, carry, w.values, w, hn_bias, lengths, cfg)[:2]


def _gated_fwd(x, carry, w, hn_bias, lengths, cfg):
    y, final, cells = _bind(x, carry, w.values, w, hn_bias, lengths, cfg, with_cells=True)
    return (y, final), (x, carry, w, hn_bias, lengths, y, cells)


def _backward_args(cfg, residuals, cotangents) -> dict:
    """:func:`jax_sprnn.gated_backward.gated_backward`'s arguments (but ``gates`` and ``method``)
    from the forward's residuals."""
    x, carry, w, hn_bias, lengths, y, cells = residuals
    kernel = fallback.dense_from_packed(w.values, w.indices, w.lane_row, cfg.meta)
    return dict(x_tm=x, carry0=carry, kernel=kernel, hn_bias=hn_bias, lengths=lengths, y_tm=y,
                cotangents=cotangents, reverse=cfg.reverse, weights=w, cells=cells)


def _weights_cotangent(w: SparseWeights, dkernel, meta: LayoutMeta) -> SparseWeights:
    """The packed weights' cotangent: ``dkernel``'s entries at the pattern's slots."""
    cols, rows, real = fallback.slot_coordinates(w.indices, w.lane_row, meta)
    dvalues = jnp.where(real, dkernel[cols, rows], 0.0).astype(w.values.dtype)
    return w.replace(values=dvalues, **{name: _float0_like(getattr(w, name)) for name in w.INDEX_LEAVES})


def _gated_bwd(cfg, residuals, cotangents):
    """The backward recurrence from the forward's outputs (:mod:`jax_sprnn.gated_backward`)."""
    args = _backward_args(cfg, residuals, cotangents)
    dx, dcarry, dkernel, dbias = gated_backward(**args, gates=cfg.gates, method=cfg.method)
    # (None: the lengths' zero cotangent, also where their batch is symbolic)
    return dx, dcarry, _weights_cotangent(args["weights"], dkernel, cfg.meta), dbias, None


_gated.defvjp(_gated_fwd, _gated_bwd)


def _run(x_tm, carry: tuple, weights: SparseWeights, hn_bias, lengths, seq_lengths, *, cell: _Cell,
         reverse: bool, method: str, time_major: bool):
    """The layer on one of its paths, with ``sparse_rnn``'s treatment of lengths: clipped for the
    kernels, and NaN for the examples whose traced length is out of range. (``time_major``: the
    caller's layout; a ``[B, T, .]`` caller's kernel reads and writes that layout directly.)"""
    T = x_tm.shape[0]
    checked, safe = _safe_lengths(lengths, seq_lengths, T)
    if method == "reference":
        kernel = fallback.dense_from_packed(weights.values, weights.indices, weights.lane_row,
                                            weights.meta)
        y, final = fallback.gated_scan(x_tm, carry, dense_matvec(kernel), safe, hn_bias,
                                       gates=cell.gates, reverse=bool(reverse))
    else:
        cfg = _Config(cell.gates, bool(reverse), method, weights.meta, full_lengths=seq_lengths is None,
                      batch_major=not time_major)
        y, final = _gated(x_tm, carry, weights, hn_bias, safe, cfg)
    return (y, final) if checked else _poisoned(y, final, lengths, T)


def _safe_lengths(lengths, seq_lengths, T: int):
    """``(checked, lengths for the kernels)``: traced ``seq_lengths`` are clipped to ``[0, T]``
    (the examples out of that range get NaN afterwards: :func:`_poisoned`)."""
    checked = seq_lengths is None or is_concrete(seq_lengths)
    return checked, lengths if checked else jnp.clip(lengths, 0, T)


def _poisoned(y, final: tuple, lengths, T: int):
    """``(y, final)`` with NaN for the examples whose traced length is out of range."""
    y, stacked = _poison_bad_lengths(y, jnp.stack(final), lengths, T)
    return y, tuple(stacked)


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
        example's outputs are zero and its carry is held). ``method``: ``"auto"`` (the native
        forward kernel where it fits and is expected faster, else XLA's dense path; docs/gated.md),
        ``"native"`` (the native forward kernel or an error that says why), ``"reference"`` (pure
        JAX at float32 HIGHEST precision). Gradients run from the forward's outputs (the backward
        recurrence in C++ on a CPU, in XLA elsewhere).

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
    check_method(method)
    y, (c, h) = _run(x_tm, (c0, h0), weights, None, lengths, seq_lengths, cell=LSTM,
                     reverse=reverse, method=method, time_major=time_major)
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
    check_method(method)
    y, (h,) = _run(x_tm, (h0,), weights, b_hn, lengths, seq_lengths, cell=GRU, reverse=reverse,
                   method=method, time_major=time_major)
    return _batch_major(y, time_major), h


__all__ = ["sparse_lstm", "sparse_gru"]
