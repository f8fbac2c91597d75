"""Flax linen modules for sparse recurrent layers.

* :class:`SparseRNNCell`: one step, ``h' = act(x W_i + b + h W_h)``, for ``nn.RNN``, ``nn.scan`` and
  step-by-step decoding. Its parameters are ``nn.SimpleCell``'s.
* :class:`SparseRNN`: the whole sequence in one :func:`jax_sprnn.sparse_rnn` call (the persistent
  kernel on a GPU), a drop-in for ``nn.RNN(nn.SimpleCell(features))`` with ``nn.RNN``'s call
  keywords and its parameters.
* :class:`SparseBidirectional`: both directions in one :func:`jax_sprnn.sparse_rnn_bidirectional`
  call, a drop-in for ``nn.Bidirectional`` of two ``nn.RNN(nn.SimpleCell)``.
* :class:`SparseLSTMCell`, :class:`SparseGRUCell` (``nn.LSTMCell``'s and ``nn.GRUCell``'s
  parameters) and the fused :class:`SparseLSTM`, :class:`SparseGRU`, drop-ins for ``nn.RNN`` of
  those cells; their mask covers the gates' recurrent kernels side by side, at the joined path
  ``cell/hi+hf+hg+ho/kernel`` (docs/flax.md, LSTM and GRU).

Parameters: the cell's are ``nn.SimpleCell``'s, and the layer's are ``nn.RNN(nn.SimpleCell)``'s,
which keeps them under ``'cell'``. Names, nesting, shapes and dtypes are the same, so those
checkpoints load unchanged::

    SparseRNNCell:  {'i': {'kernel': [F, H], 'bias': [H]}, 'h': {'kernel': [H, H]}}
    SparseRNN:      {'cell': {'i': {'kernel': [F, H], 'bias': [H]}, 'h': {'kernel': [H, H]}}}

``SparseRNN`` also keeps the mask of ``cell/h/kernel``, packed for the kernel, in a variable
collection that mirrors the parameter path::

    sparsity: {'cell': {'h': {'kernel': jax_sprnn.pruning.PackedMask}}}

``model.init`` creates it; pass it to ``apply`` with the params (``model.apply(variables, x)``
does). The mask is data: a new mask from :func:`jax_sprnn.pruning.update_sparsity` does not
recompile a jitted step. Without the collection (``apply({'params': params}, x)``, e.g. the params
of an ``nn.RNN`` checkpoint) the layer runs dense, through the all-ones mask, and warns once. After
training, :func:`jax_sprnn.pruning.to_inference` replaces the mask with the packed weights
(``SparseWeights``), which ``SparseRNN`` then runs directly.

The cell has no mask variable: ``nn.RNN`` scans only the ``params`` collection. The cell's mask is
the zeros of its kernel, which the pruning tools keep at exactly zero, so the same parameters give
the same outputs in both modules.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any, ClassVar

if importlib.util.find_spec("flax") is None:  # an extra, not a dependency of jax_sprnn
    raise ModuleNotFoundError("jax_sprnn.flax needs Flax: pip install 'jax_sprnn[flax]'", name="flax")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init

from . import _flax_serialization  # noqa: F401 (msgpack of PackedMask, SparseWeights)
from . import pruning
from ._checks import ACTIVATIONS, check_method
from ._modules import (GRU, LSTM, Gated, activation_name, cached_initial_mask, check_carry,
                       check_features, dense_layout, flip_padded, gate_mask, initial_layout,
                       masked_init, run_bidirectional, run_sequence, sequence_shape,
                       simple_bidirectional, simple_recurrence, storage_dtype, warn_no_mask_once)
from .pruning import COLLECTION, PackedMask
from .pruning.tree import JOIN
from .weights import SparseWeights

Initializer = Any


class _SimpleRNNAttributes(nn.Module):
    """The attributes, and the carry, of both linen layers (documented on :class:`SparseRNNCell`)."""

    features: int
    max_density: float = 1.0
    activation_fn: Any = "tanh"
    kernel_init: Initializer = default_kernel_init
    recurrent_kernel_init: Initializer = initializers.orthogonal()
    bias_init: Initializer = initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Initializer = initializers.zeros_init()
    mask_seed: int = 0
    precision: Any = None

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]):
        """The initial carry ``[*batch, H]`` for one step's input shape ``[*batch, F]``."""
        return self.carry_init(rng, tuple(input_shape[:-1]) + (self.features,), self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class SparseRNNCell(_SimpleRNNAttributes, nn.RNNCellBase):
    """A simple recurrent cell with a pruned recurrent kernel: ``h' = act(x W_i + b + h W_h)``.

    Drop-in for ``nn.SimpleCell`` (same parameter names and shapes: ``i/kernel [F, H]``,
    ``i/bias [H]``, ``h/kernel [H, H]``), for use inside ``nn.RNN``, ``nn.scan`` or a decoding loop
    that calls it step by step. The step is a dense matvec with the kernel's zeros as the mask
    (per-step sparse products are slower than dense ones; the sparse kernel pays off over a
    whole sequence, in :class:`SparseRNN`). ``h/kernel`` starts masked by the layer's initial mask
    (:func:`jax_sprnn.pruning.initial_mask`) and the pruning tools keep pruned weights at zero.

    Attributes:
      features: the hidden size ``H``.
      max_density: the density the layer starts from and never exceeds (1.0: start dense and
        prune gradually). Must match the :class:`SparseRNN` it shares parameters with.
      activation_fn: ``"tanh"``, ``"relu"``, ``"identity"``, or ``jnp.tanh`` / ``jax.nn.relu``.
      kernel_init, recurrent_kernel_init, bias_init: initializers of ``i/kernel``, ``h/kernel``
        and ``i/bias`` (``nn.SimpleCell``'s defaults).
      dtype, param_dtype: the computation and parameter dtypes, as in Flax.
      carry_init: initializer of the carry.
      mask_seed: seed of the initial mask when ``max_density < 1``.
      precision: precision of the two matmuls.
    """

    @nn.compact
    def __call__(self, carry, inputs):
        """One step. ``carry``: ``[*batch, H]``; ``inputs``: ``[*batch, F]``. Returns
        ``(new_carry, output)``, both the new state ``[*batch, H]``."""
        hidden = check_features(self.features)
        act = ACTIVATIONS[activation_name(self.activation_fn)]
        pruning.budgets_for_density(hidden, self.max_density)  # validates max_density
        check_carry(carry, hidden)
        mask = functools.partial(cached_initial_mask, hidden, float(self.max_density),
                                 self.mask_seed)
        dense_h = nn.Dense(hidden, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=masked_init(self.recurrent_kernel_init, mask),
                           precision=self.precision, name="h")
        dense_i = nn.Dense(hidden, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=self.kernel_init, bias_init=self.bias_init,
                           precision=self.precision, name="i")
        new_carry = act(dense_i(inputs) + dense_h(carry))
        return new_carry, new_carry


_NO_MASK = ("jax_sprnn.flax.{layer} got no mask (no '" + COLLECTION + "' collection in apply's "
            "variables), so it runs dense: every weight of its recurrent kernel counts. To prune "
            "it, take the collection from init (sparsity = model.init(key, x)['" + COLLECTION +
            "']), prune with params, sparsity = jax_sprnn.pruning.update_sparsity(params, "
            "sparsity, target), and apply both: model.apply({{'params': params, '" + COLLECTION +
            "': sparsity}}, x).")


def _mask_or_weights(module: nn.Module, *, hidden: int, gates: int, max_density: float,
                     mask_seed: int, dtype: np.dtype, layer: str):
    """In ``module``'s scope (the path of a recurrent kernel's mask): the mask, a PackedMask of
    the kernel ``[H, gates*H]`` (``init`` creates it), or the packed weights of the inference
    form (:func:`jax_sprnn.pruning.to_inference`), a SparseWeights. When the collection holds
    nothing and cannot be written (``apply`` with params alone), the all-ones mask, with a
    one-time warning that the layer runs dense. Only ``init`` creates a mask."""
    shape = (hidden, gates * hidden)
    if module.has_variable(COLLECTION, "kernel"):
        stored = module.get_variable(COLLECTION, "kernel")
        if isinstance(stored, SparseWeights):
            if stored.shape != shape:
                raise ValueError(f"the packed weights in '{COLLECTION}' at {module.path} are "
                                 f"{stored.shape}, the layer's kernel {shape}")
            return stored if stored.dtype == dtype else stored.astype(dtype)
        if not isinstance(stored, PackedMask):
            raise TypeError(f"variables['{COLLECTION}'] must hold a jax_sprnn.pruning."
                            f"PackedMask (or SparseWeights) at {module.path}, got "
                            f"{type(stored).__name__} (a checkpoint restored without a "
                            f"target? jax_sprnn.pruning.from_restored reads the inference "
                            f"form back; restore the training form with a target)")
    # Only init creates the mask: an apply that may write the collection (mutable=True) with
    # params alone would otherwise prune loaded dense weights by a random pattern, silently.
    if module.has_variable(COLLECTION, "kernel") or module.is_initializing():
        layout = module.variable(COLLECTION, "kernel", initial_layout, hidden, float(max_density),
                                 mask_seed, dtype.name, gates).value
    else:
        warn_no_mask_once(_NO_MASK.format(layer=layer))
        layout = dense_layout(hidden, dtype.name, gates)
    if layout.shape != shape:
        raise ValueError(f"the mask in '{COLLECTION}' at {module.path} is {layout.shape}, the "
                         f"layer's kernel {shape}")
    return layout


class SparseKernel(nn.Module):
    """The recurrent kernel ``cell/h/kernel [H, H]`` of :class:`SparseRNN` and its packed mask
    (``sparsity/cell/h/kernel``). Returns the :class:`SparseWeights` for one ``sparse_rnn`` call.

    When the sparsity collection holds ``SparseWeights`` instead of a mask (the inference form of
    :func:`jax_sprnn.pruning.to_inference`) they are returned as they are and ``params`` needs no
    kernel. When it holds nothing for this kernel and cannot be written (``apply`` with params
    alone), the kernel runs dense, through the all-ones mask, with a one-time warning.
    """

    features: int
    max_density: float = 1.0
    kernel_init: Initializer = initializers.orthogonal()
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # the storage dtype of the packed weights
    mask_seed: int = 0
    layer: str = "SparseRNN"  # the layer named by the no-mask warning

    @nn.compact
    def __call__(self) -> SparseWeights:
        hidden = self.features
        dtype = np.dtype(self.dtype)
        stored = _mask_or_weights(self, hidden=hidden, gates=1, max_density=self.max_density,
                                  mask_seed=self.mask_seed, dtype=dtype, layer=self.layer)
        if isinstance(stored, SparseWeights):
            return stored
        # The init mask comes from the host (the variable's value may be a tracer of a lifted
        # transform here); it is the same pattern the variable starts from.
        init_mask = functools.partial(cached_initial_mask, hidden, float(self.max_density),
                                      self.mask_seed)
        kernel = self.param("kernel", masked_init(self.kernel_init, init_mask), (hidden, hidden),
                            self.param_dtype)
        return stored.weights(kernel, dtype)


class FusedCell(nn.Module):
    """The parameters of :class:`SparseRNN`, at ``'cell'`` where ``nn.RNN`` keeps its cell's, with
    ``nn.SimpleCell``'s names: ``i`` (the input projection) and ``h`` (the recurrent kernel, and
    its mask in the sparsity collection). Returns ``(x W_i + b, SparseWeights)`` for all steps of
    ``inputs`` at once: the projection is one matmul, the recurrence one ``sparse_rnn`` call."""

    features: int
    max_density: float = 1.0
    kernel_init: Initializer = default_kernel_init
    recurrent_kernel_init: Initializer = initializers.orthogonal()
    bias_init: Initializer = initializers.zeros_init()
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32  # the recurrence's dtype
    mask_seed: int = 0
    precision: Any = None
    layer: str = "SparseRNN"

    @nn.compact
    def __call__(self, inputs) -> tuple[jax.Array, SparseWeights]:
        # 'h' before 'i', as nn.SimpleCell creates them.
        weights = SparseKernel(self.features, self.max_density, self.recurrent_kernel_init,
                               self.param_dtype, self.dtype, self.mask_seed, self.layer,
                               name="h")()
        x = nn.Dense(self.features, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, bias_init=self.bias_init,
                     precision=self.precision, name="i")(inputs)
        return x, weights


class SparseRNN(_SimpleRNNAttributes):
    """A simple recurrent layer over a whole sequence in one sparse persistent kernel call.

    A drop-in for ``nn.RNN(nn.SimpleCell(features))``: the same parameters (``cell/i/kernel``,
    ``cell/i/bias``, ``cell/h/kernel``), plus the packed mask of ``cell/h/kernel`` in the
    ``'sparsity'`` collection (without it the layer runs dense and warns once). The input
    projection ``x W_i + b`` of all steps is one matmul; the recurrence
    ``h_t = act(x_t W_i + b + h_{t-1} W_h)`` runs in :func:`jax_sprnn.sparse_rnn`.

    Inputs are ``[*batch, T, F]`` (``[T, *batch, F]`` when ``time_major``); the carry is
    ``[*batch, H]``. Outputs are in the recurrence dtype (``dtype``, else ``param_dtype``).

    Differences from ``nn.RNN``, where ``nn.RNN`` gives values that depend on padding: past an
    example's ``seq_lengths`` its outputs are zero, and an example of length 0 returns its initial
    carry.

    Attributes:
      features, max_density, activation_fn, kernel_init, recurrent_kernel_init, bias_init,
        param_dtype, carry_init, mask_seed, precision: as in :class:`SparseRNNCell`.
      dtype: the dtype of the recurrence and its packed weights (float32, bfloat16 or float16;
        default ``param_dtype``).
      time_major, return_carry, reverse, keep_order: defaults of the call keywords, as in
        ``nn.RNN``.
      method: ``sparse_rnn``'s ``method`` (``"auto"``, ``"native"`` or ``"reference"``).
      mesh, batch_axis: with a ``jax.sharding.Mesh``, the batch is split over the mesh axes
        ``batch_axis`` and every device runs the recurrence on its shard
        (:func:`jax_sprnn.sharding.sparse_rnn_sharded`).
    """

    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    method: str = "auto"
    mesh: Any = None
    batch_axis: Any = "data"

    @nn.compact
    def __call__(self, inputs, *, initial_carry=None, init_key=None, seq_lengths=None,
                 return_carry: bool | None = None, time_major: bool | None = None,
                 reverse: bool | None = None, keep_order: bool | None = None):
        """Run the layer over ``inputs``; the keywords override the attributes as in ``nn.RNN``.

        Args:
          inputs: ``[*batch, T, F]``, or ``[T, *batch, F]`` when ``time_major``.
          initial_carry: ``[*batch, H]``; default from :meth:`initialize_carry`.
          init_key: PRNG key for ``carry_init`` (default ``jax.random.key(0)``).
          seq_lengths: optional ``[*batch]`` integers in ``[0, T]``.
          return_carry: also return the final carry.
          time_major: the layout of ``inputs`` and outputs.
          reverse: process the sequence from its last valid step to its first.
          keep_order: with ``reverse``, return the outputs at their positions; otherwise (as
            ``nn.RNN`` does) in processing order, padding kept at the end.

        Returns:
          ``outputs`` (``[*batch, T, H]`` or ``[T, *batch, H]``), or ``(carry, outputs)``.
        """
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        hidden = check_features(self.features)
        activation = activation_name(self.activation_fn)
        dtype = storage_dtype(self.dtype, self.param_dtype)
        check_method(self.method)
        inputs, steps, batch_shape = sequence_shape(inputs, time_major)
        x, weights = FusedCell(hidden, self.max_density, self.kernel_init,
                               self.recurrent_kernel_init, self.bias_init, self.param_dtype, dtype,
                               self.mask_seed, self.precision, name="cell")(inputs)
        if initial_carry is None:
            key = jax.random.key(0) if init_key is None else init_key
            initial_carry = self.initialize_carry(key, batch_shape + (inputs.shape[-1],))
        recurrence = simple_recurrence(activation=activation, method=self.method, mesh=self.mesh,
                                       batch_axis=self.batch_axis)
        carry, y = run_sequence(x, weights, initial_carry, seq_lengths, steps=steps,
                                batch_shape=batch_shape, dtype=dtype, time_major=time_major,
                                reverse=reverse, keep_order=keep_order, recurrence=recurrence)
        return (carry, y) if return_carry else y


class RNNLevel(nn.Module):
    """The level that ``nn.RNN`` adds to the parameter tree: its cell, at ``'cell'``. Runs the
    cell (a :class:`FusedCell`) on the whole sequence; the recurrence is the caller's."""

    cell: nn.Module

    def __call__(self, inputs):
        return self.cell(inputs)


class _TwoDirections:
    """What a bidirectional layer adds to its cell's attributes: a carry for each direction."""

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]):
        """``(forward, backward)`` initial carries for one step's input shape ``[*batch, F]``
        (each as the cell makes it), from two keys split from ``rng``."""
        one = super().initialize_carry
        return tuple(one(key, input_shape) for key in jax.random.split(rng))

    @nn.nowrap
    def _default_carries(self, init_key, step_shape: tuple[int, ...]):
        """A call's carries where it gives none: from ``init_key`` split between the directions,
        or both from ``jax.random.key(0)``, as ``nn.Bidirectional`` does."""
        if init_key is not None:
            return self.initialize_carry(init_key, step_shape)
        one = super().initialize_carry(jax.random.key(0), step_shape)
        return one, one


