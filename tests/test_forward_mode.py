"""Forward-mode derivatives (jax.jvp, jax.jacfwd, jax.linearize) of the public functions: the kernel
paths against the pure-JAX reference (``method="reference"``, differentiated by JAX itself), for
every cell and the bidirectional calls, with lengths and reverse at odd shapes, under vmap and jit,
and reverse mode over them. Reverse mode alone must still run the backward kernels: the tangent
primitive (jax_sprnn.forward_mode) is transposed away, never evaluated."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn.testing import (GRAD_TOLERANCE, make_gated_problem, make_gated_twin_problem,
                               make_problem, make_twin_problem, random_lengths, rel_err)

H, B, T = 11, 3, 5
METHODS = ("native", "auto")
TOL = GRAD_TOLERANCE["float32"]


def _layer(cell, seed, dtype="float32"):
    """``(run, args)``: ``run(method, *args)`` one layer's outputs and final carry, ``args`` the
    arrays it is differentiated in (inputs, carry, weight values and, for the GRU, hn_bias)."""
    lengths = random_lengths(B, T, seed)
    if cell == "simple":
        _, w, x, h0 = make_problem(seed, H, B, T, 0.3, dtype)

        def run(method, x, h0, values):
            return js.sparse_rnn(x, h0, w.replace(values=values), seq_lengths=lengths,
                                 reverse=True, activation="relu", method=method)
        return run, (x, h0, w.values)
    gates = {"lstm": 4, "gru": 3}[cell]
    w, x, c0, h0, hn_bias = make_gated_problem(seed, gates, H, B, T, 0.3, dtype)
    if cell == "lstm":
        def run(method, x, c0, h0, values):
            return js.sparse_lstm(x, (c0, h0), w.replace(values=values), seq_lengths=lengths,
                                  method=method)
        return run, (x, c0, h0, w.values)

    def run(method, x, h0, values, hn_bias):
        return js.sparse_gru(x, h0, w.replace(values=values), hn_bias=hn_bias, seq_lengths=lengths,
                             reverse=True, method=method)
    return run, (x, h0, w.values, hn_bias)


def _bidirectional(cell, seed):
    """``(run, args)`` of a bidirectional layer whose directions share a layout (one paired call),
    differentiated in both directions' inputs and weight values."""
    lengths = random_lengths(B, T, seed)
    if cell == "simple":
        (_, wf, xf, hf), (_, wb, xb, hb) = make_twin_problem(seed, H, B, T, 0.3)

        def run(method, xf, xb, vf, vb):
            return js.sparse_rnn_bidirectional((xf, xb), (hf, hb), (wf.replace(values=vf),
                                                                     wb.replace(values=vb)),
                                               seq_lengths=lengths, method=method)
        return run, (xf, xb, wf.values, wb.values)
    gates = {"lstm": 4, "gru": 3}[cell]
    (wf, xf, cf, hf, nf), (wb, xb, cb, hb, nb) = make_gated_twin_problem(seed, gates, H, B, T, 0.3)
    if cell == "lstm":
        def run(method, xf, xb, vf, vb):
            return js.sparse_lstm_bidirectional(
                (xf, xb), ((cf, hf), (cb, hb)), (wf.replace(values=vf), wb.replace(values=vb)),
                seq_lengths=lengths, method=method)
    else:
        def run(method, xf, xb, vf, vb):
            return js.sparse_gru_bidirectional(
                (xf, xb), (hf, hb), (wf.replace(values=vf), wb.replace(values=vb)),
                hn_bias=(nf, nb), seq_lengths=lengths, method=method)
    return run, (xf, xb, wf.values, wb.values)


