"""Bad input gets a ValueError or TypeError that names the argument; nothing crashes inside XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js

from jax_sprnn.testing import make_problem, on_gpu


@pytest.fixture(scope="module")
def problem():
    return make_problem(0, 24, 3, 5, 0.3)


def test_wrong_hidden(problem):
    dense, w, x, h0 = problem
    with pytest.raises(ValueError, match="hidden size 24"):
        js.sparse_rnn(x[..., :20], h0[:, :20], w)


def test_wrong_rank(problem):
    dense, w, x, h0 = problem
    with pytest.raises(ValueError, match=r"inputs must be \[B, T, H\]"):
        js.sparse_rnn(x[0], h0, w)
    with pytest.raises(ValueError, match=r"inputs must be \[T, B, H\]"):
        js.sparse_rnn(x[0], h0, w, time_major=True)


def test_batch_mismatch(problem):
    dense, w, x, h0 = problem
    with pytest.raises(ValueError, match=r"h0 must be \[B, H\]"):
        js.sparse_rnn(x, h0[:2], w)


def test_dtypes(problem):
    dense, w, x, h0 = problem
    with pytest.raises(TypeError, match="inputs must be float32, bfloat16 or float16"):
        js.sparse_rnn(x.astype(jnp.int32), h0, w)
    with pytest.raises(TypeError, match="inputs must have the weights' dtype"):
        js.sparse_rnn(x.astype(jnp.float16), h0.astype(jnp.float16), w)
    with pytest.raises(TypeError, match="h0 must have the inputs' dtype"):
        js.sparse_rnn(x, h0.astype(jnp.bfloat16), w)
    with pytest.raises(TypeError, match="inputs must be float32, bfloat16 or float16"):
        js.sparse_rnn(np.asarray(x, np.float64), h0, w)


def test_unknown_activation_and_method(problem):
    dense, w, x, h0 = problem
    with pytest.raises(ValueError, match="activation must be one of"):
        js.sparse_rnn(x, h0, w, activation="sigmoid")
    with pytest.raises(ValueError, match="activation must be one of"):
        js.sparse_rnn(x, h0, w, activation=["tanh"])  # unhashable: not a bare TypeError
    with pytest.raises(ValueError, match="method must be one of"):
        js.sparse_rnn(x, h0, w, method="fast")


@pytest.mark.parametrize("method", ["auto", "native", "reference"])
def test_weights_whose_leaves_do_not_fit_their_layout_name_the_leaf(problem, method):
    """Checked on every call, before any path runs (they used to fail as a broadcast in XLA, or
    as a layout error of the native kernel, or blame the inputs' dtype)."""
    dense, w, x, h0 = problem
    S = w.meta.num_slots
    stack = jax.tree.map(lambda a: jnp.stack([a, a]), w)
    with pytest.raises(ValueError, match=rf"values must have shape \({S},\), got \(2, {S}\) "
                                         r"\(a stack of weight sets: run the call under jax.vmap"):
        js.sparse_rnn(x, h0, stack, method=method)
    with pytest.raises(ValueError, match=rf"SparseWeights.values must have shape \({S},\)"):
        js.sparse_rnn(x, h0, w.replace(values=w.values[:-1]), method=method)
    with pytest.raises(ValueError, match=r"SparseWeights.lane_row must have shape"):
        js.sparse_gru(jnp.zeros((3, 5, 72)), h0, js.SparseWeights.from_dense(
            np.ones((24, 72), np.float32), density=0.2).replace(lane_row=w.lane_row[:5]))
    with pytest.raises(TypeError, match="SparseWeights.values must be float32, bfloat16 or float16"):
        js.sparse_rnn(x, h0, w.replace(values=w.values.astype(jnp.int32)), method=method)
    with pytest.raises(TypeError, match="SparseWeights.indices must be int32"):
        js.sparse_rnn_bidirectional((x, x), (h0, h0), (w, w.replace(indices=w.indices.astype(
            jnp.int16))), method=method)
    batched = jax.vmap(lambda w: js.sparse_rnn(x, h0, w, method=method)[1])(stack)
    assert batched.shape == (2,) + h0.shape  # the stack under vmap is what runs it


def test_weights_type(problem):
    dense, w, x, h0 = problem
    with pytest.raises(TypeError, match="weights must be a jax_sprnn.SparseWeights"):
        js.sparse_rnn(x, h0, dense)


@pytest.mark.parametrize("lengths,match", [
    (np.array([5, -1, 2]), r"seq_lengths must lie in \[0, T=5\]"),
    (np.array([5, 6, 2]), r"seq_lengths must lie in \[0, T=5\]"),
    (np.array([5, 2]), r"seq_lengths must be \[B\]"),
    (np.array([5.0, 2.0, 1.0]), "seq_lengths must be an integer array"),
])
def test_bad_lengths(problem, lengths, match):
    dense, w, x, h0 = problem
    with pytest.raises((ValueError, TypeError), match=match):
        js.sparse_rnn(x, h0, w, seq_lengths=lengths)


def test_traced_bad_lengths_are_poisoned_not_wrong(problem):
    dense, w, x, h0 = problem
    f = jax.jit(lambda L: js.sparse_rnn(x, h0, w, seq_lengths=L))
    y, h = f(jnp.array([5, 9, 2], jnp.int32))
    assert np.all(np.isnan(np.asarray(y[1]))) and np.all(np.isnan(np.asarray(h[1])))
    assert np.all(np.isfinite(np.asarray(y[0]))) and np.all(np.isfinite(np.asarray(h[2])))


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_traced_64_bit_lengths_past_int32_are_poisoned_not_wrapped(problem, dtype):
    """With x64, 2**32 + 2 must not turn into the valid length 2 on its way to int32."""
    dense, w, x, h0 = problem
    with jax.enable_x64(True):
        lengths = jnp.array([5, 2**32 + 2, 2**33 + 1 if dtype == "uint64" else -2**32 + 1], dtype)
        y, h = jax.jit(lambda L: js.sparse_rnn(x, h0, w, seq_lengths=L))(lengths)
    assert np.isnan(np.asarray(h[1:])).all() and np.isnan(np.asarray(y[1:])).all()
    assert np.isfinite(np.asarray(h[0])).all()


def test_reference_rnn_checks_kernel(problem):
    dense, w, x, h0 = problem
    with pytest.raises(ValueError, match="square"):
        js.reference_rnn(x, h0, dense[:, :10])


def test_validate_catches_hand_made_weights(problem):
    dense, w, x, h0 = problem
    bad = w.replace(indices=w.indices.at[0].set(10_000))
    with pytest.raises(ValueError, match="SparseWeights.indices has columns outside"):
        bad.validate()
    with pytest.raises(ValueError, match="must have shape"):
        w.replace(values=w.values[:-1]).validate()


def test_validate_catches_a_corrupt_transposed_layout_and_split_rows(problem):
    """What the forward pass cannot see and the gradient would: perm_t must transpose the forward
    layout one to one; and each row's lanes form one run in one warp (invariant 1)."""
    dense, w, x, h0 = problem
    w.validate()
    perm = np.asarray(w.perm_t).copy()
    real = np.flatnonzero(perm >= 0)
    swapped = perm.copy()
    swapped[real[[0, 5]]] = swapped[real[[5, 0]]]
    with pytest.raises(ValueError, match="perm_t maps a transposed slot to the forward slot of "
                                         "another nonzero"):
        w.replace(perm_t=jnp.asarray(swapped)).validate()
    shared = perm.copy()
    shared[real[1]] = shared[real[2]]
    with pytest.raises(ValueError, match="one to one"):
        w.replace(perm_t=jnp.asarray(shared)).validate()
    dropped = np.asarray(w.indices_t).copy()  # a nonzero missing from the transposed layout
    dropped[real[0]] = ~dropped[real[0]]
    with pytest.raises(ValueError, match="one to one onto"):
        w.replace(indices_t=jnp.asarray(dropped),
                  perm_t=jnp.asarray(np.where(np.arange(perm.size) == real[0], -1, perm))).validate()
    on_padding = perm.copy()
    on_padding[real[0]] = int(np.flatnonzero(np.asarray(w.indices) < 0)[0])
    with pytest.raises(ValueError, match="one to one"):
        w.replace(perm_t=jnp.asarray(on_padding)).validate()
    lane_row = np.asarray(w.lane_row).copy()
    lanes = np.flatnonzero(lane_row >= 0)
    moved = lanes[np.flatnonzero(lane_row[lanes] != lane_row[lanes[0]])[-1]]  # a lane of another row
    lane_row[lanes[0]] = lane_row[moved]
    with pytest.raises(ValueError, match="not one contiguous run inside one warp"):
        w.replace(lane_row=jnp.asarray(lane_row)).validate()


def test_packing_refuses_duplicates_overflow_and_malformed_arguments():
    vals = np.array([1.0, 2.0], np.float32)
    with pytest.raises(ValueError, match=r"repeat the entry \(0, 1\) 2 times"):
        js.SparseWeights.from_pattern([0, 0], [1, 1], vals, 4)
    with pytest.raises(ValueError, match="vals has 1 NaN"):
        js.SparseWeights.from_pattern([0], [1], np.array([np.nan], np.float32), 4)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        js.SparseWeights.from_pattern([0], [1], vals[:1], -1)
    with pytest.raises(TypeError, match="rows must be integers"):
        js.SparseWeights.from_pattern([1.7], [1], vals[:1], 4)
    # finite in float32, infinite once stored in float16: refused, not stored as inf
    with pytest.raises(ValueError, match="beyond the range of float16"):
        js.SparseWeights.from_dense(np.eye(4, dtype=np.float32) * 7e4, density=0.25, dtype=np.float16)
    for density in ("0.5", np.array([0.5]), True, 1.5):
        with pytest.raises(ValueError, match="density must be a number in"):
            js.SparseWeights.from_dense(np.eye(4, dtype=np.float32), density=density)
    assert js.SparseWeights.from_dense(np.eye(4, dtype=np.float32), density=np.float32(0.5)).nnz == 8


def test_native_kernel_rejects_out_of_range_indices(problem):
    # A hand-made layout with a bad index reaches the native kernel, which never reads out of
    # bounds. The C++ kernel refuses it with a clear error. The CUDA handler cannot read the indices
    # without a synchronization, so its kernel flags them: the outputs are NaN (never a silent wrong
    # number) and the error reaches Python at the next call, after which calls work again.
    dense, w, x, h0 = problem
    bad = w.replace(indices=w.indices.at[0].set(10_000))
    if not on_gpu():
        with pytest.raises(Exception, match="indices.*names column 10000"):
            jax.block_until_ready(js.sparse_rnn(x, h0, bad, method="native"))
        return
    y, h = js.sparse_rnn(x, h0, bad, method="native")
    assert np.all(np.isnan(np.asarray(y, np.float32))) and np.all(np.isnan(np.asarray(h, np.float32)))
    with pytest.raises(Exception, match="invalid packed layout"):
        jax.block_until_ready(js.sparse_rnn(x, h0, w, method="native"))
    y, _ = js.sparse_rnn(x, h0, w, method="native")
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("gates, runs", [(3, "sparse_gru"), (4, "sparse_lstm")])
def test_sparse_rnn_refuses_gated_weights_naming_the_function_that_runs_them(gates, runs):
    rng = np.random.default_rng(gates)
    w = js.SparseWeights.from_dense(rng.standard_normal((6, gates * 6)).astype(np.float32), density=0.5)
    x, h0 = jnp.zeros((2, 3, 6)), jnp.zeros((2, 6))
    for method in ("auto", "native", "reference"):
        with pytest.raises(ValueError, match=rf"expected shape \(6, 6\), got \(6, {gates * 6}\).*{runs}"):
            js.sparse_rnn(x, h0, w, method=method)