class SparseBidirectional(_TwoDirections, _SimpleRNNAttributes):
    """A bidirectional simple recurrent layer; both directions run in one
    :func:`jax_sprnn.sparse_rnn_bidirectional` call.

    A drop-in for ``nn.Bidirectional(nn.RNN(nn.SimpleCell(features)),
    nn.RNN(nn.SimpleCell(features)))`` with the default merge (concatenation, forward features
    first): the same parameters (``forward_rnn/cell/{i,h}`` and ``backward_rnn/cell/{i,h}``), and
    the packed masks of both recurrent kernels at the same paths in the ``'sparsity'`` collection
    (without it the layer runs dense and warns once). Both directions start from the same
    initial mask (``mask_seed``); pruning then gives each its own.

    Outputs are ``[*batch, T, 2H]`` (``[T, *batch, 2H]`` when ``time_major``); past an example's
    ``seq_lengths`` they are zero in both halves.

    Attributes:
      features, max_density, activation_fn, kernel_init, recurrent_kernel_init, bias_init, dtype,
        param_dtype, carry_init, mask_seed, precision: as in :class:`SparseRNN`, for both
        directions.
      time_major, return_carry: defaults of the call keywords, as in ``nn.Bidirectional``.
      method: ``sparse_rnn``'s ``method``.
    """

    time_major: bool = False
    return_carry: bool = False
    method: str = "auto"

    @nn.compact
    def __call__(self, inputs, *, initial_carry=None, init_key=None, seq_lengths=None,
                 return_carry: bool | None = None, time_major: bool | None = None,
                 reverse: bool | None = None, keep_order: bool | None = None):
        """Run both directions over ``inputs``; keywords as in ``nn.Bidirectional``.

        Args:
          inputs: ``[*batch, T, F]``, or ``[T, *batch, F]`` when ``time_major``.
          initial_carry: ``(forward, backward)``, each ``[*batch, H]``; default from
            ``carry_init``.
          init_key: PRNG key for ``carry_init``, split between the directions (default: both use
            ``jax.random.key(0)``, as ``nn.Bidirectional`` does).
          seq_lengths: optional ``[*batch]`` integers in ``[0, T]``, for both directions.
          return_carry: also return the final carries.
          time_major: the layout of ``inputs`` and outputs.
          reverse, keep_order: accepted and ignored, as ``nn.Bidirectional`` does.

        Returns:
          ``outputs``, or ``((carry_forward, carry_backward), outputs)``.
        """
        del reverse, keep_order  # nn.Bidirectional's signature; each direction has its own
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        hidden = check_features(self.features)
        activation = activation_name(self.activation_fn)
        dtype = storage_dtype(self.dtype, self.param_dtype)
        check_method(self.method)
        inputs, steps, batch_shape = sequence_shape(inputs, time_major)
        directions = []
        for name in ("forward_rnn", "backward_rnn"):
            cell = FusedCell(hidden, self.max_density, self.kernel_init,
                             self.recurrent_kernel_init, self.bias_init, self.param_dtype, dtype,
                             self.mask_seed, self.precision, "SparseBidirectional", parent=None)
            directions.append(RNNLevel(cell, name=name)(inputs))
        if initial_carry is None:
            initial_carry = self._default_carries(init_key, batch_shape + (inputs.shape[-1],))
        carry, y = run_bidirectional(tuple(x for x, _ in directions),
                                     tuple(w for _, w in directions), initial_carry, seq_lengths,
                                     steps=steps, batch_shape=batch_shape, dtype=dtype,
                                     time_major=time_major,
                                     call=simple_bidirectional(activation=activation,
                                                               method=self.method))
        return (carry, y) if return_carry else y


