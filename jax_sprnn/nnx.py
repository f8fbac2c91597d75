"""Flax NNX modules for sparse recurrent layers (the linen pair is in :mod:`jax_sprnn.flax`).

* :class:`SparseRNNCell`: one step, for ``nnx.RNN``, ``nnx.scan`` and decoding loops. Its state has
  the names of ``nnx.SimpleCell``: ``dense_i`` (``Linear`` with bias) and ``dense_h`` (``Linear``,
  no bias), so ``nnx.SimpleCell`` weights load unchanged.
* :class:`SparseRNN`: the whole sequence in one :func:`jax_sprnn.sparse_rnn` call, with
  ``nnx.RNN``'s call keywords and its parameters: its ``cell`` is a :class:`SparseRNNCell`, so
  ``nnx.state(layer, nnx.Param)`` equals that of ``nnx.RNN(nnx.SimpleCell(F, H))``
  (``cell/dense_h/kernel``, ``cell/dense_i/{kernel,bias}``). The packed mask is in a
  :class:`Sparsity` variable (not an ``nnx.Param``, so optimizers leave it alone); a layer whose
  ``sparsity`` holds None runs dense and warns once, until :func:`prune` gives it a mask.
* :class:`SparseBidirectional`: two :class:`SparseRNN` (``forward_rnn``, ``backward_rnn``) run in
  one :func:`jax_sprnn.sparse_rnn_bidirectional` call, as ``nnx.Bidirectional`` of two
  ``nnx.RNN(nnx.SimpleCell)``.
* :class:`SparseLSTMCell`, :class:`SparseGRUCell` (``nnx.LSTMCell``'s and ``nnx.GRUCell``'s
  state) and :class:`SparseLSTM`, :class:`SparseGRU` (``nnx.RNN`` of them, fused into one
  ``sparse_lstm`` / ``sparse_gru`` call; ``sparsity`` masks the gates' kernels side by side).

Pruning an NNX model: :func:`prune` (or ``layer.prune``) recomputes the masks in place and
zeroes the pruned weights; the layout stays the same, so an ``nnx.jit`` step does not recompile.
:func:`param_masks` feeds :func:`jax_sprnn.pruning.keep_pruned` through ``nnx.Optimizer.update``;
:func:`to_inference` returns a copy of the model that runs the packed inference weights.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, ClassVar

if importlib.util.find_spec("flax") is None:  # an extra, not a dependency of jax_sprnn
    raise ModuleNotFoundError("jax_sprnn.nnx needs Flax: pip install 'jax_sprnn[flax]'", name="flax")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import initializers

from . import _flax_serialization  # noqa: F401 (msgpack of PackedMask, SparseWeights)
from . import pruning
from ._checks import ACTIVATIONS, check_method
from ._modules import (GRU, LSTM, activation_name, cached_initial_mask, check_carry,
                       check_features, dense_layout, gate_mask, initial_layout, masked_init,
                       run_bidirectional, run_sequence, sequence_shape, simple_bidirectional,
                       simple_recurrence, storage_dtype, warn_no_mask_once)
from .pruning import PackedMask
from .weights import SparseWeights

Initializer = Any
default_kernel_init = initializers.lecun_normal()


def modified_orthogonal(key, shape, dtype=jnp.float32):
    """``nnx.LSTMCell``'s default recurrent initializer: orthogonal in float32, then cast (for
    half precision). The same function, so the same ``rngs`` give ``nnx.LSTMCell``'s weights."""
    return initializers.orthogonal()(key, shape).astype(dtype)


class Sparsity(nnx.Variable):
    """The packed mask (:class:`jax_sprnn.pruning.PackedMask`) of a layer's recurrent kernel, its
    packed inference weights (:class:`jax_sprnn.SparseWeights`), or None (no mask: the layer runs
    dense). Not a parameter."""


_NO_MASK = ("jax_sprnn.nnx.{layer} has no mask (its sparsity variable holds None), so it runs "
            "dense: every weight of its recurrent kernel counts. jax_sprnn.nnx.prune(model, "
            "target) (or layer.prune(target)) gives it one.")


def _carry_keys(rngs, count: int) -> list:
    """``count`` keys for ``carry_init``: from the ``carry`` stream of an ``nnx.Rngs``, from an
    ``RngStream``, or fixed (``jax.random.key(0)`` split) without rngs."""
    if rngs is None:
        return list(jax.random.split(jax.random.key(0), count)) if count > 1 else [jax.random.key(0)]
    stream = rngs.carry if isinstance(rngs, nnx.Rngs) else rngs
    return [stream() for _ in range(count)]


