"""A bidirectional layer in one call: :func:`sparse_rnn_bidirectional`.

Both directions of a bidirectional layer read the same sequence and are independent, so a GPU can
run them side by side (issue 16). The function's contract is that of two :func:`sparse_rnn` calls,
the second with ``reverse=True``, whose outputs are concatenated, forward features first.

Where both directions' weights have one forward layout (the same ``meta``: a layer whose directions
were packed at one capacity, as :class:`jax_sprnn.flax.SparseBidirectional` packs them, or row
counts that plan alike, as row-balanced pruning gives the inference form), the directions are one
call of ``sprnn_forward_pair``: on a GPU one launch runs both, each direction on its own
thread-block clusters, and elsewhere the pair is the two calls (:func:`_paired_calls`). The
gradient's backward recurrence is one ``sprnn_backward_pair`` call where the transposed layouts
(``meta_t``) agree too, else one call per direction. Otherwise, and for ``method="reference"``,
the function makes the two calls (:func:`_two_calls`). Both give the same numbers: each direction
runs the same kernel on the same layout either way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from . import forward_mode
from ._checks import as_array, check_method
from .api import prepare_call, sparse_rnn, weights_cotangent
from .planner import LayoutMeta
from .primitives import sprnn_backward_p
from .stacked import sprnn_backward_pair_p, sprnn_forward_pair_p
from .weights import SparseWeights

_DIRECTIONS = ("forward", "backward")


def _pair(value, name: str, parts: str) -> tuple:
    """``value`` as a 2-tuple, or a TypeError naming the argument and its expected parts."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        got = f"a {type(value).__name__} of length {len(value)}" if isinstance(value, (tuple, list)) \
            else type(value).__name__
        raise TypeError(f"{name} must be a pair {parts}, one per direction, got {got}")
    return tuple(value)


def _check_weights(weights) -> tuple[SparseWeights, SparseWeights]:
    pair = _pair(weights, "weights", "(w_fwd, w_bwd) of jax_sprnn.SparseWeights")
    for i, (w, direction) in enumerate(zip(pair, _DIRECTIONS)):
        if not isinstance(w, SparseWeights):
            raise TypeError(f"weights[{i}] ({direction}) must be a jax_sprnn.SparseWeights, got "
                            f"{type(w).__name__}")
    w_f, w_b = pair
    if w_f.hidden != w_b.hidden:
        raise ValueError(f"weights: the forward kernel is {w_f.shape} and the backward "
                         f"{w_b.shape}; both directions must have the same hidden size")
    if w_f.dtype != w_b.dtype:
        raise TypeError(f"weights: the forward kernel is {w_f.dtype} and the backward "
                        f"{w_b.dtype}; both directions must have one dtype "
                        f"(SparseWeights.astype converts)")
    return pair


def _check_same(pair: tuple, name: str, parts: tuple[str, str]) -> tuple:
    """Both directions' arrays must have one shape and dtype: the outputs are concatenated and
    the directions share ``seq_lengths``. The rest is checked by ``sparse_rnn``."""
    a, b = (as_array(v) for v in pair)
    if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
        error = ValueError if tuple(a.shape) != tuple(b.shape) else TypeError
        raise error(f"{name}: {parts[0]} is {np.dtype(a.dtype)}{list(a.shape)} and {parts[1]} "
                         f"{np.dtype(b.dtype)}{list(b.shape)}; both directions must have one shape "
                         f"and dtype")
    return a, b


def _two_calls(x_f, x_b, h0_f, h0_b, w_f, w_b, **kwargs):
    """One :func:`sparse_rnn` call per direction (directions of two forward layouts, and
    ``method="reference"``). Returns ``(y_f, y_b, h_f, h_b)``, outputs in the layout of the inputs,
    each at its own positions."""
    y_f, h_f = sparse_rnn(x_f, h0_f, w_f, reverse=False, **kwargs)
    y_b, h_b = sparse_rnn(x_b, h0_b, w_b, reverse=True, **kwargs)
    return y_f, y_b, h_f, h_b


#: The paired problems' directions: the forward one from the start, the backward one from the end.
_REVERSE = (False, True)


@dataclasses.dataclass(frozen=True)
class _PairConfig:
    activation: str
    method: str
    meta: LayoutMeta
    #: the directions' one transposed layout, or None where they differ (an inference form packed
    #: tightly per direction can): the gradient's backward recurrence is then two calls
    meta_t: LayoutMeta | None
    full_lengths: bool  # no seq_lengths: every sequence runs all T steps


def _both(ws, name: str) -> tuple:
    """The two directions' ``name`` arrays."""
    return tuple(getattr(w, name) for w in ws)


def _pair_forward(xs, h0s, ws, lengths, cfg: _PairConfig):
    """``(y_f, y_b, h_f, h_b)`` of one ``sprnn_forward_pair`` call (time-major sequences)."""
    return sprnn_forward_pair_p.bind(*xs, *h0s, *_both(ws, "values"), *_both(ws, "indices"),
                                     *_both(ws, "lane_row"), lengths, activation=cfg.activation,
                                     reverse=_REVERSE, meta=cfg.meta, method=cfg.method,
                                     full_lengths=cfg.full_lengths)


@functools.partial(forward_mode.custom_vjp, nondiff_argnums=(4,))
def _paired_rnn(xs, h0s, ws, lengths, cfg):
    return tuple(_pair_forward(xs, h0s, ws, lengths, cfg))


def _paired_rnn_fwd(xs, h0s, ws, lengths, cfg):
    outs = tuple(_pair_forward(xs, h0s, ws, lengths, cfg))
    return outs, (outs[:2], h0s, ws, lengths)


