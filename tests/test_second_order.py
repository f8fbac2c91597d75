"""Derivatives of a gradient (jax.grad of jax.grad, Hessians): the kernel paths against the pure-JAX
reference (``method="reference"``, differentiated by JAX itself), for every cell, the bidirectional
calls and weight sets under vmap, at odd shapes with lengths and reverse. The first-order gradient
runs the native backward kernels (forward_mode.custom_vjp); its own derivatives come from the primitives'
JVP rules (forward-mode AD of the fallback, primitives._jvp_by_fallback)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn.testing import (GRAD_TOLERANCE, make_gated_problem, make_gated_twin_problem,
                               make_problem, make_twin_problem, random_lengths, rel_err)

H, B, T = 13, 3, 6
METHODS = ("native", "auto")


def _loss(y, finals):
    """A scalar whose gradient is nonlinear in every output (sin), so that its own derivative
    involves the recurrence's second derivatives."""
    return jnp.sum(jnp.sin(y.astype(jnp.float32))) + sum(
        jnp.sum(jnp.square(f.astype(jnp.float32))) for f in jax.tree_util.tree_leaves(finals))


def _one_layer(cell, seed, dtype="float32"):
    """``(run, args)``: ``run(method, *args)`` a scalar loss of one layer, ``args`` the arrays it is
    differentiated in (inputs, carry, weight values and, for the GRU, hn_bias)."""
    lengths = random_lengths(B, T, seed)
    if cell == "simple":
        _, w, x, h0 = make_problem(seed, H, B, T, 0.3, dtype)

        def run(method, x, h0, values):
            return _loss(*js.sparse_rnn(x, h0, w.replace(values=values), seq_lengths=lengths,
                                        reverse=True, method=method))
        return run, (x, h0, w.values)
    gates = {"lstm": 4, "gru": 3}[cell]
    w, x, c0, h0, hn_bias = make_gated_problem(seed, gates, H, B, T, 0.3, dtype)
    if cell == "lstm":
        def run(method, x, c0, h0, values):
            return _loss(*js.sparse_lstm(x, (c0, h0), w.replace(values=values), seq_lengths=lengths,
                                         method=method))
        return run, (x, c0, h0, w.values)

    def run(method, x, h0, values, hn_bias):
        return _loss(*js.sparse_gru(x, h0, w.replace(values=values), hn_bias=hn_bias,
                                    seq_lengths=lengths, reverse=True, method=method))
    return run, (x, h0, w.values, hn_bias)


def _grad_of_grad(run, method, args, wrt):
    """The gradient, with respect to every argument, of the squared norm of the gradient with
    respect to argument ``wrt`` (a gradient penalty)."""
    def penalty(*a):
        g = jax.grad(run, argnums=1 + wrt)(method, *a)
        return jnp.sum(jnp.square(g.astype(jnp.float32)))
    return jax.grad(penalty, argnums=tuple(range(len(args))))(*args)


def _assert_close(got, want, tol):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert rel_err(g, w) < tol, (i, rel_err(g, w))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_the_gradient_of_a_gradient_matches_the_reference(cell, method):
    run, args = _one_layer(cell, seed=len(cell))
    for wrt in range(len(args)):
        _assert_close(_grad_of_grad(run, method, args, wrt),
                      _grad_of_grad(run, "reference", args, wrt), GRAD_TOLERANCE["float32"])


@pytest.mark.parametrize("cell", ["simple", "gru"])
def test_the_gradient_of_a_16_bit_gradient_matches_the_reference(cell):
    run, args = _one_layer(cell, seed=7, dtype="bfloat16")
    jitted = jax.jit(_grad_of_grad, static_argnums=(0, 1, 3))
    _assert_close(jitted(run, "native", args, 0), jitted(run, "reference", args, 0),
                  5 * GRAD_TOLERANCE["bfloat16"])


def test_a_hessian_matches_the_reference():
    _, w, x, h0 = make_problem(3, 5, 2, 4, 0.5)

    def loss(x, method):
        return _loss(*js.sparse_rnn(x, h0, w, method=method))
    hessian = jax.hessian(loss)(x, "native")
    assert hessian.shape == x.shape * 2
    assert rel_err(hessian, jax.hessian(loss)(x, "reference")) < GRAD_TOLERANCE["float32"]


def _bidirectional(cell, seed):
    """``(run, args)`` of a bidirectional layer whose directions share a layout (one paired
    call), differentiated in both directions' inputs and weight values."""
    lengths = random_lengths(B, T, seed)
    if cell == "simple":
        (_, wf, xf, hf), (_, wb, xb, hb) = make_twin_problem(seed, H, B, T, 0.3)

        def run(method, xf, xb, vf, vb):
            return _loss(*js.sparse_rnn_bidirectional(
                (xf, xb), (hf, hb), (wf.replace(values=vf), wb.replace(values=vb)),
                seq_lengths=lengths, method=method))
        return run, (xf, xb, wf.values, wb.values)
    gates = {"lstm": 4, "gru": 3}[cell]
    (wf, xf, cf, hf, nf), (wb, xb, cb, hb, nb) = make_gated_twin_problem(seed, gates, H, B, T, 0.3)
    if cell == "lstm":
        def run(method, xf, xb, vf, vb):
            return _loss(*js.sparse_lstm_bidirectional(
                (xf, xb), ((cf, hf), (cb, hb)), (wf.replace(values=vf), wb.replace(values=vb)),
                seq_lengths=lengths, method=method))
    else:
        def run(method, xf, xb, vf, vb):
            return _loss(*js.sparse_gru_bidirectional(
                (xf, xb), (hf, hb), (wf.replace(values=vf), wb.replace(values=vb)),
                hn_bias=(nf, nb), seq_lengths=lengths, method=method))
    return run, (xf, xb, wf.values, wb.values)


@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_the_gradient_of_a_bidirectional_gradient_matches_the_reference(cell):
    run, args = _bidirectional(cell, seed=11)
    for wrt in (0, 2):
        _assert_close(_grad_of_grad(run, "native", args, wrt),
                      _grad_of_grad(run, "reference", args, wrt), GRAD_TOLERANCE["float32"])


def test_the_gradient_of_a_gradient_over_weight_sets_under_vmap_matches_the_reference():
    """vmap over stacked weights binds the stacked primitive (one call for every set)."""
    _, w, x, h0 = make_problem(5, H, B, T, 0.3)
    sets = jnp.stack([w.values * s for s in (1.0, -0.5, 0.8)])
    lengths = random_lengths(B, T, 5)

    def penalty(values, method):
        def loss(x):
            return _loss(*js.sparse_rnn(x, h0, w.replace(values=values), seq_lengths=lengths,
                                        method=method))
        return jnp.sum(jnp.square(jax.grad(loss)(x)))

    got = jax.vmap(jax.grad(penalty), in_axes=(0, None))(sets, "native")
    want = jax.vmap(jax.grad(penalty), in_axes=(0, None))(sets, "reference")
    assert got.shape == sets.shape and np.all(np.abs(np.asarray(got)).max(axis=1) > 0)
    assert rel_err(got, want) < GRAD_TOLERANCE["float32"]
