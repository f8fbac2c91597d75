"""The C++ CPU kernel of the gated cells' forward recurrence (issue 17), called through its FFI
target: against a float64 NumPy LSTM and GRU and against ``sparse_lstm`` / ``sparse_gru``
(``method="reference"``) at odd shapes, every dtype, ragged lengths (0 and T), ``reverse``, every
batch tile, thread split and instruction-set variant, non-finite states, and bad operands."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native
from jax_sprnn.testing import DTYPES, TOLERANCE, rel_err

pytestmark = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the C++ CPU kernel"),
    pytest.mark.skipif(not _native.has_cpu_kernels(), reason="the CPU module was not built"),
    pytest.mark.usefixtures("exact_matmuls"),  # the reference path at float32 (tests/conftest.py)
]

TARGET = _constants.ffi_target("gated_forward")
CELLS = {"lstm": 4, "gru": 3}
# Against the float64 truth that rounds the state as the kernel does (16-bit results then agree but
# for a rare 1-ulp flip); leaving out the per-step rounding is 2e-3 (bfloat16) and 2.5e-4 (float16).
ROUNDED_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-4, "float16": 1e-4}


# ---- problems and the target ---------------------------------------------------------------------

def problem(gates, hidden, batch, steps, dtype="float32", seed=0, density=0.3):
    """``(kernel as stored [H, G*H] float64, weights, x [T, B, G*H], h0, c0, hn_bias)`` in ``dtype``,
    a recurrence that stays in a moderate range; ``c0`` is empty for the GRU, ``hn_bias`` for the
    LSTM (the target's convention)."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    mask = rng.random((hidden, gates * hidden)) < density
    kernel = rng.standard_normal((hidden, gates * hidden)) * (1.2 / np.sqrt(density * hidden))
    kernel = np.asarray(jnp.asarray(np.where(mask, kernel, 0.0), dt).astype(jnp.float32))
    weights = js.SparseWeights.from_dense(kernel, mask, dtype=dt)
    x = jnp.asarray(rng.standard_normal((steps, batch, gates * hidden)), dt)
    h0 = jnp.asarray(rng.standard_normal((batch, hidden)) * 0.5, dt)
    if gates == 4:
        c0 = jnp.asarray(rng.standard_normal((batch, hidden)), dt)
        hn_bias = jnp.zeros((0,), jnp.float32)
    else:
        c0 = jnp.zeros((0,), dt)
        hn_bias = jnp.asarray(rng.standard_normal(hidden) * 0.3, jnp.float32)
    return kernel.astype(np.float64), weights, x, h0, c0, hn_bias


def attrs(weights, gates=None, reverse=False):
    meta = weights.meta
    return dict(gates=np.int64(weights.gates if gates is None else gates),
                reverse=np.int64(bool(reverse)), slots_per_lane=np.int64(meta.slots_per_lane),
                warps_per_cta=np.int64(meta.warps_per_cta), reg_slots=np.int64(meta.reg_slots),
                load_bytes=np.int64(meta.load_bytes))


def call(x, h0, c0, weights, lengths, hn_bias, *, reverse=False, gates=None, values=None,
         indices=None, lane_row=None, out_shapes=None, cells_shape=(0,)):
    """``(y, h_final, c_final)`` of the target (each operand overridable, to make bad calls; the
    LSTM's cells are not asked for unless ``cells_shape`` is given)."""
    T, B = x.shape[:2]
    H = h0.shape[-1]
    shapes = (out_shapes or ((T, B, H), h0.shape, c0.shape)) + (cells_shape,)
    results = tuple(jax.ShapeDtypeStruct(s, x.dtype) for s in shapes)
    out = jax.ffi.ffi_call(TARGET, results)(
        x, h0, c0, weights.values if values is None else values,
        weights.indices if indices is None else indices,
        weights.lane_row if lane_row is None else lane_row,
        jnp.asarray(lengths, jnp.int32), hn_bias, **attrs(weights, gates, reverse))
    return jax.block_until_ready(out[:3])


# ---- the float64 NumPy truth ---------------------------------------------------------------------

def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def numpy_gated(gates, kernel, x, h0, c0, lengths, hn_bias, reverse, dtype):
    """``(y, h_final, c_final)`` in float64, the state (c too) rounded to ``dtype`` after every
    step, the LSTM's h from the rounded c."""
    dt = DTYPES[dtype]

    def rnd(a):
        return f64(jnp.asarray(a.astype(np.float32), dt))

    x, h = f64(x), f64(h0).copy()
    c = f64(c0).copy()
    b_hn = f64(hn_bias)
    y = np.zeros(x.shape[:2] + (h.shape[1],))
    for b, length in enumerate(lengths):
        for s in range(length):
            p = length - 1 - s if reverse else s
            u = h[b] @ kernel
            if gates == 4:
                i, f, g, o = np.split(x[p, b] + u, 4)
                c[b] = rnd(sigmoid(f) * c[b] + sigmoid(i) * np.tanh(g))
                h[b] = rnd(sigmoid(o) * np.tanh(c[b]))
            else:
                x_r, x_z, x_n = np.split(x[p, b], 3)
                u_r, u_z, u_n = np.split(u, 3)
                r, z = sigmoid(x_r + u_r), sigmoid(x_z + u_z)
                h[b] = rnd((1 - z) * np.tanh(x_n + r * (u_n + b_hn)) + z * h[b])
            y[p, b] = h[b]
    return y, h, c


def api_reference(cell, weights, x, h0, c0, lengths, hn_bias, reverse):
    """``(y [T, B, H], h_final, c_final)`` of ``sparse_lstm`` / ``sparse_gru`` (reference)."""
    kwargs = dict(time_major=True, reverse=reverse, seq_lengths=jnp.asarray(lengths, jnp.int32),
                  method="reference")
    if cell == "lstm":
        y, (c, h) = js.sparse_lstm(x, (c0, h0), weights, **kwargs)
        return y, h, c
    y, h = js.sparse_gru(x, h0, weights, hn_bias=hn_bias, **kwargs)
    return y, h, c0


def assert_close(out, want, tol):
    for a, b, name in zip(out, want, ("y", "h_final", "c_final")):
        assert a.shape == np.shape(b), name
        if np.size(b):
            assert rel_err(a, b) < tol, name


# ---- against NumPy and the JAX reference -----------------------------------------------------------

@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_float64_numpy_and_the_reference(cell, reverse, dtype):
    gates, T = CELLS[cell], 11
    kernel, w, x, h0, c0, hn_bias = problem(gates, 37, 3, T, dtype, seed=gates + 2 * reverse)
    lengths = np.array([T, 0, 6], np.int32)  # a full sequence, an empty one, a partial one
    out = call(x, h0, c0, w, lengths, hn_bias, reverse=reverse)
    assert all(o.dtype == x.dtype for o in out)
    assert_close(out, numpy_gated(gates, kernel, x, h0, c0, lengths, hn_bias, reverse, dtype),
                 ROUNDED_TOLERANCE[dtype])
    assert_close(out, api_reference(cell, w, x, h0, c0, lengths, hn_bias, reverse), TOLERANCE[dtype])
    y, h, c = (f64(a) for a in out)
    assert not y[6:, 2].any() and not y[:, 1].any()  # zero past each length
    np.testing.assert_array_equal(h[1], f64(h0)[1])  # a length of 0 holds the carry
    if cell == "lstm":
        np.testing.assert_array_equal(c[1], f64(c0)[1])


@pytest.mark.parametrize("batch", [1, 4, 6, 9, 17])  # batch tiles of 1, 4, 8, 16 and 2 x 16
@pytest.mark.parametrize("cell", list(CELLS))
def test_every_batch_tile(cell, batch):
    gates, T = CELLS[cell], 7
    kernel, w, x, h0, c0, hn_bias = problem(gates, 29, batch, T, seed=batch)
    lengths = np.random.default_rng(batch).integers(0, T + 1, batch).astype(np.int32)
    lengths[0] = T
    reverse = batch % 2 == 1
    out = call(x, h0, c0, w, lengths, hn_bias, reverse=reverse)
    assert_close(out, numpy_gated(gates, kernel, x, h0, c0, lengths, hn_bias, reverse, "float32"),
                 1e-5)


@pytest.mark.parametrize("isa", ["widest", "avx2", "baseline"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_threads_and_instruction_sets(cell, isa, monkeypatch):
    # Big enough per step (~40k entries x 8 examples) for the units to be split over the pool; a
    # unit's rows are summed in one fixed order whatever the split, so the threads agree bitwise.
    gates, T = CELLS[cell], 9
    kernel, w, x, h0, c0, hn_bias = problem(gates, 203, 6, T, seed=7, density=0.25)
    lengths = np.array([T, 3, 0, T, 8, 1], np.int32)
    if isa != "widest":
        monkeypatch.setenv("JAX_SPRNN_CPU_ISA", isa)
    many = call(x, h0, c0, w, lengths, hn_bias, reverse=True)
    monkeypatch.setenv("JAX_SPRNN_CPU_THREADS", "1")
    one = call(x, h0, c0, w, lengths, hn_bias, reverse=True)
    for a, b in zip(many, one):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_close(many, numpy_gated(gates, kernel, x, h0, c0, lengths, hn_bias, True, "float32"), 1e-5)


@pytest.mark.parametrize("steps, batch", [(0, 3), (5, 0), (0, 0)])
@pytest.mark.parametrize("cell", list(CELLS))
def test_empty_sequences_and_batches(cell, steps, batch):
    gates = CELLS[cell]
    _, w, x, h0, c0, hn_bias = problem(gates, 19, batch, steps, "bfloat16")
    y, h, c = call(x, h0, c0, w, np.full(batch, steps, np.int32), hn_bias)
    assert y.shape == (steps, batch, 19)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h0))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(c0))


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_nonfinite_state_follows_the_dense_product(cell, bad):
    """A NaN or Inf in one example's h0 gives the reference's NaN/Inf pattern (the masked dense
    product's: a pruned weight's 0 times Inf is NaN) and does not reach the other examples."""
    gates, T = CELLS[cell], 4
    _, w, x, h0, c0, hn_bias = problem(gates, 23, 3, T, seed=5)
    h0 = h0.at[1, 7].set(float(bad))
    lengths = np.array([T, T, 2], np.int32)
    out = call(x, h0, c0, w, lengths, hn_bias)
    want = api_reference(cell, w, x, h0, c0, lengths, hn_bias, False)
    for a, b, name in zip(out, want, ("y", "h_final", "c_final")):
        a, b = f64(a), f64(b)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=name)
        finite = np.isfinite(b)
        assert rel_err(a[finite], b[finite]) < 1e-5, name
    y = f64(out[0])
    assert np.isfinite(y[:, 0]).all() and np.isfinite(y[:, 2]).all()
    assert not np.isfinite(y[0, 1]).all()


