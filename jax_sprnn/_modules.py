"""What the linen modules (:mod:`jax_sprnn.flax`) and the NNX modules (:mod:`jax_sprnn.nnx`) share:
their argument checks, the layer's initial mask and layout, the dense layout of a layer given no
mask, and the run of a whole sequence with the conventions of ``nn.RNN`` / ``nnx.RNN`` (both
directions with those of ``nn.Bidirectional``). Nothing here imports Flax.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import ACTIVATIONS
from .api import sparse_rnn
from .bidirectional import sparse_rnn_bidirectional
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
def cached_initial_mask(hidden: int, max_density: float, seed: int) -> np.ndarray:
    """:func:`jax_sprnn.pruning.initial_mask`, read-only and cached: a module may be traced (and
    its initializers run) several times."""
    mask = initial_mask(hidden, max_density, seed)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=64)
def _initial_layout_host(hidden: int, max_density: float, seed: int, dtype_name: str) -> PackedMask:
    return PackedMask.for_density(hidden, max_density, seed=seed, dtype=np.dtype(dtype_name),
                                  host=True)


def initial_layout(hidden: int, max_density: float, seed: int, dtype_name: str) -> PackedMask:
    """The packed starting mask of a layer. The NumPy packing is cached (packing a dense layer
    takes a moment, and ``init`` may trace a module several times); the arrays are made afresh
    for each call, since inside a trace they belong to that trace."""
    return jax.tree_util.tree_map(jnp.asarray,
                                  _initial_layout_host(hidden, max_density, seed, dtype_name))


def dense_layout(hidden: int, dtype_name: str) -> PackedMask:
    """The all-ones mask of a layer given none: it runs dense, through the same kernel path (and
    the same layout) as a layer that ``init`` made at ``max_density=1``."""
    return initial_layout(hidden, 1.0, 0, dtype_name)


_warned_no_mask: set = set()


def warn_no_mask_once(message: str) -> None:
    """Warn once per process (per message) that a layer runs dense because it was given no
    mask: a checkpoint of ``nn.RNN`` / ``nnx.RNN`` loads without one, and that is legitimate, but
    a user who meant to prune should hear that the mask is missing."""
    if message not in _warned_no_mask:
        _warned_no_mask.add(message)
        warnings.warn(message, UserWarning, stacklevel=2)


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


def _fold_batch(x, initial_carry, *, steps: int, batch_shape: tuple, hidden: int, dtype,
                time_major: bool, carry_name: str = "initial_carry"):
    """``x`` and the carry with their batch dimensions folded into one, in ``dtype``."""
    batch = math.prod(batch_shape)
    x = x.astype(dtype).reshape((steps, batch, hidden) if time_major else (batch, steps, hidden))
    if not hasattr(initial_carry, "shape") or tuple(initial_carry.shape) != batch_shape + (hidden,):
        raise ValueError(f"{carry_name} must be [*batch, H] = {batch_shape + (hidden,)}, got "
                         f"{getattr(initial_carry, 'shape', type(initial_carry).__name__)}")
    return x, jnp.asarray(initial_carry).astype(dtype).reshape(batch, hidden)


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


def run_sequence(x, weights: SparseWeights, initial_carry, seq_lengths, *, steps: int,
                 batch_shape: tuple, activation: str, dtype, time_major: bool, reverse: bool,
                 keep_order: bool, method: str, mesh=None, batch_axis="data"):
    """The recurrence of a whole layer on the projected inputs ``x`` (``[*batch, T, H]`` or
    ``[T, *batch, H]``), with ``nn.RNN``'s conventions. Returns ``(carry, outputs)``.

    The batch dimensions are folded into one for the native call and unfolded after.
    """
    hidden = weights.hidden
    x, h0 = _fold_batch(x, initial_carry, steps=steps, batch_shape=batch_shape, hidden=hidden,
                        dtype=dtype, time_major=time_major)
    lengths = _fold_lengths(seq_lengths, batch_shape)
    kwargs = dict(activation=activation, time_major=time_major, reverse=bool(reverse),
                  seq_lengths=lengths, method=method)
    if mesh is None:
        y, carry = sparse_rnn(x, h0, weights, **kwargs)
    else:
        y, carry = sparse_rnn_sharded(x, h0, weights, mesh=mesh, batch_axis=batch_axis, **kwargs)
    if reverse and not keep_order:
        y = flip_padded(y, None if lengths is None else jnp.asarray(lengths, jnp.int32),
                        time_major=time_major)
    return (carry.reshape(batch_shape + (hidden,)),
            y.reshape(_output_shape(steps, batch_shape, hidden, time_major)))


def run_bidirectional(xs: tuple, weights: tuple, initial_carry: tuple, seq_lengths, *,
                      steps: int, batch_shape: tuple, activation: str, dtype, time_major: bool,
                      method: str):
    """Both directions of a bidirectional layer in one :func:`sparse_rnn_bidirectional` call,
    with ``nn.Bidirectional``'s conventions: ``xs``, ``weights`` and ``initial_carry`` are
    (forward, backward) pairs; the outputs are concatenated, forward features first, and the
    backward ones stay at their positions. Returns ``((carry_f, carry_b), outputs)``."""
    if not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != 2:
        raise ValueError(f"initial_carry must be a pair (forward, backward) of [*batch, H] "
                         f"arrays, got {type(initial_carry).__name__}")
    hidden = weights[0].hidden
    folded = [_fold_batch(x, c, steps=steps, batch_shape=batch_shape, hidden=hidden, dtype=dtype,
                          time_major=time_major, carry_name=f"initial_carry[{i}]")
              for i, (x, c) in enumerate(zip(xs, initial_carry))]
    y, carries = sparse_rnn_bidirectional(
        tuple(x for x, _ in folded), tuple(h for _, h in folded), tuple(weights),
        activation=activation, time_major=time_major,
        seq_lengths=_fold_lengths(seq_lengths, batch_shape), method=method)
    return (tuple(c.reshape(batch_shape + (hidden,)) for c in carries),
            y.reshape(_output_shape(steps, batch_shape, 2 * hidden, time_major)))
