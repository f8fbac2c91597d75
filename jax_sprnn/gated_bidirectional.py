"""Bidirectional LSTM and GRU layers in one call: :func:`sparse_lstm_bidirectional`,
:func:`sparse_gru_bidirectional`.

The gated counterparts of :func:`jax_sprnn.sparse_rnn_bidirectional`. The contract is that of two
:func:`jax_sprnn.sparse_lstm` (or :func:`jax_sprnn.sparse_gru`) calls, the second with
``reverse=True``, whose outputs are concatenated, forward features first.

Where both directions' weights have one layout (the same ``meta``, as directions packed at one
capacity have), the forward recurrences are one ``sprnn_lstm_pair`` / ``sprnn_gru_pair`` call
(:mod:`jax_sprnn.stacked`): on a GPU one launch runs both directions, each on its own
thread-block clusters; elsewhere the pair is the two calls. The gradient runs each direction's
backward pass as :mod:`jax_sprnn.gated` does for one layer, the two backward recurrences again one
pair call (``sprnn_lstm_backward_pair`` / ``sprnn_gru_backward_pair``) where the transposed
layouts agree. Otherwise, and for
``method="reference"``, the function makes the two calls. Both give the same numbers: each
direction runs the same kernel on the same layout either way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from . import forward_mode
from ._checks import check_method, check_sequence_args, check_weights
from .bidirectional import _check_same, _check_weights, _pair
from .gated import (GRU, LSTM, _backward_args, _batch_major, _check_hn_bias, _Config, _poisoned,
                    _run, _safe_lengths, _weights_cotangent)
from .gated_backward import gated_backward_pair
from .stacked import sprnn_gru_pair_p, sprnn_lstm_pair_p, sprnn_lstm_with_cells_pair_p
from .weights import SparseWeights

_REVERSE = (False, True)


@dataclasses.dataclass(frozen=True)
class _PairConfig:
    directions: tuple[_Config, _Config]  # each direction's configuration as one gated call's


def _pair_bind(xs, carries, ws, hn_biases, lengths, cfg: _PairConfig, *, with_cells: bool):
    """Both directions' forward recurrences as one pair call: per direction ``(y, final carry,
    cells)`` as :func:`jax_sprnn.gated._bind` returns them."""
    first = cfg.directions[0]
    params = dict(reverse=_REVERSE, meta=first.meta, method=first.method,
                  full_lengths=first.full_lengths)
    layout = tuple(getattr(w, name) for name in ("values", "indices", "lane_row") for w in ws)
    h0s = tuple(c[-1] for c in carries)
    if first.gates == 4:
        c0s = tuple(c[0] for c in carries)
        prim = sprnn_lstm_with_cells_pair_p if with_cells else sprnn_lstm_pair_p
        outs = prim.bind(*xs, *h0s, *c0s, *layout, lengths, **params)
        cells = outs[6:8] if with_cells else (None, None)
        return tuple((outs[q], (outs[4 + q], outs[2 + q]), cells[q]) for q in range(2))
    y_f, y_b, h_f, h_b = sprnn_gru_pair_p.bind(*xs, *h0s, *layout, lengths, *hn_biases, **params)
    return (y_f, (h_f,), None), (y_b, (h_b,), None)


@functools.partial(forward_mode.custom_vjp, nondiff_argnums=(5,))
def _gated_pair(xs, carries, ws, hn_biases, lengths, cfg):
    return tuple((y, final) for y, final, _ in _pair_bind(xs, carries, ws, hn_biases, lengths, cfg,
                                                          with_cells=False))


def _gated_pair_fwd(xs, carries, ws, hn_biases, lengths, cfg):
    outs = _pair_bind(xs, carries, ws, hn_biases, lengths, cfg, with_cells=True)
    residuals = tuple((xs[q], carries[q], ws[q], hn_biases[q], lengths, outs[q][0], outs[q][2])
                      for q in range(2))
    return tuple((y, final) for y, final, _ in outs), residuals


def _gated_pair_bwd(cfg, residuals, cotangents):
    """Both directions' backward passes, as one gated layer's (:func:`jax_sprnn.gated._gated_bwd`),
    their backward recurrences one pair call where the transposed layouts agree."""
    first = cfg.directions[0]
    args = [_backward_args(cfg.directions[q], residuals[q], cotangents[q]) for q in range(2)]
    grads = gated_backward_pair(args, gates=first.gates, method=first.method)
    dxs, dcarries, dbiases = (tuple(g[i] for g in grads) for i in (0, 1, 3))
    dws = tuple(_weights_cotangent(a["weights"], g[2], c.meta)
                for a, g, c in zip(args, grads, cfg.directions))
    return dxs, dcarries, dws, dbiases, None  # (None: the lengths' zero cotangent)


_gated_pair.defvjp(_gated_pair_fwd, _gated_pair_bwd)


def _paired_run(xs_tm, carries, ws, hn_biases, lengths, seq_lengths, *, cell, method, time_major):
    """Both directions as one pair call, lengths treated as :func:`jax_sprnn.gated._run` treats
    them; returns each direction's ``(y, final)``."""
    T = xs_tm[0].shape[0]
    checked, safe = _safe_lengths(lengths, seq_lengths, T)
    cfg = _PairConfig(tuple(_Config(cell.gates, r, method, ws[0].meta, full_lengths=seq_lengths is None,
                                    batch_major=not time_major) for r in _REVERSE))
    outs = _gated_pair(tuple(xs_tm), tuple(carries), tuple(ws), tuple(hn_biases), safe, cfg)
    return outs if checked else tuple(_poisoned(y, final, lengths, T) for y, final in outs)


