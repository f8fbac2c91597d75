"""Pruning for sparse recurrent layers: masks, the gradual schedule, and export to the packed form.

The pieces, in the order a training loop uses them (docs/flax.md walks through the loop):

* :func:`magnitude_mask` / :func:`magnitude_masks` (``masks.py``): keep the largest-magnitude
  weights, by a ``rule`` of :data:`RULES`: one threshold per layer (``"layer"``), one across all
  layers (``"global"``), or an equal count per row (``"per_row"``: rows of the kernel as Flax
  stores it; ``"row_balanced"``: rows of ``U = kernel.T``, the output units, which is the balance
  the persistent kernel's layout wants).
* :func:`cubic_schedule` (``schedule.py``): the gradual pruning schedule of Zhu & Gupta (2017),
  "To prune, or not to prune" (arXiv:1710.01878).
* :class:`PackedMask` (``packed.py``): a mask together with its packed layout (the index arrays of
  docs/format.md), planned for fixed budgets so that a new mask does not recompile a jitted step.
* :func:`update_sparsity` and :func:`keep_pruned` (``training.py``): recompute, repack and apply
  the masks between steps; an optax wrapper that keeps pruned weights at exactly zero.
* :func:`to_inference` (``inference.py``): the trained model in its packed inference form;
  :func:`from_restored` reads that form back from a checkpoint restored without a target.

``tree.py`` finds the masks in a model's variable trees. Masks are boolean arrays in Flax
orientation (``[H_in, H_out]``, like the kernel they mask). Mask computation and packing run on the
host in NumPy, between steps; nothing here needs a GPU.
"""

from .inference import from_restored, pack_inference, to_inference
from .masks import (RULES, balanced_pattern, budgets_for_density, fit_to_budgets, initial_mask,
                    magnitude_mask, magnitude_masks)
from .packed import PackedMask
from .schedule import CubicSchedule, cubic_schedule
from .training import keep_pruned, masks_of, param_masks, update_sparsity
from .tree import COLLECTION, masks_at_paths

__all__ = [
    "RULES", "COLLECTION", "magnitude_mask", "magnitude_masks", "CubicSchedule", "cubic_schedule",
    "balanced_pattern", "budgets_for_density", "initial_mask", "PackedMask", "fit_to_budgets",
    "masks_of", "param_masks", "masks_at_paths", "update_sparsity", "keep_pruned",
    "pack_inference", "to_inference", "from_restored",
]
