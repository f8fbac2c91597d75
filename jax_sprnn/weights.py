"""``SparseWeights``: a pruned recurrent kernel in the packed on-chip layout, as a JAX pytree."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from . import planner as _planner
from .layout import LayoutMeta, decode_columns, lane_of_slot, pack_pattern
from .tile_layout import check_tile_layout, pack_tiles, plan_layer

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))

#: The gate counts G of a packed kernel ``[H, G*H]``: 1 (the simple cell), 3 (GRU), 4 (LSTM).
GATES = (1, 3, 4)


def kernel_gates(shape, what: str) -> int:
    """G of a kernel (or mask) shape ``[H, G*H]``, or a ValueError naming ``what`` and the shapes
    it may have."""
    shape = tuple(shape)
    if (len(shape) != 2 or shape[0] == 0 or shape[1] % shape[0]
            or shape[1] // shape[0] not in GATES):
        raise ValueError(f"{what} must be a non-empty square [H, H] matrix, or a gated [H, 3H] (GRU: "
                         f"gates r, z, n) or [H, 4H] (LSTM: gates i, f, g, o) one, got shape {shape}")
    return shape[1] // shape[0]


def check_weight_dtype(dtype, what: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def storable(vals: np.ndarray, dtype) -> np.ndarray:
    """The kept weights ``vals`` in the storage ``dtype``, or a ValueError where one would
    overflow to infinity there (a 16-bit dtype's range is small)."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):  # an overflow is the error below, not a warning
        stored = np.asarray(vals).astype(dtype)
    overflow = ~np.isfinite(stored.astype(np.float32))
    if overflow.any():
        big = float(np.abs(np.asarray(vals)[overflow]).max())
        raise ValueError(f"kernel has kept entries beyond the range of {dtype.name} (up to "
                         f"{big:.4g} in magnitude): stored in {dtype.name} they would be "
                         f"infinite; scale the kernel or store it in float32")
    return stored


def check_finite(values, what: str) -> None:
    """Raise ValueError when ``values`` holds NaN or infinite entries, saying how many and where.

    Ranking by magnitude has no place for a NaN (it would be pruned silently, and a model with NaN
    weights would give finite outputs), so pruning and packing refuse non-finite weights.
    """
    values = np.asarray(values)
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    nans = int(np.count_nonzero(np.isnan(values)))
    counts = [f"{n} {kind}" for n, kind in ((nans, "NaN"), (int(bad.sum()) - nans, "infinite")) if n]
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape)]
    raise ValueError(f"{what} has {' and '.join(counts)} entries (first at {first}); pruning and "
                     f"packing need finite weights")


def top_k_mask(scores, k: int, axis: int | None = None) -> np.ndarray:
    """Boolean mask of the ``k`` largest ``scores`` along ``axis`` (over all entries if None).

    Ties go to the earlier position, so the result is deterministic. It is the one ranking behind
    :meth:`SparseWeights.from_dense`'s ``density=`` and every rule of ``jax_sprnn.pruning``.
    """
    scores = np.asarray(scores)
    if axis is None:
        flat = scores.ravel()
        if k <= 0 or k >= flat.size:
            return np.full(scores.shape, k > 0)
        # Everything above the k-th largest score, then the ties at it in position order
        # (a partition, not a sort: this runs on whole kernels).
        threshold = np.partition(flat, flat.size - k)[flat.size - k]
        keep = flat > threshold
        keep[np.flatnonzero(flat == threshold)[: k - int(keep.sum())]] = True
        return keep.reshape(scores.shape)
    order = np.argsort(-scores, axis=axis, kind="stable")
    keep = np.zeros(scores.shape, bool)
    np.put_along_axis(keep, np.take(order, np.arange(k), axis=axis), True, axis=axis)
    return keep


def _row_spans(lane_row: np.ndarray, num_rows: int):
    """``(first lane, last lane, lane count)`` of every row of a layout (rows with no lane: an
    empty span, first > last)."""
    lanes = np.flatnonzero(lane_row >= 0)
    rows = lane_row[lanes]
    first = np.full(num_rows, np.iinfo(np.int64).max)
    last = np.full(num_rows, -1)
    np.minimum.at(first, rows, lanes)
    np.maximum.at(last, rows, lanes)
    return first, last, np.bincount(rows, minlength=num_rows)