class _RecurrentAttributes:
    """What the NNX cells and layers share: their checked common arguments, and the carry
    (one array, or the tuple of parts ``CARRY``, as Flax's cell keeps it)."""

    CARRY: ClassVar[tuple[str, ...] | None] = None

    def _set_common(self, in_features, hidden_features, max_density, param_dtype,
                    carry_init) -> None:
        self.in_features = check_features(in_features, "in_features")
        self.hidden_features = check_features(hidden_features, "hidden_features")
        self.max_density = float(max_density)
        self.param_dtype = param_dtype
        self.carry_init = carry_init

    def initialize_carry(self, input_shape: tuple[int, ...], rngs=None,
                         carry_init: Initializer | None = None):
        """The initial carry for one step's input shape ``[*batch, F]``: ``[*batch, H]``, or
        ``(c, h)`` of those for an LSTM, from ``carry_init`` (zeros when None), drawing keys only
        when they are needed."""
        shape = tuple(input_shape[:-1]) + (self.hidden_features,)
        carry_init = carry_init or self.carry_init
        count = 1 if self.CARRY is None else len(self.CARRY)
        if carry_init is None:
            parts = [jnp.zeros(shape, self.param_dtype) for _ in range(count)]
        else:
            parts = [carry_init(key, shape, self.param_dtype) for key in _carry_keys(rngs, count)]
        return parts[0] if self.CARRY is None else tuple(parts)

    @property
    def num_feature_axes(self) -> int:
        return 1


def _check_cell_carry(carry, parts: tuple[str, ...] | None, hidden: int):
    """The hidden state of a cell's carry, after checking it is one ``[*batch, H]`` array or a
    tuple of them with ``parts``."""
    if parts is None:
        check_carry(carry, hidden)
        return carry
    if not isinstance(carry, (tuple, list)) or len(carry) != len(parts):
        raise ValueError(f"carry must be a tuple ({', '.join(parts)}) of [*batch, {hidden}] "
                         f"arrays, got {type(carry).__name__}")
    for part in carry:
        check_carry(part, hidden)
    return carry[-1]


class SparseRNNCell(_RecurrentAttributes, nnx.RNNCellBase):
    """A simple recurrent cell with a pruned recurrent kernel: ``h' = act(W_i x + b + W_h h)``.

    The NNX twin of :class:`jax_sprnn.flax.SparseRNNCell` and a drop-in for ``nnx.SimpleCell``
    (same attributes ``dense_i`` and ``dense_h``, created in the same order, so the same ``rngs``
    give the same weights when ``max_density == 1``). The mask is the zeros of
    ``dense_h.kernel``, which starts masked by :func:`jax_sprnn.pruning.initial_mask`.

    Args:
      in_features: input size ``F``.
      hidden_features: hidden size ``H``.
      max_density, activation_fn, kernel_init, recurrent_kernel_init, bias_init, dtype,
        param_dtype, mask_seed, precision: as in :class:`jax_sprnn.flax.SparseRNNCell`.
      carry_init: initializer of the carry (default zeros).
      rngs: the ``nnx.Rngs`` for the parameters.
    """

    def __init__(self, in_features: int, hidden_features: int, *, max_density: float = 1.0,
                 activation_fn: Any = "tanh", dtype: Any = None, param_dtype: Any = jnp.float32,
                 carry_init: Initializer | None = None,
                 kernel_init: Initializer = default_kernel_init,
                 recurrent_kernel_init: Initializer = initializers.orthogonal(),
                 bias_init: Initializer = initializers.zeros_init(), mask_seed: int = 0,
                 precision: Any = None, rngs: nnx.Rngs):
        self._set_common(in_features, hidden_features, max_density, param_dtype, carry_init)
        self.activation = activation_name(activation_fn)
        pruning.budgets_for_density(self.hidden_features, self.max_density)  # validates it
        self.mask_seed = int(mask_seed)
        hidden = self.hidden_features
        mask = lambda: cached_initial_mask(hidden, self.max_density, self.mask_seed)  # noqa: E731
        # nnx.SimpleCell creates dense_h first: keep the order so equal rngs give equal weights.
        self.dense_h = nnx.Linear(hidden, hidden, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype,
                                  kernel_init=masked_init(recurrent_kernel_init, mask),
                                  precision=precision, rngs=rngs)
        self.dense_i = nnx.Linear(self.in_features, hidden, use_bias=True, dtype=dtype,
                                  param_dtype=param_dtype, kernel_init=kernel_init,
                                  bias_init=bias_init, precision=precision, rngs=rngs)

    def __call__(self, carry, inputs):  # type: ignore[override]
        """One step. ``carry``: ``[*batch, H]``; ``inputs``: ``[*batch, F]``."""
        check_carry(carry, self.hidden_features)
        new_carry = ACTIVATIONS[self.activation](self.dense_i(inputs) + self.dense_h(carry))
        return new_carry, new_carry


