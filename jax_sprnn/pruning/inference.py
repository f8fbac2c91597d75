"""A trained model in its packed inference form: each kernel and its mask become SparseWeights;
and that form read back from a checkpoint restored without a target."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..planner import WARP, LayoutMeta
from ..weights import SparseWeights, check_finite, check_weight_dtype, kernel_gates, storable
from .packed import PackedMask
from .tree import COLLECTION, drop_at, get_at, mask_leaves, path_name, replace_at


def pack_inference(kernel, mask, *, dtype=None, batch: int | None = None) -> SparseWeights:
    """One layer's packed inference weights: ``kernel`` (``[H, H]`` or a gated ``[H, G*H]``, or
    stacked ``[..., H, G*H]``) at ``mask``.

    A single layer is packed tightly by the planner (:meth:`SparseWeights.from_dense`). Stacked
    layers (``nn.scan``) must share one layout to stay stacked, so they are packed into the
    layout planned for their largest row and column counts. ``batch``: the batch the layer will
    mostly run at, if known (:meth:`SparseWeights.from_dense`).
    """
    kernel = np.asarray(jnp.asarray(kernel, jnp.float32))
    mask = np.asarray(mask)
    if kernel.shape != mask.shape or kernel.ndim < 2:
        raise ValueError(f"kernel and mask must have one shape [..., H, H] or [..., H, G*H], got "
                         f"{kernel.shape} and {mask.shape}")
    kernel_gates(kernel.shape[-2:], "kernel")
    if mask.dtype != bool:  # a 0/1 float mask cast to bool would keep every nonzero entry
        raise TypeError(f"mask must be a boolean array, got {mask.dtype}")
    dtype = check_weight_dtype(np.float32 if dtype is None else dtype, "dtype")
    if kernel.ndim == 2:
        return SparseWeights.from_dense(kernel, mask, dtype=dtype, batch=batch)
    check_finite(kernel, "kernel")
    storable(kernel[mask], dtype)  # what from_dense checks for one layer
    lead = kernel.shape[:-2]
    k = kernel.reshape((-1,) + kernel.shape[-2:])
    m = mask.reshape(k.shape)
    template = PackedMask.create(m[0], row_budget=max(1, int(m.sum(axis=1).max())),
                                 col_budget=max(1, int(m.sum(axis=2).max())), dtype=dtype, batch=batch)
    layers = [template.with_mask(m[i]).weights(k[i]) for i in range(k.shape[0])]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *layers)


def to_inference(variables: Mapping, *, batch: int | None = None) -> dict:
    """The packed inference form of a trained Flax (linen) model, in one call.

    ``variables``: ``{'params': ..., 'sparsity': ..., ...}`` as ``model.init`` made them and
    training updated them. Returns new variables in which every PackedMask of the sparsity
    collection is replaced by the :class:`SparseWeights` of its kernel (packed tightly for
    inference) and those dense kernels are removed from ``params``. ``model.apply`` runs the
    result directly: the modules use the packed weights when they find them. To get the layers'
    weights alone, take the SparseWeights leaves of ``result['sparsity']``. Trees of dicts, lists
    and tuples are walked alike. A plain boolean mask in the collection is an error (there is no
    layout to pack it into here): :func:`pack_inference` packs such a kernel on its own.
    ``batch``: the batch the model will mostly run at, if known; each layer's layout is then
    planned for it (:meth:`SparseWeights.from_dense`).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with 'params' and "
                         f"'{COLLECTION}' collections (what model.init returns)")
    if COLLECTION not in variables:
        raise ValueError(f"variables has no '{COLLECTION}' collection: the model has no "
                         "jax_sprnn.flax.SparseRNN layers, or it was dropped before this call")
    params, sparsity = variables["params"], variables[COLLECTION]
    found = mask_leaves(sparsity)
    plain = [path_name(p) for p, e in found.items() if not isinstance(e, PackedMask)]
    if plain:  # (skipped, those kernels would stay dense)
        raise ValueError(f"to_inference packs PackedMask leaves (what the jax_sprnn.flax layers "
                         f"hold); the masks at {', '.join(plain)} are boolean arrays: pack each "
                         f"with pruning.pack_inference(kernel, mask)")
    packed = {p: pack_inference(get_at(params, p, "params"), e.mask, dtype=e.dtype, batch=batch)
              for p, e in found.items()}
    out = dict(variables)
    out["params"] = drop_at(params, set(packed))
    out[COLLECTION] = replace_at(sparsity, packed)
    return out


