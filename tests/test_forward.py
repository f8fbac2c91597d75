"""The forward recurrence through the native kernel (C++ on CPU, persistent kernel on GPU) against
the pure-JAX reference, on fresh random data at odd shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import api

from jax_sprnn.testing import DTYPES, PUBLIC_CALLS, TOLERANCE, make_problem, rel_err


def _check(seed, hidden, batch, steps, density, dtype="float32", *, activation="tanh",
           reverse=False, lengths=None, time_major=False, mask=None, method="native"):
    dense, w, x, h0 = make_problem(seed, hidden, batch, steps, density, dtype, mask=mask)
    if time_major:
        x = jnp.swapaxes(x, 0, 1)
    kw = dict(activation=activation, reverse=reverse, seq_lengths=lengths, time_major=time_major)
    y, h_final = js.sparse_rnn(x, h0, w, method=method, **kw)
    y_ref, h_ref = js.reference_rnn(x, h0, dense, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert h_final.shape == h0.shape and h_final.dtype == h0.dtype
    tol = TOLERANCE[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(h_final, h_ref) < tol
    return y, h_final


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("hidden,batch", [(37, 1), (100, 3), (129, 7)])
@pytest.mark.parametrize("density", [0.01, 0.1, 1.0])
def test_matches_reference(dtype, hidden, batch, density):
    _check(hidden * 7 + batch, hidden, batch, 23, density, dtype)


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
def test_activations(activation):
    _check(1, 65, 3, 17, 0.2, activation=activation)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_single_step(dtype):
    _check(2, 50, 4, 1, 0.3, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_long_sequence(dtype):
    _check(3, 45, 2, 1200, 0.2, dtype)


def test_empty_rows_and_columns():
    rng = np.random.default_rng(5)
    mask = rng.random((70, 70)) < 0.2
    mask[:, 10:20] = False  # output units with no recurrent input (empty rows of U)
    mask[30:40, :] = False  # input units feeding nothing (empty columns of U)
    _check(5, 70, 3, 19, None, mask=mask)


def test_all_zero_pattern():
    _check(6, 33, 2, 9, None, mask=np.zeros((33, 33), bool))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lengths_and_reverse(reverse, dtype):
    lengths = np.array([13, 0, 1, 7, 13], np.int32)
    y, h_final = _check(7, 61, 5, 13, 0.15, dtype, reverse=reverse, lengths=lengths)
    # outputs past each length are exactly zero; a zero-length example keeps h0
    for b, n in enumerate(lengths):
        assert np.all(np.asarray(y[b, n:], np.float32) == 0)
    _, _, _, h0 = make_problem(7, 61, 5, 13, 0.15, dtype)
    np.testing.assert_array_equal(np.asarray(h_final[1], np.float32), np.asarray(h0[1], np.float32))


@pytest.mark.parametrize("load_bytes", [4, 8, 16])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("reverse", [False, True])
def test_many_batch_planes_with_lengths(load_bytes, dtype, reverse):
    """21 examples are 21, 11 or 6 batch planes (tiles of 1, 2, 4): many planes, a partial one, and
    an odd number of staged floats (the CUDA kernel's second staged copy must still be aligned)."""
    rng = np.random.default_rng(load_bytes * 10 + reverse)
    hidden, batch, steps = 53, 21, 9
    dense, w, x, h0 = make_problem(load_bytes + 40, hidden, batch, steps, 0.2, dtype)
    w = js.SparseWeights.from_dense(dense, dense != 0, dtype=DTYPES[dtype], load_bytes=load_bytes)
    lengths = rng.integers(0, steps + 1, batch).astype(np.int32)
    lengths[:2] = (steps, 0)
    kw = dict(reverse=reverse, seq_lengths=lengths)
    y, h_final = js.sparse_rnn(x, h0, w, method="native", **kw)
    y_ref, h_ref = js.reference_rnn(x, h0, dense, **kw)
    assert rel_err(y, y_ref) < TOLERANCE[dtype]
    assert rel_err(h_final, h_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("reverse", [False, True])
def test_time_major(reverse):
    _check(8, 40, 3, 11, 0.25, time_major=True, reverse=reverse, lengths=np.array([11, 4, 9]))


def test_reverse_runs_backwards_in_time():
    # With identity activation and zero kernel, reverse makes no difference to outputs; with a
    # real kernel the final state of a reversed run equals the forward run on the flipped input.
    dense, w, x, h0 = make_problem(9, 48, 2, 10, 0.3)
    y_rev, h_rev = js.sparse_rnn(x, h0, w, reverse=True, method="native")
    y_fwd, h_fwd = js.sparse_rnn(x[:, ::-1], h0, w, method="native")
    np.testing.assert_allclose(np.asarray(h_rev), np.asarray(h_fwd), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y_rev), np.asarray(y_fwd[:, ::-1]), rtol=1e-6, atol=1e-6)


def test_methods_agree():
    dense, w, x, h0 = make_problem(10, 57, 3, 12, 0.2)
    outs = [js.sparse_rnn(x, h0, w, method=m) for m in api.METHODS]
    for y, h in outs[1:]:
        assert rel_err(y, outs[0][0]) < 1e-5 and rel_err(h, outs[0][1]) < 1e-5


def test_outputs_are_all_written():
    # NaN inputs at positions past the lengths must not leak into outputs or the final state.
    dense, w, x, h0 = make_problem(11, 40, 3, 8, 0.2)
    lengths = np.array([8, 3, 5], np.int32)
    pos = np.arange(8)[None, :, None]
    x = jnp.where(pos >= lengths[:, None, None], jnp.nan, x)
    y, h_final = js.sparse_rnn(x, h0, w, seq_lengths=lengths, method="native")
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(h_final)))


