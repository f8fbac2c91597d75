"""A bidirectional layer in one call: :func:`sparse_rnn_bidirectional`.

Both directions of a bidirectional layer read the same sequence and are independent, so a GPU can
run them side by side (issue 16). The function's contract is that of two :func:`sparse_rnn` calls,
the second with ``reverse=True``, whose outputs are concatenated, forward features first. Today it
makes those two calls on every platform (:func:`_two_calls`). A fused one-launch primitive
replaces that body without changing the arguments or the results.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._checks import as_array, check_method
from .api import sparse_rnn
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
    """The path on every platform today: one :func:`sparse_rnn` call per direction. Returns
    ``(y_f, y_b, h_f, h_b)``, outputs in the layout of the inputs, each at its own positions."""
    y_f, h_f = sparse_rnn(x_f, h0_f, w_f, reverse=False, **kwargs)
    y_b, h_b = sparse_rnn(x_b, h0_b, w_b, reverse=True, **kwargs)
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
    y_f, y_b, h_f, h_b = _two_calls(x_f, x_b, h0_f, h0_b, w_f, w_b, activation=activation,
                                    time_major=time_major, seq_lengths=seq_lengths, method=method)
    return jnp.concatenate([y_f, y_b], axis=-1), (h_f, h_b)


__all__ = ["sparse_rnn_bidirectional"]