def from_restored(tree):
    """The inference form of :func:`to_inference` from a checkpoint restored without a target.

    A checkpointer restoring without a target (``orbax.checkpoint.StandardCheckpointer().restore(
    path)``) gives each SparseWeights back as its raw leaves: a dict of ``values``, ``indices``,
    ``lane_row``, ``indices_t``, ``lane_row_t`` and ``perm_t`` (or a list of those six arrays, from
    checkpoints written before SparseWeights named its leaves). The layout's static sizes are not in
    the checkpoint, so each one is read back (pattern and values) and packed again as
    :func:`to_inference` packs it: on the same kind of device the layout, and so every output, is
    the same bit for bit; on another device the layout is planned for that device.

    ``tree``: the restored variables (only their ``'sparsity'`` collection is read), or any tree
    holding restored SparseWeights. Returns it with SparseWeights in their places; SparseWeights
    already there are kept. A training checkpoint (``PackedMask`` leaves) is restored with a target
    from ``model.init`` instead (docs/flax.md, Checkpoints).
    """
    if isinstance(tree, Mapping) and COLLECTION in tree:
        out = dict(tree)
        out[COLLECTION] = _rebuild(tree[COLLECTION])
        return out
    return _rebuild(tree)


def _rebuild(node):
    if isinstance(node, (SparseWeights, PackedMask)):
        return node
    leaves = _raw_weights_leaves(node)
    if leaves is not None:
        return _repack(leaves)
    if isinstance(node, Mapping):
        if set(node) == set(PackedMask.LEAVES):
            raise ValueError("found a PackedMask restored without a target (the training form): "
                             "restore it with a target from model.init (docs/flax.md, "
                             "Checkpoints); from_restored reads the inference form")
        return {key: _rebuild(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_rebuild(value) for value in node)
    return node


def _raw_weights_leaves(node) -> list | None:
    """The leaves of a SparseWeights restored without a target, in ``SparseWeights.LEAVES`` order,
    or None when ``node`` is something else."""
    if isinstance(node, Mapping):
        return [node[n] for n in SparseWeights.LEAVES] if set(node) == set(SparseWeights.LEAVES) else None
    if not (isinstance(node, (list, tuple)) and len(node) == len(SparseWeights.LEAVES)
            and all(hasattr(a, "dtype") for a in node)):
        return None
    values_ok = np.dtype(node[0].dtype) in (np.float32, np.float16, jnp.bfloat16)
    return list(node) if values_ok and all(np.dtype(a.dtype) == np.int32 for a in node[1:]) else None


def _repack(leaves) -> SparseWeights:
    """Unpack the forward layout of raw SparseWeights leaves (stacked layers too) to kernel and
    mask, and pack those as :func:`to_inference` does."""
    values, indices, lane_row = (np.asarray(a) for a in leaves[:3])
    lane_row_t = np.asarray(leaves[SparseWeights.LEAVES.index("lane_row_t")])
    lead = values.shape[:-1]
    if indices.shape != values.shape or lane_row.shape[:-1] != lead:
        raise ValueError(f"restored SparseWeights leaves disagree: values {values.shape}, indices "
                         f"{indices.shape}, lane_row {lane_row.shape}")
    lanes, slots = lane_row.shape[-1], values.shape[-1]
    if lanes == 0 or lanes % WARP or slots % lanes:
        raise ValueError(f"restored SparseWeights leaves have {slots} slots and {lanes} lanes, "
                         f"not a layout of whole warps")
    # Only the sizes that locate a slot (its lane and row) are needed to read a layout back. Every
    # row owns a lane: the forward layout has G*H rows, the transposed one H (the input units).
    num_rows, hidden = int(lane_row.max()) + 1, int(lane_row_t.max()) + 1
    if hidden < 1 or num_rows % hidden:
        raise ValueError(f"restored SparseWeights leaves have {num_rows} rows and {hidden} input units, "
                         f"not a kernel [H, G*H]")
    meta = LayoutMeta(hidden=hidden, slots_per_lane=slots // lanes, num_warps=lanes // WARP,
                      warps_per_cta=1, reg_slots=0, load_bytes=16, fits=False,
                      reason="read back from a checkpoint", gates=num_rows // hidden)
    kernels, masks = [], []
    for v, idx, rows in zip(values.reshape(-1, slots), indices.reshape(-1, slots),
                            lane_row.reshape(-1, lanes)):
        layer = SparseWeights(v, indices=idx, lane_row=rows, indices_t=None, lane_row_t=None,
                              perm_t=None, meta=meta, meta_t=meta)
        kernels.append(np.asarray(layer.to_dense()))
        masks.append(layer.mask())
    shape = lead + kernels[0].shape
    return pack_inference(np.stack(kernels).reshape(shape), np.stack(masks).reshape(shape),
                          dtype=values.dtype)
