"""GPU-only tests of the persistent kernel's cluster mode (issue 16): a layout of at most
MAX_CLUSTER_CTAS CTAs runs inside one thread-block cluster, the state pushed through distributed
shared memory, with replicas of the cluster over the batch. Skipped without a GPU and the CUDA
module; cluster mode itself needs compute capability 9.0 or newer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _native, planner
from jax_sprnn.primitives import sprnn_backward_p, sprnn_forward_p
from jax_sprnn.testing import DTYPES, GRAD_TOLERANCE, TOLERANCE, make_problem, random_kernel, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_clusters():
    if not _native.current_device_spec().cluster_launch:
        pytest.skip("the GPU has no thread-block clusters (compute capability < 9.0)")


def _forward(x, h0, w, lengths, *, reverse=False, **hooks):
    """The forward primitive on time-major x with the hooks (exchange_mode forces a mode)."""
    return sprnn_forward_p.bind(jnp.swapaxes(x, 0, 1), h0, w.values, w.indices, w.lane_row, lengths,
                                activation="tanh", reverse=reverse, meta=w.meta, method="native",
                                **hooks)


def _pack_on(n_ctas, hidden, density, dtype, seed):
    """A problem whose layout was planned for n_ctas SMs (so it has at most n_ctas CTAs)."""
    rng = np.random.default_rng(seed)
    kernel, mask = random_kernel(rng, hidden, density)
    dt = DTYPES[dtype]
    kernel = np.asarray(jnp.asarray(kernel, dt).astype(jnp.float32)) * mask
    device = dataclasses.replace(planner.H200, sm_count=n_ctas, cluster_launch=False)
    return kernel, js.SparseWeights.from_dense(kernel, mask, dtype=dt, device=device)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("hidden, batch", [(256, 1), (300, 5), (1024, 8), (256, 32)])
def test_small_layers_run_in_cluster_mode(dtype, hidden, batch):
    dense, w, x, h0 = make_problem(hidden + batch, hidden, batch, 37, 0.1, dtype)
    assert w.meta.exchange == "cluster", w.meta
    lengths = np.random.default_rng(batch).integers(0, 38, batch)
    lengths[0] = 37
    for reverse in (False, True):
        run = jax.jit(lambda x, h0, w, reverse=reverse: js.sparse_rnn(
            x, h0, w, method="native", reverse=reverse, seq_lengths=lengths))
        y, h = run(x, h0, w)
        y_ref, h_ref = js.reference_rnn(x, h0, dense, reverse=reverse, seq_lengths=lengths)
        assert rel_err(y, y_ref) < TOLERANCE[dtype] and rel_err(h, h_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("n_ctas", [1, 2, 3, 5, 8, 12, 16])
def test_every_cluster_size_matches_the_grid_mode_bitwise(n_ctas):
    # The same layout in both modes: the same slots, the same fp32 sums, the same rounding.
    dense, w = _pack_on(n_ctas, 777, 0.05, "float16", n_ctas)
    assert w.meta.num_ctas <= n_ctas
    rng = np.random.default_rng(n_ctas)
    x = jnp.asarray(rng.standard_normal((6, 29, 777)), jnp.float16)
    h0 = jnp.asarray(rng.standard_normal((6, 777)) * 0.5, jnp.float16)
    lengths = jnp.asarray([29, 0, 13, 29, 1, 28], jnp.int32)
    y_c, h_c = _forward(x, h0, w, lengths, exchange_mode="cluster")
    y_g, h_g = _forward(x, h0, w, lengths, exchange_mode="grid")
    np.testing.assert_array_equal(np.asarray(y_c), np.asarray(y_g))
    np.testing.assert_array_equal(np.asarray(h_c), np.asarray(h_g))
    y_ref, _ = js.reference_rnn(x, h0, dense, seq_lengths=lengths)
    assert rel_err(jnp.swapaxes(y_c, 0, 1), y_ref) < TOLERANCE["float16"]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("where", ["x", "h0"])
def test_nonfinite_states_propagate_alike_in_both_modes(dtype, where):
    # The cluster mode learns of a non-finite staged state from its peers' pushes, the grid mode
    # from its staging: both must give the reference's NaN and Inf positions (docs/reliability.md).
    dense, w, x, h0 = make_problem(21, 300, 5, 9, 0.1, dtype)
    assert w.meta.exchange == "cluster", w.meta
    if where == "x":
        x = x.at[1, 3, 7].set(np.inf).at[3, 2, 4].set(np.nan).at[3, 2, 11].set(-np.inf)
    else:
        h0 = h0.at[1, 7].set(np.inf).at[3, 0].set(np.nan).at[3, 11].set(-np.inf)
    lengths = jnp.asarray([9, 9, 0, 6, 8], jnp.int32)
    y_c, h_c = _forward(x, h0, w, lengths, reverse=True, exchange_mode="cluster")
    y_g, h_g = _forward(x, h0, w, lengths, reverse=True, exchange_mode="grid")
    np.testing.assert_array_equal(np.asarray(y_c, np.float32), np.asarray(y_g, np.float32))
    np.testing.assert_array_equal(np.asarray(h_c, np.float32), np.asarray(h_g, np.float32))
    y_ref, h_ref = js.sparse_rnn(x, h0, w, method="reference", reverse=True, seq_lengths=lengths)
    for got, want in ((jnp.swapaxes(y_c, 0, 1), y_ref), (h_c, h_ref)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        for kind in (np.isnan, np.isposinf, np.isneginf):
            np.testing.assert_array_equal(kind(got), kind(want), err_msg=kind.__name__)
    assert np.isnan(np.asarray(y_c, np.float32)).any()


# (The dispatch admits at most the grid mode's batch limit, 112 at H=512: cluster mode is not
# assumed to be available when a program is compiled.)
@pytest.mark.parametrize("batch", [33, 64, 100])
def test_batch_replicas_equal_one_big_grid_call(batch):
    # B examples over many replicas of the cluster against the same layout in one grid launch.
    dense, w, x, h0 = make_problem(batch, 512, batch, 17, 0.1, "float16")
    assert w.meta.exchange == "cluster"
    lengths = jnp.asarray(np.random.default_rng(batch).integers(0, 18, batch), jnp.int32)
    y_c, h_c = _forward(x, h0, w, lengths, exchange_mode="cluster")
    y_g, h_g = _forward(x, h0, w, lengths, exchange_mode="grid")
    np.testing.assert_array_equal(np.asarray(y_c), np.asarray(y_g))
    np.testing.assert_array_equal(np.asarray(h_c), np.asarray(h_g))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_backward_in_cluster_mode_matches_the_grid_mode_and_the_reference(dtype):
    dense, w, x, h0 = make_problem(11, 384, 7, 23, 0.1, dtype)
    assert w.meta_t.exchange == "cluster", w.meta_t
    lengths = jnp.asarray([23, 5, 0, 23, 17, 1, 22], jnp.int32)
    y, _ = _forward(x, h0, w, lengths)
    rng = np.random.default_rng(5)
    dy = jnp.asarray(rng.standard_normal(y.shape), y.dtype)
    dh = jnp.asarray(rng.standard_normal(h0.shape), y.dtype)
    outs = {}
    for mode in ("cluster", "grid"):
        outs[mode] = sprnn_backward_p.bind(y, h0, w.transposed_values(), w.indices_t, w.lane_row_t,
                                           lengths, dy, dh, activation="tanh", reverse=False,
                                           meta=w.meta_t, method="native", exchange_mode=mode)
    for a, b in zip(outs["cluster"], outs["grid"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def loss(x, h0, values, method):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), method=method, seq_lengths=lengths)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h.astype(jnp.float32))
    got = jax.grad(loss, argnums=(0, 1, 2))(x, h0, w.values, "native")
    want = jax.grad(loss, argnums=(0, 1, 2))(x, h0, w.values, "reference")
    for g, r in zip(got, want):
        assert rel_err(g, r) < GRAD_TOLERANCE[dtype]


def test_cluster_mode_is_refused_with_a_reason_where_it_cannot_run():
    _, w, x, h0 = make_problem(3, 2304, 2, 4, 0.1, "float16")
    assert w.meta.exchange == "grid" and w.meta.num_ctas > planner.MAX_CLUSTER_CTAS
    lengths = jnp.full((2,), 4, jnp.int32)
    with pytest.raises(Exception, match="cluster mode was asked for but cannot run: the layout has"):
        jax.block_until_ready(_forward(x, h0, w, lengths, exchange_mode="cluster"))
    _, w, x, h0 = make_problem(3, 256, 2, 4, 0.1, "float16")
    with pytest.raises(Exception, match="grid_barrier \\(an ablation\\) tests the grid exchange"):
        jax.block_until_ready(_forward(x, h0, w, jnp.full((2,), 4, jnp.int32), exchange_mode="cluster",
                                       grid_barrier=True))


@pytest.mark.parametrize("exchange_mode", ["cluster", "grid"])
def test_a_stall_in_a_small_layer_times_out(monkeypatch, exchange_mode):
    # CTA 0 never pushes (grid mode: never publishes): its peers' waits (on their mbarriers, or on
    # the exchange words) end at the bound JAX_SPRNN_SPIN_TIMEOUT_US sets here; no CTA leaves the
    # cluster while a peer may still write its shared memory, so the call ends, NaN, and the next
    # call reports it.
    dense, w, x, h0 = make_problem(4, 256, 2, 16, 0.1, "float16")
    assert w.meta.exchange == "cluster" and w.meta.num_ctas > 1
    lengths = jnp.full((2,), 16, jnp.int32)
    monkeypatch.setenv("JAX_SPRNN_SPIN_TIMEOUT_US", "2000")
    y, _ = _forward(x, h0, w, lengths, debug_stall_cta=0, exchange_mode=exchange_mode)
    assert np.all(np.isnan(np.asarray(y, np.float32)))
    with pytest.raises(Exception, match="timed out"):
        jax.block_until_ready(_forward(x, h0, w, lengths))
    monkeypatch.setenv("JAX_SPRNN_SPIN_TIMEOUT_US", "soon")
    with pytest.raises(Exception, match="JAX_SPRNN_SPIN_TIMEOUT_US must be a positive integer"):
        jax.block_until_ready(_forward(x, h0, w, lengths))
    monkeypatch.delenv("JAX_SPRNN_SPIN_TIMEOUT_US")
    y, _ = _forward(x, h0, w, lengths)
    y_ref, _ = js.reference_rnn(x, h0, dense)
    assert rel_err(jnp.swapaxes(y, 0, 1), y_ref) < TOLERANCE["float16"]



def test_a_batch_past_one_staged_copy_runs_on_replicas_and_in_waves_past_the_resident_clusters():
    """H = 1024 at 30% (fp16) leaves room for 56 staged examples a CTA: a wider batch runs on
    replicas of the cluster, each staging its slice (the planner's limit counts them). Both
    directions of a bidirectional layer share the clusters held at once, so at the limit their
    replicas would be too wide, and narrower ones run in waves."""
    dense, w, _, _ = make_problem(31, 1024, 1, 1, 0.3, "float16")
    spec = _native.current_device_spec()
    one_copy = planner.max_persistent_batch(w.meta, w.dtype, dataclasses.replace(spec, cluster_launch=False))
    limit = planner.max_persistent_batch(w.meta, w.dtype, spec)
    assert w.meta.exchange == "cluster" and limit > one_copy, (one_copy, limit)
    rng = np.random.default_rng(5)

    def problem(batch):
        x = jnp.asarray(rng.standard_normal((batch, 7, 1024)), jnp.float16)
        h0 = jnp.asarray(rng.standard_normal((batch, 1024)) * 0.5, jnp.float16)
        lengths = rng.integers(0, 8, batch).astype(np.int32)
        lengths[-1] = 7
        return x, h0, lengths

    x, h0, lengths = problem(one_copy + 9)
    y, h = js.sparse_rnn(x, h0, w, method="native", seq_lengths=lengths)
    y_ref, h_ref = js.reference_rnn(x, h0, dense, seq_lengths=lengths)
    assert rel_err(y, y_ref) < TOLERANCE["float16"] and rel_err(h, h_ref) < TOLERANCE["float16"]

    x, h0, lengths = problem(limit)
    x_bwd = x[::-1]  # (another input for the other direction)
    y, (h_f, h_b) = js.sparse_rnn_bidirectional((x, x_bwd), (h0, h0), (w, w), method="native",
                                                seq_lengths=lengths)
    y_f, h_f_ref = js.reference_rnn(x, h0, dense, seq_lengths=lengths)
    y_b, h_b_ref = js.reference_rnn(x_bwd, h0, dense, seq_lengths=lengths, reverse=True)
    assert rel_err(y, jnp.concatenate([y_f, y_b], -1)) < TOLERANCE["float16"]
    assert rel_err(h_f, h_f_ref) < TOLERANCE["float16"] and rel_err(h_b, h_b_ref) < TOLERANCE["float16"]
