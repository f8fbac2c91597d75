"""The C++ CPU kernels' own paths: every batch-tile width, the rows split over XLA's thread pool,
each instruction-set variant, and the layout invariant the row build relies on (a state that is
not finite: tests/test_nan_parity.py). Each runs on the CPU backend (the kernels are CPU-only)."""

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