# ---- bad operands --------------------------------------------------------------------------------

def _bad(cell="lstm", dtype="float32"):
    gates = CELLS[cell]
    _, w, x, h0, c0, hn_bias = problem(gates, 21, 2, 3, dtype)
    return w, x, h0, c0, hn_bias, np.array([3, 2], np.int32)


def raises(*parts):
    """pytest.raises for a message that holds ``parts`` in order (literal text)."""
    return pytest.raises(Exception, match=".*".join(re.escape(p) for p in parts))


def test_gates_must_name_a_cell():
    w, x, h0, c0, hn_bias, lengths = _bad()
    with raises("gates must be 3 (GRU) or 4 (LSTM), got 5"):
        call(x, h0, c0, w, lengths, hn_bias, gates=5)
    with raises("x must be [T, B, G*H] with G = gates = 4, got [3, 2, 83]"):
        call(x[..., :83], h0, c0, w, lengths, hn_bias)
    with raises("h0 must be [B, H] = [2, 28] for the GRU"):
        call(x, h0, c0, w, lengths, hn_bias, gates=3)  # 4H = 84 read as 3 gates of 28


def test_lstm_operand_shapes():
    w, x, h0, c0, hn_bias, lengths = _bad()
    outs = ((3, 2, 21), (2, 21), (2, 21))
    with raises("c0 must be [B, H] = [2, 21] for the LSTM (gates = 4), got [2, 20]"):
        call(x, h0, c0[:, :20], w, lengths, hn_bias)
    with raises("hn_bias must have no element for the LSTM (gates = 4), got [21]"):
        call(x, h0, c0, w, lengths, jnp.zeros(21, jnp.float32))
    with raises("h0 must be [B, H] = [2, 21]", "got [2, 22]"):
        call(x, jnp.zeros((2, 22), x.dtype), c0, w, lengths, hn_bias, out_shapes=outs)
    with raises("c_final must be [B, H] = [2, 21]", "got [0]"):
        call(x, h0, c0, w, lengths, hn_bias, out_shapes=outs[:2] + ((0,),))
    with raises("cells must be [T, B, H] = [3, 2, 21]", "got [3, 2, 20]"):
        call(x, h0, c0, w, lengths, hn_bias, cells_shape=(3, 2, 20))


