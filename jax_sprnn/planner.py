"""Decide how a sparse recurrent layer is laid out on a GPU, and whether it fits on chip.

The planner is a pure function of the layer (hidden size, nonzeros per row, dtype) and of a
:class:`DeviceSpec`, so tests can call it with made-up devices. Its model of the persistent kernel
(docs/format.md, docs/design.md):

* one CTA per SM at most (more CTAs per SM would raise the cost of the steps' synchronization);
* a warp owns whole rows; a row owns ``ceil(nnz / K)`` contiguous lanes (at least one), so a warp
  can hold several short rows; every lane holds ``K`` slots (``K`` from :data:`SLOT_SIZES`);
* per thread, ``reg_slots`` of the K slots sit in registers (one 32-bit register per slot for 16-bit
  types, two for float32); the rest sit in shared memory. Each register-tier size is a kernel
  instantiation compiled for at most a fixed number of threads per CTA (its launch bound, which fixes
  its register budget): :attr:`DeviceSpec.max_threads_16` / ``max_threads_32``;
* shared memory also holds ``h_{t-1}`` staged as float32 ``[plane][H][load_bytes / 4]``.

Among the K that fit, it picks the one with the fewest slot rounds per step
(``warps_per_cta * K``, shared-memory slots weighted by :data:`SMEM_SLOT_COST`): that is what a step's
compute time is proportional to. Then, if the CTAs are thin, it regroups the same warps into fewer,
wider CTAs: every CTA stages all of ``h_{t-1}`` each step, and with too few threads that staging,
not the slots, sets the step time (see :data:`STAGE_WORDS_PER_THREAD`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from . import _constants, cost
from .cost import SMEM_SLOT_COST

WARP = 32

#: The "nonzeros per lane" sizes a layout may use.
SLOT_SIZES: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

#: Shared-memory bytes the kernel reserves for itself besides h and the weight tier.
KERNEL_SMEM_RESERVE = _constants.KERNEL_SMEM_RESERVE



#: The most staged-h loads per thread per batch plane the planner accepts while it can widen CTAs:
#: a thin CTA (sparse layers need few warps) otherwise spends the step staging ``H`` words with one
#: or two warps. Measured on the H200 at 1% density: 2 warps per CTA ran 2-4x slower per step than
#: 5% density (benchmarks/RESULTS.md, sweep).
STAGE_WORDS_PER_THREAD = 8

#: Layouts of at most this many CTAs run in cluster mode (the kernel's non-portable cluster size).
MAX_CLUSTER_CTAS = _constants.MAX_CLUSTER_CTAS
#: Cluster layouts within this fraction of the cheapest estimate count as equal, and a portable one
#: (at most 8 CTAs) is taken among them: the estimate's own error is larger (±15%), and on an H200
#: a portable cluster fits 15 times at once where one of 10-16 CTAs fits 7 times. At H = 1024
#: (fp16, 10%) the estimate put 16 CTAs of 16 warps 1% ahead of 8 of 16; measured, the 8 were
#: faster at every batch (medians of five runs: 3.2-3.3 against 3.3-3.7 µs at B = 1-16, 3.3
#: against 6.2 at B = 32; benchmarks/RESULTS.md, "Refitting the cluster step").
PORTABLE_TOLERANCE = 0.05
#: ``plan_layout``'s choices of exchange: the planner's pick, or a layout for one mode
EXCHANGES = ("auto", "cluster", "grid")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What the planner and dispatch need to know about a GPU.

    On a machine with a GPU, :func:`jax_sprnn._native.current_device_spec` reads every field from
    the device at run time. The defaults describe one NVIDIA H200 (sm_90): :data:`H200` is only the
    planning default for packing layouts on a machine without a GPU (or without the CUDA module).
    """

    name: str = "NVIDIA H200"
    sm_count: int = 132
    smem_per_block: int = 232448  # the opt-in maximum for one block
    max_threads_per_block: int = 1024
    compute_capability: tuple[int, int] = (9, 0)
    regs_per_sm: int = 65536
    #: the persistent kernels need a cooperative (grid-synchronized) launch
    cooperative_launch: bool = True
    #: thread-block clusters (sm_90 and newer): layouts of at most :data:`MAX_CLUSTER_CTAS` CTAs run
    #: in cluster mode (docs/design.md)
    cluster_launch: bool = True
    #: (register-tier slots, the most threads per CTA any compiled variant of that tier runs) for
    #: 16-bit storage: derived from the kernel's instantiation table in jax_sprnn/_constants.py
    max_threads_16: tuple[tuple[int, int], ...] = _constants.thread_limits(_constants.PERSISTENT_TIERS_16)
    #: the same for float32 storage (two registers per slot)
    max_threads_32: tuple[tuple[int, int], ...] = _constants.thread_limits(_constants.PERSISTENT_TIERS_32)
    #: the same for the gated cells' forward kernels (a smaller instantiation set)
    max_threads_gated_16: tuple[tuple[int, int], ...] = _constants.thread_limits(
        _constants.PERSISTENT_TIERS_GATED_16)
    max_threads_gated_32: tuple[tuple[int, int], ...] = _constants.thread_limits(
        _constants.PERSISTENT_TIERS_GATED_32)

    def thread_limits(self, dtype, gates: int = 1) -> tuple[tuple[int, int], ...]:
        """``(reg_slots, most threads)`` of the kernels that run a layout of ``gates`` gates in
        ``dtype``."""
        wide = bytes_per_slot(dtype) == 8
        if gates > 1:
            return self.max_threads_gated_32 if wide else self.max_threads_gated_16
        return self.max_threads_32 if wide else self.max_threads_16


