"""The per-step models behind method="auto" (jax_sprnn.cost): values worked by hand from the formulas
in its docstring, and the shape any such model must have (more batch planes, slots or warps never
cost less; float32 never leaves the kernel; the switch needs the margin). How well the constants
fit the H200 runs is a benchmark question (benchmarks/RESULTS.md), not a unit test."""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jax_sprnn import cost
from jax_sprnn.layout import LayoutMeta
from jax_sprnn.testing import make_problem


def _meta(hidden, slots_per_lane, warps_per_cta, reg_slots, ctas=128, load_bytes=16):
    return LayoutMeta(hidden=hidden, slots_per_lane=slots_per_lane, num_warps=ctas * warps_per_cta,
                      warps_per_cta=warps_per_cta, reg_slots=reg_slots, load_bytes=load_bytes,
                      fits=True, reason="fits")


# H=2304 at 10% on the H200: 24 slots per lane, all in registers, 18 warps per CTA.
H2304 = _meta(2304, 24, 18, 24)


def test_kernel_estimate_by_hand():
    # 1.31 + planes * (1.08 + 0.0027 * warps_per_cta * (reg + 1.5 * (K - reg)))
    assert cost.persistent_step_us(H2304, 4) == pytest.approx(1.31 + 1.08 + 0.0027 * 18 * 24)  # 3.5564
    assert cost.persistent_step_us(H2304, 16) == pytest.approx(1.31 + 4 * 2.2464)  # 10.2956
    assert cost.persistent_step_us(H2304, 12) == pytest.approx(1.31 + 3 * 2.2464)  # planes one by one
    in_smem = _meta(2304, 24, 18, 0)  # every slot in shared memory: 1.5 x 24 register-equivalents
    assert cost.persistent_step_us(in_smem, 4) == pytest.approx(1.31 + 1.08 + 0.0027 * 18 * 36)
    narrow = _meta(2304, 24, 18, 24, load_bytes=8)  # 2 examples per plane: B=4 is two planes
    assert cost.persistent_step_us(narrow, 4) == pytest.approx(1.31 + 2 * 2.2464)


def test_dense_estimate_by_hand():
    # max(8.5, 2 bytes * H**2 / 3.3e6 bytes per µs)
    assert cost.dense_step_us(2304, np.float16) == 8.5  # 3.2 µs of reading: the fixed cost wins
    assert cost.dense_step_us(8192, np.float16) == pytest.approx(2 * 8192**2 / 3.3e6)  # 40.67


def test_auto_switches_by_hand():
    # dense 8.5 µs, so the kernel must exceed 1.25 * 8.5 = 10.625 µs
    assert not cost.auto_prefers_dense(H2304, 8, np.float16)[0]  # 5.80 µs: faster anyway
    # 10.30 µs at B=16: 21% slower than the dense estimate but inside the margin, so it stays
    assert cost.dense_step_us(2304, np.float16) < cost.persistent_step_us(H2304, 16) < 10.625
    assert not cost.auto_prefers_dense(H2304, 16, np.float16)[0]
    prefers_dense, why = cost.auto_prefers_dense(H2304, 24, np.float16)  # 1.31 + 6 * 2.2464
    assert prefers_dense and "14.8 µs" in why and "8.5 µs" in why
    # 32 slots: 1.31 + 3 * (1.08 + 0.0027 * 18 * 32) = 9.22 µs at B=12 stays; 11.85 at B=16 does not
    k32 = _meta(2304, 32, 18, 32)
    assert cost.dense_step_us(2304, np.float16) < cost.persistent_step_us(k32, 12) < 10.625
    assert not cost.auto_prefers_dense(k32, 12, np.float16)[0]
    assert cost.auto_prefers_dense(k32, 16, np.float16)[0]


GRID = [_meta(h, k, w, r) for h, k, w, r in [(1152, 8, 4, 8), (2304, 24, 18, 24), (2304, 24, 18, 16),
                                              (4608, 48, 24, 0), (8192, 96, 32, 96)]]
