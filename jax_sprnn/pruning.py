"""Pruning for sparse recurrent layers: masks, the gradual schedule, and export to the packed form.

The pieces, in the order a training loop uses them (docs/flax.md walks through the loop):

* :func:`magnitude_mask` / :func:`magnitude_masks`: keep the largest-magnitude weights, with one
  threshold per layer (``"layer"``), one across all layers (``"global"``), or an equal count per row
  (``"per_row"``: rows of the kernel as Flax stores it; ``"row_balanced"``: rows of ``U = kernel.T``,
  the output units, which is the balance the persistent kernel's layout wants).
* :func:`cubic_schedule`: the gradual pruning schedule of Zhu & Gupta (2017), "To prune, or not to
  prune" (arXiv:1710.01878).
* :class:`PackedMask`: a mask together with its packed layout (the index arrays of
  docs/format.md). Its layout sizes are planned for a fixed per-row and per-column *budget*, and
  every later mask is packed into that same layout, so a jitted training step that takes the
  :class:`PackedMask` as an argument does not recompile when the mask changes.
* :func:`update_sparsity`: recompute the masks of a model from its weights, repack them, and zero
  the pruned weights, all in one call between training steps.
* :func:`keep_pruned`: an optax wrapper that keeps pruned weights at exactly zero.
* :func:`to_inference`: the trained model in its packed inference form, in one call.

Masks are boolean arrays in Flax orientation (``[H_in, H_out]``, like the kernel they mask). Mask
computation and packing run on the host in NumPy, between steps; nothing here needs a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .layout import LayoutMeta, pack_pattern
from .planner import DeviceSpec, Plan, plan_layout
from .weights import SparseWeights, check_weight_dtype

METHODS = ("layer", "global", "per_row", "row_balanced")

#: The name of the Flax variable collection that holds the packed masks.
COLLECTION = "sparsity"


# ---------------------------------------------------------------------------------------------
# Magnitude masks
# ---------------------------------------------------------------------------------------------

def _check_sparsity(sparsity) -> float:
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return sparsity


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _scores(kernel, current) -> np.ndarray:
    """Magnitudes, with weights outside ``current`` ranked below every kept weight.

    So a new mask is nested in the current one unless it needs more weights than the current mask
    holds (only ``row_balanced`` ever does, and then it tops up with the already-pruned weights).
    """
    kernel = np.asarray(jnp.asarray(kernel, jnp.float32))
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be a 2-D [H_in, H_out] matrix, got shape {kernel.shape}")
    scores = np.abs(kernel)
    if current is not None:
        current = np.asarray(current)
        if current.shape != kernel.shape:
            raise ValueError(f"current must have the kernel's shape {kernel.shape}, got {current.shape}")
        if current.dtype != bool:
            raise TypeError(f"current must be a boolean mask, got {current.dtype}")
        scores = np.where(current, scores, -1.0)
    return scores


def _top_k(scores: np.ndarray, k: int, axis: int | None) -> np.ndarray:
    """Boolean mask of the ``k`` largest scores along ``axis`` (all entries if None); ties go to
    the earlier position, so the result is deterministic."""
    if axis is None:
        flat = scores.ravel()
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-flat, kind="stable")[:k]] = True
        return keep.reshape(scores.shape)
    order = np.argsort(-scores, axis=axis, kind="stable")
    keep = np.zeros(scores.shape, bool)
    np.put_along_axis(keep, np.take(order, np.arange(k), axis=axis), True, axis=axis)
    return keep


def _mask_from_scores(scores: np.ndarray, sparsity: float, method: str) -> np.ndarray:
    density = 1.0 - sparsity
    if method in ("layer", "global"):
        return _top_k(scores, int(round(density * scores.size)), None)
    if method == "per_row":  # rows of the stored kernel: the weights leaving one input unit
        return _top_k(scores, int(round(density * scores.shape[1])), 1)
    # row_balanced: rows of U = kernel.T, i.e. the columns of the stored kernel
    return _top_k(scores, int(round(density * scores.shape[0])), 0)


def magnitude_mask(kernel, sparsity: float, *, method: str = "row_balanced", current=None
                   ) -> np.ndarray:
    """The boolean mask that keeps the largest-magnitude weights of one kernel.

    Args:
      kernel: ``[H_in, H_out]`` weights (Flax orientation).
      sparsity: the fraction of weights to remove, in ``[0, 1]``.
      method: ``"layer"`` or ``"global"`` (one threshold over the whole kernel; rows end up with
        different counts), ``"per_row"`` (every row ``kernel[j, :]`` keeps
        ``round((1 - sparsity) * H_out)`` weights), or ``"row_balanced"`` (every output unit,
        ``kernel[:, i]``, a row of ``U = kernel.T``, keeps ``round((1 - sparsity) * H_in)``).
      current: optional boolean mask of the weights still alive. Pruned weights rank below every
        live one, so masks computed along a schedule are nested.

    Returns:
      A NumPy boolean array of the kernel's shape. Ties are broken by position.
    """
    sparsity = _check_sparsity(sparsity)
    return _mask_from_scores(_scores(kernel, current), sparsity, _check_method(method))


def magnitude_masks(kernels, sparsity: float, *, method: str = "row_balanced", current=None):
    """:func:`magnitude_mask` over a pytree of kernels (each ``[H_in, H_out]``, or stacked
    ``[..., H_in, H_out]`` as ``nn.scan`` over layers stores them).

    With ``method="global"`` one threshold is shared by all the kernels (the layers end up with
    different densities); every other method treats each kernel (and each stacked layer) alone.
    ``current``: an optional pytree of boolean masks with the structure of ``kernels``.
    """
    sparsity = _check_sparsity(sparsity)
    _check_method(method)
    leaves, treedef = jax.tree_util.tree_flatten(kernels)
    cur = [None] * len(leaves) if current is None else treedef.flatten_up_to(current)
    layers = []  # (leaf index, shape) of each 2-D layer, in order
    scores = []
    for n, (k, c) in enumerate(zip(leaves, cur)):
        k = np.asarray(jnp.asarray(k, jnp.float32))
        if k.ndim < 2:
            raise ValueError(f"kernels must be [..., H_in, H_out] arrays, got shape {k.shape}")
        flat_k = k.reshape((-1,) + k.shape[-2:])
        flat_c = None if c is None else np.asarray(c).reshape(flat_k.shape)
        for i in range(flat_k.shape[0]):
            scores.append(_scores(flat_k[i], None if flat_c is None else flat_c[i]))
        layers.append(k.shape)
    if method == "global" and scores:
        every = np.concatenate([s.ravel() for s in scores])
        keep = _top_k(every, int(round((1.0 - sparsity) * every.size)), None)
        ends = np.cumsum([s.size for s in scores])[:-1]
        masks = [m.reshape(s.shape) for m, s in zip(np.split(keep, ends), scores)]
    else:
        masks = [_mask_from_scores(s, sparsity, method) for s in scores]
    out, pos = [], 0
    for shape in layers:
        count = int(np.prod(shape[:-2], dtype=np.int64))
        out.append(np.stack(masks[pos:pos + count]).reshape(shape))
        pos += count
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# The gradual schedule
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta (2017), eq. 1: from ``begin_step`` to ``end_step`` the target sparsity rises as

        s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (end_step - t_0)) ** power

    and is recomputed only every ``frequency`` steps (in between it holds). Before ``begin_step``
    it is ``initial_sparsity``; from ``end_step`` on, ``final_sparsity``. Pruning fast early, while
    there are many redundant weights, and slowly near the end lets the network recover.
    """

    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 1
    power: float = 3.0

    def __post_init__(self):
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(f"final_sparsity ({self.final_sparsity}) must be at least "
                             f"initial_sparsity ({self.initial_sparsity})")
        if self.begin_step < 0 or self.end_step < self.begin_step:
            raise ValueError(f"need 0 <= begin_step <= end_step, got begin_step={self.begin_step}, "
                             f"end_step={self.end_step}")
        if self.frequency < 1:
            raise ValueError(f"frequency must be at least 1, got {self.frequency}")
        if self.power <= 0:
            raise ValueError(f"power must be positive, got {self.power}")

    def __call__(self, step):
        """The target sparsity at ``step`` (a Python float for an int step; a traced scalar works)."""
        xp = np if isinstance(step, (int, np.integer)) else jnp
        t = xp.clip(step, self.begin_step, self.end_step)
        # Hold the value of the last update step at or before t.
        t = self.begin_step + ((t - self.begin_step) // self.frequency) * self.frequency
        span = max(self.end_step - self.begin_step, 1)
        frac = xp.where(step >= self.end_step, 1.0, (t - self.begin_step) / span)
        value = (self.final_sparsity + (self.initial_sparsity - self.final_sparsity) *
                 (1.0 - frac) ** self.power)
        return float(value) if xp is np else value

    def is_update_step(self, step: int) -> bool:
        """Whether the masks should be recomputed at ``step``: every ``frequency`` steps from
        ``begin_step``, and at ``end_step`` so the final sparsity is reached exactly."""
        step = int(step)
        if step < self.begin_step or step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step


def cubic_schedule(initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                   frequency: int = 1, *, power: float = 3.0) -> CubicSchedule:
    """The gradual pruning schedule of Zhu & Gupta (2017); see :class:`CubicSchedule`."""
    return CubicSchedule(float(initial_sparsity), float(final_sparsity), int(begin_step),
                         int(end_step), int(frequency), float(power))


# ---------------------------------------------------------------------------------------------
# A mask packed into a fixed layout
# ---------------------------------------------------------------------------------------------

def balanced_pattern(hidden: int, per_row: int, seed: int = 0) -> np.ndarray:
    """A ``[hidden, hidden]`` boolean pattern with exactly ``per_row`` entries in every row and
    every column, chosen pseudo-randomly from ``seed`` (NumPy, independent of any weights).

    It is the union of ``per_row`` shifted diagonals with a random column permutation, so it also
    balances the transposed layout. The modules start from it when ``max_density < 1``: it has to
    be computable without the weights, because ``init`` may run under ``jit`` or ``nn.scan``.
    """
    if not 0 <= per_row <= hidden:
        raise ValueError(f"per_row must be in [0, {hidden}], got {per_row}")
    rng = np.random.default_rng(seed)
    offsets = rng.choice(hidden, size=per_row, replace=False)
    perm = rng.permutation(hidden)
    pattern = np.zeros((hidden, hidden), bool)
    rows = np.arange(hidden)
    for offset in offsets:
        pattern[rows, perm[(rows + offset) % hidden]] = True
    return pattern


def budgets_for_density(hidden: int, max_density: float) -> tuple[int, int]:
    """``(row_budget, col_budget)`` of a layer whose masks keep at most ``max_density``.

    The row budget (nonzeros per output unit) is ``ceil(max_density * hidden)``. Row-balanced masks
    leave the column counts uneven, so the transposed layout (the backward pass) gets headroom:
    ``max(2 * row_budget, row_budget + 32)``, at most ``hidden``.
    """
    max_density = float(max_density)
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density}")
    rows = min(hidden, max(1, math.ceil(round(max_density * hidden, 6))))
    cols = hidden if rows == hidden else min(hidden, max(2 * rows, rows + 32))
    return rows, cols