class SparseLSTMCell(_RecurrentAttributes, nnx.RNNCellBase):
    """An LSTM cell with a pruned recurrent kernel: Flax's ``nnx.LSTMCell``, step for step.

    The NNX twin of :class:`jax_sprnn.flax.SparseLSTMCell` and a drop-in for ``nnx.LSTMCell``:
    the same attributes (``ii``, ``if_``, ``ig``, ``io``: ``Linear`` without bias; ``hi``, ``hf``,
    ``hg``, ``ho``: ``Linear`` with bias), created in the same order with the same default
    initializers, so the same ``rngs`` give the same weights when ``max_density == 1``; the carry
    is ``(c, h)``. The recurrent kernels start masked by the 4-gate initial mask (gate ``g``'s
    kernel by its ``g``-th ``[H, H]`` block); afterwards the mask is their zeros.

    Args: as :class:`SparseRNNCell` (no ``activation_fn``: the gates are sigmoid / tanh).
    """

    CARRY = LSTM.carry
    INPUTS = ("ii", "if_", "ig", "io")
    RECURRENT = ("hi", "hf", "hg", "ho")

    def __init__(self, in_features: int, hidden_features: int, *, max_density: float = 1.0,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 carry_init: Initializer | None = None,
                 kernel_init: Initializer = default_kernel_init,
                 recurrent_kernel_init: Initializer = modified_orthogonal,
                 bias_init: Initializer = initializers.zeros_init(), mask_seed: int = 0,
                 precision: Any = None, rngs: nnx.Rngs):
        self._set_common(in_features, hidden_features, max_density, param_dtype, carry_init)
        pruning.budgets_for_density(self.hidden_features, self.max_density, LSTM.gates)
        self.mask_seed = int(mask_seed)
        hidden = self.hidden_features
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        for name in self.INPUTS:  # nnx.LSTMCell's order: equal rngs give equal weights
            setattr(self, name, nnx.Linear(self.in_features, hidden, use_bias=False,
                                           kernel_init=kernel_init, **common))
        for g, name in enumerate(self.RECURRENT):
            mask = functools.partial(gate_mask, hidden, self.max_density, self.mask_seed,
                                     LSTM.gates, g)
            setattr(self, name, nnx.Linear(hidden, hidden, use_bias=True,
                                           kernel_init=masked_init(recurrent_kernel_init, mask),
                                           bias_init=bias_init, **common))

    def __call__(self, carry, inputs):  # type: ignore[override]
        """One step. ``carry``: ``(c, h)``, each ``[*batch, H]``; ``inputs``: ``[*batch, F]``."""
        h = _check_cell_carry(carry, self.CARRY, self.hidden_features)
        zx = jnp.concatenate([getattr(self, n)(inputs) for n in self.INPUTS], axis=-1)
        zh = jnp.concatenate([getattr(self, n)(h) for n in self.RECURRENT], axis=-1)
        return LSTM.step(carry, zx, zh)


class SparseGRUCell(_RecurrentAttributes, nnx.RNNCellBase):
    """A GRU cell with a pruned recurrent kernel: Flax's ``nnx.GRUCell``, step for step.

    The NNX twin of :class:`jax_sprnn.flax.SparseGRUCell` and a drop-in for ``nnx.GRUCell``:
    ``dense_i`` (``Linear`` ``[F, 3H]`` with bias) and ``dense_h`` (``Linear`` ``[H, 3H]``, no
    bias: ``nnx.GRUCell`` has no ``hn`` bias, unlike linen's), gates r, z, n side by side. The
    recurrent kernel starts masked by the 3-gate initial mask.

    Args: as :class:`SparseLSTMCell`; ``recurrent_kernel_init`` defaults to ``orthogonal()``,
    as in ``nnx.GRUCell``.
    """

    def __init__(self, in_features: int, hidden_features: int, *, max_density: float = 1.0,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 carry_init: Initializer | None = None,
                 kernel_init: Initializer = default_kernel_init,
                 recurrent_kernel_init: Initializer = initializers.orthogonal(),
                 bias_init: Initializer = initializers.zeros_init(), mask_seed: int = 0,
                 precision: Any = None, rngs: nnx.Rngs):
        self._set_common(in_features, hidden_features, max_density, param_dtype, carry_init)
        pruning.budgets_for_density(self.hidden_features, self.max_density, GRU.gates)
        self.mask_seed = int(mask_seed)
        hidden, width = self.hidden_features, GRU.gates * self.hidden_features
        mask = functools.partial(cached_initial_mask, hidden, self.max_density, self.mask_seed,
                                 GRU.gates)
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.dense_i = nnx.Linear(self.in_features, width, use_bias=True,
                                  kernel_init=kernel_init, bias_init=bias_init, **common)
        self.dense_h = nnx.Linear(hidden, width, use_bias=False,
                                  kernel_init=masked_init(recurrent_kernel_init, mask), **common)

    def __call__(self, carry, inputs):  # type: ignore[override]
        """One step. ``carry``: ``[*batch, H]``; ``inputs``: ``[*batch, F]``."""
        check_carry(carry, self.hidden_features)
        return GRU.step(carry, self.dense_i(inputs), self.dense_h(carry))


