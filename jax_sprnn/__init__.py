"""jax_sprnn: sparse persistent RNNs for JAX.

A pruned recurrent kernel is packed into an on-chip layout (:class:`SparseWeights`) and the whole
recurrence runs in one native call (:func:`sparse_rnn`): a persistent CUDA kernel on NVIDIA GPUs, a
C++ kernel on CPU, pure JAX elsewhere. :func:`reference_rnn` is the dense ``lax.scan`` truth;
:func:`grad` and :func:`value_and_grad` differentiate functions of SparseWeights (whose index leaves
``jax.grad`` refuses).

``jax_sprnn.export`` (``jax.export`` for programs that call jax_sprnn) is imported with the
package: it registers how exported programs serialize SparseWeights arguments. The other
submodules are imported on their own: ``jax_sprnn.pruning`` (masks, the gradual schedule, export to
the packed form), ``jax_sprnn.flax`` and ``jax_sprnn.nnx`` (Flax modules; they need
``pip install 'jax_sprnn[flax]'``) and ``jax_sprnn.sharding``. The planner, the layout and the
execution paths live in ``jax_sprnn.planner``, ``jax_sprnn.layout`` and ``jax_sprnn.api``.
"""

from . import _native  # noqa: F401 (imported to register the FFI targets)
from . import export  # noqa: F401 (jax_sprnn.export; registers SparseWeights' export serialization)
from .api import sparse_rnn
from .autodiff import grad, value_and_grad
from .bidirectional import sparse_rnn_bidirectional
from .gated import sparse_gru, sparse_lstm
from .gated_bidirectional import sparse_gru_bidirectional, sparse_lstm_bidirectional
from .planner import DeviceSpec
from .reference import reference_rnn
from .weights import SparseWeights

__version__ = "0.1.0"

__all__ = ["SparseWeights", "sparse_rnn", "sparse_rnn_bidirectional", "reference_rnn", "DeviceSpec",
           "grad", "value_and_grad", "sparse_lstm", "sparse_gru", "sparse_lstm_bidirectional",
           "sparse_gru_bidirectional"]
