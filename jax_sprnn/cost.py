"""Per-step time estimates that let ``method="auto"`` pick the faster GPU path: for the forward pass
and for the weight gradient.

The persistent kernel wins by 2-7x at small batches, but every 4-example batch plane adds a pass
over the slots and over staged h, while a dense cuBLAS step costs about the same from B=1 to B=16.
So at B=16 and H <= 2304 in 16-bit storage the dense path can win (benchmarks/RESULTS.md, sweep).

The dense model is fitted to the H200 sweep of 2026-11-30 (``benchmarks/results/sweep_2026-11-30.json``,
jax 0.11.2, fp16, H 1152-8192, B 1-16, density 1-30%), the kernel's (both exchange modes) to its own
device time on an H100 (``benchmarks/cost_fit.py``, 2026-12-06); ``tests/test_cost.py`` checks the
formulas (values worked by hand, monotonicity, the margin), ``tests/test_benchmarks.py`` the fit.

* Kernel (grid mode): ``a + planes * (b + c * warps_per_cta * K_eff)`` µs, where ``K_eff`` weights
  the shared-memory tier's slots by :data:`SMEM_SLOT_COST`: one step walks every plane, and a
  CTA's warps share its SM. A batch of one or two runs a narrower tile, :data:`GRID_ENTRY_US` less
  a dropped entry. Refitted to the kernel's device time on 2026-12-06 (:data:`KERNEL_FIXED_US`).
* Cluster mode (layouts of at most 16 CTAs): its own form, fitted to the kernel's device time
  (:func:`cluster_step_us`).
* Dense (16-bit): ``max(DENSE_MIN_US, 2 * H**2 / DENSE_BYTES_PER_US)`` µs: a fixed cost per step
  (launches, a small GEMM's latency) until the weights' bytes take longer to read.

The weight gradient (``training_2026-11-30.json``, same GPU and versions): the pattern kernel costs
about :data:`WGRAD_SLOT_US` per slot and example, XLA's dense einsum over time and batch then a
gather about ``WGRAD_DENSE_FIXED_US + WGRAD_DENSE_US * H**2 * B``. The einsum wins from a few percent
density (2.1x at H=2304, 10%; 4x at H=4608), the kernel below that, and where the dense
``[groups, H, H]`` float32 product would not be small (:data:`WGRAD_DENSE_MAX_BYTES`).

Only 16-bit storage is ever sent to the dense forward path. float32 must stay at full float32
precision: against the full-precision dense peer (the CUDA-graph cuBLAS loop, 9-194 µs) the kernel
won every fp32 point of the sweep (``sweep_2026-11-30.json``). JAX's default-precision ``lax.scan``
rounds to TF32 (relative error 2e-4 against the kernel's 1e-7) and is faster at B=16 (by 1.06-1.53x),
but that is not the same computation, and the full-precision dense step was not measured.

Other GPUs use the same constants; they are estimates, so ``auto`` switches only when the kernel is
expected to be :data:`SWITCH_MARGIN` times slower.
"""

from __future__ import annotations

import numpy as np

from typing import TYPE_CHECKING

from . import _constants

if TYPE_CHECKING:  # annotations only: the planner imports this module
    from .planner import LayoutMeta

#: Relative cost of a slot read from the shared-memory tier against one held in a register (one more
#: shared load per slot); an estimate, see benchmarks/RESULTS.md.
SMEM_SLOT_COST = 1.5

