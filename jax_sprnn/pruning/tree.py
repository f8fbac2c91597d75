"""Masks in a model's variable trees: where they are, and trees rebuilt around them.

A mask sits in the ``sparsity`` collection at the path of the kernel it masks in ``params`` (for a
linen ``SparseRNN``, ``{'cell': {'h': {'kernel': PackedMask}}}`` beside
``{'cell': {'h': {'kernel': array}}}``). Paths are tuples of plain keys (dict keys, sequence
indices, attribute names).

A gated kernel ``[H, G*H]`` that Flax keeps as G kernels ``[H, H]`` (linen's ``nn.LSTMCell``:
``hi``, ``hf``, ``hg``, ``ho``) has one mask, at a path whose key joins the G names with
:data:`JOIN`: ``{'cell': {'hi+hf+hg+ho': {'kernel': PackedMask}}}``. Its kernel in ``params`` is
those G kernels side by side, in the joined order (:func:`get_at`), and a kernel or mask given at
the joined path is split back into them (:func:`replace_at`, :func:`masks_at_paths`,
:func:`drop_at`).
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
    found = {}
    for p, leaf in flat:
        if isinstance(leaf, PackedMask):
            found[tree_path(p)] = leaf
        elif is_packed(leaf):  # SparseWeights: the inference form's weights, no mask to train
            continue
        elif hasattr(leaf, "dtype"):  # (a leaf skipped would leave its kernel unpruned)
            if np.dtype(leaf.dtype) != bool:
                raise TypeError(f"the mask at {path_name(tree_path(p))} is {np.dtype(leaf.dtype)}; "
                                f"masks are boolean arrays (mask != 0) or PackedMask")
            if np.ndim(leaf) < 2:
                raise ValueError(f"the mask at {path_name(tree_path(p))} has shape "
                                 f"{np.shape(leaf)}; a mask has its kernel's shape, [H, G*H] or "
                                 f"stacked [..., H, G*H]")
            found[tree_path(p)] = leaf
    return found


#: Joins, in one key of a mask's path, the names of the kernels it covers side by side.
JOIN = "+"


def _parts(path: tuple) -> list[tuple] | None:
    """The paths of the kernels that a joined ``path`` covers, in order (None if not joined)."""
    joined = [i for i, key in enumerate(path) if isinstance(key, str) and JOIN in key]
    if len(joined) != 1:
        return None
    i = joined[0]
    return [path[:i] + (name,) + path[i + 1:] for name in path[i].split(JOIN)]


def _lookup(tree, path: tuple):
    node = tree
    for key in path:
        node = node[key]
    return node


def get_at(tree, path: tuple, what: str):
    """The entry of ``tree`` (named ``what`` in errors) at ``path``, a mask's path; at a joined
    path that ``tree`` lacks, its kernels side by side (last axis)."""
    try:
        return _lookup(tree, path)
    except (KeyError, IndexError, TypeError):
        pass
    try:
        parts = _parts(path)
        if parts is not None:
            return jnp.concatenate([_lookup(tree, p) for p in parts], axis=-1)
    except (KeyError, IndexError, TypeError):
        pass
    raise ValueError(f"{what} has no entry at {path_name(path)} (the path of a mask in the "
                     f"sparsity tree)")


def _joined_parts(tree, paths) -> dict[tuple, list[tuple]]:
    """For each joined path among ``paths`` that ``tree`` lacks, the paths of its kernels."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_packed)
    present = {tree_path(p) for p, _ in flat}
    return {path: parts for path in paths
            if path not in present and (parts := _parts(path)) is not None}


def _split_joined(tree, new: Mapping[tuple, Any]) -> dict:
    """``new`` with each joined path that ``tree`` lacks replaced by its kernels' paths, the value
    split along its last axis at their widths."""
    joined = _joined_parts(tree, new)
    out = {}
    for path, value in new.items():
        if path in joined:
            widths = [np.shape(_lookup(tree, part))[-1] for part in joined[path]]
            out.update(zip(joined[path], jnp.split(jnp.asarray(value), np.cumsum(widths)[:-1],
                                                   axis=-1)))
        else:
            out[path] = value
    return out


def replace_at(tree, new: Mapping[tuple, Any]):
    """``tree`` with the leaves at the paths of ``new`` replaced (any pytree of dicts and lists)."""
    new = _split_joined(tree, new)

    def swap(path, leaf):
        return new.get(tree_path(path), leaf)
    return jax.tree_util.tree_map_with_path(swap, tree, is_leaf=is_packed)


def masks_at_paths(params, masks: Mapping[tuple, Any]):
    """A pytree with the structure of ``params``: ``masks[path]`` at each of its paths, and a
    scalar ``True`` for every other parameter. What ``keep_pruned`` takes as ``masks=``. A path
    that names no parameter, or a mask of another shape than its parameter's, is an error."""
    masks = _split_joined(params, masks)
    leaves = {tree_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, mask in masks.items():
        if path not in leaves:
            raise ValueError(f"masks has a mask at {path_name(path)}, where params has no "
                             f"parameter")
        if np.shape(mask) != np.shape(leaves[path]):
            raise ValueError(f"the mask at {path_name(path)} has shape {np.shape(mask)}, its "
                             f"parameter {np.shape(leaves[path])}")
    return jax.tree_util.tree_map_with_path(
        lambda p, x: masks.get(tree_path(p), jnp.ones((), bool)), params)


def drop_at(tree, paths: set):
    """A copy of ``tree`` (nested mappings, lists and tuples) without the mapping entries at
    ``paths``; a mapping emptied by the removal goes too, unless it is an item of a sequence
    (whose positions are its keys). A path that names an item of a sequence is an error."""
    joined = _joined_parts(tree, paths)
    paths = {part for path in paths for part in joined.get(path, [path])}

    def walk(node, prefix):
        if isinstance(node, (list, tuple)):
            for i in range(len(node)):
                if prefix + (i,) in paths:
                    raise ValueError(f"cannot drop {path_name(prefix + (i,))}: it is an item of "
                                     f"a sequence, whose later items would move")
            return type(node)(walk(value, prefix + (i,)) for i, value in enumerate(node))
        if not isinstance(node, Mapping):
            return node
        out = {}
        for key, value in node.items():
            path = prefix + (key,)
            if path in paths:
                continue
            if isinstance(value, (Mapping, list, tuple)) and value:
                value = walk(value, path)
                if isinstance(value, Mapping) and not value:
                    continue
            out[key] = value
        return out
    return walk(tree, ())
