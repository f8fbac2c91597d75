"""Flax's own serialization (``flax.serialization.to_bytes`` / ``from_bytes``, msgpack) of the
pytrees that the modules keep in their variables: :class:`PackedMask` (the training form's masks)
and :class:`SparseWeights` (the inference form). Imported by :mod:`jax_sprnn.flax` and
:mod:`jax_sprnn.nnx`.

A state dict holds the named leaves, the raw form that :func:`jax_sprnn.pruning.from_restored`
also reads. Restoring into a target (``from_bytes(target, data)``) needs the target's layout: the
leaves' shapes must match it, else the error names the leaf.
"""

from __future__ import annotations

import numpy as np
from flax import serialization

from .pruning import PackedMask
from .weights import SparseWeights


def _to_state_dict(node) -> dict:
    return {name: serialization.to_state_dict(getattr(node, name)) for name in node.LEAVES}


def _from_state_dict(target, state: dict):
    kind = type(target).__name__
    missing = [name for name in target.LEAVES if name not in state]
    if missing:
        raise ValueError(f"the serialized {kind} lacks the leaves {missing} (it has "
                         f"{sorted(state)}): restore it into a target of the same kind")
    leaves = []
    for name in target.LEAVES:
        leaf = serialization.from_state_dict(getattr(target, name), state[name], name=name)
        want = tuple(np.shape(getattr(target, name)))
        if tuple(np.shape(leaf)) != want:
            raise ValueError(f"the serialized {kind} has {name} of shape {tuple(np.shape(leaf))}, "
                             f"the target's layout {want}: restore into the target that "
                             f"model.init (or to_inference of the same model) gives")
        leaves.append(leaf)
    _, aux = target.tree_flatten()
    return type(target).tree_unflatten(aux, leaves)


for _cls in (PackedMask, SparseWeights):
    serialization.register_serialization_state(_cls, _to_state_dict, _from_state_dict,
                                               override=True)
