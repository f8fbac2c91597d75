"""The acoustic model, DeepSpeech2-like, with sparse recurrent layers from ``jax_sprnn.flax``.

    log-mel [B, T, n_mels]
      -> Conv 5x5 stride (2, 2) -> GELU -> Conv 5x5 stride (time_stride / 2, 2) -> GELU
      -> layers x [LayerNorm -> SparseRNN (SparseBidirectional* for both directions)]
      -> LayerNorm -> Dense(characters + blank)            trained with CTC

The recurrent cell is a simple tanh cell by default, or an LSTM or a GRU (``cell``). The recurrent
layers exist in two interchangeable forms with the same parameter tree, that of
``nn.RNN(nn.SimpleCell)`` (``nn.LSTMCell``, ``nn.GRUCell``; ``jax_sprnn.flax`` guarantees it):

* ``"layer"``: :class:`jax_sprnn.flax.SparseRNN` (``SparseLSTM``, ``SparseGRU``; for both
  directions ``SparseBidirectional``, ``SparseBidirectionalLSTM``, ``SparseBidirectionalGRU``),
  the whole sequence in one ``sparse_rnn`` (``sparse_lstm``, ``sparse_gru``; ``*_bidirectional``)
  call: the persistent kernel on a GPU (one launch for both directions), the C++ kernel on a CPU.
  Its mask lives in the ``'sparsity'`` collection (a ``PackedMask`` while training; the packed
  ``SparseWeights`` after export).
* ``"cell"``: ``nn.RNN`` of ``jax_sprnn.flax.SparseRNNCell`` (``SparseLSTMCell``,
  ``SparseGRUCell``), a ``lax.scan`` of dense steps whose pruned weights are exact zeros; the masks
  are plain boolean arrays kept beside the parameters, at the paths of the layer form's masks.

A gated layer's recurrent kernels run side by side as one ``[H, G*H]`` kernel with one mask, at a
path whose key joins the gates' kernels (``cell/hi+hf+hg+ho/kernel``, docs/flax.md);
``jax_sprnn.pruning`` reads such a path in both forms.

Training on a CPU uses the cell: XLA's dense matmul on a CPU is faster than the C++ sparse kernel
(which is there for correctness and portability, not speed). Training on a GPU uses the layer. The
pruned model is always served in the layer form with packed weights (:func:`export`), which is
what the test-set CER is measured on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_sprnn import pruning
from jax_sprnn.flax import (SparseBidirectional, SparseBidirectionalGRU, SparseBidirectionalLSTM,
                            SparseGRU, SparseGRUCell, SparseLSTM, SparseLSTMCell, SparseRNN,
                            SparseRNNCell)
from jax_sprnn.pruning.tree import JOIN, drop_at, get_at

from .text import NUM_CLASSES

RNN_IMPLS = ("layer", "cell")
#: cell name: the layer form's bidirectional layer (both directions in one call)
BIDIRECTIONAL = {"simple": SparseBidirectional, "lstm": SparseBidirectionalLSTM,
                 "gru": SparseBidirectionalGRU}
#: cell name: (the layer, the cell, the names of its recurrent kernels in gate order)
CELLS = {"simple": (SparseRNN, SparseRNNCell, ("h",)),
         "lstm": (SparseLSTM, SparseLSTMCell, ("hi", "hf", "hg", "ho")),
         "gru": (SparseGRU, SparseGRUCell, ("hr", "hz", "hn"))}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's shape (everything a checkpoint depends on) and how its recurrence runs."""

    n_mels: int = 40
    hidden: int = 256
    layers: int = 2
    bidirectional: bool = True
    conv_channels: int = 16
    time_stride: int = 4
    cell: str = "simple"        # "simple" (activation below), "lstm" or "gru"
    activation: str = "tanh"
    rnn_impl: str = "cell"      # "layer" or "cell" (see the module docstring)
    method: str = "auto"        # sparse_rnn's method, for the layer form
    dtype: str = "float32"      # the recurrence's dtype (the layer form's packed weights)

    def __post_init__(self):
        for name in ("n_mels", "hidden", "layers", "conv_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.time_stride not in (1, 2, 4):
            raise ValueError(f"time_stride must be 1, 2 or 4, got {self.time_stride}")
        if self.rnn_impl not in RNN_IMPLS:
            raise ValueError(f"rnn_impl must be one of {RNN_IMPLS}, got {self.rnn_impl!r}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {tuple(CELLS)}, got {self.cell!r}")

    def shape_fields(self) -> dict:
        """The fields that decide the parameters (a checkpoint restores only into these)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("rnn_impl", "method", "dtype")}

    def output_lengths(self, frames):
        """Output frames of ``frames`` input frames (``SAME`` convolutions: ceil division)."""
        return -(-frames // self.time_stride)


class RecurrentStack(nn.Module):
    """``layers`` recurrent layers, each after a LayerNorm, optionally bidirectional (the two
    directions concatenated). Returns ``[B, T, H]`` or ``[B, T, 2H]``."""

    config: ModelConfig

    def _rnn(self, **name) -> nn.Module:
        # parent=None leaves the module unbound until nn.Bidirectional (or nn.RNN, for the cell)
        # adopts it, so the parameters sit at the standard paths, rnn_0/forward_rnn/cell/{h,i},
        # in both forms.
        c = self.config
        if not name:
            name = {"parent": None}
        layer, cell, _ = CELLS[c.cell]
        simple = {"activation_fn": c.activation} if c.cell == "simple" else {}
        if c.rnn_impl == "layer":
            return layer(c.hidden, method=c.method, dtype=jnp.dtype(c.dtype), **simple, **name)
        return nn.RNN(cell(c.hidden, dtype=jnp.dtype(c.dtype), parent=None, **simple), **name)

    @nn.compact
    def __call__(self, x, lengths):
        c = self.config
        for i in range(c.layers):
            x = nn.LayerNorm(name=f"norm_{i}")(x)
            carry = None
            if c.rnn_impl == "cell" and jnp.dtype(c.dtype) != jnp.float32:
                # The cell's default carry has the parameter dtype (float32), its steps return
                # the computation dtype, and nn.RNN's scan needs the two equal.
                carry = jnp.zeros(x.shape[:-1][:-1] + (c.hidden,), jnp.dtype(c.dtype))
                carry = (carry, carry) if c.cell == "lstm" else carry  # (c, h)
            if c.bidirectional and c.rnn_impl == "layer":  # both directions in one call
                simple = {"activation_fn": c.activation} if c.cell == "simple" else {}
                x = BIDIRECTIONAL[c.cell](c.hidden, method=c.method, dtype=jnp.dtype(c.dtype),
                                          name=f"rnn_{i}", **simple)(x, seq_lengths=lengths)
            elif c.bidirectional:
                x = nn.Bidirectional(self._rnn(), self._rnn(), name=f"rnn_{i}")(
                    x, seq_lengths=lengths, initial_carry=None if carry is None else (carry, carry))
            else:
                x = self._rnn(name=f"rnn_{i}")(x, seq_lengths=lengths, initial_carry=carry)
        return x


class SpeechModel(nn.Module):
    """Log-mel features ``[B, T, n_mels]`` and their lengths ``[B]`` to CTC logits
    ``[B, T', NUM_CLASSES]`` and output lengths ``[B]``, ``T' = ceil(T / time_stride)``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, features, lengths):
        c = self.config
        first = 2 if c.time_stride >= 2 else 1
        x = features[..., None]                                         # [B, T, F, 1]
        x = nn.gelu(nn.Conv(c.conv_channels, (5, 5), strides=(first, 2), name="conv_0")(x))
        x = nn.gelu(nn.Conv(c.conv_channels, (5, 5), strides=(c.time_stride // first, 2),
                            name="conv_1")(x))
        x = x.reshape(x.shape[:2] + (-1,))                              # [B, T', F' * C]
        lengths = c.output_lengths(lengths).astype(jnp.int32)
        x = RecurrentStack(c, name="rnn")(x, lengths)
        x = nn.LayerNorm(name="norm_out")(x)
        return nn.Dense(NUM_CLASSES, name="classifier")(x.astype(jnp.float32)), lengths


# ---------------------------------------------------------------------------------------------
# Parameters, masks and the two forms
# ---------------------------------------------------------------------------------------------

def init_variables(config: ModelConfig, key, frames: int = 64) -> dict:
    """``model.init`` on a dummy batch; ``{'params': ..., 'sparsity': ...}`` (the layer form) or
    ``{'params': ...}`` (the cell form)."""
    features = jnp.zeros((1, frames, config.n_mels), jnp.float32)
    # Jitted: run eagerly, init compiles every small op (and each scan) on its own, which takes
    # seconds on a CPU.
    return jax.jit(SpeechModel(config).init)(key, features, jnp.array([frames]))


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)


def recurrent_kernel_paths(params) -> list[tuple]:
    """Paths of the masks of the recurrent kernels in either form: ``.../h/kernel`` for simple
    cells, the joined ``.../hi+hf+hg+ho/kernel`` (``hr+hz+hn``) of a gated cell's kernels side by
    side. :func:`kernel_at` reads the kernel at such a path."""
    flat = [_path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    paths = []
    for _, _, names in CELLS.values():
        for path in flat:
            if path[-2:] == (names[0], "kernel") and all(
                    path[:-2] + (name, "kernel") in flat for name in names):
                paths.append(path[:-2] + (JOIN.join(names), "kernel"))
    return paths


def kernel_at(params, path: tuple):
    """The recurrent kernel at a mask's path: ``[H, H]``, or a gated cell's ``[H, G*H]``."""
    return get_at(params, path, "params")


def _nested(items: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, value in items.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def dense_masks(params) -> dict:
    """All-true boolean masks at the recurrent kernels' paths: the cell form's starting
    ``sparsity`` (what ``jax_sprnn.pruning.update_sparsity`` accepts in place of PackedMasks)."""
    return _nested({p: jnp.ones(kernel_at(params, p).shape, bool)
                    for p in recurrent_kernel_paths(params)})


def boolean_masks(sparsity) -> dict:
    """Plain boolean masks of a sparsity tree (PackedMask leaves or boolean masks)."""
    return jax.tree_util.tree_map(np.asarray, pruning.masks_of(sparsity))


def density(sparsity) -> float:
    """Fraction of recurrent weights kept, over all recurrent kernels."""
    masks = jax.tree_util.tree_leaves(boolean_masks(sparsity))
    return float(sum(m.sum() for m in masks) / max(1, sum(m.size for m in masks)))


def export(config: ModelConfig, params, sparsity, *, method: str = "auto") -> tuple[ModelConfig, dict]:
    """The packed inference form of a trained model (either form): ``(config, variables)`` for the
    layer form, whose ``'sparsity'`` collection holds each recurrent layer's ``SparseWeights``
    (packed tightly for its mask by ``jax_sprnn.pruning.pack_inference``) and whose ``params`` no
    longer hold the dense recurrent kernels. ``SpeechModel(config).apply(variables, ...)`` runs it.
    """
    masks = boolean_masks(sparsity)
    dtype = np.dtype(config.dtype)
    packed = {p: pruning.pack_inference(kernel_at(params, p), _get(masks, p), dtype=dtype)
              for p in recurrent_kernel_paths(params)}
    inference = dataclasses.replace(config, rnn_impl="layer", method=method)
    return inference, {"params": drop_at(params, set(packed)),
                       pruning.COLLECTION: _nested(packed)}


def count_parameters(params) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