def _paired_rnn_bwd(cfg, residuals, cotangents):
    ys, h0s, ws, lengths = residuals
    dys, dhs = ([c.astype(ys[0].dtype) for c in part] for part in (cotangents[:2], cotangents[2:]))
    values_t = tuple(w.transposed_values() for w in ws)
    if cfg.meta_t is not None:
        dx_f, dx_b, dh0_f, dh0_b = sprnn_backward_pair_p.bind(
            *ys, *h0s, *values_t, *_both(ws, "indices_t"), *_both(ws, "lane_row_t"), lengths, *dys,
            *dhs, activation=cfg.activation, reverse=_REVERSE, meta=cfg.meta_t, method=cfg.method)
    else:
        (dx_f, dh0_f), (dx_b, dh0_b) = (
            sprnn_backward_p.bind(ys[q], h0s[q], values_t[q], ws[q].indices_t, ws[q].lane_row_t,
                                  lengths, dys[q], dhs[q], activation=cfg.activation,
                                  reverse=_REVERSE[q], meta=ws[q].meta_t, method=cfg.method)
            for q in range(2))
    dxs = (dx_f, dx_b)
    dws = tuple(weights_cotangent(ys[q], h0s[q], dxs[q], ws[q], lengths, reverse=_REVERSE[q],
                                  method=cfg.method) for q in range(2))
    return dxs, (dh0_f, dh0_b), dws, None  # (None: the lengths' zero cotangent)


_paired_rnn.defvjp(_paired_rnn_fwd, _paired_rnn_bwd)


def _one_layout(w_f: SparseWeights, w_b: SparseWeights) -> bool:
    """Whether the directions can be one paired call: one kernel instance runs both forward
    layouts. (Their transposed layouts, which only the gradient runs, may differ.)"""
    return w_f.meta == w_b.meta


def _paired_calls(x_f, x_b, h0_f, h0_b, w_f, w_b, *, activation, time_major, seq_lengths,
                   method):
    """Both directions as one ``sprnn_forward_pair`` call; returns what :func:`_two_calls`
    does."""
    calls = [prepare_call(x, h0, w, activation=activation, time_major=time_major,
                          seq_lengths=seq_lengths)
             for x, h0, w in ((x_f, h0_f, w_f), (x_b, h0_b, w_b))]
    meta_t = w_f.meta_t if w_f.meta_t == w_b.meta_t else None
    cfg = _PairConfig(activation, method, w_f.meta, meta_t, full_lengths=seq_lengths is None)
    y_f, y_b, h_f, h_b = _paired_rnn(tuple(c.x_tm for c in calls), tuple(c.h0 for c in calls),
                                     (w_f, w_b), calls[0].safe_lengths, cfg)
    (y_f, h_f), (y_b, h_b) = (c.finish(y, h) for c, y, h in zip(calls, (y_f, y_b), (h_f, h_b)))
    if not time_major:
        y_f, y_b = jnp.swapaxes(y_f, 0, 1), jnp.swapaxes(y_b, 0, 1)
    return y_f, y_b, h_f, h_b


def sparse_rnn_bidirectional(inputs, h0, weights, *, activation: str = "tanh",
                             time_major: bool = False, seq_lengths=None, method: str = "auto"):
    """Both directions of a bidirectional sparse recurrent layer.

    The forward direction runs ``h_t = act(x_fwd[t] + h_{t-1} @ w_fwd)`` from the first step, the
    backward one ``act(x_bwd[t] + h_{t+1} @ w_bwd)`` from each example's last valid step, and their
    outputs are concatenated, forward features first. It equals::

        y_f, h_f = sparse_rnn(x_fwd, h0_fwd, w_fwd, **kw)
        y_b, h_b = sparse_rnn(x_bwd, h0_bwd, w_bwd, reverse=True, **kw)
        concatenate([y_f, y_b], axis=-1), (h_f, h_b)

    with the same ``seq_lengths``. Gradients, ``jax.vmap`` and :mod:`jax_sprnn.export` work as for
    :func:`sparse_rnn`.

    Args:
      inputs: ``(x_fwd, x_bwd)``: each direction's input projection, bias included, ``[B, T, H]``
        (``[T, B, H]`` when ``time_major``), both of one shape and dtype.
      h0: ``(h0_fwd, h0_bwd)``, each ``[B, H]``.
      weights: ``(w_fwd, w_bwd)``, :class:`SparseWeights` of one hidden size and dtype.
      activation, time_major, seq_lengths, method: as in :func:`sparse_rnn`, for both directions.
        Past an example's length its outputs are zero in both halves; the backward direction starts
        at the example's last valid step.

    Returns:
      ``(outputs, (h_fwd_T, h_bwd_T))``: outputs ``[B, T, 2H]`` (``[T, B, 2H]`` when
      ``time_major``); the final states ``[B, H]`` (the backward one after position 0).
    """
    w_f, w_b = _check_weights(weights)
    x_f, x_b = _check_same(_pair(inputs, "inputs", "(x_fwd, x_bwd)"), "inputs",
                           ("x_fwd", "x_bwd"))
    h0_f, h0_b = _check_same(_pair(h0, "h0", "(h0_fwd, h0_bwd)"), "h0", ("h0_fwd", "h0_bwd"))
    check_method(method)
    run = _paired_calls if method != "reference" and _one_layout(w_f, w_b) else _two_calls
    y_f, y_b, h_f, h_b = run(x_f, x_b, h0_f, h0_b, w_f, w_b, activation=activation,
                             time_major=time_major, seq_lengths=seq_lengths, method=method)
    return jnp.concatenate([y_f, y_b], axis=-1), (h_f, h_b)


__all__ = ["sparse_rnn_bidirectional"]
