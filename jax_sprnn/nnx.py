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

Pruning an NNX model: :func:`prune` (or ``SparseRNN.prune``) recomputes the masks in place and
zeroes the pruned weights; the layout stays the same, so an ``nnx.jit`` step does not recompile.
:func:`param_masks` feeds :func:`jax_sprnn.pruning.keep_pruned` through ``nnx.Optimizer.update``;
:func:`to_inference` returns a copy of the model that runs the packed inference weights.
"""

from __future__ import annotations

import importlib.util
from typing import Any

if importlib.util.find_spec("flax") is None:  # an extra, not a dependency of jax_sprnn
    raise ModuleNotFoundError("jax_sprnn.nnx needs Flax: pip install 'jax_sprnn[flax]'", name="flax")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import initializers

from . import pruning
from ._checks import ACTIVATIONS, check_method
from ._modules import (activation_name, cached_initial_mask, check_carry, check_features,
                       dense_layout, initial_layout, masked_init, run_bidirectional, run_sequence,
                       sequence_shape, storage_dtype, warn_no_mask_once)
from .pruning import PackedMask
from .weights import SparseWeights

Initializer = Any
default_kernel_init = initializers.lecun_normal()


class Sparsity(nnx.Variable):
    """The packed mask (:class:`jax_sprnn.pruning.PackedMask`) of a :class:`SparseRNN`, its
    packed inference weights (:class:`jax_sprnn.SparseWeights`), or None (no mask: the layer runs
    dense). Not a parameter."""


_NO_MASK = ("jax_sprnn.nnx.SparseRNN has no mask (its sparsity variable holds None), so it runs "
            "dense: every weight of its recurrent kernel counts. jax_sprnn.nnx.prune(model, "
            "target) (or layer.prune(target)) gives it one.")


class _SimpleRNNAttributes:
    """What both NNX layers share: their checked common arguments, and the carry."""

    def _set_common(self, in_features, hidden_features, activation_fn, max_density, param_dtype,
                    carry_init) -> None:
        self.in_features = check_features(in_features, "in_features")
        self.hidden_features = check_features(hidden_features, "hidden_features")
        self.activation = activation_name(activation_fn)
        self.max_density = float(max_density)
        self.param_dtype = param_dtype
        self.carry_init = carry_init

    def initialize_carry(self, input_shape: tuple[int, ...], rngs=None,
                         carry_init: Initializer | None = None):
        """The initial carry ``[*batch, H]`` for one step's input shape ``[*batch, F]``, from
        ``carry_init`` (zeros when None), drawing a key only when it is needed."""
        shape = tuple(input_shape[:-1]) + (self.hidden_features,)
        carry_init = carry_init or self.carry_init
        if carry_init is None:
            return jnp.zeros(shape, self.param_dtype)
        if isinstance(rngs, nnx.Rngs):
            key = rngs.carry()
        elif rngs is None:
            key = jax.random.key(0)
        else:
            key = rngs()
        return carry_init(key, shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class SparseRNNCell(_SimpleRNNAttributes, nnx.RNNCellBase):
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
        self._set_common(in_features, hidden_features, activation_fn, max_density, param_dtype,
                         carry_init)
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


class SparseRNN(_SimpleRNNAttributes, nnx.Module):
    """A simple recurrent layer over a whole sequence in one sparse persistent kernel call.

    The NNX twin of :class:`jax_sprnn.flax.SparseRNN`: a drop-in for
    ``nnx.RNN(nnx.SimpleCell(F, H, rngs=rngs))``, with its parameters (``cell``, a
    :class:`SparseRNNCell`, so the same ``rngs`` give the same weights when ``max_density == 1``)
    plus ``sparsity``, a :class:`Sparsity` variable holding the packed mask of
    ``cell.dense_h.kernel``. Inputs are ``[*batch, T, F]`` (``[T, *batch, F]`` when
    ``time_major``). ``layer.cell`` also runs one step at a time (decoding).

    Past an example's ``seq_lengths`` its outputs are zero, and an example of length 0 returns its
    initial carry (``nnx.RNN`` gives padding-dependent values there).

    Args:
      in_features, hidden_features, max_density, activation_fn, kernel_init,
        recurrent_kernel_init, bias_init, param_dtype, carry_init, mask_seed, precision: as in
        :class:`SparseRNNCell`.
      dtype: the dtype of the recurrence and its packed weights (default ``param_dtype``).
      time_major, return_carry, reverse, keep_order: defaults of the call keywords, as in
        ``nnx.RNN``.
      method: ``sparse_rnn``'s ``method``.
      mesh, batch_axis: split the batch over these mesh axes (see :mod:`jax_sprnn.sharding`).
      rngs: the ``nnx.Rngs`` for the parameters.
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
        self._set_common(in_features, hidden_features, activation_fn, max_density, param_dtype,
                         carry_init)
        self.dtype = storage_dtype(dtype, param_dtype).name
        self.method = check_method(method)
        self.time_major, self.return_carry = bool(time_major), bool(return_carry)
        self.reverse, self.keep_order = bool(reverse), bool(keep_order)
        self.mesh, self.batch_axis = mesh, batch_axis
        self.mask_seed = int(mask_seed)
        # The cell starts masked by the initial mask, the same pattern as the layout's.
        self.cell = SparseRNNCell(in_features, hidden_features, max_density=max_density,
                                  activation_fn=activation_fn, dtype=self.dtype,
                                  param_dtype=param_dtype, carry_init=carry_init,
                                  kernel_init=kernel_init,
                                  recurrent_kernel_init=recurrent_kernel_init,
                                  bias_init=bias_init, mask_seed=mask_seed, precision=precision,
                                  rngs=rngs)
        self.sparsity = Sparsity(initial_layout(self.hidden_features, self.max_density,
                                                self.mask_seed, self.dtype))

    # ---- running ------------------------------------------------------------------------------
    def weights(self) -> SparseWeights:
        """The packed recurrent weights of the current kernel and mask (usable under jit); with
        no mask, of the whole kernel (the all-ones mask), with a one-time warning."""
        stored = self.sparsity.get_value()
        if isinstance(stored, SparseWeights):
            return stored if stored.dtype == np.dtype(self.dtype) else stored.astype(self.dtype)
        if stored is None:
            warn_no_mask_once(_NO_MASK)
            stored = dense_layout(self.hidden_features, self.dtype)
        if not isinstance(stored, PackedMask):
            raise TypeError(f"SparseRNN.sparsity must hold a PackedMask, SparseWeights or None, "
                            f"got {type(stored).__name__}")
        return stored.weights(self.cell.dense_h.kernel[...], self.dtype)

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
        carry, y = run_sequence(self.cell.dense_i(inputs), self.weights(), initial_carry,
                                seq_lengths, steps=steps, batch_shape=batch_shape, activation=self.activation,
                                dtype=np.dtype(self.dtype), time_major=time_major,
                                reverse=reverse, keep_order=keep_order, method=self.method,
                                mesh=self.mesh, batch_axis=self.batch_axis)
        return (carry, y) if return_carry else y

    # ---- pruning ------------------------------------------------------------------------------
    @property
    def mask(self) -> np.ndarray:
        """The boolean mask ``[H, H]`` of the recurrent kernel (host); all ones with no mask."""
        stored = self.sparsity.get_value()
        if stored is None:
            return np.ones((self.hidden_features,) * 2, bool)
        return np.asarray(stored.mask) if isinstance(stored, PackedMask) else stored.mask()

    def prune(self, sparsity: float, *, rule: str = "row_balanced") -> None:
        """Recompute this layer's mask at ``sparsity`` from the kernel's magnitudes (nested in
        the current mask), repack it into the same layout, and zero the pruned weights. A layer
        with no mask starts from its initial one (all ones when ``max_density == 1``)."""
        prune(self, sparsity, rule=rule)

    def to_inference(self) -> SparseWeights:
        """The packed inference weights of this layer (tightly packed by the planner)."""
        stored = self.sparsity.get_value()
        if isinstance(stored, SparseWeights):
            return stored
        return pruning.pack_inference(self.cell.dense_h.kernel[...], self.mask, dtype=self.dtype)