BATCHES = range(1, 65)


def test_kernel_estimate_grows_with_planes_and_only_with_planes():
    for meta in GRID:
        times = [cost.persistent_step_us(meta, b) for b in BATCHES]
        for b, t, t_next in zip(BATCHES, times, times[1:]):
            if b % 4 == 0 or b < 3:  # B+1 opens a new plane of 4 examples, or widens the tile
                assert t_next > t, (meta, b)
            else:
                assert t_next == t, (meta, b)


def test_a_batch_of_one_or_two_saves_the_entries_its_narrow_tile_drops():
    # B=1 runs a tile of 1 (three entries fewer than the layout's 4), B=2 a tile of 2, B=3 and 4 the
    # tile of 4; float32's layouts (a tile of 2) save one entry at B=1.
    four = cost.persistent_step_us(H2304, 4)
    assert cost.persistent_step_us(H2304, 3) == four
    assert cost.persistent_step_us(H2304, 2) == pytest.approx(four - 2 * cost.GRID_ENTRY_US)
    assert cost.persistent_step_us(H2304, 1) == pytest.approx(four - 3 * cost.GRID_ENTRY_US)
    narrow = _meta(2304, 24, 18, 24, load_bytes=8)
    assert cost.persistent_step_us(narrow, 1) == pytest.approx(cost.persistent_step_us(narrow, 2)
                                                               - cost.GRID_ENTRY_US)
    # a tile layout keeps its tile of 4 at every batch
    tiles = dataclasses.replace(H2304, tiles=True)
    assert cost.persistent_step_us(tiles, 1) == cost.persistent_step_us(tiles, 4)


def test_kernel_estimate_grows_with_slots_and_warps_and_shared_memory():
    base = _meta(2304, 24, 18, 16)
    more = [_meta(2304, 32, 18, 16),  # more slots
            _meta(2304, 24, 24, 16),  # more warps per CTA
            _meta(2304, 24, 18, 8)]   # more of the slots in shared memory
    for meta in more:
        for batch in (1, 4, 16):
            assert cost.persistent_step_us(meta, batch) > cost.persistent_step_us(base, batch)


def test_dense_estimate_never_shrinks_with_the_layer():
    times = [cost.dense_step_us(h, np.float16) for h in range(256, 16385, 256)]
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert times[0] == times[1]  # the fixed cost per step
    assert times[-1] > 4 * times[0]


def test_float32_never_takes_the_dense_path():
    for meta, batch in itertools.product(GRID, BATCHES):
        assert not cost.auto_prefers_dense(meta, batch, np.float32)[0]


def test_once_dense_larger_batches_stay_dense():
    for meta in GRID:
        for dtype in (np.float16, "bfloat16"):
            picks = [cost.auto_prefers_dense(meta, b, dtype)[0] for b in BATCHES]
            assert picks == sorted(picks), meta  # False ... False True ... True
    assert any(cost.auto_prefers_dense(meta, 64, np.float16)[0] for meta in GRID)


def test_weight_grad_choice_by_hand():
    # kernel: 1.2e-6 µs per slot and example; dense: 0.3 + 4e-8 * H**2 * B
    slots = H2304.num_slots  # 2304 warps * 24 * 32 = 1769472
    kernel, dense = 1.2e-6 * slots * 4, 0.3 + 4e-8 * 2304**2 * 4  # 8.49 µs against 1.15 µs
    prefers_dense, why = cost.weight_grad_prefers_dense(H2304, 4, 1)
    assert prefers_dense and f"{kernel:.2f}" in why and f"{dense:.2f}" in why
    sparse = _meta(2304, 1, 1, 0, ctas=72)  # 1 nonzero per row: 2304 slots, 0.011 µs
    assert not cost.weight_grad_prefers_dense(sparse, 4, 1)[0]


