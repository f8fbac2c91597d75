"""The public functional API: :func:`sparse_rnn`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import fallback
from .layout import LayoutMeta
from .primitives import sprnn_backward_p, sprnn_forward_p, sprnn_weight_grad_p
from .reference import ACTIVATIONS, scan_recurrence
from .weights import SUPPORTED_DTYPES, SparseWeights

METHODS = ("auto", "native", "reference")


def _is_concrete(x) -> bool:
    try:
        np.asarray(x)
        return True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


def _validate(inputs, h0, hidden: int, *, inputs_dtype, activation, time_major, seq_lengths):
    """Check the arguments shared by sparse_rnn and reference_rnn; return time-major x, h0, lengths."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        inputs = jnp.asarray(inputs)
    if not hasattr(h0, "shape") or not hasattr(h0, "dtype"):
        h0 = jnp.asarray(h0)
    layout = "[T, B, H]" if time_major else "[B, T, H]"
    if inputs.ndim != 3:
        raise ValueError(f"inputs must be {layout}, got shape {tuple(inputs.shape)}")
    dtype = np.dtype(inputs.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"inputs must be float32, bfloat16 or float16, got {dtype}")
    if inputs_dtype is not None and dtype != inputs_dtype:
        raise TypeError(f"inputs must have the weights' dtype {inputs_dtype}, got {dtype} "
                        f"(cast the inputs, or the weights with SparseWeights.astype)")
    x_tm = inputs if time_major else jnp.swapaxes(inputs, 0, 1)
    T, B, H = x_tm.shape
    if H != hidden:
        raise ValueError(f"inputs must have hidden size {hidden} (the kernel's) in their last axis, "
                         f"got shape {tuple(inputs.shape)}")
    if B == 0:
        raise ValueError("inputs must have a batch of at least 1")
    if tuple(h0.shape) != (B, H):
        raise ValueError(f"h0 must be [B, H] = {(B, H)}, got shape {tuple(h0.shape)}")
    if np.dtype(h0.dtype) != dtype:
        raise TypeError(f"h0 must have the inputs' dtype {dtype}, got {np.dtype(h0.dtype)}")
    if seq_lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    else:
        if not hasattr(seq_lengths, "dtype"):
            seq_lengths = np.asarray(seq_lengths)
        if tuple(seq_lengths.shape) != (B,):
            raise ValueError(f"seq_lengths must be [B] = ({B},), got shape {tuple(seq_lengths.shape)}")
        if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
            raise TypeError(f"seq_lengths must be an integer array, got {seq_lengths.dtype}")
        if _is_concrete(seq_lengths):
            host = np.asarray(seq_lengths)
            if host.size and (host.min() < 0 or host.max() > T):
                raise ValueError(f"seq_lengths must lie in [0, T={T}], got values from "
                                 f"{host.min()} to {host.max()}")
            lengths = jnp.asarray(host, jnp.int32)
        else:
            # Traced lengths cannot be checked here: out-of-range entries poison that example's
            # outputs with NaN below rather than giving a plausible wrong number.
            lengths = jnp.asarray(seq_lengths).astype(jnp.int32)
    return x_tm, h0, lengths


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


def _forward_bind(x, h0, w: SparseWeights, lengths, cfg: _Config):
    return sprnn_forward_p.bind(x, h0, w.values, w.indices, w.lane_row, lengths,
                                activation=cfg.activation, reverse=cfg.reverse, meta=cfg.meta,
                                method=cfg.method)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
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
    (dvalues,) = sprnn_weight_grad_p.bind(y, h0, dx, w.indices, w.lane_row, lengths, groups=1,
                                          reverse=cfg.reverse, meta=cfg.meta, method=cfg.method)
    dw = w.replace(values=dvalues[0].astype(w.values.dtype),
                   **{name: _float0_like(getattr(w, name))
                      for name in ("indices", "lane_row", "indices_t", "lane_row_t", "perm_t")})
    return dx, dh0, dw, _float0_like(lengths)


_native_rnn.defvjp(_native_rnn_fwd, _native_rnn_bwd)


def _reference_sparse(x, h0, w: SparseWeights, lengths, activation, reverse):
    kernel = fallback.dense_from_packed(w.values, w.indices, w.lane_row, w.meta)
    from .reference import dense_matvec
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
    if not isinstance(weights, SparseWeights):
        raise TypeError(f"weights must be a jax_sprnn.SparseWeights, got {type(weights).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = np.dtype(weights.values.dtype)
    x_tm, h0, lengths = _validate(inputs, h0, weights.hidden, inputs_dtype=dtype,
                                  activation=activation, time_major=time_major,
                                  seq_lengths=seq_lengths)
    T = x_tm.shape[0]
    checked = seq_lengths is None or _is_concrete(seq_lengths)
    safe_lengths = lengths if checked else jnp.clip(lengths, 0, T)
    if method == "reference":
        y, h_final = _reference_sparse(x_tm, h0, weights, safe_lengths, activation, bool(reverse))
    else:
        cfg = _Config(activation, bool(reverse), method, weights.meta, weights.meta_t)
        y, h_final = _native_rnn(x_tm, h0, weights, safe_lengths, cfg)
    if not checked:
        y, h_final = _poison_bad_lengths(y, h_final, lengths, T)
    return (y if time_major else jnp.swapaxes(y, 0, 1)), h_final
