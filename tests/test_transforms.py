"""jit, vmap (folded into the batch, and over weights), lax.scan over layers, and lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js

from jax_sprnn.testing import make_problem, rel_err


def test_jit_matches_eager():
    dense, w, x, h0 = make_problem(1, 41, 3, 7, 0.2)
    eager = js.sparse_rnn(x, h0, w, method="native")
    jitted = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="native"))(x, h0, w)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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


def test_vmap_over_weights_loops():
    dense0, w0, x, h0 = make_problem(10, 25, 2, 5, 0.25)
    denses = [dense0 * s for s in (1.0, -0.5, 0.7)]  # one pattern, three value sets
    ws = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[w0.gather(d) for d in denses])
    y, h = jax.vmap(lambda w: js.sparse_rnn(x, h0, w, method="native"))(ws)
    for i, dense in enumerate(denses):
        yi, hi = js.reference_rnn(x, h0, dense)
        assert rel_err(y[i], yi) < 1e-5 and rel_err(h[i], hi) < 1e-5


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
    d1, w1, x, h0 = make_problem(40, 32, 2, 5, 0.2)
    rng = np.random.default_rng(41)
    k = rng.standard_normal((32, 32)).astype(np.float32)
    traces = []

    @jax.jit
    def f(x, w):
        traces.append(1)
        return js.sparse_rnn(x, h0, w, method="native")

    f(x, w1)
    for seed in range(3):  # row-balanced masks of one size share one layout
        mask = np.zeros((32, 32), bool)
        for i in range(32):
            mask[np.random.default_rng(seed * 100 + i).choice(32, 6, replace=False), i] = True
        w = js.SparseWeights.from_dense(k, mask)
        if seed == 0:
            first_meta = w.meta
        if w.meta == first_meta and w.meta_t == js.SparseWeights.from_dense(k, mask).meta_t:
            f(x, w)
    assert len(traces) <= 2
