"""A trained model in its packed inference form: each kernel and its mask become SparseWeights."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..weights import SparseWeights, check_weight_dtype
from .packed import PackedMask
from .tree import COLLECTION, drop_at, get_at, mask_leaves, replace_at


def pack_inference(kernel, mask, *, dtype=None) -> SparseWeights:
    """One layer's packed inference weights: ``kernel`` (``[H, H]``, or stacked ``[..., H, H]``)
    at ``mask``.

    A single layer is packed tightly by the planner (:meth:`SparseWeights.from_dense`). Stacked
    layers (``nn.scan``) must share one layout to stay stacked, so they are packed into the
    layout planned for their largest row and column counts.
    """
    kernel = np.asarray(jnp.asarray(kernel, jnp.float32))
    mask = np.asarray(mask)
    if kernel.shape != mask.shape or kernel.ndim < 2:
        raise ValueError(f"kernel and mask must have one shape [..., H, H], got {kernel.shape} "
                         f"and {mask.shape}")
    dtype = check_weight_dtype(np.float32 if dtype is None else dtype, "dtype")
    if kernel.ndim == 2:
        return SparseWeights.from_dense(kernel, mask.astype(bool), dtype=dtype)
    lead = kernel.shape[:-2]
    k = kernel.reshape((-1,) + kernel.shape[-2:])
    m = mask.astype(bool).reshape(k.shape)
    template = PackedMask.create(m[0], row_budget=max(1, int(m.sum(axis=1).max())),
                                 col_budget=max(1, int(m.sum(axis=2).max())), dtype=dtype)
    layers = [template.with_mask(m[i]).weights(k[i]) for i in range(k.shape[0])]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs).reshape(lead + xs[0].shape), *layers)


def to_inference(variables: Mapping) -> dict:
    """The packed inference form of a trained Flax (linen) model, in one call.

    ``variables``: ``{'params': ..., 'sparsity': ..., ...}`` as ``model.init`` made them and
    training updated them. Returns new variables in which every PackedMask of the sparsity
    collection is replaced by the :class:`SparseWeights` of its kernel (packed tightly for
    inference) and those dense kernels are removed from ``params``. ``model.apply`` runs the
    result directly: the modules use the packed weights when they find them. To get the layers'
    weights alone, take the SparseWeights leaves of ``result['sparsity']``.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping with 'params' and "
                         f"'{COLLECTION}' collections (what model.init returns)")
    if COLLECTION not in variables:
        raise ValueError(f"variables has no '{COLLECTION}' collection: the model has no "
                         "jax_sprnn.flax.SparseRNN layers, or it was dropped before this call")
    params, sparsity = variables["params"], variables[COLLECTION]
    found = {p: e for p, e in mask_leaves(sparsity).items() if isinstance(e, PackedMask)}
    packed = {p: pack_inference(get_at(params, p, "params"), e.mask, dtype=e.dtype)
              for p, e in found.items()}
    out = dict(variables)
    out["params"] = drop_at(params, set(packed))
    out[COLLECTION] = replace_at(sparsity, packed)
    return out
