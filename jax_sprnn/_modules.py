"""What the linen modules (:mod:`jax_sprnn.flax`) and the NNX modules (:mod:`jax_sprnn.nnx`) share:
their argument checks, the layer's initial mask and layout, the dense layout of a layer given no
mask, and the run of a whole sequence with the conventions of ``nn.RNN`` / ``nnx.RNN`` (both
directions with those of ``nn.Bidirectional``). Nothing here imports Flax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import ACTIVATIONS
from .api import sparse_rnn
from .bidirectional import sparse_rnn_bidirectional
from .gated import sparse_gru, sparse_lstm
from .gated_bidirectional import sparse_gru_bidirectional, sparse_lstm_bidirectional
from .pruning import PackedMask, initial_mask
from .sharding import sparse_rnn_sharded
from .weights import SUPPORTED_DTYPES, SparseWeights

Initializer = Any

# The activations the native kernels implement, by the callables a Flax user would pass (Flax's
# ``nn.tanh``, ``nnx.relu``, ... are these same functions).
_ACTIVATION_FNS = {jnp.tanh: "tanh", jax.nn.tanh: "tanh", jax.nn.relu: "relu"}


def activation_name(activation) -> str:
    """``"tanh"``, ``"relu"`` or ``"identity"`` for a name or one of the matching callables."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {sorted(ACTIVATIONS)} (or jnp.tanh / "
                             f"jax.nn.relu), got {activation!r}")
        return activation
    try:
        return _ACTIVATION_FNS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation_fn must be 'tanh', 'relu', 'identity', jnp.tanh or "
                         f"jax.nn.relu (what the native kernels implement), got {activation!r}"
                         ) from None


def storage_dtype(dtype, param_dtype) -> np.dtype:
    """The dtype the recurrence runs in: ``dtype`` if given, else ``param_dtype``."""
    chosen = np.dtype(param_dtype if dtype is None else dtype)
    if chosen not in SUPPORTED_DTYPES:
        name = "param_dtype" if dtype is None else "dtype"
        raise TypeError(f"{name} must be float32, bfloat16 or float16 for a sparse recurrence, "
                        f"got {chosen}")
    return chosen


def check_features(features, name: str = "features") -> int:
    if isinstance(features, bool) or not isinstance(features, (int, np.integer)) or features < 1:
        raise ValueError(f"{name} must be a positive integer, got {features!r}")
    return int(features)


def check_carry(carry, hidden: int) -> None:
    """A cell's carry must be ``[*batch, hidden]``."""
    if not hasattr(carry, "shape") or carry.shape[-1:] != (hidden,):
        raise ValueError(f"carry must be [*batch, {hidden}], got shape "
                         f"{getattr(carry, 'shape', type(carry).__name__)}")