class SparseBidirectional(nnx.Module):
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

    def __init__(self, in_features: int, hidden_features: int, *, time_major: bool = False,
                 return_carry: bool = False, rngs: nnx.Rngs, **layer_args):
        if {"reverse", "keep_order", "mesh", "batch_axis"} & set(layer_args):
            raise TypeError(f"SparseBidirectional got {sorted(layer_args)}: reverse and "
                            f"keep_order are fixed per direction, and mesh is not supported")
        self.time_major, self.return_carry = bool(time_major), bool(return_carry)
        self.forward_rnn = SparseRNN(in_features, hidden_features, rngs=rngs, **layer_args)
        self.backward_rnn = SparseRNN(in_features, hidden_features, rngs=rngs, **layer_args)

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
            (fwd.cell.dense_i(inputs), bwd.cell.dense_i(inputs)), (fwd.weights(), bwd.weights()),
            initial_carry, seq_lengths, steps=steps, batch_shape=batch_shape,
            activation=fwd.activation, dtype=np.dtype(fwd.dtype), time_major=time_major,
            method=fwd.method)
        return (carry, y) if return_carry else y


def _sparse_layers(model) -> dict[tuple, SparseRNN]:
    layers = {tuple(path): m for path, m in nnx.iter_modules(model) if isinstance(m, SparseRNN)}
    if not layers:
        raise ValueError("the model has no jax_sprnn.nnx.SparseRNN layers")
    return layers