# ---- gated cells: LSTM and GRU -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _LinenGates:
    """A gated cell's parameter names in Flax linen (``nn.LSTMCell``, ``nn.GRUCell``), in gate
    order, and which of its Dense layers have a bias."""

    cell: Gated
    inputs: tuple[str, ...]
    recurrent: tuple[str, ...]
    input_bias: bool
    recurrent_bias: tuple[bool, ...]


_LSTM = _LinenGates(LSTM, ("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho"), False, (True,) * 4)
_GRU = _LinenGates(GRU, ("ir", "iz", "in"), ("hr", "hz", "hn"), True, (False, False, True))


class GateParams(nn.Module):
    """The parameters of one of a gated cell's Dense layers (``ii``, ``hi``, ...), without its
    matmul: ``kernel [in_features, features]`` (none when ``with_kernel`` is False: the inference
    form keeps the recurrent kernels packed) and ``bias [features]`` when ``use_bias``."""

    in_features: int
    features: int
    use_bias: bool
    kernel_init: Initializer
    bias_init: Initializer
    param_dtype: Any
    with_kernel: bool = True

    @nn.compact
    def __call__(self):
        kernel = (self.param("kernel", self.kernel_init, (self.in_features, self.features),
                             self.param_dtype) if self.with_kernel else None)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return kernel, bias


