"""GPU-only tests of the gated cells' persistent forward kernels (issue 17): ``sparse_lstm`` and
``sparse_gru`` with ``method="native"`` against XLA's dense path of the same math, in every dtype,
tile, register tier, exchange mode and length pattern; gradients through the custom_vjp; vmap; the
layout checks; the kernels' register spills. Skipped without a GPU and the CUDA module."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native, fallback, layout, planner
from jax_sprnn.primitives import sprnn_gru_p, sprnn_lstm_p
from jax_sprnn.testing import (GRAD_TOLERANCE, TOLERANCE, make_gated_problem, random_lengths, rel_err,
                               transpose_ops)

pytestmark = pytest.mark.gpu

GATED_FORWARD = _constants.ffi_target("gated_forward")


@pytest.fixture(autouse=True)
def _needs_the_gated_kernel():
    if GATED_FORWARD not in _native.cuda_targets() or jax.default_backend() != "gpu":
        pytest.skip("needs a GPU and the CUDA module with the gated kernels")


def problem(gates, hidden, batch, steps, density, dtype, seed, device=None, load_bytes=None):
    """``(weights, x [B, T, G*H], c0, h0, hn_bias)`` with a recurrence in a moderate range."""
    return make_gated_problem(seed, gates, hidden, batch, steps, density, dtype, device=device,
                              load_bytes=load_bytes)


def bind(gates, w, x, c0, h0, hn_bias, lengths, *, reverse=False, method="native", **hooks):
    """The primitive on time-major x: ``(y_tm, [final states])``."""
    x_tm = jnp.swapaxes(x, 0, 1)
    params = dict(reverse=reverse, meta=w.meta, method=method, **hooks)
    if gates == 4:
        y, h, c = sprnn_lstm_p.bind(x_tm, h0, c0, w.values, w.indices, w.lane_row, lengths, **params)
        return y, [c, h]
    y, h = sprnn_gru_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths, hn_bias, **params)
    return y, [h]


def xla_path(gates, w, x, c0, h0, hn_bias, lengths, *, reverse=False):
    """XLA's dense path of the same math (16-bit products exact, float32 sums)."""
    x_tm = jnp.swapaxes(x, 0, 1)
    if gates == 4:
        y, h, c, _ = jax.jit(functools.partial(fallback.lstm_forward, reverse=reverse, meta=w.meta))(
            x_tm, h0, c0, w.values, w.indices, w.lane_row, lengths)
        return y, [c, h]
    y, h = jax.jit(functools.partial(fallback.gru_forward, reverse=reverse, meta=w.meta))(
        x_tm, h0, w.values, w.indices, w.lane_row, lengths, hn_bias)
    return y, [h]


def assert_close(got, want, dtype):
    y, states = got
    y_ref, states_ref = want
    assert rel_err(y, y_ref) < TOLERANCE[dtype]
    for s, s_ref in zip(states, states_ref):
        assert rel_err(s, s_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("hidden, batch, density", [(37, 3, 0.3), (256, 1, 0.1), (300, 5, 0.1),
                                                    (1024, 9, 0.1), (200, 37, 0.2)])
def test_native_matches_xla_dense_path(gates, dtype, hidden, batch, density):
    steps = 13
    w, x, c0, h0, b = problem(gates, hidden, batch, steps, density, dtype, seed=hidden + batch)
    assert w.meta.fits, w.meta.reason
    lengths = random_lengths(batch, steps, batch)
    for reverse in (False, True):
        got = jax.jit(lambda *a, reverse=reverse: bind(gates, w, *a, lengths, reverse=reverse))(
            x, c0, h0, b)
        assert_close(got, xla_path(gates, w, x, c0, h0, b, lengths, reverse=reverse), dtype)


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("load_bytes", [4, 8, 16])
@pytest.mark.parametrize("n_ctas", [1, 3, 16, 40])
def test_grid_and_cluster_modes_agree_bitwise(gates, load_bytes, n_ctas):
    """A layout planned for n_ctas SMs runs in grid mode and (up to 16 CTAs) in cluster mode: the
    same arithmetic, so the same bits; both match XLA's path."""
    device = dataclasses.replace(planner.H200, sm_count=n_ctas, cluster_launch=False)
    hidden = {1: 128, 3: 256}.get(n_ctas, 512)  # what fits on so few SMs at 10%
    w, x, c0, h0, b = problem(gates, hidden, 6, 11, 0.1, "float16", seed=n_ctas, device=device,
                              load_bytes=load_bytes)
    assert w.meta.fits and w.meta.num_ctas <= n_ctas, w.meta
    lengths = random_lengths(6, 11, n_ctas)
    grid = bind(gates, w, x, c0, h0, b, lengths, exchange_mode="grid")
    assert_close(grid, xla_path(gates, w, x, c0, h0, b, lengths), "float16")
    if w.meta.num_ctas <= _constants.MAX_CLUSTER_CTAS and _native.current_device_spec().cluster_launch:
        cluster = bind(gates, w, x, c0, h0, b, lengths, exchange_mode="cluster")
        for a, c in zip(jax.tree_util.tree_leaves(grid), jax.tree_util.tree_leaves(cluster)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))


