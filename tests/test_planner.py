"""The planner: a pure function of the layer and a (made-up) device."""

import dataclasses

import numpy as np
import pytest

from jax_sprnn import planner
from jax_sprnn.planner import H200, DeviceSpec, plan_layout


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
    plan = plan_layout(nnz, dtype, H200)
    assert plan.fits, plan.reason
    _check_budget(plan, H200, dtype)
    warps = planner._warps_needed(planner.lanes_per_row(nnz, plan.slots_per_lane))
    want = -(-hidden // (32 * planner.STAGE_WORDS_PER_THREAD))
    assert plan.warps_per_cta >= min(want, warps)
    assert plan.num_warps - warps < plan.warps_per_cta  # padding: less than one CTA of empty warps
    # the widening never applies to a layer whose CTAs are already wide enough
    nnz = np.full(2304, 230)
    wide = plan_layout(nnz, dtype, H200)
    warps = planner._warps_needed(planner.lanes_per_row(nnz, wide.slots_per_lane))
    assert wide.warps_per_cta == -(-warps // min(H200.sm_count, warps))


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


@pytest.mark.parametrize("seed", range(5))
def test_made_up_devices_never_exceed_budget(seed):
    rng = np.random.default_rng(seed)
    device = DeviceSpec(name="made-up", sm_count=int(rng.integers(2, 200)),
                        smem_per_block=int(rng.integers(16, 228)) * 1024,
                        max_threads_per_block=int(rng.choice([256, 512, 1024])))
    hidden = int(rng.integers(1, 3000))
    nnz = rng.integers(0, hidden + 1, size=hidden) if seed % 2 else np.full(hidden, hidden // 10)
    for dtype in (np.float32, np.float16):
        plan = plan_layout(nnz, dtype, device)
        if plan.fits:
            _check_budget(plan, device, dtype)


def test_bad_arguments():
    with pytest.raises(ValueError, match="load_bytes"):
        plan_layout(np.ones(10, int), np.float32, load_bytes=12)
    with pytest.raises(ValueError, match="at least one row"):
        plan_layout(np.zeros(0, int), np.float32)


def test_max_batch_shrinks_with_hidden():
    small = plan_layout(np.full(1152, 115), np.float16)
    big = plan_layout(np.full(4608, 460), np.float16)
    assert planner.max_persistent_batch(small, np.float16) > planner.max_persistent_batch(big, np.float16) >= 4
    assert dataclasses.replace(small, fits=False) and planner.max_persistent_batch(
        dataclasses.replace(small, fits=False), np.float16) == 0


@pytest.mark.parametrize("hidden, density, groups", [(2304, 0.1, 1), (1152, 0.1, 3), (64, 0.3, 1),
                                                     (4608, 0.05, 2), (300, 0.2, 7)])
@pytest.mark.parametrize("steps", [1, 5, 256])
def test_weight_grad_time_chunks(hidden, density, groups, steps):
    # The CUDA weight-gradient kernel's time split: within [1, steps] (and 64), and its waves of
    # CTAs are at least 90% busy or as busy as any split allows.
    from jax_sprnn.layout import LayoutMeta
    from jax_sprnn.dispatch import weight_grad_time_chunks
    nnz = max(1, int(density * hidden))
    meta = LayoutMeta.from_plan(planner.plan_layout(np.full(hidden, nnz), np.float16))
    chunks = weight_grad_time_chunks(meta, groups, steps, 132)
    assert 1 <= chunks <= steps
    per_thread = 8 if meta.slots_per_lane <= 8 else 16
    blocks = -(-meta.num_warps * 32 * -(-meta.slots_per_lane // per_thread) // 1024) * groups
    filled = lambda c: blocks * c / (-(-blocks * c // 132) * 132)
    best = max(filled(c) for c in range(1, min(steps, 64) + 1))
    assert filled(chunks) >= 0.9 or filled(chunks) == best
