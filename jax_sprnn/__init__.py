"""jax_sprnn: sparse persistent RNNs for JAX.

A pruned recurrent kernel is packed into an on-chip layout (:class:`SparseWeights`) and the whole
recurrence runs in one native call (:func:`sparse_rnn`): a persistent CUDA kernel on NVIDIA GPUs, a
C++ kernel on CPU, pure JAX elsewhere.

The submodules are imported on their own: ``jax_sprnn.pruning`` (masks, the gradual schedule,
export to the packed form), ``jax_sprnn.flax`` and ``jax_sprnn.nnx`` (Flax modules; they need
``pip install 'jax_sprnn[flax]'``), ``jax_sprnn.sharding`` and ``jax_sprnn.export``. The planner,
the layout and the execution paths live in ``jax_sprnn.planner``, ``jax_sprnn.layout`` and
``jax_sprnn.api``.
"""

from . import _native  # noqa: F401 (imported to register the FFI targets)
from .api import sparse_rnn
from .planner import DeviceSpec
from .reference import reference_rnn
from .weights import SparseWeights

__version__ = "0.1.0"

__all__ = ["SparseWeights", "sparse_rnn", "reference_rnn", "DeviceSpec"]