def test_nan_propagates_like_the_reference():
    dense, w, x, h0 = make_problem(12, 30, 2, 6, 0.3)
    x = x.at[0, 2, 5].set(jnp.nan)
    y, _ = js.sparse_rnn(x, h0, w, method="native")
    y_ref, _ = js.reference_rnn(x, h0, dense)
    # A NaN poisons its example from its step on, in both; other examples stay finite. (Which units
    # it reaches differs: the dense reference multiplies it by the zeros the mask removed.)
    nan_steps = np.isnan(np.asarray(y)).any(axis=2)
    np.testing.assert_array_equal(nan_steps, np.isnan(np.asarray(y_ref)).any(axis=2))
    assert nan_steps[0, 2:].all() and not nan_steps[0, :2].any() and not nan_steps[1].any()


@pytest.mark.gpu
def test_gpu_runs_the_persistent_kernel():
    dense, w, x, h0 = make_problem(13, 256, 4, 64, 0.1, "float16")
    hlo = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="native")).lower(x, h0, w).as_text()
    assert "jax_sprnn_forward" in hlo
    _check(13, 256, 4, 64, 0.1, "float16")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reverse", [False, True])
def test_dense_fallback_matches_reference(dtype, reverse, exact_matmuls):
    # The pure-JAX dense path that method="auto" runs where the native kernel cannot, or would be
    # slower: 16-bit storage runs its matmul in that dtype with float32 accumulation.
    from jax_sprnn import fallback

    dense, w, x, h0 = make_problem(11, 77, 5, 19, 0.15, dtype)
    lengths = jnp.asarray([19, 0, 7, 1, 12], jnp.int32)
    x_tm = jnp.swapaxes(x, 0, 1)
    y, h = jax.jit(lambda x, h0, v: fallback.forward(
        x, h0, v, w.indices, w.lane_row, lengths, activation="tanh", reverse=reverse,
        meta=w.meta))(x_tm, h0, w.values)
    y_ref, h_ref = js.reference_rnn(x_tm, h0, dense, time_major=True, reverse=reverse,
                                    seq_lengths=lengths)
    assert y.dtype == x.dtype and h.dtype == x.dtype
    assert rel_err(y, y_ref) < TOLERANCE[dtype] and rel_err(h, h_ref) < TOLERANCE[dtype]
    assert np.all(np.asarray(y[7:, 2], np.float32) == 0) and np.all(np.asarray(y[:, 1], np.float32) == 0)


@pytest.mark.parametrize("call", sorted(PUBLIC_CALLS))
@pytest.mark.parametrize("method", ["auto", "native", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_empty_batch_gives_empty_results(call, method, dtype):
    """B = 0 (what a filtered or bucketed batch can come to) is a valid call, as for nn.RNN: empty
    outputs and final carries of the right shapes and dtype, under jit and grad too."""
    gates, run = PUBLIC_CALLS[call]
    H, T = 6, 4
    w = js.SparseWeights.from_dense(np.random.default_rng(3).standard_normal((H, gates * H))
                                    .astype(np.float32), density=0.5, dtype=dtype)
    x = jnp.zeros((0, T, gates * H), dtype)
    h = jnp.zeros((0, H), dtype)
    features = 2 * H if "bidirectional" in call else H
    for lengths in (None, np.zeros(0, np.int32)):
        y, final = jax.jit(lambda x, h, w, lengths: run(x, h, w, method=method,
                                                         seq_lengths=lengths))(x, h, w, lengths)
        assert y.shape == (0, T, features) and y.dtype == np.dtype(dtype)
        assert all(f.shape == (0, H) and f.dtype == np.dtype(dtype) for f in jax.tree.leaves(final))
    grads = js.grad(lambda w: sum(jnp.sum(a.astype(jnp.float32)) for a in jax.tree.leaves(
        run(x, h, w, method=method))))(w)
    np.testing.assert_array_equal(np.asarray(grads.values, np.float32), 0)
