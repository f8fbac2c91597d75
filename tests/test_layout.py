"""The packer: exact round trips, every nonzero once, bank order, transposed permutation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import layout, planner
from jax_sprnn.layout import bank_conflicts, decode_columns, lane_of_slot

from jax_sprnn.testing import DTYPES, rel_err


def _masks(rng, hidden):
    dense = np.ones((hidden, hidden), bool)
    sparse = rng.random((hidden, hidden)) < 0.1
    holes = rng.random((hidden, hidden)) < 0.3
    holes[:, min(3, hidden - 1)] = False  # an empty row of U (output unit 3 has no inputs)
    holes[min(5, hidden - 1), :] = False  # an empty column of U (input unit 5 feeds nothing)
    single = np.zeros((hidden, hidden), bool)
    single[hidden // 2, hidden // 3] = True
    return {"dense": dense, "10%": sparse, "holes": holes, "single": single,
            "empty": np.zeros((hidden, hidden), bool)}


@pytest.mark.parametrize("hidden", [1, 7, 33, 130])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_exact(hidden, dtype):
    rng = np.random.default_rng(hidden)
    kernel = np.asarray(jnp.asarray(rng.standard_normal((hidden, hidden)), DTYPES[dtype]))
    for name, mask in _masks(rng, hidden).items():
        w = js.SparseWeights.from_dense(kernel, mask)
        w.validate()
        assert w.dtype == np.dtype(DTYPES[dtype])
        assert w.shape == (hidden, hidden)
        assert w.nnz == mask.sum() and w.density == pytest.approx(mask.mean())
        np.testing.assert_array_equal(w.mask(), mask, err_msg=name)
        dense = np.asarray(w.to_dense())
        np.testing.assert_array_equal(dense, np.where(mask, kernel, 0).astype(dense.dtype), err_msg=name)


def test_every_nonzero_exactly_once():
    rng = np.random.default_rng(0)
    hidden = 200
    mask = rng.random((hidden, hidden)) < 0.17
    kernel = rng.standard_normal((hidden, hidden)).astype(np.float32)
    w = js.SparseWeights.from_dense(kernel, mask)
    idx = np.asarray(w.indices)
    rows = np.asarray(w.lane_row)[lane_of_slot(w.meta)]
    real = idx >= 0
    pairs = np.stack([idx[real], rows[real]], 1)
    assert len(np.unique(pairs, axis=0)) == len(pairs) == mask.sum()
    assert np.all(mask[pairs[:, 0], pairs[:, 1]])
    # padding is exactly zero, idle lanes hold only padding, padding columns are in range
    vals = np.asarray(w.values)
    assert np.all(vals[~real] == 0)
    assert np.all(~real[rows < 0])
    assert decode_columns(idx).max() < hidden


def test_rows_own_contiguous_lanes_in_one_warp():
    rng = np.random.default_rng(1)
    nnz = rng.integers(0, 200, size=300)
    mask = np.zeros((300, 300), bool)
    for i, n in enumerate(nnz):
        mask[rng.choice(300, n, replace=False), i] = True
    w = js.SparseWeights.from_dense(np.ones((300, 300), np.float32), mask)
    lane_row = np.asarray(w.lane_row)
    for row in range(300):
        lanes = np.flatnonzero(lane_row == row)
        assert lanes.size >= 1
        assert np.all(np.diff(lanes) == 1)
        assert lanes[0] // 32 == lanes[-1] // 32


def test_transposed_layout_is_a_permutation_of_values():
    rng = np.random.default_rng(2)
    hidden = 90
    kernel = rng.standard_normal((hidden, hidden)).astype(np.float32)
    w = js.SparseWeights.from_dense(kernel, density=0.2)
    vt = np.asarray(w.transposed_values())
    idx_t = np.asarray(w.indices_t)
    rows_t = np.asarray(w.lane_row_t)[lane_of_slot(w.meta_t)]
    real = idx_t >= 0
    dense_t = np.zeros((hidden, hidden), np.float32)  # [column i, row j] of U^T
    dense_t[idx_t[real], rows_t[real]] = vt[real]
    np.testing.assert_array_equal(dense_t, np.asarray(w.to_dense()).T)
    assert np.all(vt[~real] == 0)


@pytest.mark.parametrize("load_bytes", [4, 8, 16])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.3, 1.0])
def test_bank_aware_order_beats_unordered(load_bytes, density):
    rng = np.random.default_rng(3)
    hidden = 257
    mask = rng.random((hidden, hidden)) < density
    rows, cols = np.nonzero(mask.T)
    # (the grid layout: a packer test, not the planner's choice between modes)
    grid_only = dataclasses.replace(planner.H200, cluster_launch=False)
    plan = planner.plan_layout(np.bincount(rows, minlength=hidden), np.float16, grid_only,
                               load_bytes=load_bytes)
    aware = layout.pack_pattern(rows, cols, plan)
    naive = layout.pack_pattern(rows, cols, plan, bank_aware=False)
    c_aware = bank_conflicts(aware.indices, load_bytes)
    c_naive = bank_conflicts(naive.indices, load_bytes)
    assert c_aware <= c_naive
    if 0.1 <= density < 1.0:  # a dense row in column order is already conflict-free
        assert c_aware < c_naive


def test_bank_order_is_optimal_where_the_row_allows():
    # Each row has 8 columns in each of the 8 bank groups, but in column order 8 consecutive
    # columns share a group: the unordered layout conflicts, a perfect order exists.
    hidden = 512
    m = np.arange(64)
    mask = np.zeros((hidden, hidden), bool)
    for i in range(hidden):
        mask[(8 * m + m // 8 + 8 * i) % hidden, i] = True
    rows, cols = np.nonzero(mask.T)
    plan = planner.plan_layout(np.bincount(rows, minlength=hidden), np.float16, load_bytes=16)
    packed = layout.pack_pattern(rows, cols, plan)
    assert bank_conflicts(packed.indices, 16) == 0
    assert bank_conflicts(layout.pack_pattern(rows, cols, plan, bank_aware=False).indices, 16) > 0


def test_bank_model_counts_by_hand():
    # 8 lanes of a 16-byte phase: columns 0 and 8 share group 0 -> one extra wavefront;
    # the same column twice is a broadcast.
    idx = np.array([0, 8, 1, 2, 3, 4, 5, 6], np.int32)
    assert bank_conflicts(idx, 16) == 1
    idx = np.array([0, 0, 1, 2, 3, 4, 5, ~0], np.int32)
    assert bank_conflicts(idx, 16) == 0


def test_pack_4608_at_10_percent_keeps_every_nonzero_once():
    # The packer at a benchmark's size (its time is each benchmark row's pack_s, not a unit test's
    # business): all 2.1M nonzeros stored once, with their values, and each row on the fewest lanes.
    hidden = 4608
    kernel = np.random.default_rng(4).standard_normal((hidden, hidden)).astype(np.float32)
    w = js.SparseWeights.from_dense(kernel, density=0.1)
    nnz = round(0.1 * hidden * hidden)
    assert w.nnz == nnz
    idx = np.asarray(w.indices)
    rows = np.asarray(w.lane_row)[lane_of_slot(w.meta)]
    real = idx >= 0
    pairs = idx[real].astype(np.int64) * hidden + rows[real]
    assert real.sum() == nnz and np.unique(pairs).size == nnz
    np.testing.assert_array_equal(np.asarray(w.values)[real], kernel[idx[real], rows[real]])
    row_nnz = np.bincount(rows[real], minlength=hidden)
    lane_row = np.asarray(w.lane_row)
    lanes = np.bincount(lane_row[lane_row >= 0], minlength=hidden)
    np.testing.assert_array_equal(lanes, np.maximum(1, -(-row_nnz // w.meta.slots_per_lane)))


def test_from_dense_bad_input():
    k = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="square"):
        js.SparseWeights.from_dense(np.zeros((4, 5), np.float32), density=0.5)
    with pytest.raises(ValueError, match="mask must have the kernel's shape"):
        js.SparseWeights.from_dense(k, np.ones((3, 3), bool))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        js.SparseWeights.from_dense(k, np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="exactly one"):
        js.SparseWeights.from_dense(k)
    with pytest.raises(ValueError, match="density"):
        js.SparseWeights.from_dense(k, density=1.5)
    with pytest.raises(TypeError, match="floating"):
        js.SparseWeights.from_dense(np.zeros((4, 4), np.int32), density=0.5)
    with pytest.raises(TypeError, match="dtype"):
        js.SparseWeights.from_dense(k, density=0.5, dtype=np.float64)


def test_is_a_pytree_with_static_layout():
    w = js.SparseWeights.from_dense(np.eye(40, dtype=np.float32) * 0.5, density=0.025)
    leaves, treedef = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 6
    w2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert w2.meta == w.meta and w2.nnz == w.nnz
    doubled = jax.tree_util.tree_map(lambda a: a * 2 if a.dtype == jnp.float32 else a, w)
    np.testing.assert_array_equal(np.asarray(doubled.to_dense()), 2 * np.asarray(w.to_dense()))


def test_density_keeps_the_largest_magnitudes():
    rng = np.random.default_rng(5)
    k = rng.standard_normal((50, 50)).astype(np.float32)
    m = js.SparseWeights.from_dense(k, density=0.2).mask()
    assert m.sum() == 500
    assert np.abs(k[m]).min() >= np.abs(k[~m]).max()


def test_packing_options_change_the_layout_not_the_result():
    # load_bytes and bank_aware are speed knobs (the ablation benchmark uses them): same weights,
    # same outputs, and the unordered layout never has fewer modelled bank conflicts.
    rng = np.random.default_rng(11)
    kernel = (rng.standard_normal((96, 96)) / np.sqrt(0.2 * 96)).astype(np.float32)
    mask = rng.random((96, 96)) < 0.2
    aware = js.SparseWeights.from_dense(kernel, mask)
    plain = js.SparseWeights.from_dense(kernel, mask, bank_aware=False)
    narrow = js.SparseWeights.from_dense(kernel, mask, load_bytes=4, bank_aware=False)
    for w in (plain, narrow):
        np.testing.assert_array_equal(np.asarray(w.to_dense()), kernel * mask)
    assert bank_conflicts(np.asarray(plain.indices), 16) >= bank_conflicts(np.asarray(aware.indices), 16)
    assert narrow.meta.load_bytes == 4
    x = jnp.asarray(rng.standard_normal((3, 7, 96)), jnp.float32)
    h0 = jnp.zeros((3, 96), jnp.float32)
    want = js.sparse_rnn(x, h0, aware)[0]
    for w in (plain, narrow):  # another summation order: float32 rounding only
        assert rel_err(js.sparse_rnn(x, h0, w)[0], want) < 1e-6


def test_unit_spans_by_hand():
    # H = 2, G = 2: unit 0 is rows 0 (lanes 0-2) and 2 (lanes 3-4); unit 1 is rows 1 (lane 5) and 3
    # (lanes 6-9); the rest of the warp is idle.
    lane_row = np.full(32, -1, np.int32)
    lane_row[:10] = [0, 0, 0, 2, 2, 1, 3, 3, 3, 3]
    np.testing.assert_array_equal(layout.unit_spans(lane_row, 2, gates=2), [5, 5])
    # the simple cell: a unit is its row
    np.testing.assert_array_equal(layout.unit_spans(lane_row, 4), [3, 1, 2, 4])


@pytest.mark.parametrize("gates, hidden, density", [(1, 77, 0.05), (1, 300, 0.1), (3, 64, 0.05),
                                                    (4, 130, 0.2), (3, 200, 0.3)])
def test_unit_spans_cover_every_used_lane_once(gates, hidden, density):
    """Every lane that serves a row belongs to exactly one unit's span, and a span holds at least
    one lane per gate (the kernel's cell lanes come from the spans)."""
    rng = np.random.default_rng(hidden)
    kernel = rng.standard_normal((hidden, gates * hidden)).astype(np.float32)
    w = js.SparseWeights.from_dense(kernel, density=density)
    spans = layout.unit_spans(np.asarray(w.lane_row), hidden, gates)
    assert spans.sum() == int((np.asarray(w.lane_row) >= 0).sum())
    assert spans.min() >= gates


@pytest.mark.parametrize("exchange", ["cluster", "grid"])
def test_a_layout_packed_for_one_exchange_computes_the_same_layer(exchange):
    # The layouts differ (CTAs, slots a lane), the layer they pack does not.
    rng = np.random.default_rng(41)
    H, B, T = 300, 3, 7
    kernel = rng.standard_normal((H, H)).astype(np.float32) / np.sqrt(0.1 * H)
    mask = rng.random((H, H)) < 0.1
    auto = js.SparseWeights.from_dense(kernel, mask, device=planner.H200)
    forced = js.SparseWeights.from_dense(kernel, mask, device=planner.H200, exchange=exchange)
    assert forced.meta.exchange == exchange and forced.meta.fits
    np.testing.assert_array_equal(np.asarray(forced.to_dense()), np.asarray(auto.to_dense()))
    x = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((B, H)), jnp.float32)
    y_auto, h_auto = js.sparse_rnn(x, h0, auto)
    y, h = js.sparse_rnn(x, h0, forced)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_auto), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_auto), rtol=1e-5, atol=1e-5)