def initial_mask(hidden: int, max_density: float = 1.0, seed: int = 0) -> np.ndarray:
    """The mask a layer starts from: dense when ``max_density == 1``, otherwise
    :func:`balanced_pattern` with the row budget of :func:`budgets_for_density`."""
    rows, _ = budgets_for_density(hidden, max_density)
    if rows == hidden:
        return np.ones((hidden, hidden), bool)
    return balanced_pattern(hidden, rows, seed)


def _plan_of(meta: LayoutMeta) -> Plan:
    """A Plan that reproduces ``meta`` exactly (pack_pattern reads only the layout sizes; the
    Plan's resource estimates, which LayoutMeta does not keep, are left at zero)."""
    return Plan(**{f.name: getattr(meta, f.name, 0) for f in dataclasses.fields(Plan)})


def _fillers(pattern: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``pattern`` with fewer than ``budget`` entries, that many columns it lacks.

    Packing the pattern together with these fillers gives every row exactly ``budget`` entries,
    hence the lane assignment of the capacity plan, whatever the mask; the fillers then become
    padding. Columns are taken cyclically after the diagonal, which spreads them over all columns.
    """
    n_rows, n_cols = pattern.shape
    need = budget - pattern.sum(axis=1)
    out_r, out_c = [], []
    chunk = max(1, (1 << 22) // max(n_cols, 1))  # bound the temporary [chunk, n_cols] arrays
    for start in range(0, n_rows, chunk):
        r = np.arange(start, min(start + chunk, n_rows))
        order = (r[:, None] + 1 + np.arange(n_cols)[None, :]) % n_cols
        free = ~pattern[r[:, None], order]
        take = free & (np.cumsum(free, axis=1) <= need[r][:, None])
        rr, kk = np.nonzero(take)
        out_r.append(r[rr])
        out_c.append(order[rr, kk])
    return np.concatenate(out_r), np.concatenate(out_c)


def _check_mask(mask, hidden: int | None = None) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1] or mask.shape[0] == 0:
        raise ValueError(f"mask must be a non-empty square [H, H] array, got shape {mask.shape}")
    if hidden is not None and mask.shape[0] != hidden:
        raise ValueError(f"mask must be [{hidden}, {hidden}] (the layer's size), got {mask.shape}")
    if mask.dtype != bool:
        raise TypeError(f"mask must be a boolean array, got {mask.dtype}")
    return mask


_LEAVES = ("mask", "indices", "lane_row", "indices_t", "lane_row_t", "perm_t")


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class PackedMask:
    """A boolean mask ``[H, H]`` (Flax orientation) and its packed layout, as a pytree.

    Leaves: ``mask`` and the int32 index arrays of docs/format.md (``indices``, ``lane_row``,
    ``indices_t``, ``lane_row_t``, ``perm_t``). Static (aux) data: the two ``LayoutMeta``, the
    storage ``dtype`` the layout was planned for, and the ``row_budget`` / ``col_budget`` the
    layout holds: at most ``row_budget`` nonzeros per output unit (``mask[:, i]``) and
    ``col_budget`` per input unit (``mask[j, :]``). :meth:`with_mask` packs any mask within those
    budgets into the *same* layout, so the pytree structure, and with it every compiled program
    that takes this object as an argument, stays the same.

    Build one with :meth:`create` or :meth:`for_density`; turn it into weights with :meth:`weights`.
    """

    mask: Any
    indices: Any
    lane_row: Any
    indices_t: Any
    lane_row_t: Any
    perm_t: Any
    meta: LayoutMeta
    meta_t: LayoutMeta
    dtype: str
    row_budget: int
    col_budget: int

    # ---- pytree -------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        leaves = tuple((jax.tree_util.GetAttrKey(name), getattr(self, name)) for name in _LEAVES)
        return leaves, (self.meta, self.meta_t, self.dtype, self.row_budget, self.col_budget)

    def tree_flatten(self):
        return tuple(getattr(self, name) for name in _LEAVES), (
            self.meta, self.meta_t, self.dtype, self.row_budget, self.col_budget)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(*leaves, *aux)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, mask, *, row_budget: int | None = None, col_budget: int | None = None,
               dtype=np.float32, device: DeviceSpec | None = None, load_bytes: int = 16,
               host: bool = False) -> "PackedMask":
        """Pack ``mask`` into a layout planned for ``row_budget`` nonzeros in every output unit and
        ``col_budget`` in every input unit (default: the mask's own largest counts).

        ``dtype`` is the storage dtype of the weights (the planner's register and shared-memory
        budget depends on it). ``device`` is the GPU to plan for (default: the current one, or an
        H200 when there is none). ``host``: NumPy leaves instead of device arrays.
        """
        mask = _check_mask(mask)
        hidden = mask.shape[0]
        dtype = check_weight_dtype(dtype, "dtype")
        row_budget = max(1, int(mask.sum(axis=0).max())) if row_budget is None else int(row_budget)
        col_budget = max(1, int(mask.sum(axis=1).max())) if col_budget is None else int(col_budget)
        for name, value in (("row_budget", row_budget), ("col_budget", col_budget)):
            if not 1 <= value <= hidden:
                raise ValueError(f"{name} must be in [1, {hidden}], got {value}")
        if device is None:
            from ._native import current_device_spec
            device = current_device_spec()
        # Planning for uniform counts gives the layout every mask within the budgets packs into.
        meta = LayoutMeta.from_plan(plan_layout(np.full(hidden, row_budget), dtype, device,
                                                load_bytes=load_bytes))
        meta_t = LayoutMeta.from_plan(plan_layout(np.full(hidden, col_budget), dtype, device,
                                                  load_bytes=load_bytes))
        empty = cls(None, None, None, None, None, None, meta, meta_t, dtype.name, row_budget,
                    col_budget)
        return empty.with_mask(mask, host=host)

    @classmethod
    def for_density(cls, hidden: int, max_density: float = 1.0, *, seed: int = 0, dtype=np.float32,
                    device: DeviceSpec | None = None, load_bytes: int = 16, host: bool = False
                    ) -> "PackedMask":
        """The layout of a layer that will never hold more than ``max_density`` of its weights,
        starting from :func:`initial_mask` (dense when ``max_density == 1``)."""
        if not isinstance(hidden, (int, np.integer)) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        rows, cols = budgets_for_density(hidden, max_density)
        return cls.create(initial_mask(hidden, max_density, seed), row_budget=rows, col_budget=cols,
                          dtype=dtype, device=device, load_bytes=load_bytes, host=host)

    def with_mask(self, mask, *, host: bool = False) -> "PackedMask":
        """``mask`` packed into this object's layout (same metas, so no recompilation).

        Raises ValueError if a row or column of ``mask`` exceeds the budgets; see
        :func:`fit_to_budgets`. The leaves are device arrays, or NumPy arrays with ``host=True``.
        """
        hidden = self.meta.hidden
        mask = _check_mask(mask, hidden)
        row_counts, col_counts = mask.sum(axis=0), mask.sum(axis=1)
        if row_counts.max() > self.row_budget:
            raise ValueError(f"mask has an output unit (column of the kernel) with "
                             f"{int(row_counts.max())} nonzeros, more than the layout's row budget "
                             f"{self.row_budget}; use a row-balanced mask, fit_to_budgets, or a "
                             f"layer with a larger max_density")
        if col_counts.max() > self.col_budget:
            raise ValueError(f"mask has an input unit (row of the kernel) with "
                             f"{int(col_counts.max())} nonzeros, more than the layout's column "
                             f"budget {self.col_budget}; see fit_to_budgets")
        # U = mask.T: row i (output unit) holds columns j (input units).
        u = mask.T
        rows, cols = np.nonzero(u)
        nnz = rows.size
        fill_r, fill_c = _fillers(u, self.row_budget)
        fwd = pack_pattern(np.concatenate([rows, fill_r]), np.concatenate([cols, fill_c]),
                           _plan_of(self.meta))
        indices = fwd.indices.copy()
        indices[fwd.slot_of_nonzero[nnz:]] = ~fill_c.astype(np.int32)  # fillers become padding
        fill_rt, fill_ct = _fillers(mask, self.col_budget)  # rows of U.T = input units
        bwd = pack_pattern(np.concatenate([cols, fill_rt]), np.concatenate([rows, fill_ct]),
                           _plan_of(self.meta_t))
        indices_t = bwd.indices.copy()
        indices_t[bwd.slot_of_nonzero[nnz:]] = ~fill_ct.astype(np.int32)
        perm_t = np.full(self.meta_t.num_slots, -1, np.int32)
        perm_t[bwd.slot_of_nonzero[:nnz]] = fwd.slot_of_nonzero[:nnz]
        if fwd.meta != self.meta or bwd.meta != self.meta_t:  # cannot happen: the plans are given
            raise AssertionError("PackedMask: the packer changed the layout")
        packed = dataclasses.replace(self, mask=mask.copy(), indices=indices,
                                     lane_row=fwd.lane_row, indices_t=indices_t,
                                     lane_row_t=bwd.lane_row, perm_t=perm_t)
        # NumPy leaves are safe to cache while a module is being traced (a jnp array made there
        # would be a tracer of that trace); device arrays avoid a transfer at every step.
        return packed if host else jax.tree_util.tree_map(jnp.asarray, packed)

    # ---- use ----------------------------------------------------------------------------------
    @property
    def hidden(self) -> int:
        return self.meta.hidden

    def weights(self, kernel, dtype=None) -> SparseWeights:
        """The :class:`SparseWeights` holding ``kernel``'s values at this mask (usable under jit;
        the gradient with respect to ``kernel`` is exactly zero off the mask).

        ``dtype``: the storage dtype (default: the one the layout was planned for; another one
        keeps the layout sizes, as :meth:`SparseWeights.astype` does).
        """
        kernel = jnp.asarray(kernel)
        dtype = check_weight_dtype(self.dtype if dtype is None else dtype, "dtype")
        empty = SparseWeights(jnp.zeros((self.meta.num_slots,), dtype), self.indices,
                              self.lane_row, self.indices_t, self.lane_row_t, self.perm_t,
                              self.meta, self.meta_t)
        return empty.gather(kernel)

    def density(self) -> float:
        """Fraction of weights kept (host data)."""
        return float(np.asarray(self.mask).mean())

    def __repr__(self) -> str:
        return (f"PackedMask(hidden={self.hidden}, dtype={self.dtype}, "
                f"row_budget={self.row_budget}, col_budget={self.col_budget})")


def fit_to_budgets(mask, scores, row_budget: int, col_budget: int) -> tuple[np.ndarray, int]:
    """Drop the lowest-scoring entries of rows and columns over their budgets.

    Returns ``(mask, dropped)``. Output units (``mask[:, i]``) are trimmed to ``row_budget`` first,
    then input units (``mask[j, :]``) to ``col_budget``; the second step cannot refill a row.
    """
    mask = np.array(_check_mask(mask))
    scores = np.where(mask, np.asarray(scores, np.float32), -np.inf)
    before = int(mask.sum())
    if mask.sum(axis=0).max() > row_budget:
        mask &= _top_k(scores, row_budget, 0)
        scores = np.where(mask, scores, -np.inf)
    if mask.sum(axis=1).max() > col_budget:
        mask &= _top_k(scores, col_budget, 1)
    return mask, before - int(mask.sum())


# ---------------------------------------------------------------------------------------------
# Walking a model's variables
# ---------------------------------------------------------------------------------------------

def _key(entry) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _path(path) -> tuple:
    return tuple(_key(e) for e in path)


def _is_packed(x) -> bool:
    return isinstance(x, (PackedMask, SparseWeights))


def _mask_leaves(sparsity) -> dict[tuple, Any]:
    """``{path: PackedMask or boolean mask}`` for every mask in a sparsity tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(sparsity, is_leaf=_is_packed)
    return {_path(p): leaf for p, leaf in flat if isinstance(leaf, PackedMask) or
            (hasattr(leaf, "dtype") and np.dtype(leaf.dtype) == bool and np.ndim(leaf) >= 2)}


def _get(tree, path: tuple, what: str):
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{what} has no entry at {'/'.join(map(str, path))} (the path of a "
                             f"mask in the sparsity tree)") from None
    return node


def _replace(tree, new: dict[tuple, Any]):
    """``tree`` with the leaves at the given paths replaced (any pytree of dicts and lists)."""
    def swap(path, leaf):
        return new.get(_path(path), leaf)
    return jax.tree_util.tree_map_with_path(swap, tree, is_leaf=_is_packed)


def _unstack(packed: PackedMask) -> list[PackedMask]:
    """The layers of a PackedMask whose leaves carry leading (stacked) axes."""
    lead = np.shape(packed.mask)[:-2]
    leaves = [np.asarray(getattr(packed, name)) for name in _LEAVES]
    count = int(np.prod(lead, dtype=np.int64))
    flat = [x.reshape((count,) + x.shape[len(lead):]) for x in leaves]
    return [dataclasses.replace(packed, **{n: x[i] for n, x in zip(_LEAVES, flat)})
            for i in range(count)]


def _stack(layers: list[PackedMask], lead: tuple) -> PackedMask:
    if not lead:
        return layers[0]
    stacked = {n: jnp.stack([getattr(p, n) for p in layers]).reshape(
        lead + np.shape(getattr(layers[0], n))) for n in _LEAVES}
    return dataclasses.replace(layers[0], **stacked)


def masks_of(sparsity):
    """The boolean masks of a sparsity tree (PackedMask leaves become their ``mask``)."""
    return jax.tree_util.tree_map(lambda x: x.mask if isinstance(x, PackedMask) else x, sparsity,
                                  is_leaf=_is_packed)


def param_masks(params, sparsity):
    """A pytree with the structure of ``params``: each pruned kernel's boolean mask, and a scalar
    ``True`` for every other parameter. What :func:`keep_pruned` takes as ``masks=``.

    ``sparsity`` is the model's sparsity collection (PackedMask leaves at the paths of their
    kernels in ``params``), or a tree of boolean masks with those paths. Usable under jit.
    """
    found = _mask_leaves(sparsity)
    masks = {}
    for path, entry in found.items():
        mask = entry.mask if isinstance(entry, PackedMask) else entry
        kernel = _get(params, path, "params")
        if np.shape(kernel) != np.shape(mask):
            raise ValueError(f"the mask at {'/'.join(map(str, path))} has shape {np.shape(mask)}, "
                             f"its kernel {np.shape(kernel)}")
        masks[path] = jnp.asarray(mask)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: masks.get(_path(p), jnp.ones((), bool)), params)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def update_sparsity(params, sparsity, target_sparsity: float, *, method: str = "row_balanced"):
    """Recompute every mask from the current weights and zero the pruned weights.

    Call it between training steps, when the schedule says so
    (``schedule.is_update_step(step)``). For each mask in ``sparsity`` (the model's sparsity
    collection: PackedMask leaves, or plain boolean masks at the kernels' paths) the new mask keeps
    the largest magnitudes of ``kernel * current_mask`` (so masks are nested) at
    ``target_sparsity``, by ``method`` (see :func:`magnitude_mask`; ``"global"`` shares one
    threshold across all masked kernels). A PackedMask is repacked into its own layout, so the
    training step does not recompile; where a mask exceeds the layout's budgets (only possible
    for ``max_density < 1``) the lowest-magnitude excess is dropped, with a warning.

    Returns ``(params, sparsity)``, both new pytrees of the same structure.
    """
    target_sparsity = _check_sparsity(target_sparsity)
    _check_method(method)
    found = _mask_leaves(sparsity)
    if not found:
        raise ValueError("sparsity holds no masks (expected the 'sparsity' collection of a model "
                         "with jax_sprnn.flax.SparseRNN layers, or boolean masks)")
    paths = list(found)  # a list, not a dict: paths mix str and int keys, which do not sort
    kernels = [np.asarray(jnp.asarray(_get(params, p, "params"), jnp.float32)) for p in paths]
    current = [np.asarray(found[p].mask if isinstance(found[p], PackedMask) else found[p])
               for p in paths]
    for p, k, c in zip(paths, kernels, current):
        if k.shape != c.shape:
            raise ValueError(f"the mask at {'/'.join(map(str, p))} has shape {c.shape}, "
                             f"its kernel {k.shape}")
    new_masks = dict(zip(paths, magnitude_masks(kernels, target_sparsity, method=method,
                                                current=current)))
    kernels = dict(zip(paths, kernels))
    new_params, new_sparsity = {}, {}
    for path, entry in found.items():
        mask = new_masks[path]
        if isinstance(entry, PackedMask):
            lead = mask.shape[:-2]
            layers = []
            flat_mask = mask.reshape((-1,) + mask.shape[-2:])
            flat_kernel = kernels[path].reshape(flat_mask.shape)
            for i, layer in enumerate(_unstack(entry)):
                fitted, dropped = fit_to_budgets(flat_mask[i], np.abs(flat_kernel[i]),
                                                 layer.row_budget, layer.col_budget)
                if dropped:
                    warnings.warn(f"update_sparsity: {dropped} weights of "
                                  f"{'/'.join(map(str, path))} dropped to fit the layer's layout "
                                  f"budgets ({layer.row_budget} per output unit, "
                                  f"{layer.col_budget} per input unit)", RuntimeWarning,
                                  stacklevel=2)
                flat_mask[i] = fitted
                layers.append(layer.with_mask(fitted))
            mask = flat_mask.reshape(mask.shape)
            new_sparsity[path] = _stack(layers, lead)
        else:
            new_sparsity[path] = jnp.asarray(mask)
        kernel = _get(params, path, "params")
        new_params[path] = jnp.where(jnp.asarray(mask), kernel, jnp.zeros((), kernel.dtype))
    return _replace(params, new_params), _replace(sparsity, new_sparsity)