def test_weight_grad_stays_on_the_kernel_when_the_dense_product_is_large():
    meta = _meta(16384, 8, 8, 8, ctas=132)  # 2 groups of [16384, 16384] float32: 2 GiB
    prefers_dense, why = cost.weight_grad_prefers_dense(meta, 4, 2)
    assert not prefers_dense and "2048 MiB" in why
    assert "MiB" not in cost.weight_grad_prefers_dense(meta, 4, 1)[1]  # 1 GiB is still allowed


def test_gpu_path_of_a_layer():
    # Which GPU path a layer's forward lowers to (planned for this machine's GPU, else an H200).
    import jax.numpy as jnp

    import jax_sprnn as js
    from jax_sprnn import _native
    from jax_sprnn import dispatch
    from jax_sprnn.dispatch import gpu_path

    if dispatch.FORWARD not in _native.cuda_targets():
        pytest.skip("the CUDA module was not built")
    rng = np.random.default_rng(0)
    w = js.SparseWeights.from_dense(rng.standard_normal((2304, 2304)).astype(np.float32),
                                    density=0.3, dtype=jnp.float16, device=_native.current_device_spec())
    assert gpu_path(w.meta, 4, jnp.float16)[0] == "persistent"
    path, why = gpu_path(w.meta, 16, jnp.float16)
    prefers_dense, estimate = cost.auto_prefers_dense(w.meta, 16, jnp.float16)
    assert path == ("dense" if prefers_dense else "persistent")
    assert (estimate in why) == prefers_dense
    assert gpu_path(w.meta, 16, jnp.float16, method="native")[0] == "persistent"
    assert gpu_path(w.meta, 16, jnp.float16, target=dispatch.BACKWARD)[0] == "persistent"
    too_big, why = gpu_path(w.meta, 10_000, jnp.float16, method="native")
    assert too_big == "dense" and "exceeds the persistent kernel's limit" in why


def test_cluster_step_by_hand(monkeypatch):
    monkeypatch.setattr(cost, "CLUSTER_SPLIT_FACTOR", 0.9)  # (so that the split's rule shows)
    meta = LayoutMeta(1024, 16, 8 * 16, 16, 16, 16, True, "fits")  # 8 CTAs of 16 warps, K=16
    k_eff = 16  # every slot in registers
    plane = lambda tile: (cost.CLUSTER_PLANE_US + (cost.CLUSTER_SLOT_US * 16 + cost.CLUSTER_LANE_US) * k_eff
                          + cost.CLUSTER_CTA_US * 8
                          + (tile - 1) * (cost.CLUSTER_ENTRY_US + cost.CLUSTER_ENTRY_SLOT_US * k_eff))
    # 16 register words of slots, 512 threads: the split phase loop at tiles 1-2, not at 4
    for batch, tile, planes in ((1, 1, 1), (4, 1, 1), (15, 1, 1), (16, 2, 1), (31, 4, 1), (64, 4, 2)):
        factor = cost.CLUSTER_SPLIT_FACTOR if tile <= 2 else 1.0
        assert cost.cluster_step_us(meta, batch, np.float16) == pytest.approx(
            (cost.CLUSTER_FIXED_US + planes * plane(tile)) * factor), batch
    # the wide variant (more threads than the narrow launch bound) pays its own constant, and a
    # cluster of more CTAs its exchange (the fitted form: as the kernels before the split)
    def fitted(m):
        return cost.cluster_step_at(m, 1, 1, np.float16, split=False)
    wide = dataclasses.replace(meta, num_warps=8 * 20, warps_per_cta=20)
    assert fitted(wide) - fitted(meta) == pytest.approx(cost.CLUSTER_WIDE_VARIANT_US
                                                        + cost.CLUSTER_SLOT_US * 4 * k_eff)
    more = dataclasses.replace(meta, num_warps=12 * 16)
    assert fitted(more) - fitted(meta) == pytest.approx(4 * cost.CLUSTER_CTA_US)