def test_a_cluster_layout_that_cannot_be_had_is_an_error():
    kernel = np.ones((1024, 1024), np.float32)  # too wide for a cluster without one (128 CTAs)
    grid_only = dataclasses.replace(planner.H200, cluster_launch=False)
    with pytest.raises(ValueError, match=r"exchange='cluster'.*no cluster launch"):
        js.SparseWeights.from_dense(kernel, density=0.2, device=grid_only, exchange="cluster")
    with pytest.raises(ValueError, match="exchange must be one of"):
        js.SparseWeights.from_dense(kernel, density=0.2, exchange="l2")


def test_a_layout_planned_for_a_batch_computes_the_same_layer():
    # H=1024 at 10% in fp16: planned for B=1 the layer takes another cluster (16 CTAs, not 8);
    # the layer it packs, and what it computes, are the same.
    rng = np.random.default_rng(43)
    H, B, T = 1024, 3, 4
    kernel = (rng.standard_normal((H, H)) / np.sqrt(0.1 * H)).astype(np.float16)
    mask = rng.random((H, H)) < 0.1
    default = js.SparseWeights.from_dense(kernel, mask, device=planner.H200)
    hinted = js.SparseWeights.from_dense(kernel, mask, device=planner.H200, batch=1)
    assert (hinted.meta.num_ctas, hinted.meta.warps_per_cta) != (default.meta.num_ctas,
                                                                  default.meta.warps_per_cta)
    assert hinted.meta.reason.endswith("planned for batch 1") and "batch" not in default.meta.reason
    np.testing.assert_array_equal(np.asarray(hinted.to_dense()), np.asarray(default.to_dense()))
    x = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float16)
    h0 = jnp.asarray(rng.standard_normal((B, H)), jnp.float16)
    for a, b in zip(js.sparse_rnn(x, h0, hinted), js.sparse_rnn(x, h0, default)):
        assert rel_err(a, b) < 5e-4  # (fp16 outputs; the two layouts sum a row in other orders)
    with pytest.raises(ValueError, match=r"batch \(the batch to plan the layout for\)"):
        js.SparseWeights.from_dense(kernel, mask, batch=0)
    with pytest.raises(ValueError, match=r"batch \(the batch to plan the layout for\)"):
        js.SparseWeights.from_dense(kernel, mask, matvec="tiles", batch=-1)