class MaskSlot(nn.Module):
    """The sparsity entry of a gated kernel ``[H, G*H]``, at the joined path of its gates' kernels
    (``cell/hi+hf+hg+ho/kernel``, see :mod:`jax_sprnn.pruning.tree`): its PackedMask, or the
    packed weights of the inference form."""

    hidden: int
    gates: int
    max_density: float
    mask_seed: int
    dtype: Any
    layer: str

    @nn.compact
    def __call__(self):
        return _mask_or_weights(self, hidden=self.hidden, gates=self.gates,
                                max_density=self.max_density, mask_seed=self.mask_seed,
                                dtype=np.dtype(self.dtype), layer=self.layer)


def _side_by_side(arrays, features: int, dtype):
    """The gates' kernels or biases concatenated on the last axis (zeros for a missing bias)."""
    return jnp.concatenate([jnp.zeros((features,), dtype) if a is None else a for a in arrays],
                           axis=-1)


class _GatedAttributes(nn.Module):
    """The attributes, the carry and the parameters of the linen gated cells and layers
    (documented on :class:`SparseLSTMCell`)."""

    features: int
    max_density: float = 1.0
    kernel_init: Initializer = default_kernel_init
    recurrent_kernel_init: Initializer = initializers.orthogonal()
    bias_init: Initializer = initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Initializer = initializers.zeros_init()
    mask_seed: int = 0
    precision: Any = None

    GATES: ClassVar[_LinenGates]

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]):
        """The initial carry for one step's input shape ``[*batch, F]``, as Flax's cell makes
        it: ``(c, h)`` from two keys split from ``rng`` (LSTM), or ``h`` (GRU), each
        ``[*batch, H]``."""
        shape = tuple(input_shape[:-1]) + (self.features,)
        if self.GATES.cell.carry is None:
            return self.carry_init(rng, shape, self.param_dtype)
        return tuple(self.carry_init(key, shape, self.param_dtype)
                     for key in jax.random.split(rng, len(self.GATES.cell.carry)))

    @property
    def num_feature_axes(self) -> int:
        return 1

    @nn.nowrap
    def _fused_cell_args(self, inputs, time_major: bool):
        """What a gated layer checks and builds first: ``(inputs, steps, batch_shape, args)``, the
        inputs with their steps and batch dimensions, and the :class:`FusedGatedCell` keywords."""
        check_features(self.features)
        dtype = storage_dtype(self.dtype, self.param_dtype)
        check_method(self.method)
        inputs, steps, batch_shape = sequence_shape(inputs, time_major)
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(_GatedAttributes)
                  if f.name not in ("parent", "name")}
        args = dict(shared, dtype=dtype, gates=self.GATES, layer=type(self).__name__)
        return inputs, steps, batch_shape, args

    @nn.nowrap
    def _gate_params(self, gates: _LinenGates, in_features: int, *, with_recurrent: bool = True):
        """Create (in a compact method) the parameters of Flax's cell, and return them side by
        side: ``(W_i [F, G*H], b_i [G*H], W_h [H, G*H] or None, b_h [G*H])``, missing biases
        zero. The recurrent kernels start masked by the layer's initial mask."""
        hidden = self.features
        count = gates.cell.gates
        mask = functools.partial(gate_mask, hidden, float(self.max_density), self.mask_seed, count)
        w_i, b_i, w_h, b_h = [], [], [], []
        for g, (name_i, name_h) in enumerate(zip(gates.inputs, gates.recurrent)):  # Flax's order
            k, b = GateParams(in_features, hidden, gates.input_bias, self.kernel_init,
                              self.bias_init, self.param_dtype, name=name_i)()
            w_i.append(k)
            b_i.append(b)
            k, b = GateParams(hidden, hidden, gates.recurrent_bias[g],
                              masked_init(self.recurrent_kernel_init,
                                          functools.partial(mask, g)),
                              self.bias_init, self.param_dtype, with_recurrent, name=name_h)()
            w_h.append(k)
            b_h.append(b)
        dtype = self.param_dtype
        return (jnp.concatenate(w_i, axis=-1), _side_by_side(b_i, hidden, dtype),
                jnp.concatenate(w_h, axis=-1) if with_recurrent else None,
                _side_by_side(b_h, hidden, dtype))


