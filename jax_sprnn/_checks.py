"""Argument checks shared by the entry points (:func:`jax_sprnn.sparse_rnn`,
:func:`jax_sprnn.reference_rnn`, :func:`jax_sprnn.sharding.sparse_rnn_sharded`, the Flax modules).

Each check raises a ``ValueError`` or ``TypeError`` that names the argument and what it must be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .weights import SparseWeights, check_weight_dtype, is_concrete  # noqa: F401 (re-exported)

#: The activations the native kernels implement, by name.
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda z: z}

#: The values of ``sparse_rnn``'s ``method``.
METHODS = ("auto", "native", "reference")


#: For each gate count G: what a kernel of G gates is, and the function that runs it.
_CELLS = {1: ("a square kernel [H, H] (the simple cell)", "sparse_rnn"),
          3: ("a GRU kernel [H, 3H] (gates r, z, n side by side)", "sparse_gru"),
          4: ("an LSTM kernel [H, 4H] (gates i, f, g, o side by side)", "sparse_lstm")}


def check_weights(weights, gates: int) -> SparseWeights:
    """``weights`` as SparseWeights of ``gates`` gates, or an error that says which function runs
    the kernel it packs."""
    if not isinstance(weights, SparseWeights):
        raise TypeError(f"weights must be a jax_sprnn.SparseWeights, got {type(weights).__name__}")
    weights.check_leaves()
    if weights.gates != gates:
        H = weights.hidden
        raise ValueError(f"weights must pack {_CELLS[gates][0]}, expected shape {(H, gates * H)}, "
                         f"got {weights.shape}: jax_sprnn.{_CELLS[weights.gates][1]} runs those")
    return weights


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def as_array(x):
    """``x`` as it is when it has a shape and a dtype, else as a JAX array."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else jnp.asarray(x)


def check_seq_lengths(seq_lengths, batch: int, steps: int):
    """``seq_lengths`` checked as ``[batch]`` integers in ``[0, steps]``, as int32.

    Traced lengths cannot be range-checked: they come back unchecked (``sparse_rnn`` then poisons
    the outputs of out-of-range entries with NaN rather than giving a plausible wrong number).
    """
    if not hasattr(seq_lengths, "dtype"):
        seq_lengths = np.asarray(seq_lengths)
    if tuple(seq_lengths.shape) != (batch,):
        raise ValueError(f"seq_lengths must be [B] = ({batch},), got shape {tuple(seq_lengths.shape)}")
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(f"seq_lengths must be an integer array, got {seq_lengths.dtype}")
    if not is_concrete(seq_lengths):
        lengths = jnp.asarray(seq_lengths)
        if lengths.dtype.itemsize > 4:  # (x64) out of [0, T] stays out through the int32 cast
            lengths = jnp.minimum(lengths, steps + 1)
            if jnp.issubdtype(lengths.dtype, jnp.signedinteger):
                lengths = jnp.maximum(lengths, -1)
        return lengths.astype(jnp.int32)
    host = np.asarray(seq_lengths)
    if host.size and (host.min() < 0 or host.max() > steps):
        raise ValueError(f"seq_lengths must lie in [0, T={steps}], got values from "
                         f"{host.min()} to {host.max()}")
    return jnp.asarray(host, jnp.int32)


def check_rnn_args(inputs, h0, hidden: int, *, inputs_dtype, activation, time_major, seq_lengths):
    """Check the arguments shared by sparse_rnn and reference_rnn; return time-major x, h0, lengths."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    x_tm, (h0,), lengths = check_sequence_args(inputs, {"h0": h0}, hidden, inputs_dtype=inputs_dtype,
                                               time_major=time_major, seq_lengths=seq_lengths)
    return x_tm, h0, lengths


def check_sequence_args(inputs, states: dict, hidden: int, *, inputs_dtype, time_major, seq_lengths,
                        gates: int = 1, gate_order: str = ""):
    """Check a recurrence's ``inputs`` (``[B, T, G*H]``, the input projections of its ``gates``
    gates in ``gate_order``), its ``states`` (``{name in errors: array}``, each ``[B, H]``) and
    ``seq_lengths``; return time-major x, the states in order, and the lengths as int32."""
    inputs = as_array(inputs)
    width = "H" if gates == 1 else f"{gates}H"
    layout = f"[T, B, {width}]" if time_major else f"[B, T, {width}]"
    if inputs.ndim != 3:
        raise ValueError(f"inputs must be {layout}, got shape {tuple(inputs.shape)}")
    dtype = check_weight_dtype(inputs.dtype, "inputs")
    if inputs_dtype is not None and dtype != inputs_dtype:
        raise TypeError(f"inputs must have the weights' dtype {inputs_dtype}, got {dtype} "
                        f"(cast the inputs, or the weights with SparseWeights.astype)")
    x_tm = inputs if time_major else jnp.swapaxes(inputs, 0, 1)
    T, B, width_in = x_tm.shape
    if gates == 1 and width_in != hidden:
        raise ValueError(f"inputs must have hidden size {hidden} (the kernel's) in their last axis, "
                         f"got shape {tuple(inputs.shape)}")
    if width_in != gates * hidden:
        raise ValueError(f"inputs must be {layout} with {width} = {gates * hidden} in their last axis "
                         f"(gates {gate_order} of the weights' H = {hidden} units), got shape "
                         f"{tuple(inputs.shape)}")
    checked = []
    for name, state in states.items():
        state = as_array(state)
        if tuple(state.shape) != (B, hidden):
            raise ValueError(f"{name} must be [B, H] = {(B, hidden)}, got shape {tuple(state.shape)}")
        if np.dtype(state.dtype) != dtype:
            raise TypeError(f"{name} must have the inputs' dtype {dtype}, got {np.dtype(state.dtype)}")
        checked.append(state)
    if seq_lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    else:
        lengths = check_seq_lengths(seq_lengths, B, T)
    return x_tm, tuple(checked), lengths