class _SparseLayer(_RecurrentAttributes, nnx.Module):
    """What the NNX layers share: the mask of the recurrent kernel, running a whole sequence with
    ``nnx.RNN``'s call keywords, pruning and the inference form. A subclass names its gate count
    (``GATES``), the ``Linear`` layers of its cell that hold the recurrent kernel side by side
    (``KERNELS``), and how the inputs are projected (``_project``) and the sequence run
    (``_recurrence``)."""

    GATES: ClassVar[int] = 1
    KERNELS: ClassVar[tuple[str, ...]] = ("dense_h",)

    def _set_layer(self, *, dtype, method, time_major, return_carry, reverse, keep_order,
                   mask_seed) -> None:
        self.dtype = storage_dtype(dtype, self.param_dtype).name
        self.method = check_method(method)
        self.time_major, self.return_carry = bool(time_major), bool(return_carry)
        self.reverse, self.keep_order = bool(reverse), bool(keep_order)
        self.mask_seed = int(mask_seed)
        self.sparsity = Sparsity(initial_layout(self.hidden_features, self.max_density,
                                                self.mask_seed, self.dtype, self.GATES))

    # ---- the recurrent kernel -----------------------------------------------------------------
    def _kernel_layers(self) -> list:
        return [getattr(self.cell, name) for name in self.KERNELS]

    def kernel(self):
        """The recurrent kernel ``[H, G*H]``: the kernels of ``cell``'s ``KERNELS`` side by side."""
        return jnp.concatenate([lin.kernel[...] for lin in self._kernel_layers()], axis=-1)

    def _set_kernel(self, kernel) -> None:
        for lin, part in zip(self._kernel_layers(),
                             jnp.split(jnp.asarray(kernel), len(self.KERNELS), axis=-1)):
            lin.kernel[...] = part

    def _drop_kernel(self) -> None:
        """Remove the dense recurrent kernel (the inference form runs the packed one); a
        ``Linear`` left without parameters goes too."""
        for name in self.KERNELS:
            lin = getattr(self.cell, name)
            if getattr(lin, "bias", None) is None:
                delattr(self.cell, name)
            else:
                del lin.kernel

    # ---- running ------------------------------------------------------------------------------
    def weights(self) -> SparseWeights:
        """The packed recurrent weights of the current kernel and mask (usable under jit); with
        no mask, of the whole kernel (the all-ones mask), with a one-time warning."""
        stored = self.sparsity.get_value()
        if isinstance(stored, SparseWeights):
            return stored if stored.dtype == np.dtype(self.dtype) else stored.astype(self.dtype)
        if stored is None:
            warn_no_mask_once(_NO_MASK.format(layer=type(self).__name__))
            stored = dense_layout(self.hidden_features, self.dtype, self.GATES)
        if not isinstance(stored, PackedMask):
            raise TypeError(f"{type(self).__name__}.sparsity must hold a PackedMask, "
                            f"SparseWeights or None, got {type(stored).__name__}")
        return stored.weights(self.kernel(), self.dtype)

    def _project(self, inputs):
        """The input projection of all steps (biases that add to it included)."""
        raise NotImplementedError

    def _recurrence(self):
        """The functional call for :func:`jax_sprnn._modules.run_sequence`."""
        raise NotImplementedError

    def _bidirectional(self):
        """The functional call of both directions for :func:`jax_sprnn._modules.run_bidirectional`
        (this layer's settings, for both)."""
        raise NotImplementedError

    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None,
                 return_carry: bool | None = None, time_major: bool | None = None,
                 reverse: bool | None = None, keep_order: bool | None = None, rngs=None):
        """Run the layer; keywords as in ``nnx.RNN`` (``rngs`` feeds ``carry_init``).

        Returns ``outputs`` (``[*batch, T, H]`` or ``[T, *batch, H]``), or ``(carry, outputs)``.
        """
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        reverse = self.reverse if reverse is None else reverse
        keep_order = self.keep_order if keep_order is None else keep_order
        inputs, steps, batch_shape = sequence_shape(inputs, time_major)
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have {self.in_features} features in their last axis, "
                             f"got shape {tuple(inputs.shape)}")
        if initial_carry is None:
            initial_carry = self.initialize_carry(batch_shape + (self.in_features,), rngs)
        carry, y = run_sequence(self._project(inputs), self.weights(), initial_carry,
                                seq_lengths, steps=steps, batch_shape=batch_shape,
                                dtype=np.dtype(self.dtype),
                                time_major=time_major, reverse=reverse, keep_order=keep_order,
                                recurrence=self._recurrence(), carry_parts=self.CARRY)
        return (carry, y) if return_carry else y

    # ---- pruning ------------------------------------------------------------------------------
    @property
    def mask(self) -> np.ndarray:
        """The boolean mask ``[H, G*H]`` of the recurrent kernel (host); all ones with no mask."""
        stored = self.sparsity.get_value()
        if stored is None:
            return np.ones((self.hidden_features, self.GATES * self.hidden_features), bool)
        return np.asarray(stored.mask) if isinstance(stored, PackedMask) else stored.mask()

    def prune(self, sparsity: float, *, rule: str = "row_balanced") -> None:
        """Recompute this layer's mask at ``sparsity`` from the kernel's magnitudes (nested in
        the current mask), repack it into the same layout, and zero the pruned weights. A layer
        with no mask starts from its initial one (all ones when ``max_density == 1``)."""
        prune(self, sparsity, rule=rule)

    def to_inference(self, *, batch: int | None = None) -> SparseWeights:
        """The packed inference weights of this layer (tightly packed by the planner; for ``batch``,
        the batch it will mostly run at, where given: :meth:`SparseWeights.from_dense`)."""
        stored = self.sparsity.get_value()
        if isinstance(stored, SparseWeights):
            return stored
        return pruning.pack_inference(self.kernel(), self.mask, dtype=self.dtype, batch=batch)