# The grid-mode kernel (:func:`persistent_step_us`), refitted on 2026-12-06 by
# ``benchmarks/cost_fit.py`` to the kernel's own device time (Nsight Compute) of 18 grid layouts
# and batches on an H100 (the simple cell, the GRU and the LSTM, fp16, 10%, H 1024-2304, B 1-32:
# benchmarks/results/kernel_time_*_h100_2026-12-0[56].json): measured / estimate 0.93-1.11. The
# two-plane pass that an earlier fit read from the H200's wall clock (a pair of planes at 1.2 one-
# plane passes) is not in the kernel's own time: 1152 x 116 CTAs took 2.05 / 3.51 / 11.2 µs at
# B = 1 / 8 / 32, the GRU at 1024 2.39 / 3.94 / 13.0, linear in planes.
KERNEL_FIXED_US = 1.31
KERNEL_PLANE_US = 1.08
KERNEL_SLOT_US = 0.0027  # per plane, per warp of a CTA and per (register-equivalent) slot
#: What each entry that a batch of one or two drops from the layout's tile saves a grid-mode step
#: (its gather, reduction, cell and share of the exchange; 2304 x 128 CTAs: 2.27 µs at B = 1
#: against 2.87 at B = 4).
GRID_ENTRY_US = 0.14
DENSE_MIN_US = 8.5
DENSE_BYTES_PER_US = 3.3e6  # ~3.3 TB/s: the H200's HBM rate as a dense GEMV step sees it
SWITCH_MARGIN = 1.25
WGRAD_SLOT_US = 1.2e-6  # per slot of the layout and per example, per step
WGRAD_DENSE_FIXED_US = 0.3
WGRAD_DENSE_US = 4e-8  # per H**2 and per example, per step
WGRAD_DENSE_MAX_BYTES = 1 << 30


