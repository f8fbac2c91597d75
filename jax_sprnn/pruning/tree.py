"""Masks in a model's variable trees: where they are, and trees rebuilt around them.

A mask sits in the ``sparsity`` collection at the path of the kernel it masks in ``params`` (for a
linen ``SparseRNN``, ``{'cell': {'h': {'kernel': PackedMask}}}`` beside
``{'cell': {'h': {'kernel': array}}}``). Paths are tuples of plain keys (dict keys, sequence
indices, attribute names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..weights import PackedLayout
from .packed import PackedMask

#: The name of the Flax variable collection that holds the packed masks.
COLLECTION = "sparsity"


def tree_path(key_path) -> tuple:
    """A JAX key path (from ``jax.tree_util.tree_flatten_with_path``) as a tuple of plain keys."""
    def plain(entry) -> Any:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return getattr(entry, attr)
        return entry
    return tuple(plain(e) for e in key_path)


def path_name(path: tuple) -> str:
    return "/".join(map(str, path))


def is_packed(x) -> bool:
    """Whether ``x`` is one packed leaf of a sparsity tree (a PackedMask or SparseWeights)."""
    return isinstance(x, PackedLayout)


def mask_leaves(sparsity) -> dict[tuple, Any]:
    """``{path: PackedMask or boolean mask}`` for every mask in a sparsity tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(sparsity, is_leaf=is_packed)
    return {tree_path(p): leaf for p, leaf in flat if isinstance(leaf, PackedMask) or
            (hasattr(leaf, "dtype") and np.dtype(leaf.dtype) == bool and np.ndim(leaf) >= 2)}


def get_at(tree, path: tuple, what: str):
    """The entry of ``tree`` (named ``what`` in errors) at ``path``, a mask's path."""
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{what} has no entry at {path_name(path)} (the path of a mask in the "
                             f"sparsity tree)") from None
    return node


def replace_at(tree, new: Mapping[tuple, Any]):
    """``tree`` with the leaves at the paths of ``new`` replaced (any pytree of dicts and lists)."""
    def swap(path, leaf):
        return new.get(tree_path(path), leaf)
    return jax.tree_util.tree_map_with_path(swap, tree, is_leaf=is_packed)


def masks_at_paths(params, masks: Mapping[tuple, Any]):
    """A pytree with the structure of ``params``: ``masks[path]`` at each of its paths, and a
    scalar ``True`` for every other parameter. What ``keep_pruned`` takes as ``masks=``."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: masks.get(tree_path(p), jnp.ones((), bool)), params)


def drop_at(tree, paths: set):
    """A copy of nested mappings ``tree`` without the leaves at ``paths``; a mapping emptied by
    the removal goes too."""
    def walk(node, prefix):
        out = {}
        for key, value in node.items():
            path = prefix + (key,)
            if path in paths:
                continue
            if isinstance(value, Mapping) and value:
                value = walk(value, path)
                if not value:
                    continue
            out[key] = value
        return out
    return walk(tree, ())