def _tangents(args, seed):
    """Random tangents for ``args``, in their dtypes (padding slots of the values included: they
    move nothing on either path)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(args))
    return tuple(jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype) for k, a in zip(keys, args))


def _assert_trees_close(got, want, tol):
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert rel_err(g, w) < tol, (i, rel_err(g, w))


def _jvp(run, method, args, tangents):
    return jax.jvp(lambda *a: run(method, *a), args, tangents)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_jvp_of_one_layer_matches_the_reference(cell, method):
    run, args = _layer(cell, seed=len(cell))
    tangents = _tangents(args, seed=1)
    (out, out_t), (want, want_t) = (_jvp(run, m, args, tangents) for m in (method, "reference"))
    _assert_trees_close(out, want, TOL)
    _assert_trees_close(out_t, want_t, TOL)
    assert float(jnp.abs(out_t[0]).max()) > 0  # the tangent is not trivially zero


@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_jvp_of_a_bidirectional_layer_matches_the_reference(cell):
    run, args = _bidirectional(cell, seed=5)
    tangents = _tangents(args, seed=2)
    _assert_trees_close(_jvp(run, "native", args, tangents), _jvp(run, "reference", args, tangents),
                        TOL)


@pytest.mark.parametrize("cell", ["simple", "gru"])
def test_a_16_bit_jvp_matches_the_reference(cell):
    run, args = _layer(cell, seed=9, dtype="bfloat16")
    tangents = _tangents(args, seed=3)
    jitted = jax.jit(_jvp, static_argnums=(0, 1))
    _assert_trees_close(jitted(run, "native", args, tangents),
                        jitted(run, "reference", args, tangents), 5 * GRAD_TOLERANCE["bfloat16"])


def test_jacfwd_equals_jacrev_and_the_reference():
    _, w, x, h0 = make_problem(4, 5, 2, 3, 0.5)

    def final(x, method):
        return js.sparse_rnn(x, h0, w, seq_lengths=jnp.array([3, 1]), method=method)[1]
    forward = jax.jacfwd(final)(x, "native")
    assert forward.shape == h0.shape + x.shape
    assert rel_err(forward, jax.jacrev(final)(x, "native")) < TOL
    assert rel_err(forward, jax.jacfwd(final)(x, "reference")) < TOL
    # a state past its length does not move with the inputs there
    np.testing.assert_array_equal(np.asarray(forward)[1, :, 1, 1:], 0.0)


def test_linearize_gives_the_jvp_at_every_tangent():
    run, args = _layer("lstm", seed=2)
    out, linear = jax.linearize(lambda *a: run("native", *a), *args)
    _assert_trees_close(out, run("reference", *args), TOL)
    for seed in (4, 5):
        tangents = _tangents(args, seed)
        _assert_trees_close(linear(*tangents), _jvp(run, "reference", args, tangents)[1], TOL)


@pytest.mark.parametrize("cell", ["simple", "gru"])
def test_vmap_of_jvp_and_jvp_of_vmap_match_the_reference(cell):
    run, args = _layer(cell, seed=6)
    many = [_tangents(args, seed) for seed in (7, 8)]
    stacked = tuple(jnp.stack(t) for t in zip(*many))

    def pushed(method):
        return jax.vmap(lambda t: _jvp(run, method, args, t)[1])(stacked)
    _assert_trees_close(pushed("native"), pushed("reference"), TOL)

    # jvp of a layer vmapped over an extra leading axis of the inputs (weights shared)
    xs = jnp.stack([args[0], -args[0]])
    dxs = jnp.stack([many[0][0], many[1][0]])

    def over_inputs(method):
        return jax.jvp(jax.vmap(lambda x: run(method, x, *args[1:])), (xs,), (dxs,))
    _assert_trees_close(over_inputs("native"), over_inputs("reference"), TOL)


@pytest.mark.parametrize("cell", ["simple", "lstm"])
def test_reverse_mode_over_forward_mode_matches_the_reference(cell):
    run, args = _layer(cell, seed=3)
    tangents = _tangents(args, seed=10)

    def loss(method, *a):
        out_t = _jvp(run, method, a, tangents)[1]
        return sum(jnp.sum(jnp.sin(t)) for t in jax.tree_util.tree_leaves(out_t))
    grads = [jax.grad(loss, argnums=tuple(range(1, len(args) + 1)))(m, *args)
             for m in ("native", "reference")]
    _assert_trees_close(*grads, TOL)


def test_forward_over_forward_matches_the_reference():
    _, w, x, h0 = make_problem(8, 4, 2, 3, 0.5)

    def final(x, method):
        return jnp.sum(js.sparse_rnn(x, h0, w, method=method)[1] ** 3)
    got = jax.jacfwd(jax.jacfwd(final))(x, "native")
    assert got.shape == x.shape * 2
    assert rel_err(got, jax.jacfwd(jax.jacfwd(final))(x, "reference")) < TOL


def _primitives(jaxpr) -> set:
    return set(re.findall(r"\b(sprnn_[a-z_]+)\[", str(jaxpr)))


@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_reverse_mode_still_runs_the_backward_primitives(cell):
    """grad, grad of vmap and vmap of grad transpose the tangent primitive into the backward
    pass: it must not appear in the program (evaluating it would run the dense fallback)."""
    run, args = _layer(cell, seed=1)

    def loss(*a):
        return sum(jnp.sum(t) for t in jax.tree_util.tree_leaves(run("native", *a)))
    argnums = tuple(range(len(args)))
    programs = {
        "grad": jax.make_jaxpr(jax.grad(loss, argnums))(*args),
        "grad of vmap": jax.make_jaxpr(jax.grad(lambda x, *rest: jnp.sum(jax.vmap(
            lambda xx: loss(xx, *rest))(jnp.stack([x, x]))), argnums))(*args),
        "vmap of grad": jax.make_jaxpr(jax.vmap(jax.grad(loss, argnums), in_axes=(0,) + (None,) * (
            len(args) - 1)))(jnp.stack([args[0]] * 2), *args[1:]),
    }
    for name, program in programs.items():
        found = _primitives(program)
        assert "sprnn_tangent" not in found, name
        assert any("backward" in p for p in found), (name, found)


def test_grad_of_vmap_sums_the_shared_weights_gradient():
    """A linear map batched with its weights shared: the weights' cotangent is the batch's sum."""
    run, args = _layer("simple", seed=12)
    xs = jnp.stack([args[0], 2 * args[0], -args[0]])

    def loss(values, method):
        ys = jax.vmap(lambda x: run(method, x, args[1], values)[0])(xs)
        return jnp.sum(jnp.sin(ys))
    got = jax.grad(loss)(args[2], "native")
    assert rel_err(got, jax.grad(loss)(args[2], "reference")) < TOL
    per_input = [jax.grad(lambda v, x=x: jnp.sum(jnp.sin(run("native", x, args[1], v)[0])))(args[2])
                 for x in xs]
    assert rel_err(got, sum(per_input)) < TOL


def test_a_flax_layer_takes_forward_mode_derivatives():
    from jax_sprnn.flax import SparseGRU
    model = SparseGRU(7)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 5))
    variables = model.init(jax.random.PRNGKey(1), x)

    def apply(x, method):
        return model.clone(method=method).apply(variables, x)
    dx = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    got = jax.jvp(lambda x: apply(x, "native"), (x,), (dx,))
    want = jax.jvp(lambda x: apply(x, "reference"), (x,), (dx,))
    _assert_trees_close(got, want, TOL)


def test_an_inner_batch_axis_is_moved_back_in_both_modes():
    """vmap over a middle axis of the inputs (the weights and h0 shared): under grad the batched
    tangent map's residuals (the outputs) arrive batched on axis 1, not the first."""
    _, w, x, h0 = make_problem(3, 9, 2, 4, 0.4)
    xs = jnp.stack([x, -0.5 * x, 2 * x], axis=2)  # [B, T, 3, H], mapped on axis 2

    def loss(xs, values, h0, method):
        ys = jax.vmap(lambda xx, hh: js.sparse_rnn(xx, hh, w.replace(values=values),
                                                   method=method)[0],
                      in_axes=(2, None), out_axes=1)(xs, h0)
        return jnp.sum(jnp.sin(ys))
    args = (xs, w.values, h0)
    _assert_trees_close(jax.grad(loss, argnums=(0, 1, 2))(*args, "native"),
                        jax.grad(loss, argnums=(0, 1, 2))(*args, "reference"), TOL)
    tangents = _tangents(args, seed=13)
    _assert_trees_close(jax.jvp(lambda *a: loss(*a, "native"), args, tangents),
                        jax.jvp(lambda *a: loss(*a, "reference"), args, tangents), TOL)


