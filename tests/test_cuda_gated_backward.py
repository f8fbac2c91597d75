"""GPU-only tests of the gated cells' persistent backward kernels (issue 17): the backward primitives
(``sprnn_lstm_backward`` / ``sprnn_gru_backward``) on the CUDA target against their XLA scan, in
every dtype, tile, register tier, exchange mode and length pattern; non-finite cotangents; the
layout checks; gradients of ``sparse_lstm`` / ``sparse_gru`` through the kernel; register spills.
Skipped without a GPU and the CUDA module."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native, layout, planner
from jax_sprnn.testing import (GRAD_TOLERANCE, gated_backward_problem, make_gated_problem, rel_err,
                               run_gated_backward)

pytestmark = pytest.mark.gpu

GATED_BACKWARD = _constants.ffi_target("gated_backward")


@pytest.fixture(autouse=True)
def _needs_the_gated_backward_kernel():
    if GATED_BACKWARD not in _native.cuda_targets() or jax.default_backend() != "gpu":
        pytest.skip("needs a GPU and the CUDA module with the gated backward kernels")


def native(gates, w, kernel, ops, lengths, **hooks):
    return jax.jit(lambda: run_gated_backward(gates, w, kernel, ops, lengths, method="native",
                                              **hooks))()


def xla_scan(gates, w, kernel, ops, lengths):
    return jax.jit(lambda: run_gated_backward(gates, w, kernel, ops, lengths, xla=True))()


def assert_close(got, want, dtype):
    assert len(got) == len(want)
    for name, a, b in zip(("dx", "du", "dh0", "dc0"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) < GRAD_TOLERANCE[dtype], name


def has_cluster_mode(meta) -> bool:
    return meta.num_ctas <= _constants.MAX_CLUSTER_CTAS and _native.current_device_spec().cluster_launch


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("hidden, batch, density", [(37, 3, 0.3), (256, 1, 0.1), (300, 5, 0.1),
                                                    (1024, 9, 0.1), (200, 37, 0.2)])
def test_native_matches_the_xla_scan(gates, dtype, hidden, batch, density):
    steps = 11
    w, kernel, ops, lengths = gated_backward_problem(hidden + batch, gates, hidden, batch, steps,
                                                     density, dtype)
    assert w.meta_t.fits, w.meta_t.reason
    got = native(gates, w, kernel, ops, lengths)
    assert_close(got, xla_scan(gates, w, kernel, ops, lengths), dtype)
    idle = np.arange(steps)[:, None] >= np.asarray(lengths)[None, :]
    for a in got[:2]:  # dx, du: exact zeros where an example does not run
        assert not np.asarray(a, np.float32)[idle].any()


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("load_bytes", [4, 8, 16])
@pytest.mark.parametrize("n_ctas", [1, 3, 16, 40])
def test_grid_and_cluster_modes_agree_bitwise(gates, load_bytes, n_ctas):
    """A transposed layout planned for n_ctas SMs runs in grid mode and (up to 16 CTAs) in cluster
    mode: the same arithmetic, so the same bits; both match the XLA scan."""
    device = dataclasses.replace(planner.H200, sm_count=n_ctas, cluster_launch=False)
    hidden = {1: 96, 3: 200}.get(n_ctas, 400)  # what fits on so few SMs at 10%
    w, kernel, ops, lengths = gated_backward_problem(n_ctas, gates, hidden, 6, 9, 0.1, "float16",
                                                     device=device, load_bytes=load_bytes)
    assert w.meta_t.fits and w.meta_t.num_ctas <= n_ctas, w.meta_t
    grid = native(gates, w, kernel, ops, lengths, exchange_mode="grid")
    assert_close(grid, xla_scan(gates, w, kernel, ops, lengths), "float16")
    if has_cluster_mode(w.meta_t):
        cluster = native(gates, w, kernel, ops, lengths, exchange_mode="cluster")
        for a, c in zip(grid, cluster):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))


@pytest.mark.parametrize("exchange_mode", ["grid", "cluster"])
def test_units_narrower_than_the_tile_take_rounds(exchange_mode):
    """Units whose row holds fewer lanes than the batch tile run their cells in rounds; B = 6 adds
    a partial plane."""
    w, kernel, ops, lengths = gated_backward_problem(11, 3, 64, 6, 9, 0.02, "float16", load_bytes=16)
    spans = layout.unit_spans(np.asarray(w.lane_row_t), 64, 1)
    assert spans.min() < w.meta_t.load_bytes // 4, spans
    if exchange_mode == "cluster" and not has_cluster_mode(w.meta_t):
        pytest.skip("this layout or device has no cluster mode")
    got = native(3, w, kernel, ops, lengths, exchange_mode=exchange_mode)
    assert_close(got, xla_scan(3, w, kernel, ops, lengths), "float16")


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("exchange_mode", ["grid", "cluster"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_nonfinite_cotangent_propagates_as_in_the_xla_scan(gates, exchange_mode, bad):
    """An Inf or NaN in dy reaches du, whose product with U^T counts it as the dense product does
    (a pruned 0 times Inf is NaN): the same NaN and Inf positions as the XLA scan."""
    w, kernel, ops, lengths = gated_backward_problem(gates, gates, 200, 5, 7, 0.1, "float16")
    if exchange_mode == "cluster" and not has_cluster_mode(w.meta_t):
        pytest.skip("this layout or device has no cluster mode")
    dy_at = 4 if gates == 4 else 3
    dy = ops[dy_at].at[5, 0, 7].set(bad)  # example 0 runs every step
    ops = (*ops[:dy_at], dy, *ops[dy_at + 1:])
    got = native(gates, w, kernel, ops, lengths, exchange_mode=exchange_mode)
    want = xla_scan(gates, w, kernel, ops, lengths)
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for kind in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(kind(a), kind(b), err_msg=kind.__name__)
        finite = np.isfinite(b)
        assert rel_err(a[finite], b[finite]) < GRAD_TOLERANCE["float16"]
    assert not np.isfinite(np.asarray(got[2], np.float32)[0]).all()  # it reached dh0 of example 0


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_register_tier_runs(gates, dtype):
    """Transposed layouts of growing slots per lane reach several instantiated register tiers."""
    seen = set()
    for hidden, density in [(64, 0.05), (256, 0.2), (512, 0.3), (768, 0.5), (1024, 0.6)]:
        w, kernel, ops, lengths = gated_backward_problem(hidden, gates, hidden, 2, 5, density, dtype)
        if not w.meta_t.fits:
            continue
        seen.add(w.meta_t.reg_slots)
        assert_close(native(gates, w, kernel, ops, lengths), xla_scan(gates, w, kernel, ops, lengths),
                     dtype)
    assert len(seen) >= 2, seen


def test_no_step_gives_the_final_cotangents_back():
    for gates in (4, 3):
        w, kernel, ops, lengths = gated_backward_problem(gates, gates, 96, 3, 5, 0.2, "float16")
        got = native(gates, w, kernel, ops, jnp.zeros((3,), jnp.int32))
        assert not np.asarray(got[0], np.float32).any() and not np.asarray(got[1]).any()
        finals = (ops[5], ops[6]) if gates == 4 else (ops[4],)  # dh_final (, dc_final)
        for out, final in zip(got[2:], finals):
            np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(final, np.float32))


def test_a_bad_layout_gives_nan_and_a_deferred_error():
    """An out-of-range column of the transposed layout: the kernel clamps it, reports it, and every
    output is NaN; the next call raises."""
    w, kernel, ops, lengths = gated_backward_problem(5, 4, 64, 2, 5, 0.2, "float16")
    bad = w.replace(indices_t=w.indices_t.at[0].set(10_000))
    for out in native(4, bad, kernel, ops, lengths):
        assert np.isnan(np.asarray(out, np.float32)).all()
    with pytest.raises(Exception, match="invalid packed layout"):
        jax.block_until_ready(native(4, w, kernel, ops, lengths))
    assert np.isfinite(np.asarray(native(4, w, kernel, ops, lengths)[0], np.float32)).all()


@pytest.mark.parametrize("gates", [4, 3])
def test_gradients_run_the_backward_kernel(gates):
    """jax.grad of sparse_lstm / sparse_gru with method="native" lowers the CUDA backward target
    and matches the reference path's gradients."""
    dtype = "float32"
    w, x, c0, h0, b = make_gated_problem(17, gates, 150, 4, 12, 0.15, dtype)
    lengths = [12, 5, 0, 9]

    def loss(x, c0, h0, w, b, method):
        if gates == 4:
            y, (c, h) = js.sparse_lstm(x, (c0, h0), w, seq_lengths=lengths, method=method,
                                       reverse=True)
            return jnp.sum(y ** 2) + jnp.sum(c * h)
        y, h = js.sparse_gru(x, h0, w, hn_bias=b, seq_lengths=lengths, method=method, reverse=True)
        return jnp.sum(y ** 2) + jnp.sum(h)

    grad = jax.jit(js.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), static_argnums=5)
    assert GATED_BACKWARD in grad.lower(x, c0, h0, w, b, "native").as_text()
    v_native, g_native = grad(x, c0, h0, w, b, "native")
    v_ref, g_ref = grad(x, c0, h0, w, b, "reference")
    assert abs(float(v_native) - float(v_ref)) < 1e-4 * abs(float(v_ref))
    for name, got, want in zip(("x", "c0", "h0", "values", "hn_bias"), g_native, g_ref):
        if (gates == 4 and name == "hn_bias") or (gates == 3 and name == "c0"):
            continue
        if name == "values":
            got, want = got.values, want.values
        assert rel_err(got, want) < GRAD_TOLERANCE[dtype], name


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_register_spills_stay_small(gates, dtype):
    cuda = _native.cuda_module()
    for reg_slots in cuda.supported_reg_slots(dtype, gates):
        for tile in (1, 2, 4):
            attrs = cuda.kernel_attributes(dtype, tile, reg_slots, gates=gates, backward=True)
            assert attrs["local_bytes"] <= 48, (reg_slots, tile, attrs)
        # The two-plane variant: its 8 accumulators and 8 cells' carries spill up to 88 bytes
        # (fp32; nvcc 13.0, sm_90).
        attrs = cuda.kernel_attributes(dtype, 4, reg_slots, gates=gates, backward=True,
                                       planes_per_pass=2)
        assert attrs["local_bytes"] <= 88, (reg_slots, attrs)
