"""The C++ CPU kernels' own paths: every batch-tile width, the rows split over XLA's thread pool,
each instruction-set variant, the padding slots of a state that is not finite, and the layout
invariant the row build relies on. Each runs on the CPU backend (the kernels are CPU-only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn.primitives import sprnn_forward_p
from jax_sprnn.testing import make_problem, rel_err

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ CPU kernels")


def _forward_and_grads(method, w, x, h0, lengths, reverse):
    def loss(x, h0, values):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), method=method, reverse=reverse,
                             seq_lengths=lengths)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))) + jnp.sum(h.astype(jnp.float32) ** 2)

    out = js.sparse_rnn(x, h0, w, method=method, reverse=reverse, seq_lengths=lengths)
    return (*out, *jax.grad(loss, argnums=(0, 1, 2))(x, h0, w.values))


def _check_against_reference(seed, hidden, batch, steps, density, reverse=False):
    dense, w, x, h0 = make_problem(seed, hidden, batch, steps, density)
    lengths = np.random.default_rng(seed).integers(0, steps + 1, batch).astype(np.int32)
    lengths[0] = steps
    native = _forward_and_grads("native", w, x, h0, lengths, reverse)
    ref = _forward_and_grads("reference", w, x, h0, lengths, reverse)
    for a, b, name in zip(native, ref, ("y", "h", "dx", "dh0", "dvalues")):
        assert rel_err(a, b) < 1e-5, name
    return native


@pytest.mark.parametrize("batch", [1, 3, 4, 6, 9, 17])  # tiles of 1, 4, 4, 8, 16, 2 x 16
def test_every_batch_tile(batch):
    _check_against_reference(1, 40, batch, 6, 0.25, reverse=batch % 2 == 1)


@pytest.mark.parametrize("isa", ["widest", "avx2", "baseline"])
@pytest.mark.parametrize("threads", ["1", "all"])
def test_threads_and_instruction_sets(isa, threads, monkeypatch):
    # Big enough per step (~37k slots x 8 examples) for the rows to be split over the pool.
    if isa != "widest":
        monkeypatch.setenv("JAX_SPRNN_CPU_ISA", isa)
    if threads != "all":
        monkeypatch.setenv("JAX_SPRNN_CPU_THREADS", threads)
    _check_against_reference(2, 384, 6, 10, 0.2, reverse=True)


def test_weight_gradient_is_reproducible_across_thread_counts(monkeypatch):
    dense, w, x, h0 = make_problem(3, 384, 8, 20, 0.2)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(js.sparse_rnn(x, h0, w.replace(values=v),
                                                            method="native")[0] ** 2)))
    many = np.asarray(grad(w.values))
    monkeypatch.setenv("JAX_SPRNN_CPU_THREADS", "1")
    one = np.asarray(grad(w.values))
    np.testing.assert_array_equal(many, one)


def _packed_step_nans(w, x, h0, padding=True):
    """Which outputs of one step are NaN when the sum runs over the packed slots: the real ones, and
    with ``padding`` the padding ones too (each adds 0 * h: NaN where h is not finite)."""
    indices, values = np.asarray(w.indices), np.asarray(w.values, np.float64)
    K = w.meta.slots_per_lane
    slot = np.arange(indices.size)
    lane = (slot // (32 * K)) * 32 + slot % 32
    rows = np.asarray(w.lane_row)[lane]
    cols = np.where(indices < 0, ~indices, indices)
    h = np.asarray(h0, np.float64)
    z = np.zeros(h.shape)
    with np.errstate(invalid="ignore"):
        for e in np.flatnonzero((rows >= 0) & ((indices >= 0) | padding)):
            z[:, rows[e]] += values[e] * h[:, cols[e]]
        return np.isnan(np.tanh(np.asarray(x, np.float64)[:, 0] + z))


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_state_reaches_rows_through_padding(bad):
    dense, w, x, h0 = make_problem(4, 128, 4, 1, 0.3)  # 2 slots per lane: padding in used lanes
    h0 = h0.at[1, :8].set(bad).at[3, 17].set(-bad)
    y, _ = js.sparse_rnn(x, h0, w, method="native")
    want = _packed_step_nans(w, x, h0)
    # the case exercises the padding slots: some rows are NaN through them alone
    assert (want & ~_packed_step_nans(w, x, h0, padding=False)).any() and not want[0].any()
    np.testing.assert_array_equal(np.isnan(np.asarray(y[:, 0])), want)


def test_rows_split_across_warps_are_refused():
    # The row build relies on docs/format.md's invariant 1: a row's lanes are one run in one warp.
    dense, w, x, h0 = make_problem(5, 64, 2, 3, 0.2)
    lane_row = np.asarray(w.lane_row).copy()
    apart = [g for g in np.flatnonzero(lane_row == -1) if g % 32 == 0 or lane_row[g - 1] != 0]
    assert apart, "the layout has an idle lane away from row 0's run"
    lane_row[apart[-1]] = 0
    lengths = jnp.full((2,), 3, jnp.int32)
    with pytest.raises(Exception, match="row 0 are not one contiguous run"):
        jax.block_until_ready(sprnn_forward_p.bind(
            jnp.swapaxes(x, 0, 1), h0, w.values, w.indices, jnp.asarray(lane_row), lengths,
            activation="tanh", reverse=False, meta=w.meta, method="native"))