def _bidirectional(cell, inputs, carries: tuple, ws: tuple, hn_biases: tuple, *, time_major,
                   seq_lengths, method):
    """The checked directions run as one pair call or as two calls; returns the concatenated
    outputs and each direction's final carry."""
    x_f, x_b = _check_same(_pair(inputs, "inputs", "(x_fwd, x_bwd)"), "inputs", ("x_fwd", "x_bwd"))
    checked = []
    for x, carry, w, direction in zip((x_f, x_b), carries, ws, ("fwd", "bwd")):
        names = (f"carry ({direction})[0] (c0)", f"carry ({direction})[1] (h0)") if cell is LSTM \
            else (f"h0 ({direction})",)
        checked.append(check_sequence_args(
            x, dict(zip(names, carry)), w.hidden, inputs_dtype=w.dtype, time_major=time_major,
            seq_lengths=seq_lengths, gates=cell.gates, gate_order=cell.gate_order))
    check_method(method)
    (x_tm_f, carry_f, lengths), (x_tm_b, carry_b, _) = checked
    kwargs = dict(cell=cell, method=method, time_major=time_major)
    if method != "reference" and ws[0].meta == ws[1].meta:
        outs = _paired_run((x_tm_f, x_tm_b), (tuple(carry_f), tuple(carry_b)), ws, hn_biases, lengths,
                           seq_lengths, **kwargs)
    else:
        outs = tuple(_run(x_tm, tuple(carry), w, b, lengths, seq_lengths, reverse=r, **kwargs)
                     for x_tm, carry, w, b, r in zip((x_tm_f, x_tm_b), (carry_f, carry_b), ws,
                                                     hn_biases, _REVERSE))
    y = jnp.concatenate([_batch_major(y_tm, time_major) for y_tm, _ in outs], axis=-1)
    return y, tuple(final for _, final in outs)


def _gated_weights(weights, cell) -> tuple[SparseWeights, SparseWeights]:
    ws = _check_weights(weights)
    for w in ws:
        check_weights(w, cell.gates)
    return ws