_LAYER_ARGS = """
    Args:
      in_features, hidden_features, max_density, kernel_init, recurrent_kernel_init, bias_init,
        param_dtype, carry_init, mask_seed, precision: as in the cell.
      dtype: the dtype of the recurrence and its packed weights (default ``param_dtype``).
      time_major, return_carry, reverse, keep_order: defaults of the call keywords, as in
        ``nnx.RNN``.
      method: the functional call's ``method``.
      rngs: the ``nnx.Rngs`` for the parameters.
"""


class SparseRNN(_SparseLayer):
    """A simple recurrent layer over a whole sequence in one sparse persistent kernel call.

    The NNX twin of :class:`jax_sprnn.flax.SparseRNN`: a drop-in for
    ``nnx.RNN(nnx.SimpleCell(F, H, rngs=rngs))``, with its parameters (``cell``, a
    :class:`SparseRNNCell`, so the same ``rngs`` give the same weights when ``max_density == 1``)
    plus ``sparsity``, a :class:`Sparsity` variable holding the packed mask of
    ``cell.dense_h.kernel``. Inputs are ``[*batch, T, F]`` (``[T, *batch, F]`` when
    ``time_major``). ``layer.cell`` also runs one step at a time (decoding).

    Past an example's ``seq_lengths`` its outputs are zero, and an example of length 0 returns its
    initial carry (``nnx.RNN`` gives padding-dependent values there).
    """ + _LAYER_ARGS + """      activation_fn: as in :class:`SparseRNNCell`.
      mesh, batch_axis: split the batch over these mesh axes (see :mod:`jax_sprnn.sharding`).
    """

    def __init__(self, in_features: int, hidden_features: int, *, max_density: float = 1.0,
                 activation_fn: Any = "tanh", dtype: Any = None, param_dtype: Any = jnp.float32,
                 carry_init: Initializer | None = None,
                 kernel_init: Initializer = default_kernel_init,
                 recurrent_kernel_init: Initializer = initializers.orthogonal(),
                 bias_init: Initializer = initializers.zeros_init(), mask_seed: int = 0,
                 precision: Any = None, time_major: bool = False, return_carry: bool = False,
                 reverse: bool = False, keep_order: bool = False, method: str = "auto",
                 mesh: Any = None, batch_axis: Any = "data", rngs: nnx.Rngs):
        self._set_common(in_features, hidden_features, max_density, param_dtype, carry_init)
        self.activation = activation_name(activation_fn)
        self.mesh, self.batch_axis = mesh, batch_axis
        self._set_layer(dtype=dtype, method=method, time_major=time_major,
                        return_carry=return_carry, reverse=reverse, keep_order=keep_order,
                        mask_seed=mask_seed)
        # The cell starts masked by the initial mask, the same pattern as the layout's.
        self.cell = SparseRNNCell(in_features, hidden_features, max_density=max_density,
                                  activation_fn=activation_fn, dtype=self.dtype,
                                  param_dtype=param_dtype, carry_init=carry_init,
                                  kernel_init=kernel_init,
                                  recurrent_kernel_init=recurrent_kernel_init,
                                  bias_init=bias_init, mask_seed=mask_seed, precision=precision,
                                  rngs=rngs)

    def _project(self, inputs):
        return self.cell.dense_i(inputs)

    def _recurrence(self):
        return simple_recurrence(activation=self.activation, method=self.method, mesh=self.mesh,
                                 batch_axis=self.batch_axis)

    def _bidirectional(self):
        return simple_bidirectional(activation=self.activation, method=self.method)


