"""GPU tests of tile layouts on tensor cores (docs/format.md, "Tile layouts"; issue 15, item 3): the
16-bit forward recurrences of a tile layout (``SparseWeights.from_dense(..., matvec="tiles")``)
against XLA's dense path of the same math, in both 16-bit dtypes, odd shapes and batches, both
exchange modes, reversed and ragged; the gradient through them; a bidirectional layer of two tile
layouts in one launch; a corrupted tile layout and a forced timeout (NaN outputs and a reported
error, never a wrong number); the variants' attributes. Skipped without a GPU and the CUDA module."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native, fallback, planner
from jax_sprnn.primitives import sprnn_forward_p
from jax_sprnn.testing import (GRAD_TOLERANCE, TOLERANCE, make_gated_problem, make_problem,
                               random_lengths, rel_err, run_gated)

pytestmark = pytest.mark.gpu

DTYPES = ["float16", "bfloat16"]


@pytest.fixture(autouse=True)
def _needs_the_kernels():
    if _constants.ffi_target("forward") not in _native.cuda_targets() or jax.default_backend() != "gpu":
        pytest.skip("needs a GPU and the CUDA module")


def _modes(meta, batch):
    """The exchange modes that run this layout and batch: grid mode where one staged copy of the
    whole batch fits (else the handler refuses it), cluster mode where the device has clusters."""
    spec = _native.current_device_spec()
    grid_only = dataclasses.replace(spec, cluster_launch=False)
    grid = batch <= planner.max_persistent_batch(meta, jnp.float16, grid_only)
    cluster = meta.exchange == "cluster" and spec.cluster_launch
    return ["grid"] * grid + ["cluster"] * cluster


def _simple(w, x, h0, lengths, reverse, **hooks):
    x_tm = jnp.swapaxes(x, 0, 1)
    return sprnn_forward_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths, activation="tanh",
                                reverse=reverse, meta=w.meta, method="native", **hooks)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, batch, density", [(16, 1, 1.0), (64, 3, 0.5), (256, 8, 0.1),
                                                    (272, 13, 0.1), (1024, 32, 0.1), (512, 5, 0.3)])
def test_the_simple_cell_on_tensor_cores_matches_xla(dtype, hidden, batch, density):
    steps = 11
    dense, w, x, h0 = make_problem(hidden + batch, hidden, batch, steps, density, dtype,
                                   matvec="tiles")
    assert w.meta.tiles and w.meta.fits, w.meta.reason
    assert batch <= planner.max_persistent_batch(w.meta, w.dtype, _native.current_device_spec())
    lengths = random_lengths(batch, steps, hidden)
    for reverse in (False, True):
        y_ref, h_ref = fallback.forward(jnp.swapaxes(x, 0, 1), h0, w.values, w.indices, w.lane_row,
                                        lengths, activation="tanh", reverse=reverse, meta=w.meta)
        for mode in _modes(w.meta, batch):
            y, h = _simple(w, x, h0, lengths, reverse, exchange_mode=mode)
            assert rel_err(y, y_ref) < TOLERANCE[dtype], (mode, reverse)
            assert rel_err(h, h_ref) < TOLERANCE[dtype], (mode, reverse)


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, batch", [(48, 3), (256, 8), (512, 13), (1024, 32)])
def test_the_gated_cells_on_tensor_cores_match_xla(gates, dtype, hidden, batch):
    steps = 9
    w, x, c0, h0, hn_bias = make_gated_problem(hidden + gates, gates, hidden, batch, steps, 0.1, dtype,
                                               matvec="tiles")
    assert w.meta.tiles and w.meta.fits, w.meta.reason
    assert batch <= planner.max_persistent_batch(w.meta, w.dtype, _native.current_device_spec())
    lengths = random_lengths(batch, steps, hidden)
    for reverse in (False, True):
        want = run_gated(gates, x, c0, h0, w, hn_bias, seq_lengths=lengths, reverse=reverse,
                         method="reference")
        got = jax.jit(lambda *a, reverse=reverse: run_gated(gates, *a, seq_lengths=lengths,
                                                            reverse=reverse, method="native"))(
            x, c0, h0, w, hn_bias)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert rel_err(a, b) < TOLERANCE[dtype]


@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_the_gradient_through_a_tile_layout_matches_the_reference(cell):
    hidden, batch, steps = 256, 8, 12
    if cell == "simple":
        _, w, x, h0 = make_problem(3, hidden, batch, steps, 0.2, "float16", matvec="tiles")

        def loss(x, values, method):
            y, h = js.sparse_rnn(x, h0, w.replace(values=values), method=method)
            return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h.astype(jnp.float32))
    else:
        gates = 4 if cell == "lstm" else 3
        w, x, c0, h0, hn_bias = make_gated_problem(3, gates, hidden, batch, steps, 0.2, "float16",
                                                   matvec="tiles")

        def loss(x, values, method):
            out = run_gated(gates, x, c0, h0, w.replace(values=values), hn_bias, method=method)
            return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in out)
    got = jax.jit(jax.grad(lambda x, v: loss(x, v, "native"), argnums=(0, 1)))(x, w.values)
    want = jax.grad(lambda x, v: loss(x, v, "reference"), argnums=(0, 1))(x, w.values)
    for a, b in zip(got, want):
        assert rel_err(a, b) < GRAD_TOLERANCE["float16"]


@pytest.mark.parametrize("batch", [1, 8, 21])
def test_a_bidirectional_layer_of_tile_layouts_equals_two_calls(batch):
    """Two tile layouts of one size always share their meta, so a bidirectional layer runs both
    directions in one stacked launch: the same arithmetic as two calls, so the same bits."""
    steps, hidden = 14, 256
    (_, w_f, x_f, h_f) = make_problem(1, hidden, batch, steps, 0.1, "float16", matvec="tiles")
    (_, w_b, x_b, h_b) = make_problem(2, hidden, batch, steps, 0.1, "float16", matvec="tiles")
    assert w_f.meta == w_b.meta
    lengths = random_lengths(batch, steps, batch)
    y, (hf, hb) = js.sparse_rnn_bidirectional((x_f, x_b), (h_f, h_b), (w_f, w_b), seq_lengths=lengths,
                                              method="native")
    yf, hf1 = js.sparse_rnn(x_f, h_f, w_f, seq_lengths=lengths, method="native")
    yb, hb1 = js.sparse_rnn(x_b, h_b, w_b, seq_lengths=lengths, reverse=True, method="native")
    for a, b in ((y, jnp.concatenate([yf, yb], axis=-1)), (hf, hf1), (hb, hb1)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_a_corrupted_tile_layout_gives_nan_and_an_error():
    """A slot that does not hold its own column breaks the tile layout: the kernel flags it, fills
    the outputs with NaN, and the next call reports the layout error."""
    _, w, x, h0 = make_problem(7, 64, 2, 5, 0.5, "float16", matvec="tiles")
    idx = np.asarray(w.indices).copy()
    idx[5 * 32 + 3] = 6  # slot 5 of lane 3 claims column 6
    bad = w.replace(indices=jnp.asarray(idx))
    lengths = jnp.full((2,), 5, jnp.int32)
    y, h = _simple(bad, x, h0, lengths, False)
    assert np.all(np.isnan(np.asarray(y, np.float32))) and np.all(np.isnan(np.asarray(h, np.float32)))
    with pytest.raises(Exception, match="invalid packed layout"):
        jax.block_until_ready(js.sparse_rnn(x, h0, w, method="native"))
    y, _ = _simple(w, x, h0, lengths, False)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("mode", ["grid", "cluster"])
def test_a_forced_timeout_inside_a_tile_launch_is_reported(mode):
    _, w, x, h0 = make_problem(4, 256, 3, 16, 0.1, "float16", matvec="tiles")
    if mode not in _modes(w.meta, 3):
        pytest.skip("no cluster mode for this layout or device")
    lengths = jnp.full((3,), 16, jnp.int32)
    y, h = _simple(w, x, h0, lengths, False, spin_timeout_us=2000, debug_stall_cta=0, exchange_mode=mode)
    assert np.all(np.isnan(np.asarray(y, np.float32))) and np.all(np.isnan(np.asarray(h, np.float32)))
    with pytest.raises(Exception, match="timed out"):
        jax.block_until_ready(js.sparse_rnn(x, h0, w, method="native"))


@pytest.mark.parametrize("gates", [1, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tile_variant_is_built_and_fits_its_launch_bound(gates, dtype):
    cuda = _native.cuda_module()
    tiers = _constants.TILE_REG_SLOTS_16 if gates == 1 else _constants.TILE_REG_SLOTS_GATED_16
    for rs in tiers:
        for planes in (1, 2):
            attrs = cuda.kernel_attributes(dtype, 4, rs, gates=gates, planes_per_pass=planes, tiles=True)
            assert attrs["max_threads_per_block"] >= 256 and attrs["num_regs"] <= 255
    with pytest.raises(Exception, match="no tile-layout"):
        cuda.kernel_attributes(dtype, 2, tiers[0], gates=gates, tiles=True)