class _SparseGatedCell(_GatedAttributes, nn.RNNCellBase):
    @nn.compact
    def __call__(self, carry, inputs):
        """One step. ``carry``: ``(c, h)`` (LSTM) or ``h`` (GRU), each ``[*batch, H]``;
        ``inputs``: ``[*batch, F]``. Returns ``(new_carry, new_h)``."""
        hidden = check_features(self.features)
        cell = self.GATES.cell
        pruning.budgets_for_density(hidden, self.max_density, cell.gates)  # validates max_density
        if cell.carry is not None:
            if not isinstance(carry, (tuple, list)) or len(carry) != len(cell.carry):
                raise ValueError(f"carry must be a tuple ({', '.join(cell.carry)}) of "
                                 f"[*batch, {hidden}] arrays, got {type(carry).__name__}")
            for part in carry:
                check_carry(part, hidden)
            h = carry[-1]
        else:
            check_carry(carry, hidden)
            h = carry
        w_i, b_i, w_h, b_h = self._gate_params(self.GATES, jnp.shape(inputs)[-1])
        inputs, h, w_i, b_i, w_h, b_h = promote_dtype(inputs, h, w_i, b_i, w_h, b_h,
                                                      dtype=self.dtype)
        zx = jnp.dot(inputs, w_i, precision=self.precision) + b_i
        zh = jnp.dot(h, w_h, precision=self.precision) + b_h
        return cell.step(carry, zx, zh)


