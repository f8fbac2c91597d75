"""Pruning during training: recompute the masks between steps, and keep pruned weights at zero.

The loop (docs/flax.md): every step runs ``keep_pruned``'s optimizer with ``param_masks``; when the
schedule says so, ``update_sparsity`` recomputes the masks from the weights and repacks them into
their layouts, so the jitted step does not recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..weights import SparseWeights, check_finite
from .masks import check_rule, check_sparsity, fit_to_budgets, magnitude_masks, ranked, real_weights
from .packed import PackedMask
from .tree import get_at, is_packed, mask_leaves, masks_at_paths, path_name, replace_at


def masks_of(sparsity):
    """The boolean masks of a sparsity tree (PackedMask leaves become their ``mask``)."""
    return jax.tree_util.tree_map(lambda x: x.mask if isinstance(x, PackedMask) else x, sparsity,
                                  is_leaf=is_packed)


def param_masks(params, sparsity):
    """A pytree with the structure of ``params``: each pruned kernel's boolean mask, and a scalar
    ``True`` for every other parameter. What :func:`keep_pruned` takes as ``masks=``.

    ``sparsity`` is the model's sparsity collection (PackedMask leaves at the paths of their
    kernels in ``params``), or a tree of boolean masks with those paths. Usable under jit.
    """
    masks = {}
    for path, entry in mask_leaves(sparsity).items():
        mask = entry.mask if isinstance(entry, PackedMask) else entry
        kernel = get_at(params, path, "params")
        if np.shape(kernel) != np.shape(mask):
            raise ValueError(f"the mask at {path_name(path)} has shape {np.shape(mask)}, "
                             f"its kernel {np.shape(kernel)}")
        masks[path] = jnp.asarray(mask)
    return masks_at_paths(params, masks)


def update_sparsity(params, sparsity, target_sparsity: float, *, rule: str = "row_balanced"):
    """Recompute every mask from the current weights and zero the pruned weights.

    Call it between training steps, when the schedule says so
    (``schedule.is_update_step(step)``). For each mask in ``sparsity`` (the model's sparsity
    collection: PackedMask leaves, or plain boolean masks at the kernels' paths) the new mask keeps
    the largest magnitudes of ``kernel * current_mask`` (so masks are nested) at
    ``target_sparsity``, by ``rule`` (see :func:`magnitude_mask`; ``"global"`` shares one
    threshold across all masked kernels). A PackedMask is repacked into its own layout, so the
    training step does not recompile; where a mask exceeds the layout's budgets (only possible
    for ``max_density < 1``, when a target below the layout's density takes back pruned weights)
    those taken back are trimmed again, the smallest first; live weights always fit.

    Returns ``(params, sparsity)``, both new pytrees of the same structure.
    """
    target_sparsity = check_sparsity(target_sparsity)
    check_rule(rule)
    found = mask_leaves(sparsity)
    if not found and any(isinstance(x, SparseWeights) for x in jax.tree_util.tree_leaves(
            sparsity, is_leaf=lambda x: isinstance(x, SparseWeights))):
        raise ValueError("sparsity is the inference form (to_inference packed its masks into "
                         "SparseWeights): prune the training form's variables instead")
    if not found:
        raise ValueError("sparsity holds no masks (expected the 'sparsity' collection of a model "
                         "with jax_sprnn.flax.SparseRNN layers, or boolean masks)")
    paths = list(found)  # a list, not a dict: paths mix str and int keys, which do not sort
    kernels = [real_weights(get_at(params, p, "params"), f"the kernel at params/{path_name(p)}")
               for p in paths]
    current = [np.asarray(found[p].mask if isinstance(found[p], PackedMask) else found[p])
               for p in paths]
    for p, k, c in zip(paths, kernels, current):
        if k.shape != c.shape:
            raise ValueError(f"the mask at {path_name(p)} has shape {c.shape}, its kernel {k.shape}")
        check_finite(k, f"the kernel at params/{path_name(p)}")
    new_masks = dict(zip(paths, magnitude_masks(kernels, target_sparsity, rule=rule,
                                                current=current)))
    kernels = dict(zip(paths, kernels))
    current_at = dict(zip(paths, current))
    new_params, new_sparsity = {}, {}
    for path, entry in found.items():
        mask = new_masks[path]
        if isinstance(entry, PackedMask):
            lead = mask.shape[:-2]
            layers = []
            flat_mask = mask.reshape((-1,) + mask.shape[-2:])
            flat_kernel = kernels[path].reshape(flat_mask.shape)
            flat_current = current_at[path].reshape(flat_mask.shape)
            for i, layer in enumerate(entry.unstack()):
                # Ranked as the new mask was, so the trim drops only pruned weights the mask took
                # back: the live ones are a subset of the current mask, which fits the budgets.
                scores = ranked(np.abs(flat_kernel[i]), flat_current[i])
                flat_mask[i], _ = fit_to_budgets(flat_mask[i], scores, layer.row_budget,
                                                 layer.col_budget)
                layers.append(layer.with_mask(flat_mask[i]))
            mask = flat_mask.reshape(mask.shape)
            new_sparsity[path] = PackedMask.stack(layers, lead)
        else:
            new_sparsity[path] = jnp.asarray(mask)
        kernel = get_at(params, path, "params")
        new_params[path] = jnp.where(jnp.asarray(mask), kernel, jnp.zeros((), kernel.dtype))
    return replace_at(params, new_params), replace_at(sparsity, new_sparsity)


def _check_masks(masks, params) -> None:
    """``keep_pruned``'s ``masks``: the structure of ``params``, each mask of its parameter's
    shape or a scalar (a smaller mask would broadcast and leave pruned weights alive)."""
    try:
        pairs = jax.tree_util.tree_flatten_with_path(params)[0]
        mask_leaves = jax.tree_util.tree_structure(params).flatten_up_to(masks)
    except (ValueError, TypeError) as e:
        raise ValueError("keep_pruned: masks must have the structure of params (pass "
                         "masks=pruning.param_masks(params, sparsity))") from e
    for (path, param), mask in zip(pairs, mask_leaves):
        if np.shape(mask) not in ((), np.shape(param)):
            raise ValueError(f"keep_pruned: the mask at {jax.tree_util.keystr(path)} has shape "
                             f"{np.shape(mask)}; expected the parameter's {np.shape(param)} or a "
                             f"scalar")


def keep_pruned(inner):
    """Wrap an optax optimizer so that pruned weights stay at exactly zero.

    The wrapped transformation's ``update(grads, state, params, *, masks)`` takes ``masks`` (from
    :func:`param_masks`, a pytree with the structure of ``params``) as data, so a new mask does
    not recompile a jitted step. Gradients of pruned weights are zeroed before ``inner`` sees them
    (its moments never learn from them), and its updates of pruned weights are replaced by
    ``-params``, so ``optax.apply_updates`` lands them on exactly zero, also right after a mask
    change. Needs optax (``pip install 'jax_sprnn[flax]'``).

    Make it the outermost transformation: one chained after it (``optax.chain(keep_pruned(adam),
    clip)``) rescales the ``-params`` updates, and the pruned weights no longer land on zero.
    Transformations inside it (``keep_pruned(optax.chain(clip, adam))``) are fine. Moments the
    inner optimizer learned for a weight before a mask pruned it stay in its state; they never
    move the weight while it is pruned.
    """
    try:
        import optax
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("jax_sprnn.pruning.keep_pruned needs optax: "
                                  "pip install 'jax_sprnn[flax]'") from e

    inner = optax.with_extra_args_support(inner)

    def init(params):
        return inner.init(params)

    # ``extra``: the other keyword arguments of GradientTransformationExtraArgs, passed on to inner.
    def update(updates, state, params=None, *, masks=None, **extra):
        if masks is None:
            raise ValueError("keep_pruned: pass masks=pruning.param_masks(params, sparsity)")
        if params is None:
            raise ValueError("keep_pruned: pass params (the update zeroes pruned params)")
        _check_masks(masks, params)
        updates = jax.tree_util.tree_map(
            lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, masks)
        updates, state = inner.update(updates, state, params, **extra)
        updates = jax.tree_util.tree_map(
            lambda u, m, p: jnp.where(m, u, -p.astype(u.dtype)), updates, masks, params)
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)