def masked_init(init: Initializer, mask_fn):
    """An initializer that zeroes what ``mask_fn()`` (a boolean array) prunes."""
    def initializer(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * jnp.asarray(mask_fn(), dtype)
    return initializer


@functools.lru_cache(maxsize=64)
def cached_initial_mask(hidden: int, max_density: float, seed: int, gates: int = 1) -> np.ndarray:
    """:func:`jax_sprnn.pruning.initial_mask` (``[H, gates*H]``), read-only and cached: a module
    may be traced (and its initializers run) several times."""
    mask = initial_mask(hidden, max_density, seed, gates)
    mask.setflags(write=False)
    return mask


def gate_mask(hidden: int, max_density: float, seed: int, gates: int, gate: int) -> np.ndarray:
    """Gate ``gate``'s ``[H, H]`` slice of a gated layer's initial mask: what the Flax kernel of
    that gate (``hi``, ``hf``, ...) starts masked by."""
    return cached_initial_mask(hidden, max_density, seed, gates)[:, gate * hidden:(gate + 1) * hidden]


@functools.lru_cache(maxsize=64)
def _initial_layout_host(hidden: int, max_density: float, seed: int, dtype_name: str,
                         gates: int) -> PackedMask:
    return PackedMask.for_density(hidden, max_density, gates=gates, seed=seed,
                                  dtype=np.dtype(dtype_name), host=True)


def initial_layout(hidden: int, max_density: float, seed: int, dtype_name: str,
                   gates: int = 1) -> PackedMask:
    """The packed starting mask of a layer (of a kernel ``[H, gates*H]``). The NumPy packing is
    cached (packing a dense layer takes a moment, and ``init`` may trace a module several times);
    the arrays are made afresh for each call, since inside a trace they belong to that trace."""
    return jax.tree_util.tree_map(jnp.asarray, _initial_layout_host(hidden, max_density, seed,
                                                                    dtype_name, gates))


def dense_layout(hidden: int, dtype_name: str, gates: int = 1) -> PackedMask:
    """The all-ones mask of a layer given none: it runs dense, through the same kernel path (and
    the same layout) as a layer that ``init`` made at ``max_density=1``."""
    return initial_layout(hidden, 1.0, 0, dtype_name, gates)


# ---- gated cells ------------------------------------------------------------------------------

def lstm_step(carry, zx, zh):
    """One step of Flax's LSTM cell from the input and recurrent pre-activations ``[*batch, 4H]``
    (gates i, f, g, o, biases included). ``carry``: ``(c, h)``. Returns ``((c', h'), h')``."""
    c, _ = carry
    i, f, g, o = jnp.split(zx + zh, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h


def gru_step(h, zx, zh):
    """One step of Flax's GRU cell: ``zx`` the input pre-activations ``[*batch, 3H]`` (gates r,
    z, n, biases included), ``zh`` the recurrent ones with the n-gate's recurrent bias. Returns
    ``(h', h')``."""
    x_r, x_z, x_n = jnp.split(zx, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(zh, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    new_h = (1.0 - z) * n + z * h
    return new_h, new_h


@dataclasses.dataclass(frozen=True)
class Gated:
    """What the modules need to know of a gated cell: its gate count, its carry (a tuple of the
    parts ``carry``, or one array when None, as Flax keeps them), one step (the per-step cells),
    and the whole sequence (:func:`jax_sprnn.sparse_lstm` / :func:`jax_sprnn.sparse_gru`)."""

    name: str
    gates: int
    carry: tuple[str, ...] | None

    def step(self, carry, zx, zh):
        return (lstm_step if self.name == "LSTM" else gru_step)(carry, zx, zh)

    def recurrence(self, *, method: str, hn_bias=None):
        """The whole-sequence call for :func:`run_sequence`."""
        if self.name == "LSTM":
            return functools.partial(sparse_lstm, method=method)
        return functools.partial(sparse_gru, hn_bias=hn_bias, method=method)

    def bidirectional(self, *, method: str, hn_biases=None):
        """The whole-sequence call of both directions for :func:`run_bidirectional`
        (``hn_biases``: the GRU's pair)."""
        if self.name == "LSTM":
            return functools.partial(sparse_lstm_bidirectional, method=method)
        return functools.partial(sparse_gru_bidirectional, hn_bias=hn_biases, method=method)


LSTM = Gated("LSTM", 4, ("c", "h"))
GRU = Gated("GRU", 3, None)


_warned_no_mask: set = set()


def warn_no_mask_once(message: str) -> None:
    """Warn once per process (per message) that a layer runs dense because it was given no
    mask: a checkpoint of ``nn.RNN`` / ``nnx.RNN`` loads without one, and that is legitimate, but
    a user who meant to prune should hear that the mask is missing."""
    if message not in _warned_no_mask:
        _warned_no_mask.add(message)
        warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning of ``warn_no_mask_once`` name its caller's first
    frame outside jax_sprnn, Flax and JAX: the user's line, however many frames Flax's wrappers
    and JAX's tracing put between the two."""
    packages = [sys.modules.get(name) for name in ("jax_sprnn", "flax", "jax")]
    internal = tuple(os.path.dirname(m.__file__) + os.sep for m in packages
                     if m is not None and getattr(m, "__file__", None))
    frame, level = sys._getframe(1), 1  # level 1: warn_no_mask_once itself
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def flip_padded(y, lengths, *, time_major: bool):
    """Reverse each sequence's first ``lengths[b]`` steps, keeping padding at the end (what
    ``nn.RNN`` does to return a reversed pass's outputs in processing order). ``y``: ``[B, T, H]``
    or ``[T, B, H]``; ``lengths``: ``[B]`` or None (then the whole time axis is flipped)."""
    axis = 0 if time_major else 1
    if lengths is None:
        return jnp.flip(y, axis)
    steps = y.shape[axis]
    idx = (jnp.arange(steps - 1, -1, -1)[None, :] + lengths[:, None]) % steps  # [B, T]
    idx = (idx.T if time_major else idx)[:, :, None]
    return jnp.take_along_axis(y, idx, axis=axis)


def sequence_shape(inputs, time_major: bool):
    """``(inputs, T, batch_shape)`` of ``[*batch, T, F]`` (or ``[T, *batch, F]``) inputs."""
    if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
        inputs = jnp.asarray(inputs)
    if inputs.ndim < 2:
        raise ValueError(f"inputs must be {'[T, *batch, F]' if time_major else '[*batch, T, F]'}, "
                         f"got shape {tuple(inputs.shape)}")
    if time_major:
        return inputs, inputs.shape[0], tuple(inputs.shape[1:-1])
    return inputs, inputs.shape[-2], tuple(inputs.shape[:-2])


def _fold_inputs(x, *, steps: int, batch_shape: tuple, dtype, time_major: bool):
    """``x`` (``[*batch, T, W]`` or ``[T, *batch, W]``) with one batch dimension, in ``dtype``."""
    batch = math.prod(batch_shape)
    width = x.shape[-1]
    return x.astype(dtype).reshape((steps, batch, width) if time_major else (batch, steps, width))


def _fold_carry(carry, *, batch_shape: tuple, hidden: int, dtype, name: str):
    """A carry ``[*batch, H]`` (named ``name`` in errors) as ``[B, H]`` in ``dtype``."""
    if not hasattr(carry, "shape") or tuple(carry.shape) != batch_shape + (hidden,):
        raise ValueError(f"{name} must be [*batch, H] = {batch_shape + (hidden,)}, got "
                         f"{getattr(carry, 'shape', type(carry).__name__)}")
    return jnp.asarray(carry).astype(dtype).reshape(math.prod(batch_shape), hidden)


def _fold_carries(carry, names: tuple[str, ...] | None, *, name: str = "initial_carry", **kwargs):
    """:func:`_fold_carry` of one array (``names`` None) or of a tuple with parts ``names``
    (``name``: the carry's in errors)."""
    if names is None:
        return _fold_carry(carry, name=name, **kwargs)
    if not isinstance(carry, (tuple, list)) or len(carry) != len(names):
        raise ValueError(f"{name} must be a tuple ({', '.join(names)}) of [*batch, H] "
                         f"arrays, got {type(carry).__name__}")
    return tuple(_fold_carry(c, name=f"{name}[{i}] ({n})", **kwargs)
                 for i, (c, n) in enumerate(zip(carry, names)))


def _fold_lengths(seq_lengths, batch_shape: tuple):
    if seq_lengths is None:
        return None
    if not hasattr(seq_lengths, "shape"):
        seq_lengths = np.asarray(seq_lengths)
    if tuple(seq_lengths.shape) != batch_shape:
        raise ValueError(f"seq_lengths must be [*batch] = {batch_shape}, got shape "
                         f"{tuple(seq_lengths.shape)}")
    return seq_lengths.reshape(math.prod(batch_shape))


def _output_shape(steps: int, batch_shape: tuple, features: int, time_major: bool) -> tuple:
    return ((steps,) + batch_shape if time_major else batch_shape + (steps,)) + (features,)


def _result_dtype(dtype, initial_carry) -> np.dtype:
    """The dtype of a layer's outputs and final carry: the recurrence's ``dtype`` promoted with the
    initial carry's, as Flax's cells give it (``nn.LSTMCell(dtype=bfloat16)`` on a float32 carry
    returns float32), so that the carry fed back in the next call keeps its dtype."""
    carries = jax.tree_util.tree_leaves(initial_carry)
    return np.dtype(jnp.result_type(dtype, *(c.dtype for c in carries if hasattr(c, "dtype"))))


def _finish(carry, y, out_dtype, carry_shape: tuple, y_shape: tuple):
    """The folded results of a whole-sequence call unfolded to the caller's batch dimensions, in
    ``out_dtype``."""
    return (jax.tree_util.tree_map(lambda c: c.reshape(carry_shape).astype(out_dtype), carry),
            y.reshape(y_shape).astype(out_dtype))


def simple_recurrence(*, activation: str, method: str, mesh=None, batch_axis="data"):
    """The whole-sequence call of a simple layer for :func:`run_sequence`: :func:`sparse_rnn`,
    or with a ``mesh`` :func:`jax_sprnn.sharding.sparse_rnn_sharded`."""
    kwargs = dict(activation=activation, method=method)
    if mesh is None:
        return functools.partial(sparse_rnn, **kwargs)
    return functools.partial(sparse_rnn_sharded, mesh=mesh, batch_axis=batch_axis, **kwargs)


def run_sequence(x, weights: SparseWeights, initial_carry, seq_lengths, *, steps: int,
                 batch_shape: tuple, dtype, time_major: bool, reverse: bool, keep_order: bool,
                 recurrence, carry_parts: tuple[str, ...] | None = None):
    """The recurrence of a whole layer on the projected inputs ``x`` (``[*batch, T, W]`` or
    ``[T, *batch, W]``; ``W`` is ``H``, or ``G*H`` for a gated cell), with ``nn.RNN``'s
    conventions. Returns ``(carry, outputs)``.

    ``recurrence(x, carry, weights, *, time_major, reverse, seq_lengths)`` is the functional
    call (:func:`simple_recurrence`, :meth:`Gated.recurrence`); the carry is one array
    ``[*batch, H]``, or a tuple of them with the parts ``carry_parts``. The batch dimensions are
    folded into one for that call and unfolded after.
    """
    hidden = weights.hidden
    out_dtype = _result_dtype(dtype, initial_carry)
    x = _fold_inputs(x, steps=steps, batch_shape=batch_shape, dtype=dtype, time_major=time_major)
    h0 = _fold_carries(initial_carry, carry_parts, batch_shape=batch_shape, hidden=hidden,
                       dtype=dtype)
    lengths = _fold_lengths(seq_lengths, batch_shape)
    y, carry = recurrence(x, h0, weights, time_major=time_major, reverse=bool(reverse),
                          seq_lengths=lengths)
    if reverse and not keep_order:
        y = flip_padded(y, None if lengths is None else jnp.asarray(lengths, jnp.int32),
                        time_major=time_major)
    return _finish(carry, y, out_dtype, batch_shape + (hidden,),
                   _output_shape(steps, batch_shape, hidden, time_major))


def run_bidirectional(xs: tuple, weights: tuple, initial_carry: tuple, seq_lengths, *,
                      steps: int, batch_shape: tuple, dtype, time_major: bool, call,
                      carry_parts: tuple[str, ...] | None = None):
    """Both directions of a bidirectional layer in one call, with ``nn.Bidirectional``'s
    conventions: ``xs``, ``weights`` and ``initial_carry`` are (forward, backward) pairs; the
    outputs are concatenated, forward features first, and the backward ones stay at their
    positions. Returns ``((carry_f, carry_b), outputs)``.

    ``call(xs, carries, weights, *, time_major, seq_lengths)`` is the functional call
    (:func:`simple_bidirectional`, :meth:`Gated.bidirectional`); each direction's carry is one
    array ``[*batch, H]``, or a tuple of them with the parts ``carry_parts``."""
    if not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != 2:
        raise ValueError(f"initial_carry must be a pair (forward, backward) of carries, got "
                         f"{type(initial_carry).__name__}")
    hidden = weights[0].hidden
    fold = dict(batch_shape=batch_shape, dtype=dtype)
    y, carries = call(
        tuple(_fold_inputs(x, steps=steps, time_major=time_major, **fold) for x in xs),
        tuple(_fold_carries(c, carry_parts, hidden=hidden, name=f"initial_carry[{i}]", **fold)
              for i, c in enumerate(initial_carry)),
        tuple(weights), time_major=time_major, seq_lengths=_fold_lengths(seq_lengths, batch_shape))
    return _finish(tuple(carries), y, _result_dtype(dtype, initial_carry),
                   batch_shape + (hidden,), _output_shape(steps, batch_shape, 2 * hidden, time_major))


def simple_bidirectional(*, activation: str, method: str):
    """The whole-sequence call of a simple bidirectional layer for :func:`run_bidirectional`."""
    return functools.partial(sparse_rnn_bidirectional, activation=activation, method=method)