class SparseLSTMCell(_SparseGatedCell):
    """An LSTM cell with a pruned recurrent kernel: Flax's ``nn.LSTMCell``, step for step.

    Drop-in for ``nn.LSTMCell`` (the same parameters: ``ii``, ``if``, ``ig``, ``io`` (kernels
    ``[F, H]``, no bias) and ``hi``, ``hf``, ``hg``, ``ho`` (kernels ``[H, H]`` and biases), the
    same carry ``(c, h)``), for ``nn.RNN``, ``nn.scan`` or a decoding loop. Gates are
    ``sigmoid`` / ``tanh`` (what the kernels implement). As :class:`SparseRNNCell`, the step is a
    dense matmul whose mask is the zeros of the recurrent kernels, which start masked by the
    layer's initial mask (:func:`jax_sprnn.pruning.initial_mask` with 4 gates: gate ``g``'s kernel
    is its ``g``-th ``[H, H]`` block). :class:`SparseLSTM` runs the whole sequence fused.

    Attributes:
      features: the hidden size ``H``.
      max_density: the density the layer starts from and never exceeds (1.0: start dense and
        prune gradually). Must match the :class:`SparseLSTM` it shares parameters with.
      kernel_init, recurrent_kernel_init, bias_init: initializers of the input kernels, the
        recurrent kernels and the biases (``nn.LSTMCell``'s defaults).
      dtype, param_dtype: the computation and parameter dtypes, as in Flax.
      carry_init: initializer of the carry.
      mask_seed: seed of the initial mask when ``max_density < 1``.
      precision: precision of the matmuls.
    """

    GATES = _LSTM


class SparseGRUCell(_SparseGatedCell):
    """A GRU cell with a pruned recurrent kernel: Flax's ``nn.GRUCell``, step for step.

    Drop-in for ``nn.GRUCell``: the same parameters (``ir``, ``iz``, ``in``: kernels ``[F, H]``
    and biases; ``hr``, ``hz``: kernels ``[H, H]``; ``hn``: kernel and bias, the bias inside the
    reset gate's product) and carry ``h``, so ``nn.RNN(SparseGRUCell(H))`` loads an
    ``nn.RNN(nn.GRUCell(H))`` checkpoint unchanged. Attributes as :class:`SparseLSTMCell`; the
    fused layer is :class:`SparseGRU`.
    """

    GATES = _GRU