def keep_pruned(inner) -> "Any":
    """Wrap an optax optimizer so that pruned weights stay at exactly zero.

    The wrapped transformation's ``update(grads, state, params, *, masks)`` takes ``masks`` (from
    :func:`param_masks`, a pytree with the structure of ``params``) as data, so a new mask does
    not recompile a jitted step. Gradients of pruned weights are zeroed before ``inner`` sees them
    (its moments never learn from them), and its updates of pruned weights are replaced by
    ``-params``, so ``optax.apply_updates`` lands them on exactly zero, also right after a mask
    change.
    """
    import optax

    inner = optax.with_extra_args_support(inner)

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None, *, masks=None, **extra):
        if masks is None:
            raise ValueError("keep_pruned: pass masks=pruning.param_masks(params, sparsity)")
        if params is None:
            raise ValueError("keep_pruned: pass params (the update zeroes pruned params)")
        zero = lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype))  # noqa: E731
        updates = jax.tree_util.tree_map(zero, updates, masks)
        updates, state = inner.update(updates, state, params, **extra)
        updates = jax.tree_util.tree_map(
            lambda u, m, p: jnp.where(m, u, -p.astype(u.dtype)), updates, masks, params)
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

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


def _drop(tree, paths: set):
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
    found = {p: e for p, e in _mask_leaves(sparsity).items() if isinstance(e, PackedMask)}
    packed = {p: pack_inference(_get(params, p, "params"), e.mask, dtype=e.dtype)
              for p, e in found.items()}
    out = dict(variables)
    out["params"] = _drop(params, set(packed))
    out[COLLECTION] = _replace(sparsity, packed)
    return out


__all__ = [
    "METHODS", "COLLECTION", "magnitude_mask", "magnitude_masks", "CubicSchedule", "cubic_schedule",
    "balanced_pattern", "budgets_for_density", "initial_mask", "PackedMask", "fit_to_budgets",
    "masks_of", "param_masks", "update_sparsity", "keep_pruned", "pack_inference", "to_inference",
]
