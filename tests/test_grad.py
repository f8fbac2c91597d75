"""Differentiation: the native backward recurrence and weight gradient against JAX autodiff of the
reference, check_grads, exact zeros off the pattern, and composition with vmap/checkpoint/scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_sprnn as js

from jax_sprnn.testing import GRAD_TOLERANCE, PUBLIC_CALLS, make_problem, rel_err


def _loss_fn(method, **kw):
    def loss(x, h0, values, w, cot_y, cot_h):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), method=method, **kw)
        return (jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h.astype(jnp.float32) * cot_h))
    return loss


def _grads(method, seed, hidden, batch, steps, density, dtype="float32", **kw):
    dense, w, x, h0 = make_problem(seed, hidden, batch, steps, density, dtype)
    rng = np.random.default_rng(seed + 1)
    cot_y = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    cot_h = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    g = jax.grad(_loss_fn(method, **kw), argnums=(0, 1, 2))(x, h0, w.values, w, cot_y, cot_h)
    return g, w


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("reverse", [False, True])
def test_grads_match_reference(activation, reverse):
    lengths = np.array([9, 4, 0], np.int32)
    kw = dict(activation=activation, reverse=reverse, seq_lengths=lengths)
    native, w = _grads("native", 3, 53, 3, 9, 0.2, **kw)
    ref, _ = _grads("reference", 3, 53, 3, 9, 0.2, **kw)
    for a, b, name in zip(native, ref, ("dx", "dh0", "dvalues")):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_grads_low_precision(dtype):
    native, _ = _grads("native", 4, 40, 2, 7, 0.3, dtype)
    ref, _ = _grads("reference", 4, 40, 2, 7, 0.3, "float32")
    # gradients in 16-bit storage: GRAD_TOLERANCE, a few times the forward one (two recurrences)
    for a, b in zip(native, ref):
        assert rel_err(a, b) < GRAD_TOLERANCE[dtype]


def test_check_grads():
    dense, w, x, h0 = make_problem(5, 17, 2, 5, 0.3)

    def f(x, h0, values):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), method="native")
        return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)

    check_grads(f, (x, h0, w.values), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2)


def test_gradient_off_pattern_is_exactly_zero():
    dense, w, x, h0 = make_problem(6, 31, 3, 6, 0.15)

    def f(kernel):
        y, h = js.sparse_rnn(x, h0, w.gather(kernel), method="native")
        return jnp.sum(y * y) + jnp.sum(h)

    g = np.asarray(jax.grad(f)(jnp.asarray(dense)))
    mask = w.mask()
    assert np.all(g[~mask] == 0)
    assert np.count_nonzero(g[mask]) > 0.9 * mask.sum()
    # and padding slots of the packed values get exactly zero
    gv, _ = _grads("native", 6, 31, 3, 6, 0.15)
    assert np.all(np.asarray(gv[2])[np.asarray(w.indices) < 0] == 0)


def test_vmap_of_grad_keeps_per_example_weight_gradients():
    dense, w, x, h0 = make_problem(7, 29, 2, 5, 0.2)
    xs = jnp.stack([x, 2 * x, -x])

    def loss(values, x, method):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), method=method)
        return jnp.sum(y ** 2) + jnp.sum(h)

    per_ex = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(w.values, xs, "native")
    ref = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(w.values, xs, "reference")
    assert per_ex.shape == (3, w.values.shape[0])
    assert rel_err(per_ex, ref) < 1e-5
    assert not np.allclose(per_ex[0], per_ex[1])


def test_grad_under_checkpoint_jit_and_scan():
    dense, w, x, h0 = make_problem(8, 24, 2, 6, 0.3)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), w)

    def two_layers(values, method):
        ws = stacked.replace(values=values)

        @jax.checkpoint
        def layer(h_seq, wi):
            y, _ = js.sparse_rnn(h_seq, h0, wi, method=method)
            return y, None

        y, _ = jax.lax.scan(layer, x, ws)
        return jnp.sum(y ** 2)

    values = stacked.values * jnp.array([1.0, 0.5])[:, None]
    g = jax.jit(jax.grad(two_layers), static_argnums=1)(values, "native")
    g_ref = jax.grad(two_layers)(values, "reference")
    assert rel_err(g, g_ref) < 1e-5


def test_gradients_are_deterministic():
    a, _ = _grads("native", 9, 45, 3, 8, 0.2)
    b, _ = _grads("native", 9, 45, 3, 8, 0.2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("call", sorted(PUBLIC_CALLS))
@pytest.mark.parametrize("method", ["auto", "native", "reference"])
@pytest.mark.parametrize("reverse,lengths", [(False, None), (True, (0, 0, 0))])
def test_an_empty_sequence_passes_the_carry_cotangent_through(call, method, reverse, lengths):
    """T = 0: no step runs, so the final carry is the initial one; its cotangent reaches the
    initial carry unchanged and the weights get none (every path, reverse and lengths too)."""
    gates, run = PUBLIC_CALLS[call]
    H, B = 5, 3
    rng = np.random.default_rng(7)
    w = js.SparseWeights.from_dense(rng.standard_normal((H, gates * H)).astype(np.float32) * 0.3,
                                    density=0.6)
    h = jnp.asarray(rng.standard_normal((B, H)), jnp.float32)
    x = jnp.zeros((B, 0, gates * H), jnp.float32)
    cot = [jnp.asarray(rng.standard_normal((B, H)), jnp.float32) for _ in range(4)]
    kw = dict(method=method, reverse=reverse, seq_lengths=None if lengths is None else np.array(lengths))

    def loss(h, values):
        final = jax.tree.leaves(run(x, h, w.replace(values=values), **kw)[1])
        return sum(jnp.sum(f * c) for f, c in zip(final, cot))

    final = jax.tree.leaves(run(x, h, w, **kw)[1])
    dh, dvalues = jax.grad(loss, argnums=(0, 1))(h, w.values)
    # No step: each final carry part is its initial one, k * h (k: 1 or 2, PUBLIC_CALLS), so
    # d/dh sum(c_i * k_i h) = sum k_i c_i.
    scale = [round(float(np.mean(f / h))) for f in final]
    for f, k in zip(final, scale):
        assert k in (1, 2)
        np.testing.assert_array_equal(f, k * h)
    np.testing.assert_allclose(dh, sum(k * c for k, c in zip(scale, cot)), rtol=1e-6)
    np.testing.assert_array_equal(dvalues, 0)