class FusedGatedCell(_GatedAttributes):
    """The parameters of :class:`SparseLSTM` / :class:`SparseGRU` at ``'cell'``, with the names
    of Flax's cell, and the mask of their recurrent kernels side by side (``[H, G*H]``) at the
    joined path (``'hi+hf+hg+ho'``). Returns ``(x, weights, hn_bias)`` for all steps at once: the
    input projection ``[..., G*H]`` (with the recurrent biases that add to it), the packed
    recurrent kernel, and the GRU's ``hn`` bias (None for the LSTM)."""

    gates: Any = None  # a _LinenGates
    layer: str = ""

    @nn.compact
    def __call__(self, inputs):
        cell, hidden, dtype = self.gates.cell, self.features, np.dtype(self.dtype)
        stored = MaskSlot(hidden, cell.gates, float(self.max_density), self.mask_seed, dtype.name,
                          self.layer, name=JOIN.join(self.gates.recurrent))()
        packed = isinstance(stored, SparseWeights)
        w_i, b_i, w_h, b_h = self._gate_params(self.gates, jnp.shape(inputs)[-1],
                                               with_recurrent=not packed)
        weights = stored if packed else stored.weights(w_h, dtype)
        inputs, w_i, b_i = promote_dtype(inputs, w_i, b_i, dtype=dtype)
        x = jnp.dot(inputs, w_i, precision=self.precision) + b_i
        if cell is LSTM:  # every recurrent bias adds to the pre-activation: fold it in
            return x + b_h.astype(x.dtype), weights, None
        return x, weights, b_h[2 * hidden:]  # GRU: only hn has one, inside r's product


class _SparseGatedLayer(_GatedAttributes):
    time_major: bool = False
    return_carry: bool = False
    reverse: bool = False
    keep_order: bool = False
    method: str = "auto"

    @nn.compact
    def __call__(self, inputs, *, initial_carry=None, init_key=None, seq_lengths=None,
                 return_carry: bool | None = None, time_major: bool | None = None,
                 reverse: bool | None = None, keep_order: bool | None = None):
        """Run the layer over ``inputs``; the keywords override the attributes as in ``nn.RNN``
        (see :meth:`SparseRNN.__call__`). ``initial_carry``: ``(c, h)`` for the LSTM, ``h`` for
        the GRU, each ``[*batch, H]``. Returns ``outputs`` (``[*batch, T, H]`` or
        ``[T, *batch, H]``), or ``(carry, outputs)``."""
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        inputs, steps, batch_shape, args = self._fused_cell_args(inputs, time_major)
        dtype = args["dtype"]
        x, weights, hn_bias = FusedGatedCell(**args, name="cell")(inputs)
        if initial_carry is None:
            key = jax.random.key(0) if init_key is None else init_key
            initial_carry = self.initialize_carry(key, batch_shape + (inputs.shape[-1],))
        cell = self.GATES.cell
        carry, y = run_sequence(x, weights, initial_carry, seq_lengths, steps=steps,
                                batch_shape=batch_shape, dtype=dtype, time_major=time_major,
                                reverse=reverse, keep_order=keep_order,
                                recurrence=cell.recurrence(method=self.method, hn_bias=hn_bias),
                                carry_parts=cell.carry)
        return (carry, y) if return_carry else y


class SparseLSTM(_SparseGatedLayer):
    """An LSTM layer over a whole sequence in one :func:`jax_sprnn.sparse_lstm` call.

    A drop-in for ``nn.RNN(nn.LSTMCell(features))``: the same parameters (``cell/ii``, ...,
    ``cell/ho``, see :class:`SparseLSTMCell`), the same call keywords (``initial_carry``,
    ``init_key``, ``seq_lengths``, ``return_carry``, ``time_major``, ``reverse``,
    ``keep_order``) and carry ``(c, h)``. The four recurrent kernels run side by side as one
    kernel ``[H, 4H]`` (gates i, f, g, o), whose packed mask is in the ``'sparsity'`` collection at
    ``cell/hi+hf+hg+ho/kernel``; without it the layer runs dense and warns once. The input
    projection of all steps is one matmul, the recurrent biases folded into it.

    Past an example's ``seq_lengths`` its outputs are zero and an example of length 0 returns its
    initial carry (``nn.RNN`` gives padding-dependent values there).

    Attributes:
      features, max_density, kernel_init, recurrent_kernel_init, bias_init, param_dtype,
        carry_init, mask_seed, precision: as in :class:`SparseLSTMCell`.
      dtype: the dtype of the recurrence and its packed weights (float32, bfloat16 or float16;
        default ``param_dtype``).
      time_major, return_carry, reverse, keep_order: defaults of the call keywords.
      method: ``sparse_lstm``'s ``method``.
    """

    GATES = _LSTM