def prune(model, sparsity: float, *, rule: str = "row_balanced") -> None:
    """Prune every :class:`SparseRNN` of ``model`` in place (see
    :func:`jax_sprnn.pruning.update_sparsity`; ``rule="global"`` shares one threshold across
    the layers). The layouts stay the same, so a jitted step does not recompile. A layer with no
    mask first gets its initial layout (``max_density``, ``mask_seed``); that one change of the
    model's structure retraces a jitted step once."""
    layers = _sparse_layers(model)
    for path, layer in layers.items():
        if isinstance(layer.sparsity.get_value(), SparseWeights):
            raise ValueError(f"layer {'/'.join(map(str, path)) or '(root)'} is already in its "
                             f"packed inference form; prune the training model")
    for layer in layers.values():
        if layer.sparsity.get_value() is None:
            layer.sparsity.set_value(initial_layout(layer.hidden_features, layer.max_density,
                                                    layer.mask_seed, layer.dtype))
    params = {path: layer.cell.dense_h.kernel[...] for path, layer in layers.items()}
    masks = {path: layer.sparsity.get_value() for path, layer in layers.items()}
    # update_sparsity looks kernels up by path: give it one-level dicts with string keys.
    keys = {path: "/".join(map(str, path)) or "." for path in layers}
    new_params, new_masks = pruning.update_sparsity(
        {keys[p]: v for p, v in params.items()}, {keys[p]: v for p, v in masks.items()},
        sparsity, rule=rule)
    for path, layer in layers.items():
        layer.cell.dense_h.kernel[...] = new_params[keys[path]]
        layer.sparsity.set_value(new_masks[keys[path]])


def param_masks(model):
    """The masks for :func:`jax_sprnn.pruning.keep_pruned`, shaped like
    ``nnx.state(model, nnx.Param)``: each SparseRNN's mask at its ``cell/dense_h/kernel``, a
    scalar ``True`` elsewhere (also at the kernel of a layer with no mask). Pass them as
    ``optimizer.update(model, grads, masks=param_masks(model))``. Usable under ``nnx.jit``."""
    masks = {}
    for path, layer in _sparse_layers(model).items():
        stored = layer.sparsity.get_value()
        if isinstance(stored, PackedMask):
            masks[path + ("cell", "dense_h", "kernel")] = jnp.asarray(stored.mask)
    params = nnx.as_pure(nnx.state(model, nnx.Param))  # what nnx.Optimizer hands to optax
    return pruning.masks_at_paths(params, masks)


def to_inference(model):
    """A copy of ``model`` in which every :class:`SparseRNN` runs its packed inference weights
    (its ``sparsity`` holds :class:`jax_sprnn.SparseWeights`, its dense kernel
    ``cell.dense_h`` is gone)."""
    model = nnx.clone(model)
    for layer in _sparse_layers(model).values():
        packed = layer.to_inference()
        layer.sparsity.set_value(packed)
        del layer.cell.dense_h
    return model


__all__ = ["SparseRNNCell", "SparseRNN", "SparseBidirectional", "Sparsity", "prune", "param_masks",
           "to_inference"]