def test_gru_operand_shapes():
    w, x, h0, c0, hn_bias, lengths = _bad("gru")
    with raises("hn_bias must be float32 [H] = [21] for the GRU (gates = 3), got [20]"):
        call(x, h0, c0, w, lengths, hn_bias[:20])
    with raises("c0 must have no element for the GRU (gates = 3), got [2, 21]"):
        call(x, h0, jnp.zeros((2, 21), x.dtype), w, lengths, hn_bias)
    with raises("lengths must be int32 [B] = [2]", "got [3]"):
        call(x, h0, c0, w, np.array([3, 2, 1]), hn_bias)
    with raises("y must be [T, B, H] = [3, 2, 21]", "got [3, 2, 20]"):
        call(x, h0, c0, w, lengths, hn_bias, out_shapes=((3, 2, 20), (2, 21), (0,)))
    with raises("cells must have no element for the GRU (gates = 3), got [3, 2, 21]"):
        call(x, h0, c0, w, lengths, hn_bias, cells_shape=(3, 2, 21))


def test_dtypes_lengths_and_layout():
    w, x, h0, c0, hn_bias, lengths = _bad("lstm", "bfloat16")
    with raises("c0 is float32 but x is bfloat16"):
        call(x, h0, c0.astype(jnp.float32), w, lengths, hn_bias)
    with raises("values is float16 but x is bfloat16"):
        call(x, h0, c0, w, lengths, hn_bias, values=w.values.astype(jnp.float16))
    with raises("lengths[1] = 4 is outside [0, T=3]"):
        call(x, h0, c0, w, np.array([3, 4], np.int32), hn_bias)
    lane_row = np.asarray(w.lane_row).copy()
    lane_row[np.flatnonzero(lane_row >= 0)[0]] = 4 * 21
    with raises("lane_row[", "] = 84 is out of range [-1, 84) (the G*H = 4*21 gate rows)"):
        call(x, h0, c0, w, lengths, hn_bias, lane_row=jnp.asarray(lane_row))
    indices = np.asarray(w.indices).copy()
    indices[np.flatnonzero(indices >= 0)[0]] = 21
    with raises("names column 21 >= hidden 21"):
        call(x, h0, c0, w, lengths, hn_bias, indices=jnp.asarray(indices))