@pytest.mark.parametrize("exchange_mode", ["grid", "cluster"])
def test_units_narrower_than_the_tile_take_rounds(exchange_mode):
    """A GRU unit whose three gate runs hold fewer lanes than the batch tile runs its cell in two
    rounds of cell lanes (layout.unit_spans); B = 6 adds a partial plane."""
    w, x, c0, h0, b = problem(3, 64, 6, 9, 0.03, "float16", seed=11, load_bytes=16)
    tile = w.meta.load_bytes // 4
    assert layout.unit_spans(np.asarray(w.lane_row), 64, 3).min() < tile
    if exchange_mode == "cluster" and not (w.meta.num_ctas <= _constants.MAX_CLUSTER_CTAS
                                           and _native.current_device_spec().cluster_launch):
        pytest.skip("this layout or device has no cluster mode")
    lengths = random_lengths(6, 9, 3)
    for reverse in (False, True):
        got = bind(3, w, x, c0, h0, b, lengths, reverse=reverse, exchange_mode=exchange_mode)
        assert_close(got, xla_path(3, w, x, c0, h0, b, lengths, reverse=reverse), "float16")


def assert_same_nonfinite(got, want, dtype):
    """Equal NaN, +Inf and -Inf positions, and the finite rest within the dtype's tolerance."""
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for kind in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(kind(a), kind(b), err_msg=kind.__name__)
        finite = np.isfinite(b)
        assert rel_err(a[finite], b[finite]) < TOLERANCE[dtype]


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("exchange_mode", ["grid", "cluster"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_nonfinite_state_propagates_as_on_the_xla_path(gates, exchange_mode, bad):
    """An Inf or NaN in h0 reaches the gate sums as in the dense product (a pruned 0 times Inf is
    NaN): the kernel's non-finite phases count them (docs/reliability.md), in both exchange modes."""
    w, x, c0, h0, b = problem(gates, 200, 5, 7, 0.1, "float16", seed=int(gates + np.isnan(bad)))
    if exchange_mode == "cluster" and not (w.meta.num_ctas <= _constants.MAX_CLUSTER_CTAS
                                           and _native.current_device_spec().cluster_launch):
        pytest.skip("this layout or device has no cluster mode")
    h0 = h0.at[1, 7].set(bad).at[3, 0].set(bad).at[3, 11].set(-bad)
    lengths = jnp.asarray([7, 7, 0, 4, 6], jnp.int32)
    got = bind(gates, w, x, c0, h0, b, lengths, exchange_mode=exchange_mode)
    want = xla_path(gates, w, x, c0, h0, b, lengths)
    assert_same_nonfinite(got, want, "float16")
    assert np.isnan(np.asarray(got[0], np.float32)).any()  # the rule did reach the outputs
    assert np.isfinite(np.asarray(got[0], np.float32)[:, 0]).all()  # and spared example 0


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_register_tier_runs(gates, dtype):
    """Layouts of growing slots per lane reach every instantiated register tier."""
    tiers = _constants.REG_SLOTS_GATED_32 if dtype == "float32" else _constants.REG_SLOTS_GATED_16
    seen = set()
    for hidden, density in [(64, 0.05), (256, 0.2), (512, 0.3), (768, 0.5), (1024, 0.6)]:
        w, x, c0, h0, b = problem(gates, hidden, 2, 7, density, dtype, seed=hidden)
        if not w.meta.fits:
            continue
        seen.add(w.meta.reg_slots)
        lengths = jnp.asarray([7, 5], jnp.int32)
        assert_close(bind(gates, w, x, c0, h0, b, lengths), xla_path(gates, w, x, c0, h0, b, lengths),
                     dtype)
    assert len(seen) >= 2, (seen, tiers)


def test_no_step_returns_the_initial_carry():
    for gates in (4, 3):
        w, x, c0, h0, b = problem(gates, 96, 3, 5, 0.2, "float16", seed=gates)
        y, states = bind(gates, w, x, c0, h0, b, jnp.zeros((3,), jnp.int32))
        assert not np.asarray(y, np.float32).any()
        want = [c0, h0] if gates == 4 else [h0]
        for s, s0 in zip(states, want):
            np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s0, np.float32))


