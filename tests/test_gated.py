"""Gated cells (issue 17): the packed [H, G*H] format, sparse_lstm / sparse_gru against a float64
NumPy LSTM and GRU and against Flax's cells, their transformations (grad, vmap, export), bad inputs,
and pruning of gated kernels."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import fallback, pruning
from jax_sprnn.planner import WARP, plan_layout, unit_lanes
from jax_sprnn.testing import DTYPES, GRAD_TOLERANCE, TOLERANCE, rel_err

H, B, T = 37, 3, 11
LENGTHS = np.array([T, 0, 6], np.int32)  # a full sequence, an empty one, a partial one
CELLS = {"lstm": 4, "gru": 3}


pytestmark = pytest.mark.usefixtures("exact_matmuls")  # comparisons at 1e-5 (tests/conftest.py)


def problem(gates: int, dtype: str = "float32", seed: int = 0, density: float = 0.3):
    """``(kernel as stored, mask, weights, x, c0, h0, hn_bias)``: a masked gated kernel whose
    recurrence stays in a moderate range, and inputs in ``dtype``."""
    rng = np.random.default_rng(seed)
    mask = rng.random((H, gates * H)) < density
    kernel = rng.standard_normal((H, gates * H)) * (1.2 / np.sqrt(density * H))
    dt = DTYPES[dtype]
    kernel = np.asarray(jnp.asarray(np.where(mask, kernel, 0.0), dt).astype(jnp.float32))  # as stored
    weights = js.SparseWeights.from_dense(kernel, mask, dtype=dt)
    x = jnp.asarray(rng.standard_normal((B, T, gates * H)), dt)
    c0 = jnp.asarray(rng.standard_normal((B, H)), dt)
    h0 = jnp.asarray(rng.standard_normal((B, H)) * 0.5, dt)
    hn_bias = jnp.asarray(rng.standard_normal(H) * 0.3, jnp.float32)
    return kernel, mask, weights, x, c0, h0, hn_bias


# ---- the float64 NumPy truth ---------------------------------------------------------------------

def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_cell(gates, kernel, hn_bias, round_to):
    """One step of the LSTM (gates=4) or GRU (gates=3) in float64, the state rounded to
    ``round_to`` (the storage dtype) as the API does."""
    kernel = np.asarray(kernel, np.float64)
    b_hn = np.zeros(kernel.shape[0]) if hn_bias is None else np.asarray(hn_bias, np.float64)

    def rnd(a):
        return a.astype(round_to).astype(np.float64)

    def step(state, x):
        if gates == 4:
            c, h = state
            i, f, g, o = np.split(x + h @ kernel, 4)
            c = rnd(sigmoid(f) * c + sigmoid(i) * np.tanh(g))
            h = rnd(sigmoid(o) * np.tanh(c))
            return (c, h), h
        (h,) = state
        x_r, x_z, x_n = np.split(x, 3)
        u_r, u_z, u_n = np.split(h @ kernel, 3)
        r, z = sigmoid(x_r + u_r), sigmoid(x_z + u_z)
        n = np.tanh(x_n + r * (u_n + b_hn))
        h = rnd((1 - z) * n + z * h)
        return (h,), h
    return step


def as_float64(a):
    """A JAX array (any storage dtype) or a NumPy array as float64, NumPy arrays exactly (the finite
    differences perturb them below float32's resolution)."""
    return np.asarray(jnp.asarray(a, jnp.float32) if isinstance(a, jax.Array) else a, np.float64)


def numpy_run(gates, kernel, x, state, lengths, reverse=False, hn_bias=None, round_to=np.float64):
    """``(y [B, T, H], final state)``: every example run alone, docs/format.md's length semantics."""
    x, state = as_float64(x), [as_float64(s) for s in state]
    step = numpy_cell(gates, kernel, hn_bias, round_to)
    y = np.zeros(x.shape[:2] + (kernel.shape[0],))
    final = [s.copy() for s in state]
    for b in range(x.shape[0]):
        s_b = tuple(s[b] for s in state)
        L = int(lengths[b])
        for s in range(L):
            p = L - 1 - s if reverse else s
            s_b, y[b, p] = step(s_b, x[b, p])
        for f, v in zip(final, s_b):
            f[b] = v
    return y, final


def run(cell, x, c0, h0, w, hn_bias=None, **kw):
    """The API call of ``cell`` as ``(y, [final states])``."""
    if cell == "lstm":
        y, (c, h) = js.sparse_lstm(x, (c0, h0), w, **kw)
        return y, [c, h]
    y, h = js.sparse_gru(x, h0, w, hn_bias=hn_bias, **kw)
    return y, [h]


def initial(cell, c0, h0):
    return (c0, h0) if cell == "lstm" else (h0,)


# ---- the packed format ---------------------------------------------------------------------------

@pytest.mark.parametrize("gates", [3, 4])
def test_from_dense_round_trip(gates):
    kernel, mask, w, *_ = problem(gates)
    w.validate()
    assert w.shape == (H, gates * H) and w.gates == gates and w.hidden == H
    assert w.meta.gates == w.meta_t.gates == gates and w.meta_t.transposed and not w.meta.transposed
    assert (w.meta.num_rows, w.meta.num_cols) == (gates * H, H)
    assert (w.meta_t.num_rows, w.meta_t.num_cols) == (H, gates * H)
    np.testing.assert_array_equal(np.asarray(w.to_dense()), kernel)
    np.testing.assert_array_equal(w.mask(), mask)
    assert w.nnz == mask.sum() and w.density == pytest.approx(mask.mean())
    assert f"shape=({H}, {gates * H})" in repr(w)
    # The transposed layout holds U.T: dense, it reads back as the kernel's transpose.
    back_t = fallback.dense_from_packed(w.transposed_values(), w.indices_t, w.lane_row_t, w.meta_t)
    np.testing.assert_array_equal(np.asarray(back_t), kernel.T)
    # gather: a dense kernel's values at the pattern, zero gradient off it
    other = np.random.default_rng(5).standard_normal(kernel.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(w.gather(other).to_dense()), np.where(mask, other, 0))
    g = jax.grad(lambda k: jnp.sum(w.gather(k).values ** 2))(jnp.asarray(other))
    assert np.all(np.asarray(g)[~mask] == 0)
    # density= keeps the largest magnitudes over the whole gated kernel
    wd = js.SparseWeights.from_dense(other, density=0.25)
    assert wd.shape == (H, gates * H) and wd.nnz == round(0.25 * other.size)


@pytest.mark.parametrize("gates", [3, 4])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_a_units_gate_rows_share_a_warp_on_adjacent_lanes(gates, density):
    _, _, w, *_ = problem(gates, density=density, seed=2)
    lane_row = np.asarray(w.lane_row)
    for unit in range(H):
        lanes = [np.flatnonzero(lane_row == g * H + unit) for g in range(gates)]
        runs = np.concatenate(lanes)
        assert len({int(lane) // WARP for lane in runs}) == 1, unit  # one warp
        np.testing.assert_array_equal(runs, np.arange(runs[0], runs[0] + runs.size))  # gate order


def test_validate_catches_split_units():
    _, _, w, *_ = problem(4, density=0.3)
    lane_row = np.asarray(w.lane_row).copy()
    a, b = np.flatnonzero(lane_row == 0)[0], np.flatnonzero(lane_row == H)[0]  # unit 0, gates 0, 1
    lane_row[[a, b]] = lane_row[[b, a]]
    with pytest.raises(ValueError, match="adjacent lanes of one warp; unit 0"):
        w.replace(lane_row=jnp.asarray(lane_row)).validate()
    with pytest.raises(ValueError, match="not the transposed layout"):
        w.replace(meta_t=dataclasses.replace(w.meta_t, transposed=False)).validate()


def test_square_layouts_are_unchanged():
    _, _, w, *_ = problem(1)
    assert w.meta.gates == w.meta_t.gates == 1 and not w.meta_t.transposed
    assert w.shape == (H, H) and w.gates == 1


def test_planner_keeps_a_unit_in_one_warp():
    # Rows of 40 nonzeros fit one warp from K=2, but 4 of them only from K=6 (7 lanes each).
    row_nnz = np.full(4 * 2, 40)
    plan = plan_layout(row_nnz, np.float16, gates=4)
    assert plan.hidden == 2 and plan.gates == 4 and plan.slots_per_lane >= 6
    assert unit_lanes(row_nnz, plan.slots_per_lane, 4).max() <= WARP
    assert plan_layout(np.full(2, 40), np.float16).slots_per_lane == 2
    with pytest.raises(ValueError, match="gates of whole units"):
        plan_layout(np.full(7, 3), np.float32, gates=4)


@pytest.mark.parametrize("shape", [(4, 8), (4, 5), (4, 20), (0, 0), (4,)])
def test_from_dense_names_the_shapes_it_takes(shape):
    with pytest.raises(ValueError, match=r"kernel must be .*\[H, H\].*\[H, 3H\].*\[H, 4H\]"):
        js.SparseWeights.from_dense(np.zeros(shape, np.float32), density=0.5)


# ---- against the float64 NumPy LSTM and GRU ------------------------------------------------------

@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("method", ["auto", "reference"])
def test_matches_numpy(cell, dtype, reverse, method):
    gates = CELLS[cell]
    kernel, _, w, x, c0, h0, hn_bias = problem(gates, dtype, seed=3)
    y, final = run(cell, x, c0, h0, w, hn_bias, seq_lengths=LENGTHS, reverse=reverse, method=method)
    assert y.shape == (B, T, H) and y.dtype == w.dtype
    assert all(s.shape == (B, H) and s.dtype == w.dtype for s in final)
    y_ref, final_ref = numpy_run(gates, kernel, x, initial(cell, c0, h0), LENGTHS, reverse, hn_bias,
                                 round_to=np.dtype(DTYPES[dtype]))
    assert rel_err(y, y_ref) < TOLERANCE[dtype]
    for s, s_ref in zip(final, final_ref):
        assert rel_err(s, s_ref) < TOLERANCE[dtype]
    # Past its length an example's outputs are exactly zero and its carry is held.
    y = np.asarray(jnp.asarray(y, jnp.float32))
    assert np.all(y[1] == 0) and np.all(y[2, 6:] == 0) and np.any(y[2, :6] != 0)
    for s, s0 in zip(final, initial(cell, c0, h0)):
        np.testing.assert_array_equal(np.asarray(s[1]), np.asarray(s0[1]))  # length 0


@pytest.mark.parametrize("cell", list(CELLS))
def test_time_major_and_default_lengths(cell):
    gates = CELLS[cell]
    kernel, _, w, x, c0, h0, hn_bias = problem(gates, seed=4)
    y_bm, final_bm = run(cell, x, c0, h0, w, hn_bias)
    y_tm, final_tm = run(cell, jnp.swapaxes(x, 0, 1), c0, h0, w, hn_bias, time_major=True)
    np.testing.assert_array_equal(np.asarray(y_tm), np.swapaxes(np.asarray(y_bm), 0, 1))
    for a, b in zip(final_bm, final_tm):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    y_ref, _ = numpy_run(gates, kernel, x, initial(cell, c0, h0), np.full(B, T), hn_bias=hn_bias)
    assert rel_err(y_bm, y_ref) < 1e-5


def test_gru_hn_bias_is_inside_the_reset_product():
    kernel, _, w, x, _, h0, hn_bias = problem(3, seed=5)
    y, _ = js.sparse_gru(x, h0, w, hn_bias=hn_bias)
    y0, _ = js.sparse_gru(x, h0, w)
    assert rel_err(y0, numpy_run(3, kernel, x, (h0,), np.full(B, T))[0]) < 1e-5
    assert rel_err(y, numpy_run(3, kernel, x, (h0,), np.full(B, T), hn_bias=hn_bias)[0]) < 1e-5
    assert rel_err(y, y0) > 1e-2
    y16, _ = js.sparse_gru(x, h0, w, hn_bias=hn_bias.astype(jnp.bfloat16))  # any float dtype
    assert rel_err(y16, y) < 1e-2


def test_traced_out_of_range_lengths_poison_their_example():
    _, _, w, x, c0, h0, _ = problem(4, seed=6)
    f = jax.jit(lambda lengths: js.sparse_lstm(x, (c0, h0), w, seq_lengths=lengths))
    y, (c, h) = f(jnp.array([T, T + 1, 3], jnp.int32))
    assert np.all(np.isnan(np.asarray(y[1]))) and np.all(np.isnan(np.asarray(c[1])))
    assert np.all(np.isnan(np.asarray(h[1]))) and np.all(np.isfinite(np.asarray(h[0])))


# ---- transformations ------------------------------------------------------------------------------

def loss_weights(seed, shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


@pytest.mark.parametrize("cell,reverse", [("lstm", False), ("lstm", True), ("gru", False),
                                          ("gru", True)])
def test_grad_matches_finite_differences(cell, reverse):
    """Directional derivatives of a loss along random directions of the inputs, the initial carry,
    the values (only their real slots) and hn_bias: JAX's gradient (float32) against central
    differences of the float64 NumPy model."""
    gates = CELLS[cell]
    kernel, mask, w, x, c0, h0, hn_bias = problem(gates, seed=7)
    states = initial(cell, c0, h0)
    wy, *ws = loss_weights(8, [(B, T, H)] + [(B, H)] * len(states))

    def jax_loss(x, states, values, b_hn):
        y, final = run(cell, x, *(states if cell == "lstm" else (None, states[0])),
                       w.replace(values=values), b_hn if cell == "gru" else None,
                       seq_lengths=LENGTHS, reverse=reverse)
        return jnp.sum(y * wy) + sum(jnp.sum(s * ws_i) for s, ws_i in zip(final, ws))

    def np_loss(x, states, dense, b_hn):
        y, final = numpy_run(gates, dense, x, states, LENGTHS, reverse, b_hn if cell == "gru" else None)
        return np.sum(y * wy) + sum(np.sum(s * ws_i) for s, ws_i in zip(final, ws))

    grads = jax.grad(jax_loss, argnums=(0, 1, 2, 3))(x, states, w.values, hn_bias)
    rng = np.random.default_rng(9)
    base = [np.asarray(x, np.float64), [np.asarray(s, np.float64) for s in states],
            kernel.astype(np.float64), np.asarray(hn_bias, np.float64)]
    dense_dir = rng.standard_normal(kernel.shape) * mask
    directions = [rng.standard_normal(x.shape), [rng.standard_normal(s.shape) for s in states],
                  dense_dir, rng.standard_normal(H)]
    values_dir = np.asarray(w.gather(dense_dir.astype(np.float32)).values, np.float64)
    along = [np.sum(np.asarray(grads[0]) * directions[0]),
             sum(np.sum(np.asarray(g) * d) for g, d in zip(grads[1], directions[1])),
             np.sum(np.asarray(grads[2]) * values_dir), np.sum(np.asarray(grads[3]) * directions[3])]
    eps = 1e-5

    def shifted(k, sign):
        """The NumPy loss with argument ``k`` moved by ``sign * eps`` along its direction."""
        args = [base[0], list(base[1]), base[2], base[3]]
        if k == 1:
            args[1] = [s + sign * eps * d for s, d in zip(base[1], directions[1])]
        else:
            args[k] = base[k] + sign * eps * directions[k]
        return np_loss(*args)

    for k in range(4 if cell == "gru" else 3):
        fd = (shifted(k, 1) - shifted(k, -1)) / (2 * eps)
        assert along[k] == pytest.approx(fd, rel=2e-4, abs=1e-4), (k, along[k], fd)
    # No gradient reaches a padding slot.
    padding = np.asarray(w.indices) < 0
    assert np.all(np.asarray(grads[2])[padding] == 0)


def test_js_grad_and_value_and_grad_differentiate_sparse_weights():
    _, _, w, x, _, h0, hn_bias = problem(3, seed=10)

    def loss(w, hn_bias):
        y, h = js.sparse_gru(x, h0, w, hn_bias=hn_bias)
        return jnp.sum(jnp.tanh(y)) + jnp.sum(h ** 2)

    gw, gb = js.grad(loss, argnums=(0, 1))(w, hn_bias)
    assert isinstance(gw, js.SparseWeights) and gw.meta == w.meta
    want = jax.grad(lambda v, b: loss(w.replace(values=v), b), argnums=(0, 1))(w.values, hn_bias)
    np.testing.assert_allclose(np.asarray(gw.values), np.asarray(want[0]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(want[1]), rtol=1e-6, atol=1e-7)
    value, gw2 = js.value_and_grad(loss)(w, hn_bias)
    assert value == pytest.approx(float(loss(w, hn_bias)))
    np.testing.assert_array_equal(np.asarray(gw2.values), np.asarray(gw.values))


def test_vmap_over_sequences_lengths_and_values():
    _, _, w, x, c0, h0, _ = problem(4, seed=11)
    rng = np.random.default_rng(12)
    xs = jnp.stack([x, jnp.asarray(rng.standard_normal(x.shape), x.dtype)])
    lengths = jnp.array([LENGTHS, [2, T, 0]], jnp.int32)
    values = jnp.stack([w.values, w.values * 0.5])

    def one(x, lengths, values):
        return js.sparse_lstm(x, (c0, h0), w.replace(values=values), seq_lengths=lengths)

    y, (c, h) = jax.vmap(one)(xs, lengths, values)
    for i in range(2):
        y_i, (c_i, h_i) = one(xs[i], lengths[i], values[i])
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(y_i), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(c[i]), np.asarray(c_i), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(h[i]), np.asarray(h_i), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell", list(CELLS))
def test_export_round_trip(cell):
    pytest.importorskip("flatbuffers")
    _, _, w, x, c0, h0, hn_bias = problem(CELLS[cell], "bfloat16", seed=13)
    f = jax.jit(lambda x, c0, h0, w, b: run(cell, x, c0, h0, w, b, seq_lengths=LENGTHS))
    exported = js.export.export(f)(x, c0, h0, w, hn_bias)
    back = js.export.deserialize(js.export.serialize(exported))
    got, want = back.call(x, c0, h0, w, hn_bias), f(x, c0, h0, w, hn_bias)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert back.in_tree == exported.in_tree  # the gated SparseWeights' metas survive


# ---- paths -----------------------------------------------------------------------------------------

def test_native_without_the_cpu_kernel_is_an_error(monkeypatch):
    """Where the CPU module lacks the gated target, "native" says so and "auto" takes XLA's path."""
    from jax_sprnn import _native
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU lowering")
    _, _, w, x, c0, h0, _ = problem(4, seed=14)
    want = js.sparse_lstm(x, (c0, h0), w, method="auto")
    monkeypatch.setattr(_native, "_CPU_TARGETS", frozenset())
    with pytest.raises(RuntimeError, match=r"method='native'.*CPU module"):
        js.sparse_lstm(x, (c0, h0), w, method="native")
    got = js.sparse_lstm(x, (c0, h0), w, method="auto")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method must be one of"):
        js.sparse_lstm(x, (c0, h0), w, method="fast")


# ---- bad inputs -------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument_and_the_expected_shape():
    _, _, w4, x4, c0, h0, _ = problem(4, seed=16)
    _, _, w3, x3, *_ = problem(3, seed=16)
    _, _, w1, *_ = problem(1, seed=16)
    with pytest.raises(ValueError, match=r"weights must pack an LSTM kernel \[H, 4H\].*expected shape "
                                         r"\(37, 148\), got \(37, 111\): jax_sprnn.sparse_gru runs"):
        js.sparse_lstm(x4, (c0, h0), w3)
    with pytest.raises(ValueError, match=r"weights must pack a GRU kernel \[H, 3H\].*got \(37, 37\): "
                                         r"jax_sprnn.sparse_rnn runs"):
        js.sparse_gru(x3, h0, w1)
    with pytest.raises(TypeError, match="weights must be a jax_sprnn.SparseWeights"):
        js.sparse_gru(x3, h0, np.zeros((H, 3 * H), np.float32))
    with pytest.raises(ValueError, match=r"inputs must be \[B, T, 4H\] with 4H = 148 .*i, f, g, o"):
        js.sparse_lstm(x3, (c0, h0), w4)
    with pytest.raises(ValueError, match=r"inputs must be \[T, B, 3H\] with 3H = 111 .*r, z, n"):
        js.sparse_gru(jnp.swapaxes(x4, 0, 1), h0, w3, time_major=True)
    with pytest.raises(ValueError, match=r"inputs must be \[B, T, 3H\], got shape"):
        js.sparse_gru(x3[0], h0, w3)
    with pytest.raises(TypeError, match=r"carry must be a pair \(c0, h0\).*Array"):
        js.sparse_lstm(x4, h0, w4)
    with pytest.raises(TypeError, match="carry must be a pair.*length 3"):
        js.sparse_lstm(x4, (c0, h0, h0), w4)
    with pytest.raises(ValueError, match=r"carry\[0\] \(c0\) must be \[B, H\] = \(3, 37\)"):
        js.sparse_lstm(x4, (c0[:, :5], h0), w4)
    with pytest.raises(ValueError, match=r"carry\[1\] \(h0\) must be \[B, H\] = \(3, 37\)"):
        js.sparse_lstm(x4, (c0, h0[:2]), w4)
    with pytest.raises(TypeError, match=r"carry\[0\] \(c0\) must have the inputs' dtype float32"):
        js.sparse_lstm(x4, (c0.astype(jnp.float16), h0), w4)
    with pytest.raises(ValueError, match=r"h0 must be \[B, H\] = \(3, 37\)"):
        js.sparse_gru(x3, h0.T, w3)
    with pytest.raises(TypeError, match="inputs must have the weights' dtype"):
        js.sparse_gru(x3.astype(jnp.bfloat16), h0, w3)
    with pytest.raises(ValueError, match=r"hn_bias must be \[H\] = \(37,\)"):
        js.sparse_gru(x3, h0, w3, hn_bias=jnp.zeros(3 * H))
    with pytest.raises(TypeError, match="hn_bias must be a floating-point array, got int32"):
        js.sparse_gru(x3, h0, w3, hn_bias=jnp.zeros(H, jnp.int32))
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, T=11\]"):
        js.sparse_gru(x3, h0, w3, seq_lengths=[1, 12, 3])


# ---- Flax's cells with the same dense kernels ---------------------------------------------------------

def flax_problem(cell_type, seed, density=0.4):
    """Flax cell params with masked recurrent kernels, and what jax_sprnn takes for the same
    layer: ``(params, fused recurrent kernel, input projection function, hn_bias or None)``."""
    nn = pytest.importorskip("flax.linen")
    cell = cell_type(H)
    x = jnp.ones((B, 5))
    params = cell.init(jax.random.key(seed), cell.initialize_carry(jax.random.key(0), x.shape), x)
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    names = ("r", "z", "n") if isinstance(cell, nn.GRUCell) else ("i", "f", "g", "o")
    rng = np.random.default_rng(seed)
    for g in names:  # prune the recurrent kernels; give the input side non-trivial biases too
        p["h" + g]["kernel"] = p["h" + g]["kernel"] * (rng.random((H, H)) < density)
        for side in ("i", "h"):
            if "bias" in p[side + g]:
                p[side + g]["bias"] = rng.standard_normal(H).astype(np.float32) * 0.3
    kernel = np.concatenate([p["h" + g]["kernel"] for g in names], axis=1)

    def project(xs):  # the input projection with every bias outside the reset product
        parts = [xs @ p["i" + g]["kernel"] + p["i" + g].get("bias", 0.0)
                 + (p["h" + g]["bias"] if g != "n" and "bias" in p["h" + g] else 0.0) for g in names]
        return jnp.concatenate(parts, axis=-1)
    hn_bias = p["hn"]["bias"] if "n" in names else None
    return cell, {"params": p}, kernel, project, hn_bias


@pytest.mark.parametrize("cell_name", ["LSTMCell", "OptimizedLSTMCell", "GRUCell"])
@pytest.mark.parametrize("reverse", [False, True])
def test_equals_flax_cells(cell_name, reverse):
    nn = pytest.importorskip("flax.linen")
    cell, params, kernel, project, hn_bias = flax_problem(getattr(nn, cell_name), seed=17)
    xs = jnp.asarray(np.random.default_rng(18).standard_normal((B, T, 5)), jnp.float32)
    # Flax's nn.RNN has no defined final carry for an empty sequence (it reads position -1).
    lengths = np.array([T, 1, 6], np.int32)
    carry0 = cell.initialize_carry(jax.random.key(1), (B, 5))
    carry0 = jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.random.default_rng(19).standard_normal(a.shape), a.dtype), carry0)
    rnn = nn.RNN(cell, return_carry=True, reverse=reverse, keep_order=True)
    flax_carry, flax_y = rnn.apply({"params": {"cell": params["params"]}}, xs,
                                   initial_carry=carry0, seq_lengths=lengths)
    w = js.SparseWeights.from_dense(kernel, kernel != 0)
    if cell_name == "GRUCell":
        y, h = js.sparse_gru(project(xs), carry0, w, hn_bias=hn_bias, seq_lengths=lengths,
                             reverse=reverse)
        ours, theirs = [h], [flax_carry]
    else:
        y, (c, h) = js.sparse_lstm(project(xs), carry0, w, seq_lengths=lengths, reverse=reverse)
        ours, theirs = [c, h], list(flax_carry)
    valid = (np.arange(T)[None, :] < lengths[:, None])[:, :, None]
    np.testing.assert_allclose(np.where(valid, np.asarray(y), 0), np.where(valid, flax_y, 0),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ---- pruning of gated kernels -------------------------------------------------------------------------

@pytest.mark.parametrize("gates", [3, 4])
def test_row_balanced_masks_balance_every_gate_row(gates):
    kernel = np.random.default_rng(20).standard_normal((H, gates * H)).astype(np.float32)
    mask = pruning.magnitude_mask(kernel, 0.8, rule="row_balanced")
    assert mask.shape == kernel.shape
    np.testing.assert_array_equal(mask.sum(axis=0), round(0.2 * H))  # every gate row of every unit
    mag = np.abs(kernel)
    assert np.all(np.where(mask, mag, np.inf).min(axis=0) >= np.where(mask, -np.inf, mag).max(axis=0))
    initial_mask = pruning.initial_mask(H, 0.25, seed=1, gates=gates)
    assert initial_mask.shape == (H, gates * H)
    rows, cols = pruning.budgets_for_density(H, 0.25, gates)
    np.testing.assert_array_equal(initial_mask.sum(axis=0), rows)
    assert initial_mask.sum(axis=1).max() <= cols <= gates * H
    np.testing.assert_array_equal(pruning.initial_mask(H, 0.25, seed=1, gates=1),
                                  pruning.initial_mask(H, 0.25, seed=1))


@pytest.mark.parametrize("gates", [3, 4])
def test_packed_mask_repacks_gated_masks_into_one_layout(gates):
    packed = pruning.PackedMask.for_density(H, 0.3, gates=gates, seed=2)
    assert packed.shape == (H, gates * H) and packed.meta.gates == gates and "gates=" in repr(packed)
    kernel = np.random.default_rng(21).standard_normal((H, gates * H)).astype(np.float32)
    params, sparsity = {"cell": {"kernel": jnp.asarray(kernel)}}, {"cell": {"kernel": packed}}
    new_params, new_sparsity = pruning.update_sparsity(params, sparsity, 0.8)
    repacked = new_sparsity["cell"]["kernel"]
    assert (repacked.meta, repacked.meta_t) == (packed.meta, packed.meta_t)  # no recompilation
    mask = np.asarray(repacked.mask)
    np.testing.assert_array_equal(mask.sum(axis=0), round(0.2 * H))
    assert not np.any(np.asarray(mask) & ~np.asarray(packed.mask))  # nested
    w = repacked.weights(new_params["cell"]["kernel"])
    w.validate()
    np.testing.assert_array_equal(np.asarray(w.to_dense()), np.where(mask, kernel, 0))
    x = jnp.asarray(np.random.default_rng(22).standard_normal((B, T, gates * H)), jnp.float32)
    h0 = jnp.zeros((B, H))
    y = (js.sparse_lstm(x, (h0, h0), w)[0] if gates == 4 else js.sparse_gru(x, h0, w)[0])
    cell = "lstm" if gates == 4 else "gru"
    assert rel_err(y, numpy_run(gates, np.where(mask, kernel, 0), x, initial(cell, h0, h0),
                                np.full(B, T))[0]) < 1e-5
    with pytest.raises(ValueError, match=r"mask must be \[37, %d\] \(the layer's shape\)" % (gates * H)):
        packed.with_mask(np.ones((H, H), bool))
    with pytest.raises(ValueError, match=r"mask must be .*\[H, 3H\]"):
        pruning.PackedMask.create(np.ones((H, 2 * H), bool))


@pytest.mark.parametrize("gates", [3, 4])
def test_inference_form_and_checkpoint_read_back(gates):
    kernel = np.random.default_rng(23).standard_normal((H, gates * H)).astype(np.float32)
    mask = pruning.magnitude_mask(kernel, 0.7)
    packed = pruning.PackedMask.create(mask)
    variables = {"params": {"cell": {"kernel": kernel, "bias": np.zeros(H)}},
                 "sparsity": {"cell": {"kernel": packed}}}
    inference = pruning.to_inference(variables)
    w = inference["sparsity"]["cell"]["kernel"]
    assert isinstance(w, js.SparseWeights) and w.shape == (H, gates * H)
    assert "kernel" not in inference["params"]["cell"]
    np.testing.assert_array_equal(np.asarray(w.to_dense()), np.where(mask, kernel, 0))
    raw = {"sparsity": {"cell": {"kernel": {n: np.asarray(getattr(w, n)) for n in w.LEAVES}}}}
    back = pruning.from_restored(raw)["sparsity"]["cell"]["kernel"]
    assert (back.meta, back.meta_t) == (w.meta, w.meta_t)
    np.testing.assert_array_equal(np.asarray(back.values), np.asarray(w.values))
    stacked = pruning.pack_inference(np.stack([kernel, kernel * 2]), np.stack([mask, mask]))
    assert stacked.values.shape[0] == 2 and stacked.meta.gates == gates
    back = pruning.from_restored({n: np.asarray(getattr(stacked, n)) for n in stacked.LEAVES})
    np.testing.assert_array_equal(np.asarray(back.values), np.asarray(stacked.values))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("reverse", [False, True])
def test_backward_from_outputs_equals_autodiff_of_the_xla_scan(cell, dtype, reverse):
    """The custom_vjp's backward (from the forward's outputs, no forward recomputation) against
    JAX's autodiff of XLA's dense scan of the same math, in the storage dtype, with lengths."""
    gates = CELLS[cell]
    _, _, w, x, c0, h0, hn_bias = problem(gates, dtype, seed=21)
    carry = (c0, h0) if cell == "lstm" else (h0,)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    cot_rng = np.random.default_rng(22)
    wy = jnp.asarray(cot_rng.standard_normal((B, T, H)), jnp.float32)
    ws = [jnp.asarray(cot_rng.standard_normal((B, H)), jnp.float32) for _ in carry]

    def loss(y, final):
        return jnp.sum(y.astype(jnp.float32) * wy) + sum(
            jnp.sum(s.astype(jnp.float32) * c) for s, c in zip(final, ws))

    def ours(x, carry, values, b):
        y, final = run(cell, x, *(carry if cell == "lstm" else (None, carry[0])),
                       w.replace(values=values), b if cell == "gru" else None,
                       seq_lengths=LENGTHS, reverse=reverse)
        return loss(y, final)

    def xla(x, carry, values, b):
        kernel = fallback.dense_from_packed(values, w.indices, w.lane_row, w.meta)
        y, final = fallback.gated_scan(jnp.swapaxes(x, 0, 1), carry,
                                       fallback.storage_matvec(kernel, x.dtype), lengths,
                                       b if cell == "gru" else None, gates=gates, reverse=reverse)
        return loss(jnp.swapaxes(y, 0, 1), final)

    got = jax.grad(ours, argnums=(0, 1, 2, 3))(x, carry, w.values, hn_bias)
    want = jax.grad(xla, argnums=(0, 1, 2, 3))(x, carry, w.values, hn_bias)
    tol = GRAD_TOLERANCE[dtype]
    for name, g, r in zip(("x", "carry", "values", "hn_bias"), got, want):
        if name == "hn_bias" and cell == "lstm":
            continue
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(r)):
            assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("gates", [3, 4])
def test_weights_closed_over_are_not_folded_into_a_dense_constant(gates):
    """A jitted gradient that closes over the weights (constants of the program): the dense
    kernel that the XLA paths scatter from the packed arrays must not be folded by XLA at compile
    time (8 s at H = 1024 before the optimization barrier), i.e. no [H, G*H] constant remains."""
    from jax_sprnn.testing import make_gated_problem, run_gated
    H = 40
    w, x, c0, h0, hn_bias = make_gated_problem(3, gates, H, 2, 5, 0.2)
    loss = lambda x, h0: run_gated(gates, x, c0, h0, w, hn_bias)[0].sum()  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, h0).compile().as_text()
    dense = f"f32[{H},{gates * H}]"
    folded = [line for line in hlo.splitlines() if dense in line and " constant(" in line]
    assert not folded, folded[:2]


@pytest.mark.parametrize("gates", [3, 4])
def test_the_cpu_runs_the_backward_recurrence_in_the_cpp_kernel(gates):
    """On a CPU with the module, the gradient's backward recurrence is the C++ target (the tests
    above then check its numbers against autodiff of XLA's scan): the compiled program keeps it
    (XLA drops the platform branch not taken, the XLA scan)."""
    from jax_sprnn import _constants, _native
    from jax_sprnn.testing import make_gated_problem, run_gated
    target = _constants.ffi_target("gated_backward")
    if target not in _native.cpu_targets() or jax.default_backend() != "cpu":
        pytest.skip("needs the CPU module on the CPU backend")
    w, x, c0, h0, hn_bias = make_gated_problem(5, gates, 24, 3, 6, 0.3)
    loss = lambda x, h0: run_gated(gates, x, c0, h0, w, hn_bias)[0].sum()  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, h0).compile().as_text()
    assert target in hlo