def test_split_variants_take_the_split_factor(monkeypatch):
    """cost.split_variant is the kernels' rule (_constants.split_modes) for the variant the handler
    launches: the split takes CLUSTER_SPLIT_FACTOR off the fitted step."""
    monkeypatch.setattr(cost, "CLUSTER_SPLIT_FACTOR", 0.9)
    k16 = LayoutMeta(1024, 16, 8 * 16, 16, 16, 16, True, "fits")  # 16 words, narrow (512 threads)
    assert cost.split_variant(k16, 1, 1, np.float16) and cost.split_variant(k16, 2, 1, np.float16)
    assert not cost.split_variant(k16, 4, 1, np.float16)  # a tile of 4 splits at <= 384 threads only
    assert not cost.split_variant(k16, 1, 1, np.float32)  # 32 words at 512 threads: the wide variant
    k32 = LayoutMeta(1024, 32, 8 * 16, 16, 32, 16, True, "fits")
    assert cost.split_variant(k32, 1, 1, np.float16) and not cost.split_variant(k32, 4, 1, np.float16)
    k64 = LayoutMeta(1024, 64, 8 * 8, 8, 64, 16, True, "fits")
    assert not cost.split_variant(k64, 1, 1, np.float16)
    wide = dataclasses.replace(k16, num_warps=8 * 20, warps_per_cta=20)
    assert not cost.split_variant(wide, 1, 1, np.float16)
    # the gated cells' tier of 16 at 384 threads splits at a tile of 4 with one plane, not with two
    # (the handler's two-plane kernel is not split)
    lstm = LayoutMeta(1024, 16, 128 * 8, 8, 16, 16, True, "fits", gates=4)
    assert cost.split_variant(lstm, 4, 1, np.float16) and not cost.split_variant(lstm, 4, 2, np.float16)
    for m, tile in ((k16, 1), (k32, 1), (k64, 1), (lstm, 4)):
        unsplit = cost.cluster_step_at(m, tile, 1, np.float16, split=False)
        factor = cost.CLUSTER_SPLIT_FACTOR if cost.split_variant(m, tile, 1, np.float16) else 1.0
        assert cost.cluster_step_at(m, tile, 1, np.float16) == pytest.approx(unsplit * factor)
    # measured in 16-bit storage only: a split float32 variant keeps the fitted step
    k8 = LayoutMeta(1024, 8, 8 * 8, 8, 8, 16, True, "fits")  # 16 words in float32, 256 threads
    assert cost.split_variant(k8, 1, 1, np.float32) and cost.split_variant(k8, 1, 1, jnp.bfloat16)
    assert cost.cluster_step_at(k8, 1, 1, np.float32) == cost.cluster_step_at(k8, 1, 1, np.float32,
                                                                              split=False)
    assert cost.cluster_step_at(k8, 1, 1, jnp.bfloat16) == pytest.approx(
        cost.CLUSTER_SPLIT_FACTOR * cost.cluster_step_at(k8, 1, 1, jnp.bfloat16, split=False))


