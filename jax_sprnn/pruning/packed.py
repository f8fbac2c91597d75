"""``PackedMask``: a mask together with its packed layout, planned for fixed budgets.

Its layout sizes are planned for a fixed per-row and per-column *budget*, and every later mask is
packed into that same layout, so a jitted training step that takes the :class:`PackedMask` as an
argument does not recompile when the mask changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..layout import LayoutMeta, pack_pattern, plan_layouts
from ..planner import DeviceSpec
from ..weights import GATES, PackedLayout, SparseWeights, check_weight_dtype, kernel_gates
from .masks import budgets_for_density, check_kernel_mask, initial_mask


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


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)  # (==, hash: identity, as for arrays in a pytree)
class PackedMask(PackedLayout):
    """A boolean mask ``[H, H]``, or ``[H, G*H]`` for a gated kernel (Flax orientation), and its
    packed layout, as a pytree.

    Leaves: ``mask`` and the int32 index arrays of docs/format.md (``indices``, ``lane_row``,
    ``indices_t``, ``lane_row_t``, ``perm_t``). Static (aux) data: the two ``LayoutMeta``, the
    storage ``dtype`` the layout was planned for, and the ``row_budget`` / ``col_budget`` the
    layout holds: at most ``row_budget`` nonzeros per output unit or gate row (``mask[:, i]``)
    and ``col_budget`` per input unit (``mask[j, :]``). :meth:`with_mask` packs any mask within those
    budgets into the *same* layout, so the pytree structure, and with it every compiled program
    that takes this object as an argument, stays the same.

    Build one with :meth:`create` or :meth:`for_density`; turn it into weights with :meth:`weights`.
    """

    #: The names of the leaves, in the order the pytree flattens them.
    LEAVES = ("mask",) + PackedLayout.INDEX_LEAVES

    mask: Any
    dtype: str
    row_budget: int
    col_budget: int

    # ---- pytree -------------------------------------------------------------------------------
    def _aux(self) -> tuple:
        return self.meta, self.meta_t, self.dtype, self.row_budget, self.col_budget

    def tree_flatten_with_keys(self):
        return tuple((jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in self.LEAVES), self._aux()

    def tree_flatten(self):
        return tuple(getattr(self, n) for n in self.LEAVES), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        meta, meta_t, dtype, row_budget, col_budget = aux
        return cls(**dict(zip(cls.LEAVES, leaves)), meta=meta, meta_t=meta_t, dtype=dtype,
                   row_budget=row_budget, col_budget=col_budget)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, mask, *, row_budget: int | None = None, col_budget: int | None = None,
               dtype=np.float32, device: DeviceSpec | None = None, load_bytes: int | None = None,
               host: bool = False, batch: int | None = None) -> "PackedMask":
        """Pack ``mask`` (``[H, H]``, or a gated ``[H, G*H]``) into a layout planned for
        ``row_budget`` nonzeros in every output unit (gate row) and ``col_budget`` in every input
        unit (default: the mask's own largest counts).

        ``dtype`` is the storage dtype of the weights (the planner's register and shared-memory
        budget depends on it). ``device`` is the GPU to plan for (default: the current one, or an
        H200 when there is none). ``host``: NumPy leaves instead of device arrays. ``batch``: the
        batch the layer will mostly run at, if known (:meth:`SparseWeights.from_dense`).
        """
        mask = check_kernel_mask(mask)
        hidden, width = mask.shape
        gates = kernel_gates(mask.shape, "mask")
        dtype = check_weight_dtype(dtype, "dtype")
        row_budget = max(1, int(mask.sum(axis=0).max())) if row_budget is None else int(row_budget)
        col_budget = max(1, int(mask.sum(axis=1).max())) if col_budget is None else int(col_budget)
        for name, value, most in (("row_budget", row_budget, hidden), ("col_budget", col_budget, width)):
            if not 1 <= value <= most:
                raise ValueError(f"{name} must be in [1, {most}], got {value}")
        if device is None:
            from .._native import current_device_spec
            device = current_device_spec()
        # Planning for uniform counts gives the layout every mask within the budgets packs into.
        meta, meta_t = (LayoutMeta.from_plan(p) for p in plan_layouts(
            np.full(width, row_budget), np.full(hidden, col_budget), dtype, device, gates=gates,
            load_bytes=load_bytes, batch=batch))
        empty = cls(**dict.fromkeys(cls.LEAVES), meta=meta, meta_t=meta_t, dtype=dtype.name,
                    row_budget=row_budget, col_budget=col_budget)
        return empty.with_mask(mask, host=host)

    @classmethod
    def for_density(cls, hidden: int, max_density: float = 1.0, *, gates: int = 1, seed: int = 0,
                    dtype=np.float32, device: DeviceSpec | None = None, load_bytes: int | None = None,
                    host: bool = False, batch: int | None = None) -> "PackedMask":
        """The layout of a layer (``gates``: 1, or 3 / 4 for a GRU / LSTM kernel ``[H, G*H]``)
        that will never hold more than ``max_density`` of its weights, starting from
        :func:`initial_mask` (dense when ``max_density == 1``)."""
        if not isinstance(hidden, (int, np.integer)) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        if gates not in GATES:
            raise ValueError(f"gates must be one of {GATES}, got {gates!r}")
        rows, cols = budgets_for_density(hidden, max_density, gates)
        return cls.create(initial_mask(hidden, max_density, seed, gates), row_budget=rows,
                          col_budget=cols, dtype=dtype, device=device, load_bytes=load_bytes,
                          host=host, batch=batch)

    def with_mask(self, mask, *, host: bool = False) -> "PackedMask":
        """``mask`` packed into this object's layout (same metas, so no recompilation).

        Raises ValueError if a row or column of ``mask`` exceeds the budgets; see
        :func:`fit_to_budgets`. The leaves are device arrays, or NumPy arrays with ``host=True``.
        """
        mask = check_kernel_mask(mask, self.shape)
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
        fwd = pack_pattern(np.concatenate([rows, fill_r]), np.concatenate([cols, fill_c]), self.meta)
        indices = fwd.indices.copy()
        indices[fwd.slot_of_nonzero[nnz:]] = ~fill_c.astype(np.int32)  # fillers become padding
        fill_rt, fill_ct = _fillers(mask, self.col_budget)  # rows of U.T = input units
        bwd = pack_pattern(np.concatenate([cols, fill_rt]), np.concatenate([rows, fill_ct]),
                           self.meta_t)
        indices_t = bwd.indices.copy()
        indices_t[bwd.slot_of_nonzero[nnz:]] = ~fill_ct.astype(np.int32)
        perm_t = np.full(self.meta_t.num_slots, -1, np.int32)
        perm_t[bwd.slot_of_nonzero[:nnz]] = fwd.slot_of_nonzero[:nnz]
        if fwd.meta != self.meta or bwd.meta != self.meta_t:  # cannot happen: the layouts are given
            raise AssertionError("PackedMask: the packer changed the layout")
        packed = dataclasses.replace(self, mask=mask.copy(), indices=indices,
                                     lane_row=fwd.lane_row, indices_t=indices_t,
                                     lane_row_t=bwd.lane_row, perm_t=perm_t)
        # NumPy leaves are safe to cache while a module is being traced (a jnp array made there
        # would be a tracer of that trace); device arrays avoid a transfer at every step.
        return packed if host else jax.tree_util.tree_map(jnp.asarray, packed)

    # ---- stacked layers (nn.scan) -------------------------------------------------------------
    def unstack(self) -> list["PackedMask"]:
        """The layers of a PackedMask whose leaves carry leading (stacked) axes, in order."""
        lead = np.shape(self.mask)[:-2]
        count = int(np.prod(lead, dtype=np.int64))
        flat = {n: np.asarray(getattr(self, n)) for n in self.LEAVES}
        flat = {n: x.reshape((count,) + x.shape[len(lead):]) for n, x in flat.items()}
        return [dataclasses.replace(self, **{n: x[i] for n, x in flat.items()})
                for i in range(count)]

    @classmethod
    def stack(cls, layers: list["PackedMask"], lead: tuple) -> "PackedMask":
        """The inverse of :meth:`unstack`: ``layers`` (of one layout) stacked into ``lead`` axes."""
        if not lead:
            return layers[0]
        stacked = {n: jnp.stack([getattr(p, n) for p in layers]).reshape(
            lead + np.shape(getattr(layers[0], n))) for n in cls.LEAVES}
        return dataclasses.replace(layers[0], **stacked)

    # ---- use ----------------------------------------------------------------------------------
    def weights(self, kernel, dtype=None) -> SparseWeights:
        """The :class:`SparseWeights` holding ``kernel``'s values at this mask (usable under jit;
        the gradient with respect to ``kernel`` is exactly zero off the mask).

        ``dtype``: the storage dtype (default: the one the layout was planned for; another one
        keeps the layout sizes, as :meth:`SparseWeights.astype` does).
        """
        kernel = jnp.asarray(kernel)
        dtype = check_weight_dtype(self.dtype if dtype is None else dtype, "dtype")
        empty = SparseWeights(jnp.zeros((self.meta.num_slots,), dtype), **self.layout_fields())
        return empty.gather(kernel)

    def density(self) -> float:
        """Fraction of weights kept (host data)."""
        return float(np.asarray(self.mask).mean())

    def __repr__(self) -> str:
        gates = f", gates={self.gates}" if self.gates > 1 else ""
        return (f"PackedMask(hidden={self.hidden}{gates}, dtype={self.dtype}, "
                f"row_budget={self.row_budget}, col_budget={self.col_budget})")