@pytest.mark.parametrize("shape", ["b, t", "2, t"])
def test_an_exported_jvp_with_symbolic_shapes_matches_the_reference(shape):
    """The tangent map holds the integer operands (lengths, indices) fixed rather than giving them
    float0 tangents, which cannot take a symbolic shape."""
    pytest.importorskip("flatbuffers")
    import jax_sprnn.export
    _, w, x, h0 = make_problem(5, 8, 2, 4, 0.4)
    dx = jnp.flip(x, axis=1)

    def pushed(method):
        def fn(x, h0, dx):
            return jax.jvp(lambda x: js.sparse_rnn(x, h0, w, method=method), (x,), (dx,))
        return fn
    b, t = jax.export.symbolic_shape(shape)
    specs = (jax.ShapeDtypeStruct((b, t, 8), jnp.float32), jax.ShapeDtypeStruct((b, 8), jnp.float32),
             jax.ShapeDtypeStruct((b, t, 8), jnp.float32))
    if jax.default_backend() == "gpu" and shape == "b, t":  # a launch needs a known batch
        with pytest.raises(ValueError, match="the batch is symbolic"):
            jax_sprnn.export.export(pushed("native"))(*specs)
        return
    exported = jax_sprnn.export.export(pushed("native"))(*specs)
    for steps in (4, 1):
        args = (x[:, :steps], h0, dx[:, :steps])
        _assert_trees_close(exported.call(*args), pushed("reference")(*args), TOL)


def test_a_batched_tangent_map_transposes_back_onto_its_batch_axis():
    """jax.linear_transpose of a vmap (over a middle axis of time-major inputs, which reaches the
    tangent map unmoved) of a jvp: the batched map's tangent operand is batched on axis 2, and its
    cotangent must land there."""
    _, w, x, h0 = make_problem(14, H, B, T, 0.3)
    x_tm = jnp.swapaxes(x, 0, 1)
    tangents = jnp.stack([_tangents((x_tm,), seed)[0] for seed in (15, 16)], axis=2)  # [T, B, 2, H]

    def pushed(method):
        def one(dx):
            return jax.jvp(lambda x: js.sparse_rnn(x, h0, w, time_major=True, method=method)[0],
                           (x_tm,), (dx,))[1]
        return jax.vmap(one, in_axes=2)
    cotangent = _tangents((jnp.stack([x_tm, x_tm]),), seed=17)[0]  # [2, T, B, H]
    got = jax.linear_transpose(pushed("native"), tangents)(cotangent)
    want = jax.linear_transpose(pushed("reference"), tangents)(cotangent)
    _assert_trees_close(got, want, TOL)
