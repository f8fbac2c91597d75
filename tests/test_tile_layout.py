"""Tile layouts (docs/format.md, "Tile layouts"; jax_sprnn.tile_layout), on any machine: the packer's
invariants, the planner, that every CPU path computes the same layer from a tile layout as from the
ordinary one, the errors, and the CUDA lowering's ``tiles`` attribute (lowered, never run). The
tensor-core kernel itself is tested on the GPU (tests/test_cuda_tiles.py)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native, planner, tile_layout
from jax_sprnn.testing import TOLERANCE, make_gated_problem, make_problem, rel_err, run_gated

WARP = planner.WARP


@pytest.mark.parametrize("gates", [1, 3, 4])
@pytest.mark.parametrize("hidden, density", [(16, 1.0), (48, 0.3), (80, 0.05), (144, 0.1)])
def test_a_tile_layout_holds_the_same_pattern_as_the_ordinary_one(gates, hidden, density):
    rng = np.random.default_rng(hidden + gates)
    kernel = rng.standard_normal((hidden, gates * hidden)).astype(np.float16)
    tiles = js.SparseWeights.from_dense(kernel, density=density, matvec="tiles")
    slots = js.SparseWeights.from_dense(kernel, density=density)
    tiles.validate()
    meta = tiles.meta
    assert meta.tiles and not slots.meta.tiles and not tiles.meta_t.tiles
    assert meta.slots_per_lane == hidden and meta.load_bytes == 16 and meta.gates == gates
    assert tiles.nnz == slots.nnz
    np.testing.assert_array_equal(np.asarray(tiles.to_dense()), np.asarray(slots.to_dense()))
    np.testing.assert_array_equal(tiles.mask(), slots.mask())
    # One lane a row, a unit's gates on adjacent lanes of one warp, slot k holding column k (or ~k).
    lane_row = np.asarray(tiles.lane_row)
    rows = lane_row[lane_row >= 0]
    assert sorted(rows.tolist()) == list(range(gates * hidden))
    lane_of = np.empty(gates * hidden, np.int64)
    lane_of[rows] = np.flatnonzero(lane_row >= 0)
    by_gate = lane_of.reshape(gates, hidden)
    assert np.all(np.diff(by_gate, axis=0) == 1) and np.all(by_gate // WARP == by_gate[:1] // WARP)
    idx = np.asarray(tiles.indices).reshape(meta.num_warps, hidden, WARP)
    assert np.all(np.where(idx < 0, ~idx, idx) == np.arange(hidden)[None, :, None])
    assert np.all(np.asarray(tiles.values)[np.asarray(tiles.indices) < 0] == 0)


def test_a_broken_tile_layout_fails_validation():
    kernel = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float16)
    w = js.SparseWeights.from_dense(kernel, density=0.5, matvec="tiles")
    idx = np.asarray(w.indices).copy()
    idx[3 * WARP + 5], idx[4 * WARP + 5] = idx[4 * WARP + 5], idx[3 * WARP + 5]  # two columns swapped
    with pytest.raises(ValueError, match="column k"):
        w.replace(indices=jnp.asarray(idx)).validate()
    rows = np.asarray(w.lane_row).copy()
    rows[[0, 1]] = rows[[1, 0]]
    with pytest.raises(ValueError, match="tile layout"):
        w.replace(lane_row=jnp.asarray(rows)).validate()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("hidden, batch", [(48, 5), (96, 1)])
def test_the_cpu_paths_compute_the_same_simple_layer(dtype, hidden, batch):
    """The C++ kernel and XLA's paths run a tile layout as the ordinary layout it also is: outputs and
    gradients (inputs, carry, weights) match the ordinary layout's within the dtype's tolerance."""
    # (The same seed packed both ways: the ordinary layout does not come from the tile layout.)
    _, tiles, x, h0 = make_problem(hidden, hidden, batch, 9, 0.3, dtype, scale=0.5, matvec="tiles")
    _, slots, _, _ = make_problem(hidden, hidden, batch, 9, 0.3, dtype, scale=0.5)
    lengths = jnp.asarray(np.random.default_rng(1).integers(0, 10, batch), jnp.int32)
    for method in ("native", "reference"):
        def value_and_grads(w, method=method):
            def loss(x, h0, values):
                y, h = js.sparse_rnn(x, h0, w.replace(values=values), seq_lengths=lengths, method=method)
                return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h.astype(jnp.float32))
            value, (dx, dh0, dv) = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, h0, w.values)
            return value, dx, dh0, w.replace(values=dv).to_dense()  # (the weights' gradient, dense)
        for got, want in zip(value_and_grads(tiles), value_and_grads(slots)):
            assert rel_err(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("gates", [3, 4])
def test_the_cpu_paths_compute_the_same_gated_layer(gates):
    w, x, c0, h0, hn_bias = make_gated_problem(gates, gates, 64, 3, 7, 0.2, "float16", matvec="tiles")
    slots = make_gated_problem(gates, gates, 64, 3, 7, 0.2, "float16")[0]  # (same seed, packed apart)
    for reverse in (False, True):
        got = run_gated(gates, x, c0, h0, w, hn_bias, reverse=reverse)
        want = run_gated(gates, x, c0, h0, slots, hn_bias, reverse=reverse)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert rel_err(a, b) < TOLERANCE["float16"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=np.float32), "matvec='tiles'.*float16 or bfloat16"),
    (dict(load_bytes=8), "load_bytes.*16-byte"),
])
def test_bad_tile_requests_name_the_argument(kwargs, match):
    kernel = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    kwargs.setdefault("dtype", np.float16)
    with pytest.raises(ValueError, match=match):
        js.SparseWeights.from_dense(kernel, density=0.5, matvec="tiles", **kwargs)


def test_a_width_off_the_strip_and_an_unknown_matvec_are_errors():
    kernel = np.random.default_rng(0).standard_normal((40, 40)).astype(np.float16)
    with pytest.raises(ValueError, match="multiple of 16, got H=40"):
        js.SparseWeights.from_dense(kernel, density=0.5, matvec="tiles")
    with pytest.raises(ValueError, match="matvec must be one of"):
        js.SparseWeights.from_dense(kernel, density=0.5, matvec="dense")


@pytest.mark.parametrize("matvec", ["slots", "tiles"])
def test_a_repeated_entry_is_an_error_not_a_lost_or_doubled_value(matvec):
    """U[r, c] = v given twice is ambiguous: no layout keeps one of the values (lost) or both in two
    slots (counted twice in nnz, and trained at twice the rate); every layout says so."""
    rows, cols = np.array([0, 0, 1]), np.array([2, 2, 3])
    vals = np.array([1.0, 2.0, 3.0], np.float16)
    with pytest.raises(ValueError, match=r"repeat the entry \(0, 2\) 2 times"):
        js.SparseWeights.from_pattern(rows, cols, vals, 16, matvec=matvec)


def test_auto_packs_the_ordinary_layout():
    kernel = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float16)
    assert not js.SparseWeights.from_dense(kernel, density=0.5).meta.tiles


@pytest.mark.parametrize("gates, hidden, in_a_cluster", [(1, 256, True), (3, 256, True), (4, 256, True),
                                                         (1, 1024, True), (3, 1024, False),
                                                         (4, 1024, False)])
def test_the_planner_fits_tile_layouts_in_both_exchange_modes(gates, hidden, in_a_cluster):
    """On an H200 the common layer sizes fit as tile layouts, spread over the grid and, where 16 SMs
    hold the dense weights (not a gated layer of 1024: 6-8 MB), on one cluster; the shared-memory
    tier is planned at 2 bytes a slot (fragments, no index)."""
    plans = {mode: tile_layout.plan_tile_layout(hidden, np.float16, gates=gates, exchange=mode)
             for mode in ("auto", "cluster", "grid")}
    if not in_a_cluster:
        assert not plans.pop("cluster").fits
    for mode, plan in plans.items():
        assert plan.fits and plan.tiles, (mode, plan.reason)
        assert plan.num_warps * (WARP // gates) >= hidden
        assert plan.reg_slots in tile_layout._reg_tiers(gates)
        assert plan.smem_bytes <= planner.H200.smem_per_block
        most = planner.max_persistent_batch(plan, np.float16)
        assert most >= (tile_layout.MIN_BATCH if plan.exchange == "grid" else 16), (mode, most)
    if in_a_cluster:  # (CTAs too thin to stage the state each step only where no cluster fits)
        assert plans["auto"].exchange == "cluster"
        assert plans["cluster"].num_ctas <= planner.MAX_CLUSTER_CTAS
    p = plans["grid"]
    weights = planner.weight_smem_bytes(p.slots_per_lane, p.reg_slots, p.threads_per_cta, np.float16, True)
    assert weights == (p.slots_per_lane - p.reg_slots) * p.threads_per_cta * 2


@pytest.mark.parametrize("gates, hidden, exchange", [(1, 1088, "auto"), (3, 704, "auto"), (4, 512, "grid")])
def test_grid_mode_tile_plans_have_ctas_wide_enough_to_stage_the_state(gates, hidden, exchange):
    """In grid mode each CTA stages the whole state every step: a tile plan keeps CTAs of at least
    H / (32 * STAGE_WORDS_PER_THREAD) warps (one-warp CTAs took 53 µs steps at H = 1024, B = 32), or
    runs in a cluster, whose peers push the state, where a cheaper thin grid plan also fits."""
    plan = tile_layout.plan_tile_layout(hidden, np.float16, gates=gates, exchange=exchange)
    assert plan.fits, plan.reason
    wide_enough = -(-hidden // (WARP * planner.STAGE_WORDS_PER_THREAD))
    in_cluster = exchange != "grid" and plan.num_ctas <= planner.MAX_CLUSTER_CTAS
    assert in_cluster or plan.warps_per_cta >= wide_enough, plan.reason


def test_a_layer_too_large_for_the_chip_gets_a_plan_that_says_why():
    plan = tile_layout.plan_tile_layout(8192, np.float16, gates=4)
    assert not plan.fits and "no tile layout of H=8192" in plan.reason
    assert planner.max_persistent_batch(plan, np.float16) == 0


def test_a_tile_layout_stored_as_float32_runs_as_an_ordinary_layout():
    """astype(float32) keeps the layout; no GPU runs it on tensor cores (runs_tiles), and the CPU
    still computes the same layer."""
    _, w, x, h0 = make_problem(5, 32, 2, 4, 0.5, "float16", matvec="tiles")
    w32 = w.astype(jnp.float32)
    assert planner.runs_tiles(w.meta, w.dtype) and not planner.runs_tiles(w32.meta, w32.dtype)
    y16, _ = js.sparse_rnn(x.astype(jnp.float32), h0.astype(jnp.float32), w32)
    y, _ = js.sparse_rnn(x.astype(jnp.float32), h0.astype(jnp.float32),
                         js.SparseWeights.from_dense(np.asarray(w32.to_dense()), w32.mask()))
    assert rel_err(y16, y) < TOLERANCE["float32"]


def _forward_calls(fn, *args):
    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _native.cuda_targets()]
    text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
    return [(m.group(1), m.group(0)) for m in re.finditer(r"stablehlo\.custom_call @(\w+)\(.*", text)]


@pytest.mark.parametrize("cell", ["simple", "lstm", "gru", "bidirectional"])
@pytest.mark.parametrize("matvec, dtype, expected", [("tiles", "float16", 1), ("tiles", "bfloat16", 1),
                                                     ("slots", "float16", 0)])
def test_the_cuda_forward_call_says_whether_it_runs_tiles(cuda_targets_registered, cell, matvec, dtype,
                                                          expected):
    """``tiles = 1`` on the forward targets of a 16-bit tile layout (one call, or one stacked call
    of both directions), 0 otherwise; the backward targets never take it."""
    gates = {"simple": 1, "bidirectional": 1, "gru": 3, "lstm": 4}[cell]
    if gates == 1:
        _, w, x, h0 = make_problem(2, 64, 3, 5, 0.2, dtype, matvec=matvec)
    else:
        w, x, c0, h0, hn_bias = make_gated_problem(2, gates, 64, 3, 5, 0.2, dtype, matvec=matvec)

    def forward(x, h0):
        if cell == "simple":
            return js.sparse_rnn(x, h0, w, method="native")[0]
        if cell == "bidirectional":
            return js.sparse_rnn_bidirectional((x, x), (h0, h0), (w, w), method="native")[0]
        return run_gated(gates, x, c0, h0, w, hn_bias, method="native")[0]

    def grad(x, h0):
        return jax.grad(lambda x: jnp.sum(forward(x, h0).astype(jnp.float32)))(x)

    fwd_target = _constants.ffi_target("forward" if gates == 1 else "gated_forward")
    for fn in (forward, grad):
        calls = _forward_calls(fn, x, h0)
        forwards = [line for name, line in calls if name == fwd_target]
        assert len(forwards) == 1, [name for name, _ in calls]
        assert re.search(rf"tiles = {expected} : i64", forwards[0])
        assert all("tiles =" not in line for name, line in calls if name != fwd_target)


def test_a_tile_plan_for_a_device_without_clusters_is_a_grid_plan():
    device = dataclasses.replace(planner.H200, cluster_launch=False)
    plan = tile_layout.plan_tile_layout(256, np.float16, device, exchange="cluster")
    assert not plan.fits and "cluster mode" in plan.reason
    assert tile_layout.plan_tile_layout(256, np.float16, device).fits


def test_a_tile_layout_planned_for_a_batch():
    plan = tile_layout.plan_tile_layout(256, np.float16, planner.H200, batch=8)
    assert plan.fits and plan.reason.endswith("planned for batch 8"), plan.reason
    assert planner.max_persistent_batch(plan, np.float16) >= 8
    assert "batch" not in tile_layout.plan_tile_layout(256, np.float16, planner.H200).reason
    with pytest.raises(ValueError, match=r"batch \(the batch to plan the layout for\)"):
        tile_layout.plan_tile_layout(256, np.float16, planner.H200, batch=0)