def test_the_cpp_backward_names_a_bad_operand():
    """The backward target checks its operands one by one and names the first that is wrong (the
    checks the CUDA target shares), and so does the primitive before any target sees them."""
    from jax_sprnn import _constants, _native
    from jax_sprnn.primitives import sprnn_gru_backward_p
    from jax_sprnn.testing import make_gated_problem
    T, B, H = 4, 2, 16
    w, x, c0, h0, hn_bias = make_gated_problem(9, 3, H, B, T, 0.3)
    x_steps = jnp.swapaxes(x, 0, 1)
    u = jnp.zeros((T, B, 3 * H - 1), jnp.float32)  # one column short
    state = jnp.zeros((T, B, H), x.dtype)
    empty = jnp.zeros((0,), x.dtype)
    lengths = jnp.full((B,), T, jnp.int32)
    layout = (w.transposed_values(), w.indices_t, w.lane_row_t)
    kernel = fallback.dense_from_packed(w.values, w.indices, w.lane_row, w.meta)
    with pytest.raises(ValueError, match=r"sprnn_gru_backward: u must be \[4, 2, 48\]"):
        sprnn_gru_backward_p.bind(x_steps, u, state, state, h0, hn_bias, *layout, lengths, kernel,
                                  meta=w.meta_t, method="auto")
    good_u = jnp.zeros((T, B, 3 * H), jnp.float32)
    with pytest.raises(ValueError, match=r"sprnn_gru_backward: hn_bias must be \[16\]"):
        sprnn_gru_backward_p.bind(x_steps, good_u, state, state, h0, hn_bias[:15], *layout, lengths,
                                  kernel, meta=w.meta_t, method="auto")
    target = _constants.ffi_target("gated_backward")
    if target not in _native.cpu_targets() or jax.default_backend() != "cpu":
        pytest.skip("needs the CPU module on the CPU backend")
    shapes = (jax.ShapeDtypeStruct((T, B, 3 * H), x.dtype), jax.ShapeDtypeStruct((T, B, 3 * H), jnp.float32),
              jax.ShapeDtypeStruct((B, H), x.dtype), jax.ShapeDtypeStruct((0,), x.dtype))
    call = jax.ffi.ffi_call(target, shapes)
    with pytest.raises(Exception, match=r"u must be float32 \[T, B, G\*H\] = \[4, 2, 48\]"):
        jax.block_until_ready(call(x_steps, u, state, empty, state, h0, empty, hn_bias, *layout, lengths,
                                   gates=np.int64(3), slots_per_lane=np.int64(w.meta_t.slots_per_lane)))