class SparseGRU(_SparseGatedLayer):
    """A GRU layer over a whole sequence in one :func:`jax_sprnn.sparse_gru` call.

    A drop-in for ``nn.RNN(nn.GRUCell(features))``: the same parameters (see
    :class:`SparseGRUCell`), call keywords and carry ``h``. The recurrent kernels ``hr``, ``hz``,
    ``hn`` run side by side as one kernel ``[H, 3H]`` (gates r, z, n), whose packed mask is at
    ``cell/hr+hz+hn/kernel`` in the ``'sparsity'`` collection; ``hn``'s bias is
    ``sparse_gru``'s ``hn_bias``. Otherwise as :class:`SparseLSTM`.
    """

    GATES = _GRU


class _SparseGatedBidirectional(_TwoDirections, _GatedAttributes):
    time_major: bool = False
    return_carry: bool = False
    method: str = "auto"

    @nn.compact
    def __call__(self, inputs, *, initial_carry=None, init_key=None, seq_lengths=None,
                 return_carry: bool | None = None, time_major: bool | None = None,
                 reverse: bool | None = None, keep_order: bool | None = None):
        """Run both directions over ``inputs``; keywords as in ``nn.Bidirectional`` (see
        :meth:`SparseBidirectional.__call__`). ``initial_carry``: ``(forward, backward)``, each
        ``(c, h)`` for the LSTM or ``h`` for the GRU, ``[*batch, H]``. Returns ``outputs``
        (``[*batch, T, 2H]`` or ``[T, *batch, 2H]``), or ``((carry_forward, carry_backward),
        outputs)``."""
        del reverse, keep_order  # nn.Bidirectional's signature; each direction has its own
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        inputs, steps, batch_shape, args = self._fused_cell_args(inputs, time_major)
        dtype = args["dtype"]
        directions = [RNNLevel(FusedGatedCell(**args, parent=None), name=name)(inputs)
                      for name in ("forward_rnn", "backward_rnn")]
        if initial_carry is None:
            initial_carry = self._default_carries(init_key, batch_shape + (inputs.shape[-1],))
        cell = self.GATES.cell
        hn_biases = None if cell is LSTM else tuple(b for _, _, b in directions)
        carry, y = run_bidirectional(tuple(x for x, _, _ in directions),
                                     tuple(w for _, w, _ in directions), initial_carry, seq_lengths,
                                     steps=steps, batch_shape=batch_shape, dtype=dtype,
                                     time_major=time_major,
                                     call=cell.bidirectional(method=self.method, hn_biases=hn_biases),
                                     carry_parts=cell.carry)
        return (carry, y) if return_carry else y


class SparseBidirectionalLSTM(_SparseGatedBidirectional):
    """A bidirectional LSTM layer; both directions run in one
    :func:`jax_sprnn.sparse_lstm_bidirectional` call (one launch on a GPU).

    A drop-in for ``nn.Bidirectional(nn.RNN(nn.LSTMCell(features)),
    nn.RNN(nn.LSTMCell(features)))`` with the default merge (concatenation, forward features
    first): the same parameters (``forward_rnn/cell/{ii, ..., ho}`` and ``backward_rnn/cell/...``,
    see :class:`SparseLSTMCell`), and the packed masks of both recurrent kernels at
    ``{forward,backward}_rnn/cell/hi+hf+hg+ho/kernel`` in the ``'sparsity'`` collection (without
    them the layer runs dense and warns once). Both directions start from the same initial mask
    (``mask_seed``); pruning then gives each its own.

    Outputs are ``[*batch, T, 2H]`` (``[T, *batch, 2H]`` when ``time_major``); past an example's
    ``seq_lengths`` they are zero in both halves.

    Attributes:
      features, max_density, kernel_init, recurrent_kernel_init, bias_init, dtype, param_dtype,
        carry_init, mask_seed, precision: as in :class:`SparseLSTM`, for both directions.
      time_major, return_carry: defaults of the call keywords, as in ``nn.Bidirectional``.
      method: ``sparse_lstm_bidirectional``'s ``method``.
    """

    GATES = _LSTM


class SparseBidirectionalGRU(_SparseGatedBidirectional):
    """A bidirectional GRU layer; both directions run in one
    :func:`jax_sprnn.sparse_gru_bidirectional` call (one launch on a GPU).

    A drop-in for ``nn.Bidirectional(nn.RNN(nn.GRUCell(features)), nn.RNN(nn.GRUCell(features)))``:
    the parameters of :class:`SparseGRUCell` under ``forward_rnn/cell`` and ``backward_rnn/cell``,
    the masks at ``{forward,backward}_rnn/cell/hr+hz+hn/kernel``. Otherwise as
    :class:`SparseBidirectionalLSTM`.
    """

    GATES = _GRU


__all__ = ["SparseRNNCell", "SparseRNN", "SparseBidirectional", "SparseBidirectionalLSTM",
           "SparseBidirectionalGRU", "SparseLSTMCell", "SparseGRUCell",
           "SparseLSTM", "SparseGRU", "FusedCell", "FusedGatedCell", "SparseKernel", "RNNLevel",
           "GateParams", "MaskSlot", "activation_name", "flip_padded"]