def test_a_cluster_launch_narrows_the_tile_where_replicas_allow():
    """The handler's rule: the narrowest tile (1, then 2) at which every replica runs one plane while
    the device holds that many; else the layout's tile on as many replicas as fit."""
    meta = LayoutMeta(1024, 16, 8 * 16, 16, 16, 16, True, "fits")  # 512 threads: one CTA an SM
    assert cost.ctas_per_sm(meta, 1, np.float16) == 1
    held = cost.resident_clusters(8)  # 15 on the H200
    assert cost.cluster_launch(meta, held, np.float16) == (1, held, 1)
    assert cost.cluster_launch(meta, held + 1, np.float16) == (2, -(-(held + 1) // 2), 1)
    assert cost.cluster_launch(meta, 2 * held + 1, np.float16) == (4, -(-(2 * held + 1) // 4), 1)
    assert cost.cluster_launch(meta, 4 * held + 4, np.float16) == (4, held, 2)
    assert cost.cluster_replicas(meta, 56, np.float16) == 14  # 14 tiles of 4 on 14 replicas
    # a batch of 3 never takes the layout's tile of 4 where three replicas fit
    assert cost.cluster_launch(meta, 3, np.float16)[0] == 1
    # a tile layout keeps its tile of 4
    assert cost.cluster_launch(dataclasses.replace(meta, tiles=True), 3, np.float16)[0] == 4
    # a small layout (4 warps, a few KB) shares an SM: by registers, 4 CTAs of 128 threads
    small = LayoutMeta(256, 8, 8 * 4, 4, 8, 16, True, "fits")
    assert cost.ctas_per_sm(small, 1, np.float16) == 4
    assert cost.cluster_launch(small, 32, np.float16) == (1, 32, 1)
    # ... and a layout whose shared memory fills half an SM holds one
    full = LayoutMeta(2048, 64, 16 * 16, 16, 16, 16, True, "fits")  # 48 slots a thread in smem
    assert cost.ctas_per_sm(full, 1, np.float16) == 1


def test_cluster_steps_grow_with_the_batch_and_never_shrink():
    for meta in (LayoutMeta(1024, 16, 8 * 16, 16, 16, 16, True, "fits"),
                 LayoutMeta(256, 8, 8 * 4, 4, 8, 16, True, "fits"),
                 LayoutMeta(1024, 24, 16 * 10, 10, 24, 16, True, "fits"),
                 LayoutMeta(512, 16, 6 * 11, 11, 16, 8, True, "fits")):  # float32: a tile of 2
        for dtype in (np.float16, np.float32):
            steps = [cost.cluster_step_us(meta, b, dtype) for b in range(1, 129)]
            assert all(b >= a for a, b in zip(steps, steps[1:])), (meta, dtype)
            assert steps[-1] > steps[0]


@pytest.mark.parametrize("num_ctas, sm_count, resident", [
    (1, 132, 132), (3, 132, 39), (4, 132, 30), (8, 132, 15), (9, 132, 9), (10, 132, 7), (16, 132, 7),
    (8, 144, 16), (16, 16, 1), (8, 4, 1), (3, 40, 13)])
def test_resident_clusters_are_counted_per_gpc(num_ctas, sm_count, resident):
    # The H200 (132 SMs): the driver's counts. Other GPUs: GPCs of GPC_SMS (18) SMs hold
    # 18 // N clusters each, and a partial GPC its own (40 SMs = 2 x 18 + 4: 2 x 6 + 1 of 3 CTAs).
    assert cost.resident_clusters(num_ctas, sm_count) == resident


def test_a_wide_variant_costs_more_per_plane():
    # 16-bit storage, register tier 16: the narrow variant runs up to 512 threads, the wide one 768.
    narrow = LayoutMeta(1024, 16, 12 * 16, 16, 16, 16, True, "fits")
    wide = LayoutMeta(1024, 16, 12 * 20, 20, 16, 16, True, "fits")
    assert not cost.wide_variant(narrow, np.float16) and cost.wide_variant(wide, np.float16)
    extra = (cost.cluster_step_at(wide, 1, 1, np.float16, split=False)
             - cost.cluster_step_at(narrow, 1, 1, np.float16, split=False))
    assert extra == pytest.approx(cost.CLUSTER_WIDE_VARIANT_US + cost.CLUSTER_SLOT_US * 4 * 16)
    # float32's tier 16 has a narrow bound of 384 threads: 512 is its wide variant
    assert cost.wide_variant(LayoutMeta(1024, 16, 8 * 16, 16, 16, 16, True, "fits"), np.float32)
    # a tier without a wide variant (RS = 64, 16-bit) never counts as wide
    assert not cost.wide_variant(LayoutMeta(2048, 64, 16 * 16, 16, 64, 16, True, "fits"), np.float16)


def test_grid_steps_count_their_planes_one_by_one():
    # the kernel's own time is linear in planes (a two-plane pass is not cheaper: cost.py)
    lstm = LayoutMeta(1024, 16, 128 * 8, 8, 16, 16, True, "fits", gates=4)
    simple = LayoutMeta(1024, 16, 128 * 8, 8, 16, 16, True, "fits")
    per_plane = cost.KERNEL_PLANE_US + cost.KERNEL_SLOT_US * 8 * 16
    for meta in (simple, lstm):
        for batch, planes in ((4, 1), (8, 2), (20, 5)):
            assert cost.persistent_step_us(meta, batch) == pytest.approx(
                cost.KERNEL_FIXED_US + planes * per_plane)
    # float32's h loads of 8 bytes: tiles of 2, so B=4 is two planes
    assert cost.persistent_step_us(dataclasses.replace(lstm, load_bytes=8), 4) == pytest.approx(
        cost.KERNEL_FIXED_US + 2 * per_plane)
    # in cluster mode every plane's state crosses the cluster on its own: planes count one by one
    small = LayoutMeta(1024, 16, 16 * 16, 16, 16, 16, True, "fits")  # 16 CTAs: 7 replicas at most
    one, two = (cost.cluster_step_us(small, b, np.float16) for b in (28, 56))  # 7 and 14 tiles of 4
    assert two - cost.CLUSTER_FIXED_US == pytest.approx(2 * (one - cost.CLUSTER_FIXED_US))


def test_gated_auto_switches_by_hand():
    """The gated rule: the simple cell's step estimate against XLA's dense gated step (at least
    20 µs), with the switch margin."""
    lstm = LayoutMeta(hidden=1024, slots_per_lane=16, num_warps=128 * 8, warps_per_cta=8, reg_slots=16,
                      load_bytes=16, fits=True, reason="fits", gates=4)
    per_plane = 1.08 + 0.0027 * 8 * 16
    # 24.1 µs at B=64 stays inside the margin (1.25 * 20); 46.9 at B=128 does not
    for batch, planes, dense in ((4, 1, False), (32, 8, False), (64, 16, False), (128, 32, True)):
        prefers_dense, why = cost.gated_prefers_dense(lstm, batch, np.float16)
        assert prefers_dense is dense, why
        assert f"{1.31 + planes * per_plane:.1f} µs" in why and "20.0 µs" in why
    assert not cost.gated_prefers_dense(lstm, 64, np.float32)[0]  # float32 never leaves the kernel
    huge = LayoutMeta(hidden=8192, slots_per_lane=16, num_warps=128 * 8, warps_per_cta=8,
                      reg_slots=16, load_bytes=16, fits=True, reason="fits", gates=4)
    assert f"{2 * 4 * 8192 ** 2 / 3.3e6:.1f} µs for XLA" in cost.gated_prefers_dense(huge, 4, np.float16)[1]


def test_cpu_auto_keeps_the_kernel_where_the_dense_path_would_rebuild_a_large_kernel():
    # XLA's dense path rebuilds K from the packed layout in every call: for short sequences of a
    # layer of 512 x 512 cells or more the C++ kernel is faster whatever the density (2026-12-03).
    small = make_problem(1, 256, 4, 1, 0.1, "float32")[1].meta
    large = make_problem(2, 1024, 4, 1, 0.1, "float32")[1].meta
    dense_layout = make_problem(3, 1024, 4, 1, 0.45, "float32")[1].meta
    assert cost.cpu_prefers_dense(small, 4, 1, forward=True)[0]  # small: the rows' set-up decides
    for meta in (large, dense_layout):
        for steps in (1, 3, 16, cost.CPU_BUILD_STEPS - 1):
            prefers_dense, why = cost.cpu_prefers_dense(meta, 4, steps, forward=True)
            assert not prefers_dense and "rebuild" in why, (meta.hidden, steps, why)
    # Long sequences amortize the rebuild: the fitted per-step rule decides again.
    assert cost.cpu_prefers_dense(dense_layout, 4, cost.CPU_BUILD_STEPS, forward=True)[0]
    assert not cost.cpu_prefers_dense(large, 4, cost.CPU_BUILD_STEPS, forward=True)[0]
