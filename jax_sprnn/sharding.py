"""Data parallelism for :func:`jax_sprnn.sparse_rnn`: the batch split over a device mesh.

XLA's SPMD partitioner does not know how to split a custom call. Given a batch-sharded input it
would gather the whole batch onto every device and run the recurrence replicated. Wrapping the
call in ``shard_map`` tells it what we know: the examples of a batch are independent, so every
device runs the native kernel on its own shard of the batch with the (replicated) weights, and
no activation crosses devices. Only the weight gradient is summed over the mesh (one all-reduce of
the nonzeros, as in any data-parallel step).

docs/distributed.md shows a whole data-parallel training step across GPUs and hosts.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._checks import as_array, check_seq_lengths
from .api import sparse_rnn
from .weights import SparseWeights


def _batch_axes(mesh: Mesh, batch_axis) -> tuple[str, ...]:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
    if not axes:
        raise ValueError("batch_axis must name at least one mesh axis")
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"batch_axis {batch_axis!r} names axes {unknown} that the mesh does not "
                         f"have (its axes: {mesh.axis_names})")
    return axes


def _spec_entry(axes: Sequence[str]):
    return axes[0] if len(axes) == 1 else tuple(axes)


def batch_sharding(mesh: Mesh, batch_axis="data", *, ndim: int = 3, batch_dim: int = 0
                   ) -> NamedSharding:
    """The ``NamedSharding`` that splits dimension ``batch_dim`` of an ``ndim``-D array over the
    mesh axes ``batch_axis`` (one name or several) and replicates the rest."""
    axes = _batch_axes(mesh, batch_axis)
    spec = [None] * ndim
    spec[batch_dim] = _spec_entry(axes)
    return NamedSharding(mesh, P(*spec))


def sparse_rnn_sharded(inputs, h0, weights: SparseWeights, *, mesh: Mesh, batch_axis="data",
                       activation: str = "tanh", time_major: bool = False, reverse: bool = False,
                       seq_lengths=None, method: str = "auto"):
    """:func:`jax_sprnn.sparse_rnn` with the batch split over ``mesh``.

    Same arguments and results as ``sparse_rnn``, plus ``mesh`` and ``batch_axis`` (a mesh axis
    name, or a tuple of names whose product splits the batch). The batch must divide evenly. Use
    it under ``jax.jit`` with inputs sharded by :func:`batch_sharding` (unsharded inputs work too:
    XLA slices them first). Each device runs the recurrence on ``B / n`` examples; the weights are
    replicated; differentiation works, and the weight gradient is summed across the mesh.
    """
    axes = _batch_axes(mesh, batch_axis)
    if not isinstance(weights, SparseWeights):
        raise TypeError(f"weights must be a jax_sprnn.SparseWeights, got {type(weights).__name__}")
    inputs = as_array(inputs)
    if inputs.ndim != 3:
        raise ValueError(f"inputs must be {'[T, B, H]' if time_major else '[B, T, H]'}, got shape "
                         f"{tuple(inputs.shape)}")
    batch = inputs.shape[1 if time_major else 0]
    devices = math.prod(mesh.shape[a] for a in axes)
    if batch % devices:
        raise ValueError(f"the batch ({batch}) must be divisible by the {devices} devices of mesh "
                         f"axes {axes}")
    entry = _spec_entry(axes)
    seq_spec = P(None, entry) if time_major else P(entry)
    batch_spec = P(entry)
    kwargs = dict(activation=activation, time_major=time_major, reverse=reverse, method=method)

    if seq_lengths is None:
        def body(x, h, w):
            return sparse_rnn(x, h, w, **kwargs)
        args, in_specs = (inputs, h0, weights), (seq_spec, batch_spec, P())
    else:
        def body(x, h, w, lengths):
            return sparse_rnn(x, h, w, seq_lengths=lengths, **kwargs)
        # Inside shard_map the lengths are traced: check them here, on the whole batch.
        seq_lengths = check_seq_lengths(seq_lengths, batch, inputs.shape[0 if time_major else 1])
        args, in_specs = (inputs, h0, weights, seq_lengths), (seq_spec, batch_spec, P(), batch_spec)
    # Our primitives carry no varying-manual-axes rule, so the per-device type check is off.
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(seq_spec, batch_spec),
                       check_vma=False)
    return fn(*args)


__all__ = ["sparse_rnn_sharded", "batch_sharding"]