#: The planning default without a GPU (see :class:`DeviceSpec`); never used for dispatch on a GPU.
H200 = DeviceSpec()


@dataclasses.dataclass(frozen=True)
class LayoutMeta:
    """The static half of a packed layout: its sizes, and whether the persistent kernel runs it.

    It holds no dtype, so one meta serves a layout in any storage dtype. Hashable: it is pytree aux
    data and a primitive parameter. A :class:`Plan` is a LayoutMeta plus the planner's accounting.
    """

    hidden: int
    slots_per_lane: int
    num_warps: int
    warps_per_cta: int
    reg_slots: int
    load_bytes: int
    fits: bool
    reason: str
    #: G, gate rows per hidden unit: 1 for the simple cell, 3 (GRU) or 4 (LSTM) for a gated kernel
    #: ``[H, G*H]``. The forward layout of a gated kernel has ``G*H`` rows (row ``g*H + i`` is gate
    #: ``g`` of unit ``i``) over ``H`` columns, and a unit's G rows share a warp (docs/format.md).
    gates: int = dataclasses.field(default=1, kw_only=True)
    #: whether this is the transposed (backward) layout of a gated kernel: ``H`` rows over ``G*H``
    #: columns. A square layer's two layouts have one shape, so its ``meta_t`` leaves it False.
    transposed: bool = dataclasses.field(default=False, kw_only=True)
    #: whether this is a tile layout (docs/format.md, "Tile layouts"; :mod:`jax_sprnn.tile_layout`):
    #: one row a lane and a slot for every column, which the 16-bit forward kernels run as dense
    #: tiles on tensor cores. Every other path runs it as the ordinary layout it also is.
    tiles: bool = dataclasses.field(default=False, kw_only=True)

    @classmethod
    def from_plan(cls, plan: "LayoutMeta") -> "LayoutMeta":
        """The layout half of a :class:`Plan` (or a copy of a LayoutMeta)."""
        return cls(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(cls)})

    @property
    def num_ctas(self) -> int:
        return self.num_warps // self.warps_per_cta

    @property
    def threads_per_cta(self) -> int:
        return self.warps_per_cta * WARP

    @property
    def num_slots(self) -> int:
        return self.num_warps * self.slots_per_lane * WARP

    @property
    def num_lanes(self) -> int:
        return self.num_warps * WARP

    @property
    def num_rows(self) -> int:
        """Rows of the packed matrix (the values of ``lane_row``)."""
        return self.hidden if self.transposed else self.gates * self.hidden

    @property
    def num_cols(self) -> int:
        """Columns of the packed matrix (the length of the vector a step reads)."""
        return self.gates * self.hidden if self.transposed else self.hidden

    @property
    def exchange(self) -> str:
        """How the persistent kernel exchanges the state for this layout on a GPU with thread-block
        clusters: ``"cluster"`` (every CTA in one cluster, through distributed shared memory) or
        ``"grid"`` (through L2). Devices without clusters always run ``"grid"``, and so does a
        layout of few CTAs whose two staged copies of a batch tile do not fit in shared memory
        (the handler checks; a grid layout widened into few CTAs can be one, e.g. H=8192 at 0.1%
        in float32)."""
        return "cluster" if self.num_ctas <= MAX_CLUSTER_CTAS else "grid"

    @property
    def phase_lanes(self) -> int:
        """Lanes served together by shared memory for one load of ``load_bytes`` each."""
        return 128 // self.load_bytes