class _GatedLayer(_SparseLayer):
    CELL: ClassVar[type]

    def __init__(self, in_features: int, hidden_features: int, *, max_density: float = 1.0,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 carry_init: Initializer | None = None, time_major: bool = False,
                 return_carry: bool = False, reverse: bool = False, keep_order: bool = False,
                 method: str = "auto", mask_seed: int = 0, precision: Any = None,
                 rngs: nnx.Rngs, **initializers_):
        self._set_common(in_features, hidden_features, max_density, param_dtype, carry_init)
        self.precision = precision
        self._set_layer(dtype=dtype, method=method, time_major=time_major,
                        return_carry=return_carry, reverse=reverse, keep_order=keep_order,
                        mask_seed=mask_seed)
        self.cell = self.CELL(in_features, hidden_features, max_density=max_density,
                              dtype=self.dtype, param_dtype=param_dtype, carry_init=carry_init,
                              mask_seed=mask_seed, precision=precision, rngs=rngs, **initializers_)


class SparseLSTM(_GatedLayer):
    """An LSTM layer over a whole sequence in one :func:`jax_sprnn.sparse_lstm` call.

    The NNX twin of :class:`jax_sprnn.flax.SparseLSTM`: a drop-in for
    ``nnx.RNN(nnx.LSTMCell(F, H, rngs=rngs))``, with its parameters (``cell``, a
    :class:`SparseLSTMCell`) and carry ``(c, h)``, plus ``sparsity``, the packed mask of the
    recurrent kernels ``cell.hi``, ``hf``, ``hg``, ``ho`` side by side (``[H, 4H]``). The input
    projection of all steps is one matmul, with the recurrent biases folded in. ``kernel_init``,
    ``recurrent_kernel_init`` and ``bias_init`` are passed to the cell.
    """ + _LAYER_ARGS

    CELL = SparseLSTMCell
    CARRY = LSTM.carry
    GATES = LSTM.gates
    KERNELS = SparseLSTMCell.RECURRENT

    def _project(self, inputs):
        cell, dtype = self.cell, np.dtype(self.dtype)
        w_i = jnp.concatenate([getattr(cell, n).kernel[...] for n in cell.INPUTS], axis=-1)
        b_h = jnp.concatenate([getattr(cell, n).bias[...] for n in cell.RECURRENT], axis=-1)
        x = jnp.dot(jnp.asarray(inputs, dtype), w_i.astype(dtype), precision=self.precision)
        return x + b_h.astype(dtype)

    def _recurrence(self):
        return LSTM.recurrence(method=self.method)

    def _bidirectional(self):
        return LSTM.bidirectional(method=self.method)


class SparseGRU(_GatedLayer):
    """A GRU layer over a whole sequence in one :func:`jax_sprnn.sparse_gru` call.

    The NNX twin of :class:`jax_sprnn.flax.SparseGRU`: a drop-in for
    ``nnx.RNN(nnx.GRUCell(F, H, rngs=rngs))``, with its parameters (``cell``, a
    :class:`SparseGRUCell`) and carry, plus ``sparsity``, the packed mask of
    ``cell.dense_h.kernel`` (``[H, 3H]``). ``nnx.GRUCell`` has no ``hn`` bias, so neither does
    this layer. ``kernel_init``, ``recurrent_kernel_init`` and ``bias_init`` are passed to the
    cell.
    """ + _LAYER_ARGS

    CELL = SparseGRUCell
    GATES = GRU.gates

    def _project(self, inputs):
        return self.cell.dense_i(inputs)

    def _recurrence(self):
        return GRU.recurrence(method=self.method)

    def _bidirectional(self):
        return GRU.bidirectional(method=self.method)


