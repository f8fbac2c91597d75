"""Tile layouts: the packed format's dense form, which the GPU runs on tensor cores.

A tile layout (docs/format.md, "Tile layouts") is an ordinary packed layout in which every lane
serves one row and holds a slot for every column: slot ``k`` of a lane is column ``k``, with index
``k`` where the pattern stores the entry and ``~k`` (value 0) where it does not. So the pattern,
``nnz``, the C++ CPU kernel, the fallbacks, the weight gradient and ``to_dense`` see the same layer
as in the ordinary layout, while the 16-bit forward kernels read a warp's 32 rows over 16 columns
as two operands of ``mma.m16n8k16`` and run the step's product on tensor cores
(cuda/persistent_kernel.cuh, "dense tiles"). At the densities where almost no 16x16 block of U is
empty (about 10% and up at random), that is the sparse gather's arithmetic in fewer instructions in
all; docs/design.md ("Dense tiles on tensor cores") says where it should pay and where not.

The G gate rows of a unit sit on adjacent lanes of one warp (``32 // G`` units a warp), as in every
gated layout. Only the forward layout can be a tile layout; the transposed one (backward) stays
sparse.
"""

from __future__ import annotations

import numpy as np

from . import _constants, cost
from .layout import PackedPattern, plan_layouts, widest_fitting
from .planner import (KERNEL_SMEM_RESERVE, MAX_CLUSTER_CTAS, PORTABLE_TOLERANCE, STAGE_WORDS_PER_THREAD,
                      WARP, DeviceSpec, H200, LayoutMeta, Plan, planned_for, check_batch_hint,
                      cta_smem_bytes, plan_layout, runs_batch, weight_smem_bytes)

#: The columns of one tensor-core strip: a tile layout's width is a multiple of it.
STRIP = cost.TILE_STRIP_COLUMNS
#: A tile layout's staged-state load: a batch tile of 4 (a pass of two planes fills the mma's 8).
LOAD_BYTES = 16
#: The batch a tile plan should run persistently where any tile plan of the layer can.
MIN_BATCH = 32


#: How a layer's step forms its recurrent product on a GPU: ``"slots"``, the sparse (value, index)
#: gather; ``"tiles"``, a tile layout on tensor cores; ``"auto"``, slots (the tensor-core path
#: measured slower so far: benchmarks/RESULTS.md).
MATVECS = ("auto", "slots", "tiles")


def plan_layer(row_nnz, col_nnz, dtype, device, *, gates: int = 1, load_bytes: int | None = None,
               exchange: str = "auto", matvec: str = "auto",
               batch: int | None = None) -> tuple[Plan, Plan]:
    """:func:`jax_sprnn.layout.plan_layouts`, or for ``matvec="tiles"`` a tile forward layout
    (16-byte loads) and an ordinary transposed one, at the widest load that fits."""
    if matvec not in MATVECS:
        raise ValueError(f"matvec must be one of {MATVECS}, got {matvec!r}")
    if matvec != "tiles":
        return plan_layouts(row_nnz, col_nnz, dtype, device, gates=gates, load_bytes=load_bytes,
                            exchange=exchange, batch=batch)
    if load_bytes not in (None, LOAD_BYTES):
        raise ValueError(f"load_bytes: a tile layout stages {LOAD_BYTES}-byte loads (a batch tile of "
                         f"4), got {load_bytes}")
    fwd = plan_tile_layout(np.asarray(row_nnz).size // gates, dtype, device, gates=gates,
                           exchange=exchange, batch=batch)

    return fwd, widest_fitting(lambda lb: plan_layout(col_nnz, dtype, device, load_bytes=lb, gates=gates,
                                                      transposed=gates > 1, exchange=exchange,
                                                      batch=batch))


def tile_layout_error(hidden: int, dtype) -> str | None:
    """Why a layer of ``hidden`` units in ``dtype`` cannot have a tile layout, or None."""
    if np.dtype(dtype).itemsize != 2:
        return (f"matvec='tiles': tile layouts run on tensor cores in float16 or bfloat16 storage, got "
                f"{np.dtype(dtype).name}")
    if hidden % STRIP:
        return f"matvec='tiles': a tile layout needs H to be a multiple of {STRIP}, got H={hidden}"
    return None