@pytest.mark.parametrize("gates", [4, 3])
def test_gradients_through_the_native_forward(gates):
    dtype = "float32"
    w, x, c0, h0, b = problem(gates, 130, 3, 9, 0.2, dtype, seed=7)
    lengths = [9, 4, 7]

    def loss(x, c0, h0, w, b, method):
        if gates == 4:
            y, (c, h) = js.sparse_lstm(x, (c0, h0), w, seq_lengths=lengths, method=method)
            return jnp.sum(y ** 2) + jnp.sum(c * h)
        y, h = js.sparse_gru(x, h0, w, hn_bias=b, seq_lengths=lengths, method=method)
        return jnp.sum(y ** 2) + jnp.sum(h)

    args = (x, c0, h0, w, b)
    v_native, g_native = js.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args, "native")
    v_ref, g_ref = js.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args, "reference")
    assert abs(float(v_native) - float(v_ref)) < 1e-4 * abs(float(v_ref))
    for name, got, want in zip(("x", "c0", "h0", "values", "hn_bias"), g_native, g_ref):
        if name == "values":
            got, want = got.values, want.values
        if (gates == 4 and name == "hn_bias") or (gates == 3 and name == "c0"):
            continue
        assert rel_err(got, want) < GRAD_TOLERANCE[dtype], name


def test_vmap_folds_into_the_batch():
    w, x, c0, h0, _ = problem(4, 160, 6, 8, 0.2, "bfloat16", seed=3)
    xs, c0s, h0s = (a.reshape((2, 3) + a.shape[1:]) for a in (x, c0, h0))
    run = lambda x, c, h: js.sparse_lstm(x, (c, h), w, method="native")  # noqa: E731
    y_v, (c_v, h_v) = jax.vmap(run)(xs, c0s, h0s)
    y, (c, h) = run(x, c0, h0)
    for a, b in ((y_v, y), (c_v, c), (h_v, h)):
        np.testing.assert_array_equal(np.asarray(a.reshape(b.shape), np.float32),
                                      np.asarray(b, np.float32))


def test_a_bad_layout_gives_nan_and_a_deferred_error():
    """An out-of-range column: the kernel clamps it, reports it, and the outputs are NaN."""
    w, x, c0, h0, _ = problem(4, 64, 2, 5, 0.2, "float16", seed=11)
    bad = w.replace(indices=w.indices.at[0].set(10_000))
    y, (c, h) = js.sparse_lstm(x, (c0, h0), bad, method="native")
    for out in (y, c, h):
        assert np.isnan(np.asarray(out, np.float32)).all()
    with pytest.raises(Exception, match="invalid packed layout"):  # at the next call
        jax.block_until_ready(js.sparse_lstm(x, (c0, h0), w, method="native"))
    y, _ = js.sparse_lstm(x, (c0, h0), w, method="native")
    assert np.isfinite(np.asarray(y, np.float32)).all()