@pytest.mark.parametrize("gates", [3, 4])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_cpp_and_the_xla_backward_recurrences_agree(gates, dtype):
    """The backward primitive (the C++ recurrence on a CPU) against its XLA scan, on ragged lengths:
    every output within the dtype's gradient tolerance, and exact zeros where nothing runs."""
    from jax_sprnn.testing import gated_backward_problem, run_gated_backward
    w, kernel, operands, lengths = gated_backward_problem(13, gates, 29, 5, 7, 0.25, dtype)
    got = jax.jit(lambda: run_gated_backward(gates, w, kernel, operands, lengths))()
    want = jax.jit(lambda: run_gated_backward(gates, w, kernel, operands, lengths, xla=True))()
    assert len(got) == len(want) == (4 if gates == 4 else 3)
    for a, r in zip(got, want):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert rel_err(a, r) < GRAD_TOLERANCE[dtype]
    T = operands[0].shape[0]
    idle = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
    for a in got[:2]:  # dx, du: zero at the steps an example does not run
        assert not np.asarray(a, np.float32)[idle].any()


@pytest.mark.parametrize("gates", [3, 4])
def test_the_backward_primitive_vmaps_into_the_batch(gates):
    """vmap of the backward primitive folds into its batch: the same as one call per slice."""
    from jax_sprnn.testing import gated_backward_problem, run_gated_backward
    w, kernel, operands, lengths = gated_backward_problem(13, gates, 29, 6, 7, 0.25)
    batch_axes = (1, 1, 1, 1, 1, 0, 0) if gates == 4 else (1, 1, 1, 1, 0, None)

    def split(a, ax):  # [.., 6, ..] -> [2, .., 3, ..]
        if ax is None:
            return a
        a = jnp.moveaxis(a, ax, 0).reshape((2, 3) + a.shape[:ax] + a.shape[ax + 1:])
        return jnp.moveaxis(a, 1, ax + 1)
    split_ops = [split(a, ax) for a, ax in zip(operands, batch_axes)]
    in_axes = tuple(None if ax is None else 0 for ax in batch_axes)
    run = lambda ops, ln: run_gated_backward(gates, w, kernel, ops, ln)  # noqa: E731
    mapped = jax.vmap(lambda *a: run(a[:-1], a[-1]), in_axes=(*in_axes, 0))(
        *split_ops, lengths.reshape(2, 3))
    for i in range(2):
        ops = [a if ax is None else a[i] for a, ax in zip(split_ops, batch_axes)]
        one = run(ops, lengths.reshape(2, 3)[i])
        for m, o in zip(mapped, one):
            np.testing.assert_allclose(np.asarray(m[i]), np.asarray(o), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_lstm_forward_saves_its_cells(dtype, reverse):
    """``sprnn_lstm_with_cells`` (what a differentiated LSTM binds) gives the plain primitive's
    results and the cell state after each position: zero past a sequence's end, the final c at
    its last position, and the XLA scan's cells within the dtype's tolerance."""
    from jax_sprnn.primitives import sprnn_lstm_p, sprnn_lstm_with_cells_p
    from jax_sprnn.testing import make_gated_problem
    T, B, H = 8, 4, 33
    w, x, c0, h0, _ = make_gated_problem(21, 4, H, B, T, 0.3, dtype)
    x_tm = jnp.swapaxes(x, 0, 1)
    lengths = jnp.asarray([8, 0, 5, 3], jnp.int32)
    operands = (x_tm, h0, c0, w.values, w.indices, w.lane_row, lengths)
    # ("native": the C++ kernel; "auto" takes XLA's path at this size)
    params = dict(reverse=reverse, meta=w.meta, method="native")
    y, h, c, cells = jax.jit(lambda: sprnn_lstm_with_cells_p.bind(*operands, **params))()
    for a, b in zip((y, h, c), jax.jit(lambda: sprnn_lstm_p.bind(*operands, **params))()):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    want = fallback.lstm_forward(*operands, reverse=reverse, meta=w.meta)
    assert cells.shape == y.shape and cells.dtype == y.dtype
    assert rel_err(cells, want[3]) < TOLERANCE[dtype]
    cells = np.asarray(cells, np.float32)
    for b, L in enumerate(np.asarray(lengths)):
        assert not cells[L:, b].any()
        if L:
            last = 0 if reverse else L - 1
            # (XLA may fuse the cell's arithmetic into each output apart: an ulp in float32)
            np.testing.assert_allclose(cells[last, b], np.asarray(c, np.float32)[b], rtol=1e-6, atol=1e-7)