class _Bidirectional(nnx.Module):
    """What the NNX bidirectional layers share: two layers of class ``LAYER``, ``forward_rnn`` and
    ``backward_rnn``, built in that order from ``rngs``, run in one bidirectional call."""

    LAYER: ClassVar[type]

    def __init__(self, in_features: int, hidden_features: int, *, time_major: bool = False,
                 return_carry: bool = False, rngs: nnx.Rngs, **layer_args):
        if {"reverse", "keep_order", "mesh", "batch_axis"} & set(layer_args):
            raise TypeError(f"{type(self).__name__} got {sorted(layer_args)}: reverse and "
                            f"keep_order are fixed per direction, and mesh is not supported")
        self.time_major, self.return_carry = bool(time_major), bool(return_carry)
        self.forward_rnn = self.LAYER(in_features, hidden_features, rngs=rngs, **layer_args)
        self.backward_rnn = self.LAYER(in_features, hidden_features, rngs=rngs, **layer_args)

    def __call__(self, inputs, *, initial_carry=None, seq_lengths=None,
                 return_carry: bool | None = None, time_major: bool | None = None,
                 reverse: bool | None = None, keep_order: bool | None = None, rngs=None):
        """Run both directions; keywords as in ``nnx.Bidirectional`` (``reverse`` and
        ``keep_order`` are ignored there too; ``rngs`` feeds ``carry_init``).

        Returns ``outputs`` (``[*batch, T, 2H]`` or ``[T, *batch, 2H]``), or
        ``((carry_forward, carry_backward), outputs)``.
        """
        del reverse, keep_order
        return_carry = self.return_carry if return_carry is None else return_carry
        time_major = self.time_major if time_major is None else time_major
        fwd, bwd = self.forward_rnn, self.backward_rnn
        inputs, steps, batch_shape = sequence_shape(inputs, time_major)
        if inputs.shape[-1] != fwd.in_features:
            raise ValueError(f"inputs must have {fwd.in_features} features in their last axis, "
                             f"got shape {tuple(inputs.shape)}")
        if initial_carry is None:
            step_shape = batch_shape + (fwd.in_features,)
            initial_carry = tuple(layer.initialize_carry(step_shape, rngs) for layer in (fwd, bwd))
        carry, y = run_bidirectional(
            (fwd._project(inputs), bwd._project(inputs)), (fwd.weights(), bwd.weights()),
            initial_carry, seq_lengths, steps=steps, batch_shape=batch_shape,
            dtype=np.dtype(fwd.dtype), time_major=time_major, call=fwd._bidirectional(),
            carry_parts=fwd.CARRY)
        return (carry, y) if return_carry else y


class SparseBidirectional(_Bidirectional):
    """A bidirectional simple recurrent layer; both directions run in one
    :func:`jax_sprnn.sparse_rnn_bidirectional` call.

    The NNX twin of :class:`jax_sprnn.flax.SparseBidirectional` and a drop-in for
    ``nnx.Bidirectional(nnx.RNN(nnx.SimpleCell(F, H, rngs=rngs)), nnx.RNN(nnx.SimpleCell(F, H,
    rngs=rngs)))``: its ``forward_rnn`` and ``backward_rnn`` are :class:`SparseRNN` layers, built
    in that order from ``rngs``, so ``nnx.state(layer, nnx.Param)`` has that tree (and the same
    ``rngs`` give the same weights when ``max_density == 1``). Each keeps its own mask;
    :func:`prune`, :func:`param_masks` and :func:`to_inference` treat them as two layers. The
    outputs are concatenated, forward features first.

    Args:
      in_features, hidden_features, max_density, activation_fn, kernel_init,
        recurrent_kernel_init, bias_init, dtype, param_dtype, carry_init, mask_seed, precision,
        method: as in :class:`SparseRNN`, for both directions.
      time_major, return_carry: defaults of the call keywords, as in ``nnx.Bidirectional``.
      rngs: the ``nnx.Rngs`` for the parameters.
    """

    LAYER = SparseRNN


class SparseBidirectionalLSTM(_Bidirectional):
    """A bidirectional LSTM layer; both directions run in one
    :func:`jax_sprnn.sparse_lstm_bidirectional` call.

    The NNX twin of :class:`jax_sprnn.flax.SparseBidirectionalLSTM` and a drop-in for
    ``nnx.Bidirectional`` of two ``nnx.RNN(nnx.LSTMCell(F, H, rngs=rngs))``: ``forward_rnn`` and
    ``backward_rnn`` are :class:`SparseLSTM` layers, otherwise as :class:`SparseBidirectional`.
    Arguments as :class:`SparseLSTM`'s, for both directions.
    """

    LAYER = SparseLSTM