def test_a_unit_whose_gates_are_out_of_order_is_a_layout_error():
    """Invariant 5: a unit's gate rows on adjacent runs in gate order. Swapping two gate rows'
    lanes breaks it; the kernel must not mix the gates up silently."""
    w, x, c0, h0, _ = problem(4, 64, 2, 5, 0.2, "float16", seed=12)
    lane_row = np.asarray(w.lane_row)
    H = 64
    lanes_g0 = np.flatnonzero(lane_row == 0)
    lanes_g1 = np.flatnonzero(lane_row == H)
    swapped = lane_row.copy()
    swapped[lanes_g0[0]], swapped[lanes_g1[0]] = H, 0
    bad = w.replace(lane_row=jnp.asarray(swapped))
    y, _ = js.sparse_lstm(x, (c0, h0), bad, method="native")
    assert np.isnan(np.asarray(y, np.float32)).all()
    with pytest.raises(Exception, match="invalid packed layout"):
        jax.block_until_ready(js.sparse_lstm(x, (c0, h0), w, method="native"))


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("exchange_mode", ["grid", "cluster"])
def test_a_batch_major_call_runs_without_transposes_and_matches(gates, exchange_mode):
    # As the simple cell's (test_cuda.py): batch_major, x and y are [B, T, .] in memory, the kernel
    # indexes them so, and the API's swapaxes become bitcasts. The same bits as the time-major call
    # (ragged, reverse), in either exchange mode.
    w, x, c0, h0, hn_bias = problem(gates, 200, 6, 9, 0.1, "float16", seed=43)
    if exchange_mode == "cluster" and not (w.meta.num_ctas <= _constants.MAX_CLUSTER_CTAS
                                           and _native.current_device_spec().cluster_launch):
        pytest.skip("this layout or device has no cluster mode")
    lengths = random_lengths(6, 9, 43)

    def call(x, c0, h0, batch_major):
        y, states = bind(gates, w, x, c0, h0, hn_bias, lengths, reverse=True, batch_major=batch_major,
                         exchange_mode=exchange_mode)
        return jnp.swapaxes(y, 0, 1), states
    batch_major = jax.jit(lambda x, c0, h0: call(x, c0, h0, True))
    time_major = jax.jit(lambda x, c0, h0: call(x, c0, h0, False))
    got, want = batch_major(x, c0, h0), time_major(x, c0, h0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert transpose_ops(batch_major.lower(x, c0, h0).compile().as_text()) == []
    assert transpose_ops(time_major.lower(x, c0, h0).compile().as_text()) != []  # what the layout saves
    # The public functions take that path for [B, T, .] arrays (their default).
    public = jax.jit(lambda x, c0, h0: (js.sparse_lstm(x, (c0, h0), w, method="native") if gates == 4
                                        else js.sparse_gru(x, h0, w, hn_bias=hn_bias, method="native")))
    assert transpose_ops(public.lower(x, c0, h0).compile().as_text()) == []


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_register_spills_stay_small(gates, dtype):
    cuda = _native.cuda_module()
    for reg_slots in cuda.supported_reg_slots(dtype, gates):
        for tile, planes in ((1, 1), (2, 1), (4, 1), (4, 2)):  # (4, 2): the two-plane variant
            attrs = cuda.kernel_attributes(dtype, tile, reg_slots, gates=gates, planes_per_pass=planes)
            # On the H200 (nvcc 13.0, 2026-12-03): one plane up to 16 bytes; two planes up to 32,
            # in the fp32 LSTM's RS=0 wide tier (96 registers), 8 more since the kernels end the
            # call out of line (finish_call). Inlining it saves those 8 and costs 8 in 24 of the
            # simple cell's 16-bit tiers, so it stays out of line (docs/design.md).
            assert attrs["local_bytes"] <= (16 if planes == 1 else 32), (reg_slots, tile, planes, attrs)


@pytest.mark.parametrize("exchange_mode", ["grid", "cluster"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_lstm_kernel_saves_its_cells(exchange_mode, dtype):
    """The LSTM kernel writes its cell state after each position where asked
    (``sprnn_lstm_with_cells``): the XLA path's cells, zero past each end, c_final at the last
    position, and the plain call's other results bit for bit."""
    from jax_sprnn.primitives import sprnn_lstm_with_cells_p
    w, x, c0, h0, _ = problem(4, 200, 6, 9, 0.1, dtype, seed=23)
    if exchange_mode == "cluster" and not (w.meta.num_ctas <= _constants.MAX_CLUSTER_CTAS
                                           and _native.current_device_spec().cluster_launch):
        pytest.skip("this layout or device has no cluster mode")
    lengths = random_lengths(6, 9, 23)
    x_tm = jnp.swapaxes(x, 0, 1)
    for reverse in (False, True):
        params = dict(reverse=reverse, meta=w.meta, method="native", exchange_mode=exchange_mode)
        y, h, c, cells = sprnn_lstm_with_cells_p.bind(x_tm, h0, c0, w.values, w.indices, w.lane_row,
                                                      lengths, **params)
        plain = bind(4, w, x, c0, h0, None, lengths, reverse=reverse, exchange_mode=exchange_mode)
        for a, b in zip((y, c, h), (plain[0], *plain[1])):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        want = jax.jit(functools.partial(fallback.lstm_forward, reverse=reverse, meta=w.meta))(
            x_tm, h0, c0, w.values, w.indices, w.lane_row, lengths)[3]
        assert rel_err(cells, want) < TOLERANCE[dtype]
        cells = np.asarray(cells, np.float32)
        for b, L in enumerate(np.asarray(lengths)):
            assert not cells[L:, b].any()
            if L:
                np.testing.assert_array_equal(cells[0 if reverse else L - 1, b], np.asarray(c, np.float32)[b])