# ---- through the public API ------------------------------------------------------------------------

def _native_api(cell, weights, x, h0, c0, lengths, hn_bias, reverse):
    """``(y [T, B, H], h_final, c_final, hlo)`` of ``sparse_lstm`` / ``sparse_gru`` with
    ``method="native"`` (batch-major inputs), jitted."""
    kwargs = dict(seq_lengths=jnp.asarray(lengths, jnp.int32), reverse=reverse, method="native")
    if cell == "lstm":
        f = jax.jit(lambda x, c0, h0: js.sparse_lstm(x, (c0, h0), weights, **kwargs))
        args = (jnp.swapaxes(x, 0, 1), c0, h0)
        y, (c, h) = f(*args)
    else:
        f = jax.jit(lambda x, h0: js.sparse_gru(x, h0, weights, hn_bias=hn_bias, **kwargs))
        args = (jnp.swapaxes(x, 0, 1), h0)
        y, h = f(*args)
        c = c0
    return jnp.swapaxes(y, 0, 1), h, c, f.lower(*args).as_text()


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("cell", list(CELLS))
def test_public_api_runs_this_kernel(cell, dtype):
    gates, T = CELLS[cell], 13
    kernel, w, x, h0, c0, hn_bias = problem(gates, 41, 5, T, dtype, seed=11)
    lengths = np.array([T, 4, 0, 12, 1], np.int32)
    for reverse in (False, True):
        *out, hlo = _native_api(cell, w, x, h0, c0, lengths, hn_bias, reverse)
        assert TARGET in hlo
        assert_close(out, numpy_gated(gates, kernel, x, h0, c0, lengths, hn_bias, reverse, dtype),
                     ROUNDED_TOLERANCE[dtype])
        direct = call(x, h0, c0, w, lengths, hn_bias, reverse=reverse)
        for a, b in zip(out, direct):  # the same kernel: the same bits
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