@dataclasses.dataclass(frozen=True)
class Plan(LayoutMeta):
    """A layout decision for one dtype and device: the layout (``fits`` says whether the persistent
    kernel can run it on the device) and the shared memory it was planned with."""

    #: shared memory of one CTA with a single batch plane, in bytes
    smem_bytes: int


def lanes_per_row(row_nnz: np.ndarray, slots_per_lane: int) -> np.ndarray:
    """Lanes each row needs with K slots per lane: every row needs one lane for its output."""
    return np.maximum(1, -(-np.asarray(row_nnz, np.int64) // slots_per_lane))


def pack_rows_into_warps(row_lanes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Best-fit-decreasing bin packing of rows (each ``row_lanes[i]`` <= 32 lanes) into warps.

    Returns ``(warp_of_row, first_lane_of_row, num_warps)``. Rows never straddle warps, so a row's
    partial sums reduce inside one warp with shuffles.
    """
    row_lanes = np.asarray(row_lanes, np.int64)
    hidden = row_lanes.size
    warp_of_row = np.empty(hidden, np.int64)
    first_lane = np.empty(hidden, np.int64)
    # open_bins[c]: warps with exactly c free lanes, as a stack of (warp, next free lane)
    open_bins: list[list[tuple[int, int]]] = [[] for _ in range(WARP + 1)]
    num_warps = 0
    order = np.argsort(-row_lanes, kind="stable")
    for row, need in zip(order.tolist(), row_lanes[order].tolist()):
        for free in range(need, WARP + 1):  # the fullest warp that still has room
            if open_bins[free]:
                warp, lane = open_bins[free].pop()
                break
        else:
            warp, lane, free = num_warps, 0, WARP
            num_warps += 1
        warp_of_row[row] = warp
        first_lane[row] = lane
        if free > need:
            open_bins[free - need].append((warp, lane + need))
    return warp_of_row, first_lane, num_warps


def unit_lanes(row_nnz: np.ndarray, slots_per_lane: int, gates: int = 1) -> np.ndarray:
    """Lanes each hidden unit needs: the lanes of its ``gates`` rows ``g*H + i``, which share a
    warp (for ``gates=1``, :func:`lanes_per_row`)."""
    return lanes_per_row(row_nnz, slots_per_lane).reshape(gates, -1).sum(axis=0)


def _warps_needed(row_lanes: np.ndarray) -> int:
    # Equal-size rows (row-balanced pruning, the common case) pack exactly; otherwise run the packer.
    if row_lanes.size and np.all(row_lanes == row_lanes[0]):
        return -(-row_lanes.size // (WARP // int(row_lanes[0])))
    return pack_rows_into_warps(row_lanes)[2]


def bytes_per_slot(dtype, tiles: bool = False) -> int:
    """On-chip bytes per (value, index) pair: 16-bit value + 16-bit index, or float32 + index; a
    tile layout's kernel holds the 16-bit value alone (:func:`runs_tiles`)."""
    if tiles:
        return 2
    return 8 if np.dtype(dtype).itemsize == 4 else 4


def runs_tiles(meta: LayoutMeta, dtype) -> bool:
    """Whether a GPU runs this layout on tensor cores: a tile layout in 16-bit storage (a tile
    layout stored as float32 runs as the ordinary layout it also is)."""
    return meta.tiles and np.dtype(dtype).itemsize == 2


def weight_smem_bytes(slots_per_lane: int, reg_slots: int, threads: int, dtype, tiles: bool = False) -> int:
    """Shared memory of a CTA's weight tier: the slots beyond the register tier, for every thread."""
    return (slots_per_lane - reg_slots) * threads * bytes_per_slot(dtype, tiles)


def cta_smem_bytes(cols: int, load_bytes: int, slots_per_lane: int, reg_slots: int, threads: int,
                   dtype, gates: int = 1, transposed: bool = False, tiles: bool = False) -> int:
    """Shared memory of one CTA with a single batch plane of the staged state, ``cols`` wide (the
    kernel's own plan, :func:`jax_sprnn._constants.persistent_smem_bytes`, plus the reserve; the
    cell state too where the recurrence keeps one)."""
    tile = load_bytes // 4
    weights = weight_smem_bytes(slots_per_lane, reg_slots, threads, dtype, tiles)
    cell = _constants.cell_state_smem_bytes(tile, tile, threads // WARP, gates, transposed)
    return _constants.persistent_smem_bytes(cols, tile, tile, weights, 1, cell) + KERNEL_SMEM_RESERVE


def _step_cost(plan: Plan) -> float:
    smem_slots = plan.slots_per_lane - plan.reg_slots
    return plan.warps_per_cta * (plan.reg_slots + SMEM_SLOT_COST * smem_slots)


def plan_layout(
    row_nnz: Sequence[int] | np.ndarray,
    dtype,
    device: DeviceSpec = H200,
    *,
    load_bytes: int = 16,
    slot_sizes: Sequence[int] = SLOT_SIZES,
    gates: int = 1,
    transposed: bool = False,
    exchange: str = "auto",
    batch: int | None = None,
) -> Plan:
    """Plan the layout of a layer whose row ``i`` (output unit ``i``) has ``row_nnz[i]`` nonzeros.

    ``load_bytes`` (4, 8 or 16) is the width of one staged-h load, i.e. a batch tile of
    ``load_bytes / 4`` examples. When nothing fits on chip the returned plan has ``fits=False``,
    a ``reason`` with the numbers, and a layout that the CPU kernel and the fallbacks can still use.

    ``gates`` (G): ``row_nnz`` holds the ``G*H`` rows of a gated kernel's forward layout (row
    ``g*H + i``: gate ``g`` of unit ``i``); each unit's G rows are kept in one warp, and the plan's
    ``hidden`` is H. ``transposed``: ``row_nnz`` holds the H rows of a gated kernel's transposed
    (backward) layout instead, over ``G*H`` columns: its kernel stages ``G*H`` values an example and
    runs the gated cells' register tiers.

    ``exchange`` picks between the two layouts that fit: ``"auto"`` the one with the lower estimated
    step (``jax_sprnn.cost``), ``"cluster"`` the cheapest on at most :data:`MAX_CLUSTER_CTAS` CTAs
    (one thread-block cluster) where one fits, ``"grid"`` the layout spread over the SMs as for a GPU
    without clusters (a layer small enough to need few CTAs still runs in cluster mode).

    ``batch``: the batch the layer will run at, if known. The estimates are then taken at that
    batch alone, instead of their geometric mean over :data:`jax_sprnn.cost.PLANNING_BATCHES`, and
    a layout that runs that batch persistently is preferred to one that does not. Any batch still
    runs on the result.
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"plan_layout: exchange must be one of {EXCHANGES}, got {exchange!r}")
    check_batch_hint(batch)
    row_nnz = np.asarray(row_nnz, np.int64)
    row_gates = 1 if transposed else gates
    if gates < 1 or row_nnz.size % row_gates:
        raise ValueError(f"plan_layout: {row_nnz.size} rows are not {gates} gates of whole units")
    hidden = int(row_nnz.size) // row_gates
    cols = gates * hidden if transposed else hidden
    if hidden == 0:
        raise ValueError("plan_layout: the layer must have at least one row")
    if load_bytes not in (4, 8, 16):
        raise ValueError(f"plan_layout: load_bytes must be 4, 8 or 16, got {load_bytes}")
    max_nnz = int(row_nnz.max())
    best: Plan | None = None
    reasons = []
    for k in sorted(slot_sizes):
        lanes = unit_lanes(row_nnz, k, row_gates)
        if lanes.max() > WARP:  # a unit's rows must fit in one warp
            continue
        warps = _warps_needed(lanes)
        num_ctas = min(device.sm_count, warps)
        wpc = -(-warps // num_ctas)
        threads = wpc * WARP
        if threads > device.max_threads_per_block:
            reasons.append(f"K={k}: {warps} warps need {threads} threads per CTA "
                           f"> {device.max_threads_per_block}")
            continue
        num_ctas = -(-warps // wpc)
        reg_slots = max((r for r, most in device.thread_limits(dtype, gates) if r <= k and threads <= most),
                        default=None)
        if reg_slots is None:
            reasons.append(f"K={k}: no kernel instantiation runs {threads} threads per CTA")
            continue
        smem = cta_smem_bytes(cols, load_bytes, k, reg_slots, threads, dtype, gates, transposed)
        if smem > device.smem_per_block:
            reasons.append(f"K={k}: needs {smem} bytes of shared memory per CTA "
                           f"> {device.smem_per_block}")
            continue
        plan = Plan(hidden, k, num_ctas * wpc, wpc, reg_slots, load_bytes, True, "fits", smem,
                    gates=gates, transposed=transposed)
        if best is None or (_step_cost(plan), k) < (_step_cost(best), best.slots_per_lane):
            best = plan
    if best is not None:
        grid = _widen_thin_ctas(best, dtype, device)
        if exchange == "grid":
            return planned_for(grid, batch)
        cluster = _cluster_layout(row_nnz, dtype, device, load_bytes, slot_sizes, gates, transposed,
                                  batch)
        if exchange == "cluster" and cluster is not None:
            return planned_for(cluster, batch)
        return planned_for(_faster_of(grid, cluster, dtype, device, batch), batch)
    # Nothing fits: still lay it out (for the CPU kernel and the fallback paths), with the
    # smallest K that keeps every row inside one warp.
    k = next((s for s in sorted(slot_sizes) if unit_lanes(row_nnz, s, row_gates).max() <= WARP), None)
    if k is None:
        k = int(math.ceil(max_nnz / WARP))
        while unit_lanes(row_nnz, k, row_gates).max() > WARP:
            k += 1
    warps = _warps_needed(unit_lanes(row_nnz, k, row_gates))
    wpc = max(1, min(warps, device.max_threads_per_block // WARP))
    num_warps = -(-warps // wpc) * wpc
    detail = "; ".join(reasons[-3:]) if reasons else f"a row has {max_nnz} nonzeros"
    reason = (f"H={hidden} with {int(row_nnz.sum())} nonzeros (max {max_nnz} per row) does not fit "
              f"on {device.name} ({device.sm_count} SMs, {device.smem_per_block} bytes of shared "
              f"memory per CTA): {detail}")
    return Plan(hidden, k, num_warps, wpc, 0, load_bytes, False, reason,
                cta_smem_bytes(cols, load_bytes, k, 0, wpc * WARP, dtype, gates, transposed),
                gates=gates, transposed=transposed)


def _widen_thin_ctas(plan: Plan, dtype, device: DeviceSpec) -> Plan:
    """The same warps in fewer CTAs of at least ``H / (32 * STAGE_WORDS_PER_THREAD)`` warps, when
    the register tier's thread limit and shared memory allow (never fewer registers per slot)."""
    want = -(-plan.num_cols // (WARP * STAGE_WORDS_PER_THREAD))
    if plan.warps_per_cta >= want:
        return plan
    warps = plan.num_warps
    limit = dict(device.thread_limits(dtype, plan.gates))[plan.reg_slots]
    for wpc in range(min(want, warps, limit // WARP, device.max_threads_per_block // WARP),
                     plan.warps_per_cta, -1):
        smem = cta_smem_bytes(plan.num_cols, plan.load_bytes, plan.slots_per_lane, plan.reg_slots,
                              wpc * WARP, dtype, plan.gates, plan.transposed)
        if smem <= device.smem_per_block:
            return dataclasses.replace(plan, num_warps=-(-warps // wpc) * wpc, warps_per_cta=wpc,
                                       smem_bytes=smem)
    return plan


def max_persistent_batch(plan: LayoutMeta, dtype, device: DeviceSpec = H200) -> int:
    """The largest batch the persistent kernel runs for this layout (more planes of staged h): in
    grid mode, one staged copy of the whole batch fits in a CTA's shared memory; in cluster mode,
    the clusters the device holds at once (``cost.resident_clusters``) each take a slice of it,
    with two staged copies of their slice (the handler's plan_exchange, which runs the replicas in
    waves where the device holds fewer clusters than estimated)."""
    if not plan.fits:
        return 0
    layout_tile = plan.load_bytes // 4
    tiles = runs_tiles(plan, dtype)
    weights = weight_smem_bytes(plan.slots_per_lane, plan.reg_slots, plan.threads_per_cta, dtype, tiles)
    budget = device.smem_per_block - KERNEL_SMEM_RESERVE

    def fits(batch, copies):  # the handler's shared-memory plan, in its batch tile
        tile = layout_tile if tiles else _constants.batch_tile(layout_tile, batch)
        cell = _constants.cell_state_smem_bytes(batch, tile, plan.warps_per_cta, plan.gates,
                                                plan.transposed)
        return _constants.persistent_smem_bytes(plan.num_cols, batch, tile, weights, copies, cell) <= budget

    def widest(copies):  # the staged copies alone bound it; the lengths and the cell state trim it
        batch = max(0, (budget - weights) // (copies * plan.num_cols * plan.load_bytes)) * layout_tile
        while batch > 0 and not fits(batch, copies):
            batch -= 1
        return batch

    batch = widest(1)
    if device.cluster_launch and plan.num_ctas <= MAX_CLUSTER_CTAS:
        replica = widest(2) // layout_tile * layout_tile  # (a replica's slice is whole batch tiles)
        batch = max(batch, replica * cost.resident_clusters(plan.num_ctas, device.sm_count))
    return int(batch)


def check_batch_hint(batch) -> None:
    """``batch``, the planners' hint of the batch a layer will run at: None or a positive integer."""
    if batch is not None and (isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer))
                              or batch < 1):
        raise ValueError(f"batch (the batch to plan the layout for) must be a positive integer or "
                         f"None, got {batch!r}")


def runs_batch(plan: LayoutMeta, batch: int | None, dtype, device: DeviceSpec) -> bool:
    """Whether the persistent kernel runs ``batch`` on this layout (True with no batch given)."""
    return batch is None or max_persistent_batch(plan, dtype, device) >= batch


def planned_for(plan: Plan, batch: int | None) -> Plan:
    """The plan, its ``reason`` naming the batch it was planned for (when one was given)."""
    if batch is None or not plan.fits:
        return plan
    return dataclasses.replace(plan, reason=f"{plan.reason}, planned for batch {int(batch)}")


def _cluster_layout(row_nnz: np.ndarray, dtype, device: DeviceSpec, load_bytes: int,
                    slot_sizes: Sequence[int], gates: int, transposed: bool = False,
                    batch: int | None = None) -> Plan | None:
    """The cheapest layout on at most :data:`MAX_CLUSTER_CTAS` CTAs, by the cluster-mode step
    estimate over a few batches, or at ``batch`` where it is given, among the layouts that run it
    where any does (``jax_sprnn.cost.planning_step_us``), or None (no clusters on the device, or
    the layer does not fit in so few CTAs). Within :data:`PORTABLE_TOLERANCE` of the cheapest, a
    portable cluster (at most 8 CTAs) is preferred. Cluster mode keeps two staged copies of the
    state, so the shared memory is planned for both."""

    if not device.cluster_launch:
        return None
    row_gates = 1 if transposed else gates
    hidden = int(row_nnz.size) // row_gates
    cols = gates * hidden if transposed else hidden
    tile = load_bytes // 4
    candidates: list[tuple[float, Plan]] = []
    for k in sorted(slot_sizes):
        lanes = unit_lanes(row_nnz, k, row_gates)
        if lanes.max() > WARP:
            continue
        warps = _warps_needed(lanes)
        for ctas in range(1, MAX_CLUSTER_CTAS + 1):
            wpc = -(-warps // ctas)
            threads = wpc * WARP
            if threads > device.max_threads_per_block or -(-warps // wpc) != ctas:
                continue
            reg_slots = max((r for r, most in device.thread_limits(dtype, gates)
                             if r <= k and threads <= most), default=None)
            if reg_slots is None:
                continue
            weights = weight_smem_bytes(k, reg_slots, threads, dtype)
            cell = _constants.cell_state_smem_bytes(tile, tile, wpc, gates, transposed)
            two_copies = (_constants.persistent_smem_bytes(cols, tile, tile, weights, 2, cell)
                          + KERNEL_SMEM_RESERVE)
            if two_copies > device.smem_per_block:
                continue
            plan = Plan(hidden, k, ctas * wpc, wpc, reg_slots, load_bytes, True,
                        f"fits (cluster mode: {ctas} CTAs of {wpc} warps)",
                        cta_smem_bytes(cols, load_bytes, k, reg_slots, threads, dtype, gates, transposed),
                        gates=gates, transposed=transposed)
            candidates.append((cost.planning_step_us(plan, "cluster", dtype, batch), plan))
    if not candidates:
        return None
    candidates = [c for c in candidates if runs_batch(c[1], batch, dtype, device)] or candidates
    best_us = min(us for us, _ in candidates)
    near = [(us, plan) for us, plan in candidates if us <= best_us * (1 + PORTABLE_TOLERANCE)]
    return min(near, key=lambda c: (c[1].num_ctas > cost.PORTABLE_CLUSTER_CTAS, c[0]))[1]


def _faster_of(grid: Plan, cluster: Plan | None, dtype, device: DeviceSpec,
               batch: int | None = None) -> Plan:
    """The grid-mode or the cluster-mode layout, whichever has the lower estimated step over a few
    batches (a layout is usually planned before its batch is known), or at ``batch`` where it is
    given; there, one that runs the batch persistently wins over one that does not."""

    if cluster is None or grid.num_ctas <= MAX_CLUSTER_CTAS:
        return grid
    runs = runs_batch(grid, batch, dtype, device), runs_batch(cluster, batch, dtype, device)
    if runs[0] != runs[1]:
        return grid if runs[0] else cluster
    # Like for like: the grid model predates the split phase loop (cost.CLUSTER_SPLIT_FACTOR), whose
    # variants run in both modes and whose grid-mode gain is unmeasured.
    faster = (cost.planning_step_us(cluster, "cluster", dtype, batch, split=False)
              < cost.planning_step_us(grid, "grid", dtype, batch))
    return cluster if faster else grid
