"""Data parallelism for :func:`jax_sprnn.sparse_rnn`: the batch split over a device mesh.

Nothing here is needed for it: under ``jax.jit`` (or pjit, or Flax's partitioning) the primitives
split themselves over a batch-sharded input (:mod:`jax_sprnn._partitioning`). Every device runs the
recurrence on its own shard of the batch with the replicated weights, no activation crosses devices,
and the weight gradient is summed over the batch's mesh axes with one all-reduce.

This module keeps two conveniences: :func:`batch_sharding`, the ``NamedSharding`` that splits the
batch, and :func:`sparse_rnn_sharded`, ``sparse_rnn`` with its inputs constrained to that sharding.

docs/distributed.md shows a whole data-parallel training step across GPUs and hosts.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._checks import as_array, check_weights
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
    if not 0 <= batch_dim < ndim:
        raise ValueError(f"batch_dim must lie in [0, ndim={ndim}), got {batch_dim}")
    axes = _batch_axes(mesh, batch_axis)
    spec = [None] * ndim
    spec[batch_dim] = _spec_entry(axes)
    return NamedSharding(mesh, P(*spec))


def sparse_rnn_sharded(inputs, h0, weights: SparseWeights, *, mesh: Mesh, batch_axis="data",
                       activation: str = "tanh", time_major: bool = False, reverse: bool = False,
                       seq_lengths=None, method: str = "auto"):
    """:func:`jax_sprnn.sparse_rnn` with its inputs' batch split over ``mesh``.

    ``sparse_rnn`` itself splits over a batch-sharded input; this only constrains ``inputs`` and
    ``h0`` to :func:`batch_sharding` first, for inputs that arrive with another sharding (or
    none). Same arguments and results as ``sparse_rnn``, plus ``mesh`` and ``batch_axis`` (a mesh
    axis name, or a tuple of names whose product splits the batch). The batch must divide evenly.
    """
    axes = _batch_axes(mesh, batch_axis)
    check_weights(weights, 1)
    inputs = as_array(inputs)
    if inputs.ndim != 3:
        raise ValueError(f"inputs must be {'[T, B, H]' if time_major else '[B, T, H]'}, got shape "
                         f"{tuple(inputs.shape)}")
    batch_dim = 1 if time_major else 0
    devices = math.prod(mesh.shape[a] for a in axes)
    if inputs.shape[batch_dim] % devices:
        raise ValueError(f"the batch ({inputs.shape[batch_dim]}) must be divisible by the "
                         f"{devices} devices of mesh axes {axes}")
    constrain = jax.lax.with_sharding_constraint
    inputs = constrain(inputs, batch_sharding(mesh, axes, ndim=3, batch_dim=batch_dim))
    h0 = as_array(h0)
    if h0.ndim == 2:  # else sparse_rnn says what h0 must be
        h0 = constrain(h0, batch_sharding(mesh, axes, ndim=2))
    return sparse_rnn(inputs, h0, weights, activation=activation, time_major=time_major,
                      reverse=reverse, seq_lengths=seq_lengths, method=method)


__all__ = ["sparse_rnn_sharded", "batch_sharding"]