def sparse_lstm_bidirectional(inputs, carry, weights, *, time_major: bool = False, seq_lengths=None,
                              method: str = "auto"):
    """Both directions of a bidirectional sparse LSTM layer.

    It equals::

        y_f, (c_f, h_f) = sparse_lstm(x_fwd, (c0_fwd, h0_fwd), w_fwd, **kw)
        y_b, (c_b, h_b) = sparse_lstm(x_bwd, (c0_bwd, h0_bwd), w_bwd, reverse=True, **kw)
        concatenate([y_f, y_b], axis=-1), ((c_f, h_f), (c_b, h_b))

    with the same ``seq_lengths``. Gradients, ``jax.vmap`` and :mod:`jax_sprnn.export` work as for
    :func:`jax_sprnn.sparse_lstm`.

    Args:
      inputs: ``(x_fwd, x_bwd)``: each direction's input projection, biases included,
        ``[B, T, 4H]`` (``[T, B, 4H]`` when ``time_major``), gates i, f, g, o; one shape and dtype.
      carry: ``((c0_fwd, h0_fwd), (c0_bwd, h0_bwd))``, each ``[B, H]``.
      weights: ``(w_fwd, w_bwd)``: the recurrent kernels ``[H, 4H]`` as :class:`SparseWeights` of one
        hidden size and dtype.
      time_major, seq_lengths, method: as in :func:`jax_sprnn.sparse_lstm`, for both directions.

    Returns:
      ``(outputs, ((c_fwd_T, h_fwd_T), (c_bwd_T, h_bwd_T)))``: outputs ``[B, T, 2H]``
      (``[T, B, 2H]`` when ``time_major``); the backward direction's carry is after position 0.
    """
    ws = _gated_weights(weights, LSTM)
    carries = _pair(carry, "carry", "((c0_fwd, h0_fwd), (c0_bwd, h0_bwd))")
    for i, c in enumerate(carries):
        if not (isinstance(c, (tuple, list)) and len(c) == 2):
            raise TypeError(f"carry[{i}] must be a pair (c0, h0) of [B, H] arrays, got "
                            f"{type(c).__name__}")
    return _bidirectional(LSTM, inputs, tuple(tuple(c) for c in carries), ws, (None, None),
                          time_major=time_major, seq_lengths=seq_lengths, method=method)


def sparse_gru_bidirectional(inputs, h0, weights, *, hn_bias=None, time_major: bool = False,
                             seq_lengths=None, method: str = "auto"):
    """Both directions of a bidirectional sparse GRU layer.

    It equals::

        y_f, h_f = sparse_gru(x_fwd, h0_fwd, w_fwd, hn_bias=hn_bias_fwd, **kw)
        y_b, h_b = sparse_gru(x_bwd, h0_bwd, w_bwd, hn_bias=hn_bias_bwd, reverse=True, **kw)
        concatenate([y_f, y_b], axis=-1), (h_f, h_b)

    with the same ``seq_lengths``. Gradients, ``jax.vmap`` and :mod:`jax_sprnn.export` work as for
    :func:`jax_sprnn.sparse_gru`.

    Args:
      inputs: ``(x_fwd, x_bwd)``: each direction's input projection, biases included,
        ``[B, T, 3H]`` (``[T, B, 3H]`` when ``time_major``), gates r, z, n; one shape and dtype.
      h0: ``(h0_fwd, h0_bwd)``, each ``[B, H]``.
      weights: ``(w_fwd, w_bwd)``: the recurrent kernels ``[H, 3H]`` as :class:`SparseWeights` of one
        hidden size and dtype.
      hn_bias: None (zero) or ``(hn_bias_fwd, hn_bias_bwd)``, each ``[H]`` (see
        :func:`jax_sprnn.sparse_gru`).
      time_major, seq_lengths, method: as in :func:`jax_sprnn.sparse_gru`, for both directions.

    Returns:
      ``(outputs, (h_fwd_T, h_bwd_T))``: outputs ``[B, T, 2H]`` (``[T, B, 2H]`` when
      ``time_major``); the backward direction's state is after position 0.
    """
    ws = _gated_weights(weights, GRU)
    h0s = _pair(h0, "h0", "(h0_fwd, h0_bwd)")
    biases = (None, None) if hn_bias is None else _pair(hn_bias, "hn_bias",
                                                         "(hn_bias_fwd, hn_bias_bwd)")
    biases = tuple(_check_hn_bias(b, w.hidden) for b, w in zip(biases, ws))
    y, finals = _bidirectional(GRU, inputs, tuple((h,) for h in h0s), ws, biases,
                               time_major=time_major, seq_lengths=seq_lengths, method=method)
    return y, tuple(h for (h,) in finals)


__all__ = ["sparse_lstm_bidirectional", "sparse_gru_bidirectional"]