class SparseBidirectionalGRU(_Bidirectional):
    """A bidirectional GRU layer; both directions run in one
    :func:`jax_sprnn.sparse_gru_bidirectional` call.

    The NNX twin of :class:`jax_sprnn.flax.SparseBidirectionalGRU` (``nnx.GRUCell`` has no ``hn``
    bias, so neither does this layer): ``forward_rnn`` and ``backward_rnn`` are :class:`SparseGRU`
    layers, otherwise as :class:`SparseBidirectional`. Arguments as :class:`SparseGRU`'s.
    """

    LAYER = SparseGRU


def _sparse_layers(model) -> dict[tuple, _SparseLayer]:
    layers = {tuple(path): m for path, m in nnx.iter_modules(model) if isinstance(m, _SparseLayer)}
    if not layers:
        raise ValueError("the model has no jax_sprnn.nnx.SparseRNN, SparseLSTM or SparseGRU layers")
    return layers


def prune(model, sparsity: float, *, rule: str = "row_balanced") -> None:
    """Prune every sparse layer (:class:`SparseRNN`, :class:`SparseLSTM`, :class:`SparseGRU`) of
    ``model`` in place (see :func:`jax_sprnn.pruning.update_sparsity`; ``rule="global"`` shares
    one threshold across the layers; a gated layer's gates are pruned as one kernel
    ``[H, G*H]``, and ``row_balanced`` balances every gate row). The layouts stay the same, so a
    jitted step does not recompile. A layer with no mask first gets its initial layout
    (``max_density``, ``mask_seed``); that one change of the model's structure retraces a jitted
    step once."""
    layers = _sparse_layers(model)
    for path, layer in layers.items():
        if isinstance(layer.sparsity.get_value(), SparseWeights):
            raise ValueError(f"layer {'/'.join(map(str, path)) or '(root)'} is already in its "
                             f"packed inference form; prune the training model")
    for layer in layers.values():
        if layer.sparsity.get_value() is None:
            layer.sparsity.set_value(initial_layout(layer.hidden_features, layer.max_density,
                                                    layer.mask_seed, layer.dtype, layer.GATES))
    # update_sparsity looks kernels up by path: give it one-level dicts with string keys.
    keys = {path: "/".join(map(str, path)) or "." for path in layers}
    new_params, new_masks = pruning.update_sparsity(
        {keys[p]: layer.kernel() for p, layer in layers.items()},
        {keys[p]: layer.sparsity.get_value() for p, layer in layers.items()}, sparsity, rule=rule)
    for path, layer in layers.items():
        layer._set_kernel(new_params[keys[path]])
        layer.sparsity.set_value(new_masks[keys[path]])


def param_masks(model):
    """The masks for :func:`jax_sprnn.pruning.keep_pruned`, shaped like
    ``nnx.state(model, nnx.Param)``: each sparse layer's mask at its recurrent kernel
    (``cell/dense_h/kernel``; a gated layer's split among its gates' kernels), a scalar ``True``
    elsewhere (also at the kernel of a layer with no mask). Pass them as
    ``optimizer.update(model, grads, masks=param_masks(model))``. Usable under ``nnx.jit``."""
    masks = {}
    for path, layer in _sparse_layers(model).items():
        stored = layer.sparsity.get_value()
        if isinstance(stored, PackedMask):
            parts = jnp.split(jnp.asarray(stored.mask), len(layer.KERNELS), axis=-1)
            masks.update({path + ("cell", name, "kernel"): part
                          for name, part in zip(layer.KERNELS, parts)})
    params = nnx.as_pure(nnx.state(model, nnx.Param))  # what nnx.Optimizer hands to optax
    return pruning.masks_at_paths(params, masks)


def to_inference(model, *, batch: int | None = None):
    """A copy of ``model`` in which every sparse layer runs its packed inference weights (its
    ``sparsity`` holds :class:`jax_sprnn.SparseWeights`, and its dense recurrent kernels are gone:
    ``cell.dense_h`` entirely, the LSTM's ``cell.hi.kernel``, ... but not their biases). ``batch``:
    the batch the model will mostly run at, if known; the layouts are then planned for it."""
    model = nnx.clone(model)
    for layer in _sparse_layers(model).values():
        layer.sparsity.set_value(layer.to_inference(batch=batch))
        layer._drop_kernel()
    return model


__all__ = ["SparseRNNCell", "SparseRNN", "SparseBidirectional", "SparseBidirectionalLSTM",
           "SparseBidirectionalGRU", "SparseLSTMCell", "SparseGRUCell",
           "SparseLSTM", "SparseGRU", "Sparsity", "prune", "param_masks", "to_inference"]