def _check_units_in_warps(lane_row: np.ndarray, meta: LayoutMeta) -> None:
    """The gated forward layout's invariant: unit ``i``'s rows ``g*H + i`` run on adjacent lanes
    of one warp, in gate order (docs/format.md)."""
    first, last, _ = _row_spans(lane_row, meta.num_rows)
    first, last = first.reshape(meta.gates, -1), last.reshape(meta.gates, -1)
    same_warp = np.all(first // _planner.WARP == first[:1] // _planner.WARP, axis=0)
    adjacent = np.all(first[1:] == last[:-1] + 1, axis=0)
    bad = np.flatnonzero(~(same_warp & adjacent))
    if bad.size:
        raise ValueError(f"SparseWeights.lane_row must keep the {meta.gates} gate rows of a unit on "
                         f"adjacent lanes of one warp; unit {int(bad[0])} does not")


def _check_row_runs(lane_row: np.ndarray, meta: LayoutMeta, name: str) -> None:
    """Invariant 1 (docs/format.md): the lanes of each row are one contiguous run inside one warp."""
    first, last, count = _row_spans(lane_row, meta.num_rows)
    bad = np.flatnonzero((count > 0) & ((last - first + 1 != count)
                                        | (first // _planner.WARP != last // _planner.WARP)))
    if bad.size:
        raise ValueError(f"SparseWeights.{name}: the lanes of row {int(bad[0])} are not one "
                         f"contiguous run inside one warp")


def _slot_coordinates(indices: np.ndarray, lane_row: np.ndarray, meta: LayoutMeta):
    """``(row, column, real)`` of every slot of a layout, on host data."""
    rows = lane_row[lane_of_slot(meta)]
    return rows, decode_columns(indices), (indices >= 0) & (rows >= 0)


def _check_transposed(w: "SparseWeights") -> None:
    """The transposed layout holds the forward layout's nonzeros, each once, and ``perm_t`` maps
    every real transposed slot to the forward slot of the same nonzero (a wrong map passes the
    forward pass and corrupts only the gradient)."""
    rows, cols, real = _slot_coordinates(np.asarray(w.indices), np.asarray(w.lane_row), w.meta)
    rows_t, cols_t, real_t = _slot_coordinates(np.asarray(w.indices_t), np.asarray(w.lane_row_t),
                                               w.meta_t)
    keys = rows[real].astype(np.int64) * w.meta.num_cols + cols[real]
    if np.unique(keys).size != keys.size:
        raise ValueError("SparseWeights.indices stores a nonzero in more than one slot")
    perm = np.asarray(w.perm_t).astype(np.int64)
    if np.any((perm >= 0) != real_t):
        raise ValueError("SparseWeights.perm_t must be >= 0 exactly on the real transposed slots")
    target = perm[real_t]
    if not (np.all(real[target]) and np.unique(target).size == target.size == keys.size):
        raise ValueError("SparseWeights.perm_t must map the real transposed slots one to one onto "
                         "the real forward slots")
    if not (np.array_equal(rows[target], cols_t[real_t])
            and np.array_equal(cols[target], rows_t[real_t])):
        raise ValueError("SparseWeights: perm_t maps a transposed slot to the forward slot of "
                         "another nonzero (indices_t, lane_row_t and perm_t must transpose the "
                         "forward layout)")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)  # (identity ==: see SparseWeights)
class PackedLayout:
    """The index half of a packed layer (docs/format.md): the int32 arrays ``indices``,
    ``lane_row`` (forward layout) and ``indices_t``, ``lane_row_t``, ``perm_t`` (the transposed
    layout for the backward pass), and the two layouts' static sizes ``meta`` and ``meta_t``.

    :class:`SparseWeights` adds the values; ``jax_sprnn.pruning.PackedMask`` adds the boolean mask
    the layout was packed from. The fields are keyword-only, so each subclass puts its own first.
    """

    #: The names of the index arrays, in the order the pytrees flatten them.
    INDEX_LEAVES: ClassVar[tuple[str, ...]] = ("indices", "lane_row", "indices_t", "lane_row_t",
                                               "perm_t")

    indices: Any
    lane_row: Any
    indices_t: Any
    lane_row_t: Any
    perm_t: Any
    meta: LayoutMeta
    meta_t: LayoutMeta

    @property
    def hidden(self) -> int:
        return self.meta.hidden

    @property
    def gates(self) -> int:
        """G: 1 for the simple cell, 3 for a GRU, 4 for an LSTM kernel."""
        return self.meta.gates

    @property
    def shape(self) -> tuple[int, int]:
        """The dense kernel's shape, Flax orientation: ``(H, G*H)``."""
        return (self.meta.hidden, self.meta.gates * self.meta.hidden)

    def layout_fields(self) -> dict[str, Any]:
        """The fields of the layout alone (index arrays and metas), as keywords for a subclass."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(PackedLayout)}


def is_concrete(x) -> bool:
    """Whether ``x`` has values here (it is not a tracer), so that they can be checked."""
    try:
        np.asarray(x)
        return True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


def _density_value(density) -> float:
    """``density`` as a float in [0, 1]: a Python, NumPy or 0-d array real number."""
    try:
        value = np.asarray(density)
        ok = (not isinstance(density, (bool, np.bool_)) and value.ndim == 0
              and (value.dtype.kind in "iuf" or value.dtype == jnp.bfloat16)
              and 0.0 <= float(value) <= 1.0)
    except Exception:  # a tracer, a string, None
        ok = False
    if not ok:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    return float(value)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)  # (==, hash: identity, as for arrays in a pytree)
class SparseWeights(PackedLayout):
    """A recurrent kernel ``[H, H]`` (Flax orientation: ``h_t = act(x_t + h_{t-1} @ kernel)``), or a
    gated one ``[H, G*H]`` (G = 3 for :func:`jax_sprnn.sparse_gru`, 4 for
    :func:`jax_sprnn.sparse_lstm`; the gates concatenated along the last axis as Flax fuses them),
    kept as its nonzeros in the packed layout of docs/format.md.

    Leaves: ``values`` (differentiable, the storage dtype) and the int32 arrays ``indices``,
    ``lane_row`` (forward layout) and ``indices_t``, ``lane_row_t``, ``perm_t`` (the transposed layout
    for the backward pass). The layouts' static sizes are aux data, so a new mask with the same
    layout sizes reuses compiled programs. Build one with :meth:`from_dense`.

    Its index leaves are integers, so ``jax.grad`` with respect to a whole ``SparseWeights`` (or a
    params tree holding one) refuses them: use :func:`jax_sprnn.grad` / :func:`jax_sprnn.value_and_grad`
    (the gradient's ``values``, float0 index leaves), differentiate ``weights.values``, or a dense
    kernel through :meth:`gather`.

    The leaves are named (a keyed pytree), so a checkpointer restoring without a target gives a dict
    of these names; ``jax_sprnn.pruning.from_restored`` packs it back into SparseWeights.
    """

    #: The names of the leaves, in the order the pytree flattens them.
    LEAVES: ClassVar[tuple[str, ...]] = ("values",) + PackedLayout.INDEX_LEAVES

    values: Any

    # ---- pytree -------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        return (tuple((jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in self.LEAVES),
                (self.meta, self.meta_t))

    def tree_flatten(self):
        return tuple(getattr(self, n) for n in self.LEAVES), (self.meta, self.meta_t)

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(**dict(zip(cls.LEAVES, leaves)), meta=aux[0], meta_t=aux[1])

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, kernel, mask=None, *, density: float | None = None, dtype=None,
                   device: _planner.DeviceSpec | None = None, load_bytes: int | None = None,
                   bank_aware: bool = True, exchange: str = "auto",
                   matvec: str = "auto", batch: int | None = None) -> "SparseWeights":
        """Pack a dense ``[H, H]`` kernel (Flax orientation), or a gated ``[H, 3H]`` / ``[H, 4H]``
        one (column ``g*H + i``: gate ``g`` of unit ``i``), keeping the entries where ``mask`` is
        true, or the ``density`` fraction of largest magnitudes. Exactly one of the two is needed.

        ``dtype`` is the storage dtype (default: the kernel's; float64 becomes float32).
        ``device`` is the GPU to plan for (default: the current one, or an H200 when there is none).
        ``load_bytes`` (4, 8 or 16) is the width of one staged-state load (a batch tile of
        ``load_bytes / 4`` examples); None (the default) takes the widest whose layout fits on chip.
        ``bank_aware=False`` skips the bank-conflict-aware order (the ablation baseline).
        ``exchange`` (``"auto"``, ``"cluster"``, ``"grid"``) is the GPU exchange to plan for: the
        planner's pick by estimated step, a layout on one thread-block cluster (an error where none
        fits the device), or one spread over the SMs (docs/design.md). These change only speed and
        which layers fit, never the result.
        ``matvec`` is how a GPU forms a step's recurrent product: ``"slots"``, the sparse gather of
        (value, index) pairs; ``"tiles"``, a tile layout (docs/format.md) whose forward step runs
        on tensor cores over dense 16-column strips (float16 or bfloat16, H a multiple of 16; for
        dense-ish layers, about 10% density and up); ``"auto"``, slots: the tensor-core path
        measured slower so far (benchmarks/RESULTS.md). It too changes only speed and fit.
        ``batch`` is the batch the layer will mostly run at, if known: the planner then picks the
        layout whose estimated step is lowest at that batch (and that runs it persistently), where
        by default it weighs B = 1 to 32 alike (the geometric mean of the estimates). Every batch
        still runs; ``meta.reason`` records it.
        """
        kernel = np.asarray(kernel)
        gates = kernel_gates(kernel.shape, "kernel")
        if not np.issubdtype(kernel.dtype, np.floating) and kernel.dtype != jnp.bfloat16:
            raise TypeError(f"kernel must be a floating-point array, got {kernel.dtype}")
        check_finite(kernel, "kernel")
        if dtype is None:
            dtype = np.float32 if kernel.dtype == np.float64 else kernel.dtype
        dtype = check_weight_dtype(dtype, "dtype")
        if (mask is None) == (density is None):
            raise ValueError("pass exactly one of mask= or density=")
        if mask is None:
            density = _density_value(density)
            with np.errstate(over="ignore"):  # (ranks as inf; refused below if kept)
                scores = np.abs(np.asarray(kernel, np.float32))
            mask = top_k_mask(scores, int(round(density * scores.size)))
        mask = np.asarray(mask)
        if mask.shape != kernel.shape:
            raise ValueError(f"mask must have the kernel's shape {kernel.shape}, got {mask.shape}")
        if mask.dtype != bool:
            raise TypeError(f"mask must be a boolean array, got {mask.dtype}")
        if device is None:
            from ._native import current_device_spec
            device = current_device_spec()
        # U = kernel.T: row i (output unit) has nonzeros at columns j where mask[j, i]. Reading
        # the transposed mask yields them sorted by row, as the packer likes.
        rows, cols = np.nonzero(mask.T)
        vals = storable(kernel.reshape(-1)[cols * kernel.shape[1] + rows], dtype)  # kernel[cols, rows]
        return cls.from_pattern(rows, cols, vals, kernel.shape[0], gates=gates, device=device,
                                load_bytes=load_bytes, bank_aware=bank_aware, exchange=exchange,
                                matvec=matvec, batch=batch)

    @classmethod
    def from_pattern(cls, rows, cols, vals, hidden: int, *, gates: int = 1,
                     device: _planner.DeviceSpec | None = None, load_bytes: int | None = None,
                     bank_aware: bool = True, exchange: str = "auto",
                     matvec: str = "auto", batch: int | None = None) -> "SparseWeights":
        """Pack nonzeros ``U[rows[n], cols[n]] = vals[n]`` (``U = kernel.T``, ``G*H x H``; rows in
        ``[0, gates * hidden)``, columns in ``[0, hidden)``, each entry given once, finite values)
        of a layer of ``hidden`` units (options as in :meth:`from_dense`)."""
        if isinstance(hidden, (bool, np.bool_)) or not isinstance(hidden, (int, np.integer)) \
                or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        hidden = int(hidden)
        rows, cols = (np.asarray(a) for a in (rows, cols))
        for name, a in (("rows", rows), ("cols", cols)):
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must be integers, got {a.dtype}")
        rows, cols = rows.astype(np.int64), cols.astype(np.int64)
        vals = np.asarray(vals)
        dtype = check_weight_dtype(vals.dtype, "vals")
        if not (rows.shape == cols.shape == vals.shape and rows.ndim == 1):
            raise ValueError("rows, cols and vals must be 1-D arrays of one length")
        if gates not in GATES:
            raise ValueError(f"gates must be one of {GATES}, got {gates!r}")
        if rows.size and (min(rows.min(), cols.min()) < 0 or rows.max() >= gates * hidden
                          or cols.max() >= hidden):
            raise ValueError(f"rows must lie in [0, {gates * hidden}) and cols in [0, {hidden})")
        keys, first, counts = np.unique(rows * hidden + cols, return_index=True, return_counts=True)
        if np.any(counts > 1):
            dup = int(first[np.argmax(counts > 1)])
            raise ValueError(f"rows and cols repeat the entry ({int(rows[dup])}, {int(cols[dup])}) "
                             f"{int(counts.max())} times: each nonzero must be given once")
        check_finite(vals, "vals")
        if device is None:
            from ._native import current_device_spec
            device = current_device_spec()
        fwd_plan, bwd_plan = plan_layer(np.bincount(rows, minlength=gates * hidden),
                                        np.bincount(cols, minlength=hidden), dtype, device,
                                        gates=gates, load_bytes=load_bytes, exchange=exchange,
                                        matvec=matvec, batch=batch)
        if exchange == "cluster" and not (fwd_plan.fits and fwd_plan.exchange == "cluster"):
            raise ValueError(
                f"exchange='cluster': no layout of this layer (H={hidden}, {rows.size} nonzeros, "
                f"{np.dtype(dtype).name}) fits in one thread-block cluster of at most "
                f"{_planner.MAX_CLUSTER_CTAS} CTAs on {device.name}"
                + ("" if device.cluster_launch else " (the device has no cluster launch)")
                + f"; the planner's layout: {fwd_plan.num_ctas} CTAs, {fwd_plan.reason}")
        if fwd_plan.tiles:
            fwd = pack_tiles(rows, cols, fwd_plan)
        else:
            fwd = pack_pattern(rows, cols, fwd_plan, bank_aware=bank_aware)
        bwd = pack_pattern(cols, rows, bwd_plan, bank_aware=bank_aware)
        values = np.zeros(fwd.meta.num_slots, dtype)
        values[fwd.slot_of_nonzero] = vals
        perm_t = np.full(bwd.meta.num_slots, -1, np.int64)
        perm_t[bwd.slot_of_nonzero] = fwd.slot_of_nonzero
        # device_put, not jnp.asarray: the latter compiles a conversion per dtype on a first call.
        return cls(jax.device_put(values), indices=jax.device_put(fwd.indices),
                   lane_row=jax.device_put(fwd.lane_row), indices_t=jax.device_put(bwd.indices),
                   lane_row_t=jax.device_put(bwd.lane_row),
                   perm_t=jax.device_put(perm_t.astype(np.int32)), meta=fwd.meta, meta_t=bwd.meta)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.values.dtype)

    @property
    def nnz(self) -> int:
        """Stored nonzeros (host data; not available under a transformation)."""
        return int(np.count_nonzero(np.asarray(self.indices) >= 0))

    @property
    def density(self) -> float:
        rows, cols = self.shape
        return self.nnz / float(rows * cols)

    def replace(self, **changes) -> "SparseWeights":
        return dataclasses.replace(self, **changes)

    def astype(self, dtype) -> "SparseWeights":
        """The same pattern stored in another dtype (the layout sizes are kept)."""
        return self.replace(values=jnp.asarray(self.values).astype(check_weight_dtype(dtype, "dtype")))

    # ---- views (differentiable JAX; usable under jit) -----------------------------------------
    def _coordinates(self):
        """(input unit j, output unit i, is_real) of every forward slot."""
        idx = jnp.asarray(self.indices)
        rows = jnp.asarray(self.lane_row)[lane_of_slot(self.meta)]
        real = (idx >= 0) & (rows >= 0)
        cols = jnp.where(idx < 0, ~idx, idx)
        return cols, jnp.maximum(rows, 0), real

    def to_dense(self) -> jax.Array:
        """The dense ``[H, G*H]`` kernel in Flax orientation; zero where the mask removed weights."""
        cols, rows, real = self._coordinates()
        vals = jnp.where(real, self.values, jnp.zeros((), self.values.dtype))
        dense = jnp.zeros(self.shape, self.values.dtype)
        return dense.at[cols, rows].add(vals)

    def gather(self, kernel) -> "SparseWeights":
        """These weights with their values taken from a dense kernel at the stored positions.

        The gradient with respect to ``kernel`` is exactly zero off the pattern.
        """
        kernel = jnp.asarray(kernel)
        if kernel.shape != self.shape:
            raise ValueError(f"kernel must have shape {self.shape}, got {kernel.shape}")
        cols, rows, real = self._coordinates()
        vals = jnp.where(real, kernel[cols, rows], jnp.zeros((), kernel.dtype))
        return self.replace(values=vals.astype(self.values.dtype))

    def transposed_values(self) -> jax.Array:
        """The values in the transposed layout (a gather through ``perm_t``; padding is zero)."""
        perm = jnp.asarray(self.perm_t)
        vals = jnp.asarray(self.values)[jnp.maximum(perm, 0)]
        return jnp.where(perm >= 0, vals, jnp.zeros((), vals.dtype))

    def mask(self) -> np.ndarray:
        """The boolean ``[H, G*H]`` pattern (host NumPy)."""
        idx = np.asarray(self.indices)
        rows = np.asarray(self.lane_row)[lane_of_slot(self.meta)]
        real = (idx >= 0) & (rows >= 0)
        out = np.zeros(self.shape, bool)
        out[idx[real], rows[real]] = True
        return out

    def check_leaves(self) -> None:
        """Check the leaves' shapes and dtypes against the layout; raise an error naming the leaf.
        Cheap, and fine on traced leaves: every call that takes SparseWeights runs it."""
        m, mt = self.meta, self.meta_t
        for name, arr, size in (("values", self.values, m.num_slots), ("indices", self.indices, m.num_slots),
                                ("lane_row", self.lane_row, m.num_lanes),
                                ("indices_t", self.indices_t, mt.num_slots),
                                ("lane_row_t", self.lane_row_t, mt.num_lanes),
                                ("perm_t", self.perm_t, mt.num_slots)):
            if np.shape(arr) != (size,):
                stacked = np.ndim(arr) == 2 and np.shape(arr)[1:] == (size,)
                raise ValueError(f"SparseWeights.{name} must have shape ({size},), got "
                                 f"{np.shape(arr)}" + (" (a stack of weight sets: run the call "
                                                       "under jax.vmap over them)" if stacked else ""))
        for name in self.INDEX_LEAVES:
            arr = getattr(self, name)
            if np.dtype(arr.dtype) != np.int32:
                raise TypeError(f"SparseWeights.{name} must be int32, got {arr.dtype}")
        check_weight_dtype(self.values.dtype, "SparseWeights.values")

    def validate(self) -> None:
        """Check the invariants of docs/format.md on host data; raise ValueError naming the array."""
        self.check_leaves()
        m, mt = self.meta, self.meta_t
        if (mt.hidden, mt.gates, m.transposed, mt.transposed) != (m.hidden, m.gates, False,
                                                                 m.gates > 1):
            raise ValueError(f"SparseWeights: meta_t (H={mt.hidden}, gates={mt.gates}, transposed="
                             f"{mt.transposed}) is not the transposed layout of meta (H={m.hidden}, "
                             f"gates={m.gates})")
        for name, idx, rows, lay in (("indices", self.indices, self.lane_row, m),
                                     ("indices_t", self.indices_t, self.lane_row_t, mt)):
            cols = decode_columns(np.asarray(idx))
            if cols.size and (cols.min() < 0 or cols.max() >= lay.num_cols):
                raise ValueError(f"SparseWeights.{name} has columns outside [0, {lay.num_cols})")
            rows = np.asarray(rows)
            if rows.size and (rows.min() < -1 or rows.max() >= lay.num_rows):
                raise ValueError(f"SparseWeights.lane_row{name[7:]} has rows outside "
                                 f"[-1, {lay.num_rows})")
            if not np.array_equal(np.unique(rows[rows >= 0]), np.arange(lay.num_rows)):
                raise ValueError(f"SparseWeights.lane_row{name[7:]} must give every row a lane")
        if m.gates > 1:  # (first: its message names the unit)
            _check_units_in_warps(np.asarray(self.lane_row), m)
        _check_row_runs(np.asarray(self.lane_row), m, "lane_row")
        _check_row_runs(np.asarray(self.lane_row_t), mt, "lane_row_t")
        if m.tiles:
            check_tile_layout(np.asarray(self.indices), np.asarray(self.lane_row), m)
        perm = np.asarray(self.perm_t)
        if perm.size and (perm.min() < -1 or perm.max() >= m.num_slots):
            raise ValueError(f"SparseWeights.perm_t has entries outside [-1, {m.num_slots})")
        _check_transposed(self)
        real = np.asarray(self.indices) >= 0
        if np.any(np.asarray(self.values)[~real] != 0):
            raise ValueError("SparseWeights.values must be exactly zero on padding slots")

    def __repr__(self) -> str:
        # nnz and density read the index leaves: only where they hold integers here (not a
        # tracer, a ShapeDtypeStruct, or a gradient's float0 zeros).
        indices = self.indices
        counted = (isinstance(indices, (np.ndarray, jax.Array))
                   and np.issubdtype(np.dtype(indices.dtype), np.integer) and is_concrete(indices))
        counts = f"nnz={self.nnz}, density={self.density:.4f}, " if counted else ""
        return (f"SparseWeights(shape={self.shape}, dtype={self.dtype}, {counts}"
                f"K={self.meta.slots_per_lane}, warps={self.meta.num_warps}, "
                f"ctas={self.meta.num_ctas}, fits={self.meta.fits})")