def batch_planes(meta: LayoutMeta, batch: int) -> int:
    """The batch planes (tiles of ``load_bytes / 4`` examples) one kernel step walks."""
    return -(-batch // max(1, meta.load_bytes // 4))


#: A tile layout's step (docs/format.md, "Tile layouts") on tensor cores: what one 16-column strip
#: of a warp's 32 rows costs a batch plane, in register-tier slots of the slot kernel's fit (per
#: thread and strip, two mma, four staged-state loads and two conversions serve two planes of 4).
#: An estimate from the instruction counts, not fitted: it only ranks tile layouts against each
#: other. The first measurement (benchmarks/RESULTS.md, "Dense tiles on tensor cores") found the
#: tile step slower than the slot kernel's, set by its cell epilogue, and ``auto`` packs no tile
#: layout.
TILE_STRIP_SLOTS = 1.0
#: The tensor-core step's matrix strip: 16 columns.
TILE_STRIP_COLUMNS = 16


def _slot_equivalents(meta: LayoutMeta) -> float:
    """A lane's per-plane work in register-tier slots (the shared-memory tier's weighted by
    :data:`SMEM_SLOT_COST`); a tile layout's counted in strips (:data:`TILE_STRIP_SLOTS`)."""
    if meta.tiles:
        strips, reg = meta.slots_per_lane / TILE_STRIP_COLUMNS, meta.reg_slots / TILE_STRIP_COLUMNS
        return TILE_STRIP_SLOTS * (reg + SMEM_SLOT_COST * (strips - reg))
    return meta.reg_slots + SMEM_SLOT_COST * (meta.slots_per_lane - meta.reg_slots)


def dropped_entries(meta: LayoutMeta, batch: int) -> int:
    """The batch entries of the layout's tile that a batch of one or two drops in grid mode: it runs
    a narrower tile (``_constants.batch_tile``); a tile layout keeps its tile of 4."""
    layout_tile = max(1, meta.load_bytes // 4)
    return 0 if meta.tiles else layout_tile - _constants.batch_tile(layout_tile, batch)


def persistent_step_us(meta: LayoutMeta, batch: int) -> float:
    """Estimated µs per step of the persistent forward kernel for this layout and batch, in grid
    mode: ``a + planes * (b + c * warps_per_cta * K_eff) - g * dropped entries``."""
    per_plane = KERNEL_PLANE_US + KERNEL_SLOT_US * meta.warps_per_cta * _slot_equivalents(meta)
    return (KERNEL_FIXED_US + batch_planes(meta, batch) * per_plane
            - GRID_ENTRY_US * dropped_entries(meta, batch))


# Cluster mode (docs/design.md): the layout's CTAs form one thread-block cluster, a step pushes the
# state into every peer's shared memory and waits on its own mbarrier; replicas of the cluster run
# slices of the batch side by side, each at the narrowest batch tile that gives every replica one
# plane (:func:`cluster_launch`, the handler's rule). Per step, ``a + planes * (b + c * warps_per_cta
# * K_eff + l * K_eff + n * N + e * [wide variant] + (tile - 1) * (t + u * K_eff))`` µs: the slots
# a CTA's warps issue on its SM's schedulers, a lane's own serial chain of K_eff slots (which few
# warps cannot hide: 13 CTAs of 2 warps and K = 96 took 2.43 µs at H = 768), the cluster's exchange
# (each of the N CTAs pushes to every peer and waits on all of them: 256 x 1 took 1.43 µs on 6
# CTAs, 1.50 on 8, 1.79 on 15), the wide variant's tighter register cap, and each batch entry of a
# tile past the first (its gather's K_eff multiply-adds, its reduction, cell and push). The state's
# width adds nothing measurable beyond these. Fitted by ``benchmarks/cost_fit.py`` (least squares on
# relative errors, non-negative) to the kernel's own device time (Nsight Compute, free of the host's
# jitter) of 165 layouts and batches on an H100 (the simple cell, fp16 and fp32, 10%, H 256-2304,
# B 1-64, clusters of 1-16 CTAs; thirteen of the GRU and the LSTM, whose cluster layouts the planner
# weighs with the same estimate; 2026-12-05 and 06, the last thirty-one with the cell lanes' entry
# kept in registers and the shorter cell chain, 2-12% faster: benchmarks/results/kernel_time_*_h100_*.json;
# the H100 and the H200 share the SM and its clock, and these steps stay on chip): measured /
# estimate 0.92-1.13 (10-90%), 0.79-1.38 at most; a 16-CTA cluster at B >= 16 reads up to 1.4x
# its estimate (2304 x 16 CTAs at B = 16: 6.31 µs against 5.3). The H200's wall-clock cluster runs
# of 2026-12-04 read higher (the host's jitter, and an older kernel): see benchmarks/RESULTS.md.
# Since these points the kernel compiles its phase loop once per exchange mode in the small one-plane
# tiers (PersistentConfig::kSplitModes, 2026-12-06 and 07): those layouts run 6-9% under this
# estimate (same-machine A/Bs, RESULTS.md "Twenty-ninth session" and "Thirty-first session"), which
# CLUSTER_SPLIT_FACTOR is to carry until a refit on their kernel times.
CLUSTER_FIXED_US = 1.18
# A plane's own cost is all in its slot, lane and CTA terms: the non-negative fit leaves nothing
# for a flat per-plane term (0.27 before the 2026-12-06 points, 0.0033 before the shorter chain's;
# the band did not move).
CLUSTER_PLANE_US = 0.0
CLUSTER_SLOT_US = 0.00108  # per plane, per warp of a CTA and per (register-equivalent) slot
CLUSTER_LANE_US = 0.0052  # per plane and per slot of a lane
CLUSTER_CTA_US = 0.0351  # per plane and per CTA of the cluster
CLUSTER_WIDE_VARIANT_US = 0.144
CLUSTER_ENTRY_US = 0.26  # per plane and per batch entry of its tile past the first
CLUSTER_ENTRY_SLOT_US = 0.0028  # ... and per slot of K_eff
PORTABLE_CLUSTER_CTAS = _constants.PORTABLE_CLUSTER_CTAS
#: The cluster-mode step of a variant whose phase loop is compiled per exchange mode
#: (:func:`split_variant`) in 16-bit storage, against the fit above, which predates the split: the
#: split alone took 6% off the step at H = 256, 9% off the LSTM's at 256 x 8 (H200) and 9% at
#: 1024 x 8 (H100). It decides the 1024 layer's default at 10%: the fitted model rated the split
#: tier of 32 slots on 8 CTAs of 16 warps and the unsplit tier of 64 on 8 of 8 within 0.04%, while
#: the kernel ran the first 6% faster at B = 1-8 before the split (2.20 against 2.35 µs, 16% slower
#: at B = 32) and 1.82 µs at B = 8 since (H100 kernel time; benchmarks/RESULTS.md, thirty-second
#: session). Not applied in float32 storage, where no split was measured (at 0.92 there it would
#: change 22 more of the planner's picks, unverified); tools/kt_cases/split_factor.txt times old
#: picks against new: every fp16 pair timed favoured the new pick (H100, 2026-12-07: -15% at
#: 1024 x 1 and 8, -3% at 1024 x 32 and 1152 x 8; RESULTS.md, thirty-third session).
CLUSTER_SPLIT_FACTOR = 0.92

#: The batches a layout's step is estimated at when it is planned (before its batch is known), with
#: their weights: single examples and the 16-64 where most training runs count alike
#: (:func:`planning_step_us` takes their geometric mean).
PLANNING_BATCHES = ((1, 1.0), (4, 1.0), (8, 1.0), (16, 1.0), (32, 1.0))


def _tiers(dtype, gates: int) -> dict:
    wide = np.dtype(dtype).itemsize == 4
    if gates > 1:
        return _constants.PERSISTENT_TIERS_GATED_32 if wide else _constants.PERSISTENT_TIERS_GATED_16
    return _constants.PERSISTENT_TIERS_32 if wide else _constants.PERSISTENT_TIERS_16


def wide_variant(meta: LayoutMeta, dtype) -> bool:
    """Whether the layout's CTAs run its register tier's wide variant (more threads than the narrow
    launch bound): a tighter register cap, fewer staging loads in flight, and in the 16-bit tiers
    of 16 and 32 slots 18-22 bytes of spills (nvcc 13.0, sm_90)."""
    tier = _tiers(dtype, meta.gates).get(meta.reg_slots)
    return tier is not None and meta.threads_per_cta > tier.narrow_threads


#: A thread-block cluster's CTAs share one GPC (graphics processing cluster), so a GPU holds fewer
#: clusters at once than ``sm_count // N``. The H200's counts for N = 1..16, one CTA per SM, from
#: ``cuOccupancyMaxActiveClusters`` (benchmarks/probes/active_clusters.py, 2026-12-04; the same for
#: 128-768 threads): the handler asks the driver the same question at run time.
H200_RESIDENT_CLUSTERS = (132, 66, 39, 30, 22, 17, 15, 15, 9, 7, 7, 7, 7, 7, 7, 7)
#: Other GPUs: GPCs of about this many SMs (Hopper's hold up to 18), each holding its own clusters.
GPC_SMS = 18


def resident_clusters(num_ctas: int, sm_count: int = 132, ctas_per_sm: int = 1) -> int:
    """Estimated clusters of ``num_ctas`` CTAs the device holds at once, ``ctas_per_sm`` CTAs an SM
    (a GPC holds about that many times the clusters it holds at one CTA an SM)."""
    n = max(1, num_ctas)
    if sm_count == 132 and n <= len(H200_RESIDENT_CLUSTERS):
        return ctas_per_sm * H200_RESIDENT_CLUSTERS[n - 1]
    full, rest = divmod(sm_count, GPC_SMS)
    return ctas_per_sm * max(1, full * (GPC_SMS // n) + rest // n)


#: One Hopper SM (the H100's and the H200's alike): its shared memory, registers and threads, which
#: the CTAs of a small layout at a narrow tile share.
SM_SMEM_BYTES = 233472
SM_REGS = 65536
SM_THREADS = 2048


def ctas_per_sm(meta: LayoutMeta, tile: int, dtype) -> int:
    """Estimated CTAs of the layout one SM holds at once in cluster mode at this batch tile (two
    staged copies of one tile, the occupancy the handler asks the driver about): the fewest that its
    registers (a thread's are capped by its variant's launch bound), threads and shared memory
    allow. A layout of 128 threads and a few KB runs two CTAs an SM or more; 512 threads, one."""
    from .planner import weight_smem_bytes  # (the planner imports this module)

    threads = meta.threads_per_cta
    tier = _tiers(dtype, meta.gates).get(meta.reg_slots)
    if tier is None:
        return 1
    bound = tier.wide_threads if tier.wide_threads and threads > tier.narrow_threads else tier.narrow_threads
    regs = min(255, SM_REGS // bound) // 8 * 8
    weights = weight_smem_bytes(meta.slots_per_lane, meta.reg_slots, threads, dtype, meta.tiles)
    cell = _constants.cell_state_smem_bytes(tile, tile, meta.warps_per_cta, meta.gates, meta.transposed)
    smem = (_constants.persistent_smem_bytes(meta.num_cols, tile, tile, weights, 2, cell)
            + _constants.KERNEL_SMEM_RESERVE)
    return max(1, min(SM_REGS // (regs * threads), SM_THREADS // threads, SM_SMEM_BYTES // smem))


def cluster_launch(meta: LayoutMeta, batch: int, dtype, sm_count: int = 132) -> tuple[int, int, int]:
    """``(tile, replicas, planes)``: the batch tile, the replicas of the cluster and the planes each
    walks a step, for a cluster-mode call of ``batch`` examples (the handler's rule in
    cuda/cuda_persistent.cu, with :func:`resident_clusters` and :func:`ctas_per_sm` for the
    driver's answer). The narrowest tile (1, then 2) at which every replica runs one plane while the
    device holds that many replicas at once; else the layout's tile, on as many replicas as fit (a
    tile layout keeps 4)."""
    def held(tile):
        return resident_clusters(meta.num_ctas, sm_count, ctas_per_sm(meta, tile, dtype))

    tile = _constants.batch_tile(max(1, meta.load_bytes // 4), batch)
    for narrow in (1, 2):
        if narrow < tile and not meta.tiles and -(-batch // narrow) <= held(narrow):
            tile = narrow
            break
    tiles = -(-batch // tile)
    replicas = max(1, min(tiles, held(tile)))
    return tile, replicas, -(-tiles // replicas)


def cluster_replicas(meta: LayoutMeta, batch: int, dtype, sm_count: int = 132) -> int:
    """Replicas of the cluster a batch runs on (:func:`cluster_launch`)."""
    return cluster_launch(meta, batch, dtype, sm_count)[1]


def cluster_plane_us(meta: LayoutMeta, tile: int, dtype) -> float:
    """Estimated µs of one batch plane of ``tile`` examples in a cluster-mode step."""
    k_eff = _slot_equivalents(meta)
    plane = (CLUSTER_PLANE_US + (CLUSTER_SLOT_US * meta.warps_per_cta + CLUSTER_LANE_US) * k_eff
             + CLUSTER_CTA_US * meta.num_ctas
             + (tile - 1) * (CLUSTER_ENTRY_US + CLUSTER_ENTRY_SLOT_US * k_eff))
    if wide_variant(meta, dtype):
        plane += CLUSTER_WIDE_VARIANT_US
    return plane


def split_variant(meta: LayoutMeta, tile: int, planes: int, dtype) -> bool:
    """Whether the kernel the handler launches for this layout at this batch tile, ``planes``
    planes a CTA, holds a copy of its phase loop per exchange mode (``_constants.split_modes``; the
    handler takes the two-plane variant for two planes or more at a tile of 4)."""
    from .planner import runs_tiles  # (the planner imports this module)

    tier = _tiers(dtype, meta.gates).get(meta.reg_slots)
    if tier is None:
        return False
    words = meta.reg_slots * (2 if np.dtype(dtype).itemsize == 4 else 1)
    planes_per_pass = 2 if planes >= 2 and tile == 4 else 1
    return _constants.split_modes(words, tile, meta.transposed, tier.narrow_threads, planes_per_pass,
                                  wide_variant(meta, dtype), bool(runs_tiles(meta, dtype)))


def cluster_step_at(meta: LayoutMeta, tile: int, planes: int, dtype, split: bool | None = None) -> float:
    """Estimated µs per step in cluster mode where each replica walks ``planes`` planes of ``tile``;
    ``split``: whether the kernel compiles its phase loop per exchange mode (default: whether this
    one does, :func:`split_variant`; False for the kernels the constants were fitted to), which in
    16-bit storage takes :data:`CLUSTER_SPLIT_FACTOR` off the step."""
    step = CLUSTER_FIXED_US + planes * cluster_plane_us(meta, tile, dtype)
    return step * split_factor(meta, tile, planes, dtype, split)


def split_factor(meta: LayoutMeta, tile: int, planes: int, dtype, split: bool | None = None) -> float:
    """The factor :func:`cluster_step_at` applies to its fitted step: :data:`CLUSTER_SPLIT_FACTOR`
    for a kernel whose phase loop is compiled per exchange mode (``split``, default
    :func:`split_variant`) in 16-bit storage, else 1."""
    if split is None:
        split = split_variant(meta, tile, planes, dtype)
    measured = np.dtype(dtype).itemsize == 2  # (CLUSTER_SPLIT_FACTOR: 16-bit storage only)
    return CLUSTER_SPLIT_FACTOR if split and measured else 1.0


def cluster_step_us(meta: LayoutMeta, batch: int, dtype, sm_count: int = 132,
                    split: bool | None = None) -> float:
    """Estimated µs per step of the persistent kernel in cluster mode for this layout, batch and
    storage dtype (``split``: as :func:`cluster_step_at`)."""
    tile, _, planes = cluster_launch(meta, batch, dtype, sm_count)
    return cluster_step_at(meta, tile, planes, dtype, split)


def planning_step_us(meta: LayoutMeta, exchange: str, dtype, batch: int | None = None,
                     split: bool | None = None) -> float:
    """The estimated step in the given exchange mode at ``batch``, or with no batch given, the
    weighted geometric mean over :data:`PLANNING_BATCHES`: how the planner compares layouts whose
    batch is not known. Geometric, so that a layout 1.5x slower at B = 1 weighs as much as one 1.5x
    slower at B = 32 (an arithmetic mean is all large batches: their steps are 4-6x longer).
    ``split=False`` estimates a cluster layout as the kernel before the split phase loop, which is
    how the grid model still sees every layout (the split's grid-mode gain is unmeasured)."""
    def step(b):
        if exchange == "cluster":
            return cluster_step_us(meta, b, dtype, split=split)
        return persistent_step_us(meta, b)
    if batch is not None:
        return step(batch)
    log_mean = (sum(w * np.log(step(b)) for b, w in PLANNING_BATCHES)
                / sum(w for _, w in PLANNING_BATCHES))
    return float(np.exp(log_mean))


def kernel_step_us(meta: LayoutMeta, batch: int, dtype) -> float:
    """The persistent kernel's estimated step in the exchange mode its layout runs in."""
    if meta.exchange == "cluster":
        return cluster_step_us(meta, batch, dtype)
    return persistent_step_us(meta, batch)


def dense_step_us(hidden: int, dtype) -> float:
    """Estimated µs per step of XLA's dense recurrence in 16-bit storage."""
    return max(DENSE_MIN_US, np.dtype(dtype).itemsize * hidden * hidden / DENSE_BYTES_PER_US)


def auto_prefers_dense(meta: LayoutMeta, batch: int, dtype) -> tuple[bool, str]:
    """Whether ``method="auto"`` should run the dense XLA path although the kernel fits, and why."""
    if np.dtype(dtype).itemsize != 2:
        return False, "float32 storage: the persistent kernel"
    kernel, dense = kernel_step_us(meta, batch, dtype), dense_step_us(meta.hidden, dtype)
    why = (f"estimated {kernel:.1f} µs per step for the persistent kernel ({batch_planes(meta, batch)} "
           f"batch planes) against {dense:.1f} µs for XLA's dense step")
    return kernel > SWITCH_MARGIN * dense, why


# The gated cells' forward kernels (LSTM, GRU): the simple cell's step estimate (a unit's cell runs
# on one lane per batch entry of the plane, in parallel, so the gates add no measurable time per
# plane), against XLA's dense step of a gated cell, which moves G times the weights and runs its
# gates' elementwise ops: at least DENSE_GATED_MIN_US. Fitted to the gated suite's run of
# 2026-12-02 (benchmarks/results/gated_lanes_2026-12-02.json, H200, fp16, 10%, H = 1024): the kernel
# 2.3-4.6 µs at B = 1-8 and 15.0-16.5 at B = 32 (the estimate: 3.9-6.1 and 19.8), XLA's dense LSTM
# and GRU steps 26.6-31.5 µs at B = 32 (15-26 at H = 2048, B = 32, in the earlier runs).
DENSE_GATED_MIN_US = 20.0


def gated_prefers_dense(meta: LayoutMeta, batch: int, dtype) -> tuple[bool, str]:
    """Whether ``method="auto"`` should run a gated cell's dense XLA path although its kernel fits
    (very wide batches, whose planes the kernel walks one after the other), and why."""
    if np.dtype(dtype).itemsize != 2:
        return False, "float32 storage: the persistent kernel"
    kernel = kernel_step_us(meta, batch, dtype)
    dense = max(DENSE_GATED_MIN_US,
                np.dtype(dtype).itemsize * meta.gates * meta.hidden ** 2 / DENSE_BYTES_PER_US)
    why = (f"estimated {kernel:.1f} µs per step for the persistent kernel ({batch_planes(meta, batch)} "
           f"batch planes) against {dense:.1f} µs for XLA's dense step")
    return kernel > SWITCH_MARGIN * dense, why


def weight_grad_prefers_dense(meta: LayoutMeta, batch: int, groups: int) -> tuple[bool, str]:
    """Whether ``method="auto"`` should compute the weight gradient with XLA's dense einsum and a
    gather (``fallback.weight_grad``) rather than the pattern kernel, and why."""
    dense_bytes = 4 * groups * meta.hidden ** 2
    if dense_bytes > WGRAD_DENSE_MAX_BYTES:
        return False, f"the dense [groups, H, H] product would take {dense_bytes / 2**20:.0f} MiB"
    kernel = WGRAD_SLOT_US * meta.num_slots * batch
    dense = WGRAD_DENSE_FIXED_US + WGRAD_DENSE_US * meta.hidden ** 2 * batch
    why = (f"estimated {kernel:.2f} µs per step for the pattern kernel ({meta.num_slots} slots) "
           f"against {dense:.2f} µs for XLA's dense einsum and gather")
    return kernel > SWITCH_MARGIN * dense, why


# ---- the CPU -----------------------------------------------------------------------------------
#
# The C++ kernel against XLA's dense lax.scan on a 2-core CPU (benchmarks/results/cpu_2026-12-02.json,
# `python -m benchmarks.run --suite cpu`, jax 0.10.2). Each nonzero costs one random load of a state
# tile, about a cycle a core, while dense runs at the CPU's matmul rate, and a call first builds its
# rows (0.4-1.6 ms at H=1024-2048). So the kernel wins once a row has enough nonzeros to amortize
# that, at low density, over more than a few steps: at 10% from H=512 for every batch and dtype
# (1.1-3.8x forward), at H=256 only from B=16 (from B=4 against the dense path as it runs,
# rebuilding K: see CPU_SHORT_ROWS_BATCH); the backward recurrence and the weight gradient from
# H=256 (2-13x). Only 10% was measured across the grid; higher densities were spot-checked (at 30%
# dense wins at B <= 4), hence the conservative density limits below. The limits are on the
# layout's density, padding included (what a lowering can see: the nonzero count is data): that is
# about 1.25x the real density at 10-30% (10% -> 0.125, 30% -> 0.34-0.375).
CPU_MIN_STEPS = 4               # below this the rows' set-up dominates (small layers)
# XLA's dense path is not the dense scan of a kernel the caller keeps: it first rebuilds the
# kernel from the packed layout, in every call (a scatter of every slot, ~20 ns a slot, into a
# zeroed rows x cols array), where the C++ kernel builds its rows at ~4 ns a slot. From 512 x 512
# cells that outweighs the dense steps' gain until long sequences (2-core CPU, 2026-12-03, fp32:
# T=1-3 at H=512-2048 and 10%, the dense path 1.8-9x slower; H=1024 at 45%, 4x slower at T=8,
# 1.35x at T=32, 1.2x faster at T=100; at H <= 256 the two are within the noise).
CPU_BUILD_CELLS = 512 * 512
CPU_BUILD_STEPS = 64
# Rows with few slots (H = 256 at 10%) from this batch on: against the dense path with its
# rebuild, the kernel was 8-58% faster at B = 4 and 4-13% slower at B = 1 (cpu_2026-12-03.json).
CPU_SHORT_ROWS_BATCH = 4
CPU_MIN_NNZ_PER_ROW = 48        # forward: enough slots per row to amortize the gather
CPU_FORWARD_MAX_DENSITY = 0.2   # forward at small batches: ~15% real; measured at 10%, not 30%
CPU_BATCH_WIDE = 16             # forward: a batch this wide amortizes the gather up to ...
CPU_MAX_DENSITY = 0.38          # ... ~30% real, as do the backward and weight gradient


def layout_density(meta: LayoutMeta) -> float:
    """The layout's slots over its ``rows * columns`` (``H**2``, ``G*H**2`` for a gated kernel):
    its density, padding included (so an over-estimate)."""
    return meta.num_slots / float(meta.num_rows * meta.num_cols)


def cpu_prefers_dense(meta: LayoutMeta, batch: int, steps: int, *, forward: bool
                      ) -> tuple[bool, str]:
    """Whether ``method="auto"`` should run XLA's dense path rather than the C++ kernel on the CPU
    (``forward``: the forward recurrence; else the backward recurrence or the weight gradient)."""
    density = layout_density(meta)
    cells = meta.num_rows * meta.num_cols
    if cells >= CPU_BUILD_CELLS and steps < CPU_BUILD_STEPS:
        return False, (f"the dense path would rebuild the {meta.num_cols}x{meta.num_rows} kernel "
                       f"from the packed layout for only {steps} steps: the C++ kernel")
    if steps < CPU_MIN_STEPS:
        return True, f"{steps} steps are too few to amortize building the sparse rows"
    if density > CPU_MAX_DENSITY:
        return True, f"a layout of density {density:.2f} is denser than the C++ kernel's gain"
    if not forward or batch >= CPU_BATCH_WIDE:
        return False, f"density {density:.2f}: the C++ kernel"
    per_row = density * meta.hidden
    if per_row >= CPU_MIN_NNZ_PER_ROW and density <= CPU_FORWARD_MAX_DENSITY:
        return False, f"{per_row:.0f} nonzeros per row at density {density:.2f}: the C++ kernel"
    if batch >= CPU_SHORT_ROWS_BATCH and density <= CPU_FORWARD_MAX_DENSITY:
        return False, (f"{per_row:.0f} nonzeros per row, but a batch of {batch} against a dense path "
                       f"that rebuilds its kernel: the C++ kernel")
    return True, (f"{per_row:.0f} nonzeros per row at density {density:.2f} and batch {batch}: "
                  f"XLA's dense step is faster")