def _reg_tiers(gates: int) -> tuple[int, ...]:
    return _constants.TILE_REG_SLOTS_GATED_16 if gates > 1 else _constants.TILE_REG_SLOTS_16


def plan_tile_layout(hidden: int, dtype, device: DeviceSpec = H200, *, gates: int = 1,
                     exchange: str = "auto", batch: int | None = None) -> Plan:
    """The tile layout of a layer of ``hidden`` units and ``gates`` gate rows each: the CTA count
    and register tier with the lowest estimated step (``jax_sprnn.cost``) among those that fit
    (whose CTAs are wide enough to stage the state in grid mode, and which run a batch of
    :data:`MIN_BATCH`, where any do),
    in the exchange mode asked for (``"auto"``; ``"cluster"``: at most :data:`MAX_CLUSTER_CTAS`
    CTAs; ``"grid"``: ranked by the grid-mode estimate, as ``plan_layout`` does). ``batch``, as
    ``plan_layout`` takes it: the estimates at that batch, and the plans that run it (instead of
    :data:`MIN_BATCH`) where any do. Where none fits, a plan with ``fits=False`` and the reason
    (the CPU paths still run it)."""
    check_batch_hint(batch)
    why = tile_layout_error(hidden, dtype)
    if why is not None:
        raise ValueError(why)
    units_per_warp = WARP // gates
    warps = -(-hidden // units_per_warp)
    cols = k = hidden
    limits = dict(device.thread_limits(dtype, gates))
    candidates: list[tuple[float, Plan]] = []
    for ctas in range(1, min(device.sm_count, warps) + 1):
        wpc = -(-warps // ctas)
        threads = wpc * WARP
        if -(-warps // wpc) != ctas or threads > device.max_threads_per_block:
            continue
        rs = max((r for r in _reg_tiers(gates) if r <= k and threads <= limits.get(r, 0)), default=None)
        if rs is None:
            continue
        one_copy = cta_smem_bytes(cols, LOAD_BYTES, k, rs, threads, dtype, gates, tiles=True)
        if one_copy > device.smem_per_block:
            continue
        in_cluster = ctas <= MAX_CLUSTER_CTAS and device.cluster_launch
        if in_cluster:  # cluster mode keeps two staged copies of the state
            weights = weight_smem_bytes(k, rs, threads, dtype, tiles=True)
            cell = _constants.cell_state_smem_bytes(4, 4, wpc, gates, False)
            two = _constants.persistent_smem_bytes(cols, 4, 4, weights, 2, cell) + KERNEL_SMEM_RESERVE
            if two > device.smem_per_block:
                continue
        # ("grid" ranks every CTA count as a grid layout: a layer too small for more than a
        # cluster's CTAs still gets one, which the handler may then run in cluster mode.)
        mode = "grid" if exchange == "grid" or not in_cluster else "cluster"
        plan = Plan(hidden, k, ctas * wpc, wpc, rs, LOAD_BYTES, True,
                    f"fits (tile layout: {ctas} CTAs of {wpc} warps, planned for {mode} mode)",
                    one_copy, gates=gates, tiles=True)
        if exchange != "cluster" or in_cluster:
            candidates.append((cost.planning_step_us(plan, mode, dtype, batch), plan, mode))
    # In grid mode every CTA stages the whole state each step: CTAs too thin for it (more than
    # STAGE_WORDS_PER_THREAD words a thread and batch entry) ran 53 µs steps at H = 1024, B = 32
    # (benchmarks/RESULTS.md, "Dense tiles"), so they are kept only where nothing else fits (a
    # cluster's peers push the state instead).
    wide_enough = -(-cols // (WARP * STAGE_WORDS_PER_THREAD))
    staged = [c for c in candidates if c[2] == "cluster" or c[1].warps_per_cta >= wide_enough]
    candidates = staged or candidates
    # A tile layout's weights fill shared memory, which leaves little for the staged state: keep
    # the plans that run the batch (MIN_BATCH when none is given) where any does.
    roomy = [c for c in candidates if runs_batch(c[1], MIN_BATCH if batch is None else batch, dtype, device)]
    candidates = [c[:2] for c in roomy or candidates]
    if candidates:
        best_us = min(us for us, _ in candidates)
        near = [(us, plan) for us, plan in candidates if us <= best_us * (1 + PORTABLE_TOLERANCE)]
        # Among near-equal estimates: a portable cluster, then fewer CTAs (fewer to exchange with).
        return planned_for(
            min(near, key=lambda c: (c[1].num_ctas > cost.PORTABLE_CLUSTER_CTAS, c[1].num_ctas, c[0]))[1],
            batch)
    wpc = max(1, min(warps, device.max_threads_per_block // WARP))
    reason = (f"no tile layout of H={hidden} ({gates} gate row(s) a unit, {np.dtype(dtype).name}) fits "
              f"on {device.name} ({device.sm_count} SMs, {device.smem_per_block} bytes of shared "
              f"memory per CTA)" + ("" if exchange == "auto" else f" in {exchange} mode"))
    return Plan(hidden, k, -(-warps // wpc) * wpc, wpc, 0, LOAD_BYTES, False, reason,
                cta_smem_bytes(cols, LOAD_BYTES, k, 0, wpc * WARP, dtype, gates, tiles=True),
                gates=gates, tiles=True)


def tile_lanes(meta: LayoutMeta) -> np.ndarray:
    """``[G*H]``: the global lane of each row of a tile layout (unit ``i``'s gate ``g`` is row
    ``g*H + i``, on lane ``(i % U) * G + g`` of warp ``i // U``, ``U = 32 // G``)."""
    gates, hidden = meta.gates, meta.hidden
    units_per_warp = WARP // gates
    unit = np.arange(hidden)
    first = (unit // units_per_warp) * WARP + (unit % units_per_warp) * gates
    return (first[None, :] + np.arange(gates)[:, None]).reshape(-1)


def pack_tiles(rows: np.ndarray, cols: np.ndarray, plan: LayoutMeta) -> PackedPattern:
    """Place nonzeros ``(rows[n], cols[n])`` (each at most once) of a ``G*H x H`` pattern in the tile
    layout of ``plan``: the same result type as :func:`jax_sprnn.layout.pack_pattern`."""
    meta = LayoutMeta.from_plan(plan)
    if not meta.tiles or meta.transposed or meta.slots_per_lane != meta.num_cols:
        raise ValueError("pack_tiles: the plan is not a forward tile layout (plan_tile_layout)")
    k = meta.slots_per_lane
    lane_of_row = tile_lanes(meta)
    if lane_of_row.size and lane_of_row.max() >= meta.num_lanes:
        raise AssertionError("pack_tiles: the plan has fewer warps than its rows need")
    lane_row = np.full(meta.num_lanes, -1, np.int32)
    lane_row[lane_of_row] = np.arange(meta.num_rows, dtype=np.int32)
    # Every slot is padding (~k) until a nonzero takes it; slot (w, k, l) is flat (w*K + k)*32 + l.
    indices = np.broadcast_to(~np.arange(k, dtype=np.int32)[None, :, None],
                              (meta.num_warps, k, WARP)).reshape(-1).copy()
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)  # each entry once
    lane = lane_of_row[rows]
    slot_of_nonzero = ((lane // WARP) * k + cols) * WARP + lane % WARP
    indices[slot_of_nonzero] = cols
    return PackedPattern(meta, indices, lane_row, slot_of_nonzero.astype(np.int32))


def check_tile_layout(indices: np.ndarray, lane_row: np.ndarray, meta: LayoutMeta) -> None:
    """Raise ValueError unless ``indices`` / ``lane_row`` form the tile layout of ``meta``."""
    if meta.slots_per_lane != meta.num_cols or meta.num_cols % STRIP:
        raise ValueError(f"a tile layout has K = {meta.num_cols} slots a lane (the columns, a multiple "
                         f"of {STRIP}), got K = {meta.slots_per_lane}")
    lane_row = np.asarray(lane_row)
    if not np.array_equal(np.flatnonzero(lane_row >= 0), np.sort(tile_lanes(meta))) or not np.array_equal(
            lane_row[tile_lanes(meta)], np.arange(meta.num_rows)):
        raise ValueError("SparseWeights.lane_row is not a tile layout's (tile_layout.tile_lanes)")
    cols = np.asarray(indices).reshape(meta.num_warps, meta.slots_per_lane, WARP)
    cols = np.where(cols < 0, ~cols, cols)
    if not np.all(cols == np.arange(meta.slots_per_lane)[None, :, None]):
        raise ValueError("SparseWeights.indices of a tile layout must hold column k (or ~k) in slot k")
