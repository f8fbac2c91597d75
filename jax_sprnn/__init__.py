"""jax_sprnn: sparse persistent RNNs for JAX.

A pruned recurrent kernel is packed into an on-chip layout (:class:`SparseWeights`) and the whole
recurrence runs in one native call (:func:`sparse_rnn`): a persistent CUDA kernel on NVIDIA GPUs, a
C++ kernel on CPU, pure JAX elsewhere.
"""

from . import _native  # registers the FFI targets
from .api import METHODS, sparse_rnn
from .layout import LayoutMeta, bank_conflicts
from .planner import H200, DeviceSpec, Plan, plan_layout
from .reference import reference_rnn
from .weights import SparseWeights, magnitude_mask

__version__ = "0.1.0"

__all__ = [
    "SparseWeights", "sparse_rnn", "reference_rnn", "magnitude_mask", "plan_layout", "DeviceSpec",
    "Plan", "H200", "LayoutMeta", "bank_conflicts", "METHODS",
]
