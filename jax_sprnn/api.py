"""The public functional API: :func:`sparse_rnn`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import fallback, forward_mode
from ._checks import METHODS, check_method, check_rnn_args, check_weights, is_concrete
from .planner import LayoutMeta
from .primitives import sprnn_backward_p, sprnn_forward_p, sprnn_weight_grad_p
from .reference import dense_matvec, scan_recurrence
from .weights import SparseWeights


def _poison_bad_lengths(y_tm, h_final, lengths, T):
    bad = (lengths < 0) | (lengths > T)
    nan = jnp.array(jnp.nan, y_tm.dtype)
    return (jnp.where(bad[None, :, None], nan, y_tm), jnp.where(bad[:, None], nan, h_final))


@dataclasses.dataclass(frozen=True)
class _Config:
    activation: str
    reverse: bool
    method: str
    meta: LayoutMeta
    meta_t: LayoutMeta
    batch_major: bool = False  # the caller's x and y are [B, T, H] (primitives._persistent_cuda)
    full_lengths: bool = False  # no seq_lengths: every sequence runs all T steps (the same)


def _forward_bind(x, h0, w: SparseWeights, lengths, cfg: _Config):
    return sprnn_forward_p.bind(x, h0, w.values, w.indices, w.lane_row, lengths,
                                activation=cfg.activation, reverse=cfg.reverse, meta=cfg.meta,
                                method=cfg.method, batch_major=cfg.batch_major,
                                full_lengths=cfg.full_lengths)


@functools.partial(forward_mode.custom_vjp, nondiff_argnums=(4,))
def _native_rnn(x, h0, w, lengths, cfg):
    return tuple(_forward_bind(x, h0, w, lengths, cfg))


def _native_rnn_fwd(x, h0, w, lengths, cfg):
    y, h_final = _forward_bind(x, h0, w, lengths, cfg)
    return (y, h_final), (y, h0, w, lengths)


def _float0_like(x):
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _native_rnn_bwd(cfg, residuals, cotangents):
    y, h0, w, lengths = residuals
    dy, dh_final = cotangents
    dy = dy.astype(y.dtype)
    dh_final = dh_final.astype(y.dtype)
    dx, dh0 = sprnn_backward_p.bind(y, h0, w.transposed_values(), w.indices_t, w.lane_row_t, lengths,
                                    dy, dh_final, activation=cfg.activation, reverse=cfg.reverse,
                                    meta=cfg.meta_t, method=cfg.method)
    dw = weights_cotangent(y, h0, dx, w, lengths, reverse=cfg.reverse, method=cfg.method)
    return dx, dh0, dw, None  # (None: a zero cotangent, also for a symbolic batch of lengths)


def weights_cotangent(y, h0, dz, w: SparseWeights, lengths, *, reverse: bool, method: str
                      ) -> SparseWeights:
    """The cotangent of ``w`` in a simple-cell call's VJP, from its outputs ``y`` and ``dz``
    (``dL/dz`` per position, the backward recurrence's ``dx``): the sampled weight gradient in
    ``values``, float0 zeros in the index leaves."""
    (dvalues,) = sprnn_weight_grad_p.bind(y, h0, dz, w.indices, w.lane_row, lengths, groups=1,
                                          reverse=reverse, meta=w.meta, method=method)
    return w.replace(values=dvalues[0].astype(w.values.dtype),
                     **{name: _float0_like(getattr(w, name)) for name in w.INDEX_LEAVES})


_native_rnn.defvjp(_native_rnn_fwd, _native_rnn_bwd)


def _reference_sparse(x, h0, w: SparseWeights, lengths, activation, reverse):
    kernel = fallback.dense_from_packed(w.values, w.indices, w.lane_row, w.meta)
    return scan_recurrence(x, h0, dense_matvec(kernel), lengths, activation=activation, reverse=reverse)


def sparse_rnn(inputs, h0, weights: SparseWeights, *, activation: str = "tanh",
               time_major: bool = False, reverse: bool = False, seq_lengths=None,
               method: str = "auto"):
    """Run a sparse recurrent layer ``h_t = act(x_t + h_{t-1} @ kernel)`` over a whole sequence.

    Args:
      inputs: the input projection, bias included (``x_t = W in_t + b``, computed outside):
        ``[B, T, H]``, or ``[T, B, H]`` when ``time_major``. float32, bfloat16 or float16, the dtype
        of ``weights``.
      h0: the initial state ``[B, H]``, same dtype.
      weights: the recurrent kernel as :class:`SparseWeights` (``[H, H]``, Flax orientation).
      activation: ``"tanh"``, ``"relu"`` or ``"identity"``.
      time_major: the layout of ``inputs`` and ``outputs``.
      reverse: run from the last valid position to the first (outputs stay at their positions).
      seq_lengths: optional ``[B]`` integers in ``[0, T]``. Past its length an example's state is
        frozen and its outputs are zero; its final state is the state at its length.
      method: ``"auto"`` (the native kernel where it is available and fits, else a dense XLA
        path with a one-time warning; on a GPU also the dense path for a 16-bit forward pass where
        :mod:`jax_sprnn.cost` expects the kernel to be clearly slower, e.g. B=16 at H=2304),
        ``"native"`` (the native kernel or an error that says why), or ``"reference"`` (pure JAX).

    Returns:
      ``(outputs, final_state)``: outputs laid out like ``inputs``, final state ``[B, H]``.
      Accumulation is float32; the state is rounded to the storage dtype after every step.
    """
    check_method(method)
    args = prepare_call(inputs, h0, weights, activation=activation, time_major=time_major,
                        seq_lengths=seq_lengths)
    if method == "reference":
        y, h_final = _reference_sparse(args.x_tm, args.h0, weights, args.safe_lengths, activation,
                                       bool(reverse))
    else:
        cfg = _Config(activation, bool(reverse), method, weights.meta, weights.meta_t,
                      batch_major=not time_major, full_lengths=seq_lengths is None)
        y, h_final = _native_rnn(args.x_tm, args.h0, weights, args.safe_lengths, cfg)
    y, h_final = args.finish(y, h_final)
    return (y if time_major else jnp.swapaxes(y, 0, 1)), h_final


@dataclasses.dataclass(frozen=True)
class PreparedCall:
    """A simple-cell call's checked operands: x time-major, h0, and the lengths twice: as given
    (``lengths``) and as the kernels may read them (``safe_lengths``, clipped to ``[0, T]`` where
    traced values could not be checked)."""
    x_tm: jax.Array
    h0: jax.Array
    lengths: jax.Array
    safe_lengths: jax.Array
    checked: bool  # the lengths were checked here (absent, or concrete)

    def finish(self, y_tm, h_final):
        """The results, with NaN for the examples whose traced lengths were out of range."""
        if self.checked:
            return y_tm, h_final
        return _poison_bad_lengths(y_tm, h_final, self.lengths, self.x_tm.shape[0])


def prepare_call(inputs, h0, weights, *, activation, time_major, seq_lengths) -> PreparedCall:
    """Check one simple-cell call's arguments (shared by sparse_rnn and the bidirectional layer)."""
    check_weights(weights, 1)  # a gated kernel gets an error naming sparse_lstm / sparse_gru
    x_tm, h0, lengths = check_rnn_args(inputs, h0, weights.hidden,
                                       inputs_dtype=np.dtype(weights.values.dtype),
                                       activation=activation, time_major=time_major,
                                       seq_lengths=seq_lengths)
    checked = seq_lengths is None or is_concrete(seq_lengths)
    safe = lengths if checked else jnp.clip(lengths, 0, x_tm.shape[0])
    return PreparedCall(x_tm, h0, lengths, safe, checked)


__all__ = ["sparse_rnn", "METHODS"]
