"""The planner: a pure function of the layer and a (made-up) device."""

import dataclasses

import numpy as np
import pytest

from jax_sprnn import _constants, cost, planner
from jax_sprnn.dispatch import weight_grad_time_chunks
from jax_sprnn.layout import LayoutMeta
from jax_sprnn.planner import H200, DeviceSpec, plan_layout

#: The H200 without thread-block clusters: every layout is a grid-mode one (as before sm_90).
GRID_ONLY = dataclasses.replace(H200, cluster_launch=False)


def _check_budget(plan, device, dtype):
    words = planner.bytes_per_slot(dtype) // 4
    assert plan.num_ctas <= device.sm_count
    assert plan.threads_per_cta <= device.max_threads_per_block
    limits = dict(device.thread_limits(dtype))
    assert plan.reg_slots in limits and plan.reg_slots <= plan.slots_per_lane
    assert plan.threads_per_cta <= limits[plan.reg_slots]
    weights_smem = (plan.slots_per_lane - plan.reg_slots) * plan.threads_per_cta * words * 4
    assert plan.hidden * plan.load_bytes + weights_smem <= plan.smem_bytes <= device.smem_per_block


@pytest.mark.parametrize("hidden,density", [(1152, 0.1), (2304, 0.1), (2304, 0.3), (4608, 0.1), (100, 1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_plans_fit_within_budget(hidden, density, dtype):
    nnz = np.full(hidden, int(round(density * hidden)))
    plan = plan_layout(nnz, dtype, H200)
    assert plan.fits, plan.reason
    assert plan.slots_per_lane in planner.SLOT_SIZES
    assert plan.slots_per_lane * 32 >= nnz.max()
    _check_budget(plan, H200, dtype)


@pytest.mark.parametrize("hidden,density", [(1152, 0.01), (1152, 0.05), (2304, 0.01), (1000, 0.003)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sparse_layers_get_ctas_wide_enough_to_stage_h(hidden, density, dtype):
    # Few warps hold a very sparse layer; spread over every SM they would leave one or two warps per
    # CTA to stage all of h each step. The planner regroups them into fewer, wider CTAs instead.
    nnz = np.full(hidden, max(1, int(round(density * hidden))))
    plan = plan_layout(nnz, dtype, GRID_ONLY)
    assert plan.fits, plan.reason
    _check_budget(plan, GRID_ONLY, dtype)
    warps = planner._warps_needed(planner.lanes_per_row(nnz, plan.slots_per_lane))
    want = -(-hidden // (32 * planner.STAGE_WORDS_PER_THREAD))
    assert plan.warps_per_cta >= min(want, warps)
    assert plan.num_warps - warps < plan.warps_per_cta  # padding: less than one CTA of empty warps
    # the widening never applies to a layer whose CTAs are already wide enough
    nnz = np.full(2304, 230)
    wide = plan_layout(nnz, dtype, GRID_ONLY)
    warps = planner._warps_needed(planner.lanes_per_row(nnz, wide.slots_per_lane))
    assert wide.warps_per_cta == -(-warps // min(GRID_ONLY.sm_count, warps))


def test_every_row_fits_its_warp():
    rng = np.random.default_rng(0)
    nnz = rng.integers(0, 300, size=777)
    plan = plan_layout(nnz, np.float16)
    lanes = planner.lanes_per_row(nnz, plan.slots_per_lane)
    assert lanes.max() <= 32
    warp, first, used = planner.pack_rows_into_warps(lanes)
    assert used <= plan.num_warps
    # no two rows overlap, and rows stay inside their warp
    assert np.all(first + lanes <= 32)
    occupied = np.zeros((used, 32), int)
    for w, f, n in zip(warp, first, lanes):
        occupied[w, f:f + n] += 1
    assert occupied.max() == 1


def test_tiny_device_does_not_fit_and_says_why():
    tiny = DeviceSpec(name="tiny", sm_count=4, smem_per_block=16384, max_threads_per_block=256)
    plan = plan_layout(np.full(4096, 400), np.float16, tiny)
    assert not plan.fits
    assert "tiny" in plan.reason and "4096" in plan.reason
    # the fallback layout is still a valid layout for the CPU kernel
    assert plan.slots_per_lane * 32 >= 400


# Layers that must fit a made-up device, each for a reason checked by hand:
# - 1000 rows of 100 nonzeros, 1000 SMs: K=4 gives each row 25 lanes, one row per warp, one warp per
#   CTA; shared memory 1000 * 16 (staged h) + 4 * 32 * 8 (the slots, all in shared memory even in
#   float32) + 1024 (reserve) = 18048 bytes <= 24 KiB;
# - 64 rows of 8, 2 SMs of 256 threads: K=1 gives 8 lanes per row, 4 rows per warp, 16 warps, 8 per
#   CTA (256 threads); 64 * 16 + 256 * 8 + 1024 = 4096 bytes <= 16 KiB;
# - 1024 rows of 1 nonzero, 32 SMs, 17600 bytes: in 16-bit storage K=1 (32 rows per warp, 32 warps,
#   one per CTA) needs 1024 * 16 + 32 * 4 + 1024 = 17536 bytes. Its CTAs are thin (the planner would
#   like 4 warps to stage h) but 2 warps already need 17664 bytes, so they must stay thin.
MUST_FIT = [
    (DeviceSpec(name="many SMs", sm_count=1000, smem_per_block=24 * 1024, max_threads_per_block=256),
     np.full(1000, 100)),
    (DeviceSpec(name="two SMs", sm_count=2, smem_per_block=16 * 1024, max_threads_per_block=256),
     np.full(64, 8)),
    (DeviceSpec(name="no room to widen", sm_count=32, smem_per_block=17600), np.full(1024, 1)),
]
# Layers that cannot fit whatever the planner does:
# - h alone, 2000 rows * 16 bytes + the 1024-byte reserve, exceeds 32 KiB of shared memory;
# - every row needs a lane of its own, and 2 SMs * 128 threads are 256 lanes for 300 rows.
MUST_NOT_FIT = [
    (DeviceSpec(name="small smem", sm_count=132, smem_per_block=32 * 1024), np.full(2000, 1)),
    (DeviceSpec(name="few lanes", sm_count=2, max_threads_per_block=128), np.full(300, 1)),
]


def _case_id(value):
    return value.name if isinstance(value, DeviceSpec) else f"H{value.size}"


@pytest.mark.parametrize("device, nnz", MUST_FIT, ids=_case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_made_up_devices_fit_within_budget(device, nnz, dtype):
    plan = plan_layout(nnz, dtype, device)
    assert plan.fits, plan.reason
    _check_budget(plan, device, dtype)


@pytest.mark.parametrize("device, nnz", MUST_NOT_FIT, ids=_case_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_made_up_devices_refuse_what_cannot_fit(device, nnz, dtype):
    plan = plan_layout(nnz, dtype, device)
    assert not plan.fits
    assert device.name in plan.reason and str(nnz.size) in plan.reason


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_shared_memory_bound_is_exact(dtype):
    # 64 rows of 8 nonzeros: with K=8 each row takes one lane, the 64 rows two warps, and every slot
    # sits in the 8-slot register tier. What is left is h (64 * 16 bytes), the lengths of the one
    # plane's 4 examples (16 bytes) and the kernel's reserve: the least shared memory any layout of
    # this layer needs.
    least = 64 * 16 + 4 * 4 + planner.KERNEL_SMEM_RESERVE
    device = DeviceSpec(name="exact", sm_count=2, smem_per_block=least, max_threads_per_block=256)
    plan = plan_layout(np.full(64, 8), dtype, device)
    assert plan.fits, plan.reason
    assert (plan.slots_per_lane, plan.reg_slots, plan.smem_bytes) == (8, 8, least)
    assert not plan_layout(np.full(64, 8), dtype, dataclasses.replace(device, smem_per_block=least - 1)).fits


def test_bad_arguments():
    with pytest.raises(ValueError, match="load_bytes"):
        plan_layout(np.ones(10, int), np.float32, load_bytes=12)
    with pytest.raises(ValueError, match="at least one row"):
        plan_layout(np.zeros(0, int), np.float32)


def test_max_batch_shrinks_with_hidden():
    small = plan_layout(np.full(1152, 115), np.float16)
    big = plan_layout(np.full(4608, 460), np.float16)
    batch = lambda plan: planner.max_persistent_batch(plan, np.float16)
    assert batch(small) > batch(big) >= 4
    assert batch(dataclasses.replace(small, fits=False)) == 0


NO_CLUSTERS = dataclasses.replace(H200, name="an H200 without clusters", cluster_launch=False)


@pytest.mark.parametrize("hidden, nnz", [(1152, 115), (4608, 460), (300, 60)])
def test_max_batch_is_the_most_planes_that_fit_in_shared_memory(hidden, nnz):
    # Grid mode: each batch plane (a tile of load_bytes / 4 examples) stages one more copy of h,
    # H * load_bytes bytes, on top of the single-plane CTA the plan was made with.
    plan = plan_layout(np.full(hidden, nnz), np.float16, NO_CLUSTERS)
    batch = planner.max_persistent_batch(plan, np.float16, NO_CLUSTERS)
    per_plane = plan.load_bytes // 4
    assert batch % per_plane == 0
    planes = batch // per_plane
    smem = lambda planes: plan.smem_bytes + (planes - 1) * hidden * plan.load_bytes
    assert smem(planes) <= H200.smem_per_block < smem(planes + 1)


@pytest.mark.parametrize("hidden, nnz, dtype", [(1152, 115, np.float16), (256, 26, np.float32)])
def test_a_cluster_layout_takes_a_replica_of_the_batch_on_each_resident_cluster(hidden, nnz, dtype):
    """Cluster mode: each cluster the device holds at once runs a slice of whole batch tiles, with
    two staged copies of it; the limit is the widest slice that fits, times those clusters (more
    than one staged copy of the whole batch allows)."""
    plan = plan_layout(np.full(hidden, nnz), dtype)
    assert plan.num_ctas <= planner.MAX_CLUSTER_CTAS
    batch = planner.max_persistent_batch(plan, dtype)
    resident = cost.resident_clusters(plan.num_ctas, H200.sm_count)
    tile = plan.load_bytes // 4
    assert batch % (resident * tile) == 0
    weights = planner.weight_smem_bytes(plan.slots_per_lane, plan.reg_slots, plan.threads_per_cta, dtype)
    budget = H200.smem_per_block - _constants.KERNEL_SMEM_RESERVE
    two_copies = lambda b: _constants.persistent_smem_bytes(hidden, b, tile, weights, 2)
    assert two_copies(batch // resident) <= budget < two_copies(batch // resident + tile)
    assert batch > planner.max_persistent_batch(plan, dtype, NO_CLUSTERS) > 0


def _wg_meta(slots_per_lane, num_warps):
    meta = LayoutMeta.from_plan(plan_layout(np.full(64, 4), np.float16))
    return dataclasses.replace(meta, slots_per_lane=slots_per_lane, num_warps=num_warps,
                               warps_per_cta=1)


# The weight-gradient kernel runs one thread per 8 slots of a lane (K <= 8) or per 16 (K > 8), in
# CTAs of 1024 threads, one grid per group; it splits time into chunks so that 132 SMs get whole
# waves that are at least 90% busy, else as busy as any split of at most 64 chunks allows.
WG_CASES = [
    # (K, warps, groups, steps, chunks): the arithmetic by hand
    (8, 33, 1, 256, 64),         # 1056 threads: 2 CTAs; 2c < 132 up to c = 64, best at 64: 128/132
    (8, 33, 1, 5, 5),            # the same, but no more chunks than steps
    (8, 132 * 32, 1, 256, 1),    # 132 CTAs: one full wave already
    (8, 100 * 32, 1, 256, 5),    # 100 CTAs: c = 2, 3, 4 fill 76%; c = 5 fills 500 / 528 = 95%
    (24, 33, 1, 256, 44),        # two threads per lane: 2112 threads, 3 CTAs; 3 * 44 = 132
    (8, 33, 1000, 256, 1),       # 2000 CTAs over the groups: 2000 / 2112 = 95% at once
    (8, 33, 40000, 256, 1),      # 40000 groups: at most 65535 // 40000 = 1 chunk in the grid
]


@pytest.mark.parametrize("slots_per_lane, warps, groups, steps, chunks", WG_CASES)
def test_weight_grad_time_chunks(slots_per_lane, warps, groups, steps, chunks):
    meta = _wg_meta(slots_per_lane, warps)
    assert weight_grad_time_chunks(meta, groups, steps, 132) == chunks


# ---- cluster mode (issue 16): small layers inside one thread-block cluster ----------------------

@pytest.mark.parametrize("hidden, density", [(256, 0.1), (512, 0.1), (1024, 0.1), (300, 0.05)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_small_layers_are_planned_for_one_cluster(hidden, density, dtype):
    nnz = np.full(hidden, max(1, int(density * hidden)))
    plan = plan_layout(nnz, dtype, H200)
    assert plan.fits, plan.reason
    assert plan.exchange == "cluster" and plan.num_ctas <= planner.MAX_CLUSTER_CTAS, plan
    assert "cluster mode" in plan.reason
    # The kernel keeps two staged copies of the state in cluster mode: both must fit.
    tile = plan.load_bytes // 4
    weights = planner.weight_smem_bytes(plan.slots_per_lane, plan.reg_slots, plan.threads_per_cta, dtype)
    two = (planner._constants.persistent_smem_bytes(hidden, tile, tile, weights, 2)
           + planner.KERNEL_SMEM_RESERVE)
    assert two <= H200.smem_per_block
    # Every row still has its lanes inside one warp, and the warps fill at most N CTAs.
    warps = planner._warps_needed(planner.lanes_per_row(nnz, plan.slots_per_lane))
    assert warps <= plan.num_warps and plan.num_warps % plan.warps_per_cta == 0
    assert plan.threads_per_cta <= dict(H200.thread_limits(dtype))[plan.reg_slots]


def test_cluster_mode_is_chosen_by_the_step_estimate():
    for hidden, density in [(256, 0.1), (1024, 0.1), (2304, 0.1), (2304, 0.3), (4608, 0.05)]:
        nnz = np.full(hidden, int(density * hidden))
        plan = plan_layout(nnz, np.float16, H200)
        grid = plan_layout(nnz, np.float16, GRID_ONLY)
        assert grid.exchange == "grid" or grid.num_ctas <= planner.MAX_CLUSTER_CTAS
        if plan.exchange == "cluster" and grid.exchange == "grid":  # (like for like: unsplit)
            assert (cost.planning_step_us(plan, "cluster", np.float16, split=False)
                    < cost.planning_step_us(grid, "grid", np.float16))
        else:
            assert plan == grid
    # Large layers stay on the whole GPU (the paper's headline layer among them). At 10%, H = 2304
    # (an H100's kernel time, 2026-12-06: the grid 2.27 / 2.87 / 7.43 µs at B = 1 / 4 / 16, a
    # 16-CTA cluster 3.83 / 3.83 / 6.31) and the GRU and the LSTM at 1024 too.
    assert plan_layout(np.full(2304, 691), np.float16, H200).exchange == "grid"
    assert plan_layout(np.full(2304, 230), np.float16, H200).exchange == "grid"
    for gates in (3, 4):
        assert plan_layout(np.full(gates * 1024, 102), np.float16, H200, gates=gates).exchange == "grid"
    assert plan_layout(np.full(4608, 460), np.float16, H200).exchange == "grid"
    # A single example runs faster on the grid at H = 2304 (its narrow tile), a wide batch in a
    # cluster (whose replicas run it at about one example's step); at B = 4-8 the two are close.
    assert plan_layout(np.full(2304, 230), np.float16, H200, batch=1).exchange == "grid"
    assert plan_layout(np.full(2304, 230), np.float16, H200, batch=16).exchange == "cluster"


def test_devices_without_clusters_get_grid_layouts_only():
    plan = plan_layout(np.full(256, 25), np.float16, GRID_ONLY)
    assert plan.fits and plan.reason == "fits"
    assert plan.num_ctas > planner.MAX_CLUSTER_CTAS  # spread over the SMs, as before


def test_cluster_layouts_need_two_staged_copies_in_shared_memory():
    # H=8192 in float32: one staged copy of a batch tile (128 KiB) fits a CTA, two do not, so no
    # layout on 1-16 CTAs can run in cluster mode however few weights it holds.
    nnz = np.full(8192, 8)
    assert planner._cluster_layout(nnz, np.float32, H200, 16, planner.SLOT_SIZES, 1) is None
    # Half the state per copy (fp32 at 8-byte loads: a tile of 2) fits twice.
    plan = planner._cluster_layout(nnz, np.float32, H200, 8, planner.SLOT_SIZES, 1)
    assert plan is not None and plan.num_ctas <= planner.MAX_CLUSTER_CTAS


@pytest.mark.parametrize("hidden, gates", [(2304, 1), (1024, 4), (256, 1)])
def test_an_exchange_mode_can_be_asked_for(hidden, gates):
    nnz = np.full(gates * hidden, hidden // 10)
    auto = plan_layout(nnz, np.float16, H200, gates=gates)
    cluster = plan_layout(nnz, np.float16, H200, gates=gates, exchange="cluster")
    grid = plan_layout(nnz, np.float16, H200, gates=gates, exchange="grid")
    assert cluster.fits and cluster.exchange == "cluster", cluster
    assert cluster == planner._cluster_layout(nnz, np.float16, H200, 16, planner.SLOT_SIZES, gates)
    assert grid == plan_layout(nnz, np.float16, GRID_ONLY, gates=gates)
    assert grid.num_ctas > planner.MAX_CLUSTER_CTAS
    assert auto in (cluster, grid)  # the planner's pick is one of the two


def test_an_exchange_mode_is_checked():
    with pytest.raises(ValueError, match="exchange must be one of"):
        plan_layout(np.full(64, 6), np.float16, H200, exchange="dsmem")
    # Without clusters on the device, "cluster" has no layout of its own: the grid one is planned.
    nnz = np.full(1024, 102)
    forced = plan_layout(nnz, np.float16, GRID_ONLY, exchange="cluster")
    assert forced == plan_layout(nnz, np.float16, GRID_ONLY)


def test_a_portable_cluster_is_preferred_within_the_estimates_error(monkeypatch):
    # H=1024 at 10% in fp16, as the fitted model (before the split phase loop) estimates it: 16 CTAs
    # of 16 warps (K=16) are estimated 1% cheaper than 8 of 16 (K=32); within PORTABLE_TOLERANCE the
    # 8-CTA cluster is taken (15 fit an H200 at once, not 7).
    monkeypatch.setattr(cost, "CLUSTER_SPLIT_FACTOR", 1.0)
    nnz = np.full(1024, 102)
    plan = planner._cluster_layout(nnz, np.float16, H200, 16, planner.SLOT_SIZES, 1)
    assert plan.num_ctas <= cost.PORTABLE_CLUSTER_CTAS, plan
    tolerance = planner.PORTABLE_TOLERANCE
    monkeypatch.setattr(planner, "PORTABLE_TOLERANCE", 0.0)
    cheapest = planner._cluster_layout(nnz, np.float16, H200, 16, planner.SLOT_SIZES, 1)
    assert cheapest.num_ctas > cost.PORTABLE_CLUSTER_CTAS, cheapest
    est = [cost.planning_step_us(p, "cluster", np.float16) for p in (plan, cheapest)]
    assert est[1] < est[0] <= est[1] * (1 + tolerance)


# ---- a batch to plan for (plan_layout(batch=...), SparseWeights.from_dense(batch=...)) -----------

@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8", np.float32(4)])
def test_a_batch_hint_is_checked(bad):
    with pytest.raises(ValueError, match=r"batch \(the batch to plan the layout for\).*got"):
        plan_layout(np.full(256, 25), np.float16, H200, batch=bad)


def test_the_planning_estimate_at_a_batch_is_the_step_at_that_batch():
    plan = plan_layout(np.full(1024, 102), np.float16, H200)
    for batch in (1, 5, 32):
        assert cost.planning_step_us(plan, "cluster", np.float16, batch) == \
            cost.cluster_step_us(plan, batch, np.float16)
        assert cost.planning_step_us(plan, "grid", np.float16, batch) == cost.persistent_step_us(plan, batch)
    # Without one, the geometric mean over the planning batches: not the step at any one batch here.
    mean = cost.planning_step_us(plan, "grid", np.float16)
    steps = [cost.persistent_step_us(plan, b) for b, _ in cost.PLANNING_BATCHES]
    assert mean == pytest.approx(np.exp(np.mean(np.log(steps)))) and min(steps) < mean < max(steps)


def test_without_a_batch_a_loss_at_one_example_weighs_as_much_as_at_many(monkeypatch):
    # Two layouts, each 1.5x slower than the other at one end of the planning batches: they tie,
    # whatever their steps' sizes (an arithmetic mean would pick the one faster at B = 32).
    plan = plan_layout(np.full(1024, 102), np.float16, H200)
    first, last = cost.PLANNING_BATCHES[0][0], cost.PLANNING_BATCHES[-1][0]
    base = {b: 2.0 + b / 2 for b, _ in cost.PLANNING_BATCHES}
    slow_small = {b: t * (1.5 if b == first else 1.0) for b, t in base.items()}
    slow_large = {b: t * (1.5 if b == last else 1.0) for b, t in base.items()}
    for steps in (slow_small, slow_large):
        monkeypatch.setattr(cost, "persistent_step_us", lambda meta, b, steps=steps: steps[b])
        assert cost.planning_step_us(plan, "grid", np.float16) == pytest.approx(
            np.exp(np.mean(np.log(list(base.values())))) * 1.5 ** 0.2)


@pytest.mark.parametrize("hidden, density, gates", [(1024, 0.1, 1), (512, 0.2, 1), (256, 0.1, 1),
                                                   (2304, 0.1, 1), (1024, 0.1, 3), (768, 0.1, 4)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_layout_planned_for_a_batch_is_estimated_no_slower_there(hidden, density, gates, dtype):
    nnz = np.full(gates * hidden, max(1, int(density * hidden)))
    default = plan_layout(nnz, dtype, H200, gates=gates)
    for batch in (1, 8, 32):
        hinted = plan_layout(nnz, dtype, H200, gates=gates, batch=batch)
        assert hinted.fits and hinted.reason.endswith(f", planned for batch {batch}"), hinted.reason
        if planner.max_persistent_batch(default, dtype) >= batch:
            assert planner.max_persistent_batch(hinted, dtype) >= batch
            # (a portable cluster is taken within PORTABLE_TOLERANCE of a wider one's estimate)
            assert cost.kernel_step_us(hinted, batch, dtype) <= \
                cost.kernel_step_us(default, batch, dtype) * (1 + planner.PORTABLE_TOLERANCE)
    assert plan_layout(nnz, dtype, H200, gates=gates, batch=None) == default


def test_a_layout_planned_for_a_batch_runs_that_batch_where_one_can():
    # H=2304 at 10% in fp16: the default layout (the grid's 128 CTAs) runs at most 24 examples
    # persistently; planned for 64, a cluster of fewer CTAs with replicas runs them.
    nnz = np.full(2304, 230)
    default = plan_layout(nnz, np.float16, H200)
    assert planner.max_persistent_batch(default, np.float16) < 64
    hinted = plan_layout(nnz, np.float16, H200, batch=64)
    assert hinted.exchange == "cluster" and planner.max_persistent_batch(hinted, np.float16) >= 64
    # A batch that nothing runs persistently still gets a layout (the estimates decide).
    assert plan_layout(nnz, np.float16, H200, batch=1 << 20).fits
    # Without clusters there is only the grid layout, whatever the batch.
    assert plan_layout(nnz, np.float16, GRID_ONLY, batch=64).num_ctas == \
        plan_layout(nnz, np.float16, GRID_ONLY).num_ctas


def test_the_cluster_layout_planned_for_a_batch_runs_it_where_one_can(monkeypatch):
    # H=1536 at 10% in fp16, B=256: the cluster layout with the lowest estimate there (8 CTAs,
    # K=96) runs at most 240 examples persistently; one that runs 256 (6 CTAs, K=192) is taken.
    nnz = np.full(1536, 153)
    plan = planner._cluster_layout(nnz, np.float16, H200, 16, planner.SLOT_SIZES, 1, False, 256)
    assert planner.max_persistent_batch(plan, np.float16) >= 256, plan
    monkeypatch.setattr(planner, "runs_batch", lambda *args: True)
    cheapest = planner._cluster_layout(nnz, np.float16, H200, 16, planner.SLOT_SIZES, 1, False, 256)
    assert planner.max_persistent_batch(cheapest, np.float16) < 256, cheapest