def test_a_cluster_layout_with_ctas_without_rows_is_refused():
    # A plan of more CTAs than the pattern's warps (possible only with a hand-made plan: the planner
    # plans for the pattern) would leave a CTA without units in cluster mode, where nothing waits for
    # it and its peers' pushes could run phases ahead of its reads (docs/design.md).
    rng = np.random.default_rng(0)
    keys = np.unique(np.repeat(np.arange(64), 4) * 64 + rng.integers(0, 64, 256))
    rows, cols = keys // 64, keys % 64
    plan = planner.plan_layout(np.bincount(rows, minlength=64), np.float16)
    used = plan.num_warps
    assert layout.pack_pattern(rows, cols, plan).meta.num_ctas == plan.num_ctas
    too_many = dataclasses.replace(plan, num_warps=planner.MAX_CLUSTER_CTAS * plan.warps_per_cta)
    assert used < too_many.num_ctas <= planner.MAX_CLUSTER_CTAS
    with pytest.raises(ValueError, match=f"the plan has {planner.MAX_CLUSTER_CTAS} CTAs but this pattern's "
                                         f"rows fill only {used} warps"):
        layout.pack_pattern(rows, cols, too_many)
    # Past the cluster size the layout runs in grid mode, where a CTA without rows skips the steps.
    grid = dataclasses.replace(plan, num_warps=(planner.MAX_CLUSTER_CTAS + 1) * plan.warps_per_cta)
    assert layout.pack_pattern(rows, cols, grid).meta.num_ctas == planner.MAX_CLUSTER_CTAS + 1
