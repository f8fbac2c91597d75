"""jit, vmap (folded into the batch, and over weights: one stacked call, or a loop), lax.scan over
layers, and lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js

from jax_sprnn import _constants
from jax_sprnn.testing import make_problem, normal, random_kernel, rel_err


def test_jit_matches_eager():
    dense, w, x, h0 = make_problem(1, 41, 3, 7, 0.2)
    eager = js.sparse_rnn(x, h0, w, method="native")
    jitted = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="native"))(x, h0, w)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("cell", ["simple", "gru"])
def test_disable_jit_runs_the_kernels_and_their_gradients(cell):
    """Under jax.disable_jit() (debugging) the primitives still run compiled: their eager
    implementation jits the bind, which used to come straight back to itself (RecursionError)."""
    dense, w, x, h0 = make_problem(3, 9, 2, 4, 0.4)
    if cell == "simple":
        def run(x, values, method):
            return js.sparse_rnn(x, h0, w.replace(values=values), method=method)
    else:
        kernel = np.concatenate([dense] * 3, axis=1)
        wg = js.SparseWeights.from_dense(kernel, density=0.4)
        x = jnp.concatenate([x] * 3, axis=-1)

        def run(x, values, method):
            return js.sparse_gru(x, h0, wg.replace(values=values), method=method)
        w = wg

    def loss(x, values, method):
        return jnp.sum(jnp.sin(run(x, values, method)[0]))
    with jax.disable_jit():
        got = run(x, w.values, "native"), jax.grad(loss, argnums=(0, 1))(x, w.values, "native")
    want = run(x, w.values, "reference"), jax.grad(loss, argnums=(0, 1))(x, w.values, "reference")
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel_err(a, b) < 1e-5


def test_native_lowers_to_our_custom_call():
    dense, w, x, h0 = make_problem(2, 20, 2, 3, 0.3)
    hlo = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="native")).lower(x, h0, w).as_text()
    assert "jax_sprnn_forward" in hlo
    hlo = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="reference")).lower(x, h0, w).as_text()
    assert "jax_sprnn_forward" not in hlo


@pytest.mark.parametrize("in_axes", [(0, 0, None), (1, None, None), (0, None, None)])
def test_vmap_folds_into_the_batch(in_axes):
    dense, w, x, h0 = make_problem(3, 33, 2, 6, 0.2)
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.standard_normal((4,) + x.shape), x.dtype)
    h0s = jnp.asarray(rng.standard_normal((4,) + h0.shape), h0.dtype)
    if in_axes[0] == 1:
        xs = jnp.moveaxis(xs, 0, 1)
    f = lambda x, h0, w: js.sparse_rnn(x, h0, w, method="native")
    h0_arg = h0s if in_axes[1] == 0 else h0
    y, h = jax.vmap(f, in_axes=in_axes)(xs, h0_arg, w)
    jaxpr = str(jax.make_jaxpr(jax.vmap(f, in_axes=in_axes))(xs, h0_arg, w))
    assert jaxpr.count("sprnn_forward") == 1 and "scan" not in jaxpr  # one call for all
    for i in range(4):
        xi = xs[:, i] if in_axes[0] == 1 else xs[i]
        yi, hi = f(xi, h0s[i] if in_axes[1] == 0 else h0, w)
        assert rel_err(y[i], yi) < 1e-6 and rel_err(h[i], hi) < 1e-6


def test_vmap_with_lengths():
    dense, w, x, h0 = make_problem(4, 27, 3, 8, 0.2)
    lengths = jnp.array([[8, 2, 5], [0, 8, 3]], jnp.int32)
    f = lambda L: js.sparse_rnn(x, h0, w, seq_lengths=L, method="native")
    y, h = jax.vmap(f)(lengths)
    for i in range(2):
        yi, hi = js.reference_rnn(x, h0, dense, seq_lengths=lengths[i])
        assert rel_err(y[i], yi) < 1e-5 and rel_err(h[i], hi) < 1e-5


def _weight_sets(seed, scales):
    """One pattern, a value set per scale, stacked: vmappable SparseWeights and the dense kernels."""
    dense0, w0, x, h0 = make_problem(seed, 25, 2, 5, 0.25)
    denses = [dense0 * s for s in scales]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[w0.gather(d) for d in denses]), denses, x, h0


@pytest.mark.parametrize("reverse", [False, True])
def test_vmap_over_weights_is_one_stacked_call(reverse):
    ws, denses, x, h0 = _weight_sets(10, (1.0, -0.5, 0.7))
    L = jnp.array([5, 3], jnp.int32)

    def run(w, x):
        return js.sparse_rnn(x, h0, w, method="native", reverse=reverse, seq_lengths=L)

    jaxpr = str(jax.make_jaxpr(jax.vmap(run, in_axes=(0, None)))(ws, x))
    assert "sprnn_forward_stack" in jaxpr and "scan[" not in jaxpr
    y, h = jax.vmap(run, in_axes=(0, None))(ws, x)
    xs = normal(11, (3,) + x.shape)  # the inputs vmapped too
    y2, _ = jax.vmap(run)(ws, xs)
    for i, dense in enumerate(denses):
        yi, hi = js.reference_rnn(x, h0, dense, reverse=reverse, seq_lengths=L)
        assert rel_err(y[i], yi) < 1e-5 and rel_err(h[i], hi) < 1e-5
        assert rel_err(y2[i], js.reference_rnn(xs[i], h0, dense, reverse=reverse,
                                               seq_lengths=L)[0]) < 1e-5
    # The gradient: the backward recurrences are one stacked call too; each set its own gradient.
    def loss(w, x):
        y, h = run(w, x)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h)

    def ref_loss(kernel, x):
        y, h = js.reference_rnn(x, h0, kernel, reverse=reverse, seq_lengths=L)
        return jnp.sum(jnp.sin(y)) + jnp.sum(h)

    grad = jax.vmap(js.grad(loss, argnums=(0, 1)), in_axes=(0, None))
    assert "sprnn_backward_stack" in str(jax.make_jaxpr(grad)(ws, x))
    g_w, g_x = grad(ws, x)
    for i, dense in enumerate(denses):
        r_k, r_x = jax.grad(ref_loss, argnums=(0, 1))(jnp.asarray(dense), x)
        w_i = jax.tree_util.tree_map(lambda a, i=i: a[i], ws)
        g_dense = np.asarray(w_i.replace(values=g_w.values[i]).to_dense())
        mask = dense != 0
        assert rel_err(g_dense[mask], np.asarray(r_k)[mask]) < 1e-4
        assert rel_err(g_x[i], r_x) < 1e-4


def test_vmap_over_weights_loops_where_one_call_cannot_take_them():
    # Lengths that differ per weight set (the problems of one call share theirs), and more weight
    # sets than one call takes: one call per set (lax.map, a scan).
    ws, denses, x, h0 = _weight_sets(12, (1.0, -0.5, 0.7))
    lengths = jnp.array([[5, 3], [2, 5], [0, 4]], jnp.int32)

    def run(w, L):
        return js.sparse_rnn(x, h0, w, method="native", seq_lengths=L)

    assert "scan[" in str(jax.make_jaxpr(jax.vmap(run))(ws, lengths))
    y, _ = jax.vmap(run)(ws, lengths)
    for i, dense in enumerate(denses):
        assert rel_err(y[i], js.reference_rnn(x, h0, dense, seq_lengths=lengths[i])[0]) < 1e-5
    many, _, _, _ = _weight_sets(13, np.linspace(-1, 1, _constants.MAX_PROBLEMS + 1))
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda w: js.sparse_rnn(x, h0, w, method="native")))(many))
    assert "scan[" in jaxpr and "sprnn_forward_stack" not in jaxpr


def test_scan_over_layers():
    dense, w, x, h0 = make_problem(20, 30, 2, 6, 0.2)
    ws = jax.tree_util.tree_map(lambda a: jnp.stack([a, a, a]), w)

    @jax.jit
    def stack(x):
        def layer(h_seq, wi):
            y, _ = js.sparse_rnn(h_seq, h0, wi, method="native")
            return y, None
        return jax.lax.scan(layer, x, ws)[0]

    ref = x
    for _ in range(3):
        ref, _ = js.reference_rnn(ref, h0, dense)
    assert rel_err(stack(x), ref) < 1e-5


def test_two_layers_in_one_jit():
    d1, w1, x, h0 = make_problem(30, 36, 2, 5, 0.1)
    d2, w2, _, _ = make_problem(31, 36, 2, 5, 0.3)

    @jax.jit
    def f(x):
        y, _ = js.sparse_rnn(x, h0, w1, method="native")
        return js.sparse_rnn(y, h0, w2, activation="relu", method="native")

    r, _ = js.reference_rnn(x, h0, d1)
    r = js.reference_rnn(r, h0, d2, activation="relu")
    for a, b in zip(f(x), r):
        assert rel_err(a, b) < 1e-5


def test_new_mask_same_layout_does_not_recompile():
    # Circulant masks (column i holds rows i + o mod H for six offsets o) have six nonzeros in every
    # row and every column, so whatever the offsets, their layout and their transpose's are the same.
    hidden = 32
    _, _, x, h0 = make_problem(40, hidden, 2, 5, 0.2)
    rng = np.random.default_rng(41)
    cols = np.arange(hidden)
    traces = []

    @jax.jit
    def f(x, w):
        traces.append(1)
        return js.sparse_rnn(x, h0, w, method="native")

    metas = set()
    for seed in range(3):
        offsets = np.random.default_rng(seed).choice(hidden, 6, replace=False)
        mask = np.zeros((hidden, hidden), bool)
        mask[(cols + offsets[:, None]) % hidden, cols] = True
        kernel, _ = random_kernel(rng, hidden, 0.0, mask=mask)
        w = js.SparseWeights.from_dense(kernel, mask)
        metas.add((w.meta, w.meta_t))
        y, h = f(x, w)
        y_ref, h_ref = js.reference_rnn(x, h0, kernel)  # this mask's answer, not a cached one
        assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
        assert len(traces) == 1, f"mask {seed} retraced"
    assert len(metas) == 1
    # the counter counts: a layer of another layout is traced again
    _, w_other, _, _ = make_problem(42, hidden, 2, 5, 0.5)
    assert (w_other.meta, w_other.meta_t) not in metas
    f(x, w_other)
    assert len(traces) == 2
