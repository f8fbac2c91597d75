"""GPU tests of stacked problems (issue 16, item 2): both directions of a bidirectional layer in one
persistent launch (``sprnn_forward_stack`` / ``sprnn_backward_stack``, and the gated cells'
``sprnn_lstm_stack`` / ``sprnn_gru_stack``), against one call of the one-problem primitive per
direction on the same kernel, bit for bit, in each exchange mode; and a stall inside a stacked
launch. (``tests/test_bidirectional.py`` checks ``sparse_rnn_bidirectional``
and its gradient through the paired launch against the reference, on the GPU too.) Skipped without
a GPU and the CUDA module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native
from jax_sprnn.primitives import (_recurrence_attrs, sprnn_backward_p, sprnn_forward_p, sprnn_gru_p,
                                  sprnn_lstm_p, sprnn_lstm_with_cells_p)
from jax_sprnn.stacked import (sprnn_backward_stack_p, sprnn_forward_stack_p, sprnn_gru_stack_p,
                               sprnn_lstm_stack_p, sprnn_lstm_with_cells_stack_p)
from jax_sprnn.testing import (TOLERANCE, make_gated_twin_problem, make_twin_problem, normal,
                               random_lengths, rel_err)

pytestmark = pytest.mark.gpu

REVERSE = (False, True)


def twin_problem(seed, hidden, batch, steps, density, dtype):
    """make_twin_problem, whose backward direction has another pattern (so other lane rows)."""
    fwd, bwd = make_twin_problem(seed, hidden, batch, steps, density, dtype)
    assert not np.array_equal(np.asarray(fwd[1].lane_row), np.asarray(bwd[1].lane_row))
    return fwd, bwd


def _stack(ws, name):
    return jnp.stack([jnp.asarray(getattr(w, name)) for w in ws])


def _hooks(mode):
    return {} if mode == "auto" else {"exchange_mode": mode}


def _modes(meta):
    return ["auto", "grid"] + (["cluster"] if meta.exchange == "cluster" else [])


CASES = [(256, 1), (300, 5), (1024, 8), (256, 32), (2304, 4)]  # 2304: a grid-mode layout


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("hidden, batch", CASES)
def test_the_stacked_forward_equals_one_call_per_direction_bitwise(dtype, hidden, batch):
    steps = 23
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = twin_problem(hidden + batch, hidden, batch, steps,
                                                          0.1, dtype)
    ws = (w_f, w_b)
    x = jnp.stack([jnp.swapaxes(x_f, 0, 1), jnp.swapaxes(x_b, 0, 1)])  # [2, T, B, H]
    h0 = jnp.stack([h_f, h_b])
    for use_lengths in (False, True):
        lengths = (random_lengths(batch, steps, batch) if use_lengths
                   else jnp.full((batch,), steps, jnp.int32))
        for mode in _modes(w_f.meta):
            y, h = sprnn_forward_stack_p.bind(
                x, h0, _stack(ws, "values"), _stack(ws, "indices"), _stack(ws, "lane_row"), lengths,
                activation="tanh", reverse=REVERSE, meta=w_f.meta, method="native",
                full_lengths=not use_lengths, **_hooks(mode))
            for q, (w, r) in enumerate(zip(ws, REVERSE)):
                y_q, h_q = sprnn_forward_p.bind(x[q], h0[q], w.values, w.indices, w.lane_row, lengths,
                                                activation="tanh", reverse=r, meta=w.meta,
                                                method="native", **_hooks(mode))
                where = f"{mode} mode, direction {q}, lengths {use_lengths}"
                np.testing.assert_array_equal(np.asarray(y[q]), np.asarray(y_q), err_msg=where)
                np.testing.assert_array_equal(np.asarray(h[q]), np.asarray(h_q), err_msg=where)
            assert np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("hidden, batch", [(256, 1), (300, 5), (1024, 8), (2304, 4)])
def test_the_stacked_backward_equals_one_call_per_direction_bitwise(dtype, hidden, batch):
    steps = 19
    (_, w_f, y_f, h_f), (_, w_b, y_b, h_b) = twin_problem(7 * hidden + batch, hidden, batch, steps,
                                                          0.1, dtype)
    ws = (w_f, w_b)
    dt = y_f.dtype
    y = jnp.tanh(jnp.stack([jnp.swapaxes(y_f, 0, 1), jnp.swapaxes(y_b, 0, 1)]))  # outputs in (-1, 1)
    h0 = jnp.stack([h_f, h_b])
    dy = normal(1, y.shape).astype(dt)
    dh = normal(2, h0.shape).astype(dt)
    lengths = random_lengths(batch, steps, hidden)
    values_t = jnp.stack([w.transposed_values() for w in ws])
    for mode in _modes(w_f.meta_t):
        dx, dh0 = sprnn_backward_stack_p.bind(
            y, h0, values_t, _stack(ws, "indices_t"), _stack(ws, "lane_row_t"), lengths, dy, dh,
            activation="tanh", reverse=REVERSE, meta=w_f.meta_t, method="native", **_hooks(mode))
        for q, (w, r) in enumerate(zip(ws, REVERSE)):
            dx_q, dh0_q = sprnn_backward_p.bind(
                y[q], h0[q], w.transposed_values(), w.indices_t, w.lane_row_t, lengths, dy[q], dh[q],
                activation="tanh", reverse=r, meta=w.meta_t, method="native", **_hooks(mode))
            np.testing.assert_array_equal(np.asarray(dx[q]), np.asarray(dx_q), err_msg=mode)
            np.testing.assert_array_equal(np.asarray(dh0[q]), np.asarray(dh0_q), err_msg=mode)


def test_a_stall_in_a_stacked_launch_times_out(monkeypatch):
    if not _native.current_device_spec().cluster_launch:
        pytest.skip("the GPU has no thread-block clusters")
    (dense, w_f, x_f, h_f), (_, w_b, x_b, h_b) = twin_problem(5, 256, 2, 16, 0.1, "float16")
    assert w_f.meta.exchange == "cluster" and w_f.meta.num_ctas > 1
    xs, hs, ws = (x_f, x_b), (h_f, h_b), (w_f, w_b)
    x = jnp.stack([jnp.swapaxes(a, 0, 1) for a in xs])
    args = (x, jnp.stack(hs), _stack(ws, "values"), _stack(ws, "indices"), _stack(ws, "lane_row"),
            jnp.full((2,), 16, jnp.int32))
    params = dict(activation="tanh", reverse=REVERSE, meta=w_f.meta, method="native")
    monkeypatch.setenv("JAX_SPRNN_SPIN_TIMEOUT_US", "2000")
    # CTA 0 (the forward direction's first cluster) never pushes: its peers time out, the call
    # ends with NaN outputs, and the next call reports it.
    y, _ = sprnn_forward_stack_p.bind(*args, **params, debug_stall_cta=0, exchange_mode="cluster")
    assert np.all(np.isnan(np.asarray(y[0], np.float32)))
    with pytest.raises(Exception, match="timed out"):
        jax.block_until_ready(sprnn_forward_stack_p.bind(*args, **params))
    monkeypatch.delenv("JAX_SPRNN_SPIN_TIMEOUT_US")
    y, _ = js.sparse_rnn_bidirectional(xs, hs, ws)
    y_ref, _ = js.reference_rnn(x_f, h_f, dense)
    assert rel_err(y[..., :256], y_ref) < TOLERANCE["float16"]


def test_the_handler_refuses_a_malformed_stacked_call():
    # The forward target called directly: every malformed stacked operand is an error that names
    # it, before any launch.
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = twin_problem(9, 256, 2, 5, 0.1, "float16")
    _native.initialize_cuda()
    x = jnp.stack([jnp.swapaxes(a, 0, 1) for a in (x_f, x_b)])  # [2, T, B, H]
    h0 = jnp.stack([h_f, h_b])
    ws = (w_f, w_b)
    attrs = _recurrence_attrs(activation="tanh", reverse=False, meta=w_f.meta)
    attrs.update(reverse=np.int64(2), batch_major=np.int64(1), problems=np.int64(2), tiles=np.int64(0))
    args = dict(x=x, h0=h0, values=_stack(ws, "values"), indices=_stack(ws, "indices"),
                lane_row=_stack(ws, "lane_row"), lengths=jnp.full((2,), 5, jnp.int32))

    def call(**changes):
        a = {k: changes.pop(k, v) for k, v in args.items()}
        results = (jax.ShapeDtypeStruct(a["x"].shape, a["x"].dtype),
                   jax.ShapeDtypeStruct(a["h0"].shape, a["h0"].dtype),
                   jax.ShapeDtypeStruct((_constants.cuda_workspace_bytes(4, 256),), np.uint8))
        out = jax.ffi.ffi_call(_constants.ffi_target("forward"), results)(
            *a.values(), **{**attrs, **{k: np.int64(v) for k, v in changes.items()}})
        return jax.block_until_ready(out)

    y, _, _ = call()  # (well formed: it runs)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    for changes, message in [
            (dict(values=w_f.values), r"values size \d+ != 2\*NW\*K\*32"),
            # (one problem's lanes: too few for two, whichever check sees it first)
            (dict(lane_row=w_f.lane_row), r"lane_row size \d+ is not a multiple|values size \d+ !="),
            (dict(reverse=4), "reverse must be a bit mask of the 2 problems"),
            (dict(batch_major=0), "several problems in one call need batch-major"),
            (dict(problems=3), r"x must be \[3, T, B, H\]"),
            (dict(lengths=jnp.full((4,), 5, jnp.int32)), "lengths must have B = 2"),
            (dict(h0=h0[0]), r"h0 must be \[2, 2, 256\]")]:
        with pytest.raises(Exception, match=message):
            call(**changes)


@pytest.mark.parametrize("hidden, batch", [(256, 4), (1024, 8)])
def test_vmap_over_weight_sets_is_one_launch_and_equals_one_call_per_set(hidden, batch):
    # Three value sets of one pattern under vmap: one stacked launch forward and backward, bit for
    # bit the per-set calls.
    _, w, x, h0 = make_twin_problem(hidden + 3, hidden, batch, 13, 0.1, "float16")[0]
    ws = jax.tree_util.tree_map(lambda a: jnp.stack([a, a, a]), w)
    ws = ws.replace(values=ws.values * jnp.asarray([1.0, -0.5, 0.7], ws.values.dtype)[:, None])
    L = random_lengths(batch, 13, hidden)

    def run(w):
        return js.sparse_rnn(x, h0, w, seq_lengths=L, reverse=True, method="native")

    def loss(w):
        y, h = run(w)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h.astype(jnp.float32))

    grad = jax.vmap(js.grad(loss))
    assert "sprnn_forward_stack" in str(jax.make_jaxpr(jax.vmap(run))(ws))
    assert "sprnn_backward_stack" in str(jax.make_jaxpr(grad)(ws))
    y, h = jax.jit(jax.vmap(run))(ws)
    g = jax.jit(grad)(ws)
    for i in range(3):
        w_i = jax.tree_util.tree_map(lambda a, i=i: a[i], ws)
        y_i, h_i = jax.jit(run)(w_i)
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(y_i))
        np.testing.assert_array_equal(np.asarray(h[i]), np.asarray(h_i))
        np.testing.assert_array_equal(np.asarray(g.values[i]), np.asarray(jax.jit(js.grad(loss))(w_i).values))


def test_an_ensemble_of_bidirectional_layers_is_one_launch_and_equals_one_call_per_set():
    # Three weight pairs under vmap: 6 problems of one stacked launch (the forward directions'
    # sets, then the backward ones: mixed reverse bits), bit for bit the per-set paired calls.
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = twin_problem(21, 256, 3, 11, 0.1, "float16")
    scales = jnp.asarray([1.0, -0.6, 0.8], w_f.values.dtype)[:, None]
    ws = tuple(jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), w) for w in (w_f, w_b))
    ws = tuple(w.replace(values=w.values * scales) for w in ws)
    L = random_lengths(3, 11, 21)

    def run(ws):
        return js.sparse_rnn_bidirectional((x_f, x_b), (h_f, h_b), ws, seq_lengths=L, method="native")

    assert "sprnn_forward_stack" in str(jax.make_jaxpr(jax.vmap(run))(ws))
    y, (s_f, s_b) = jax.jit(jax.vmap(run))(ws)
    for i in range(3):
        y_i, (f_i, b_i) = jax.jit(run)(tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], w) for w in ws))
        for got, want in ((y[i], y_i), (s_f[i], f_i), (s_b[i], b_i)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---- the gated cells' forward recurrences as stacked problems (issue 17) -------------------------

GATED_STACKS = {"lstm": (4, sprnn_lstm_stack_p, sprnn_lstm_p), "gru": (3, sprnn_gru_stack_p, sprnn_gru_p),
                "lstm_with_cells": (4, sprnn_lstm_with_cells_stack_p, sprnn_lstm_with_cells_p)}


@pytest.mark.parametrize("kind", GATED_STACKS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("hidden, batch", [(256, 1), (300, 5), (1024, 8)])
def test_the_stacked_gated_forward_equals_one_call_per_direction_bitwise(kind, dtype, hidden, batch):
    # Two directions of one layout, each with its own pattern, carry and (GRU) hn_bias: one launch
    # against one call per direction, in each exchange mode, with and without lengths.
    gates, stack_p, one_p = GATED_STACKS[kind]
    steps = 17
    fwd, bwd = make_gated_twin_problem(hidden + batch, gates, hidden, batch, steps, 0.1, dtype)
    assert not np.array_equal(np.asarray(fwd[0].lane_row), np.asarray(bwd[0].lane_row))
    ws = (fwd[0], bwd[0])
    x = jnp.stack([jnp.swapaxes(d[1], 0, 1) for d in (fwd, bwd)])  # [2, T, B, G*H]
    h0, c0 = (jnp.stack([d[i] for d in (fwd, bwd)]) for i in (3, 2))
    hn_bias = jnp.stack([fwd[4], bwd[4] * -1.7])
    layout = (_stack(ws, "values"), _stack(ws, "indices"), _stack(ws, "lane_row"))
    for use_lengths in (False, True):
        lengths = (random_lengths(batch, steps, batch) if use_lengths
                   else jnp.full((batch,), steps, jnp.int32))
        for mode in _modes(fwd[0].meta):
            params = dict(meta=fwd[0].meta, method="native", full_lengths=not use_lengths, **_hooks(mode))
            if gates == 4:
                outs = stack_p.bind(x, h0, c0, *layout, lengths, reverse=REVERSE, **params)
            else:
                outs = stack_p.bind(x, h0, *layout, lengths, hn_bias, reverse=REVERSE, **params)
            for q, (w, r) in enumerate(zip(ws, REVERSE)):
                if gates == 4:
                    one = one_p.bind(x[q], h0[q], c0[q], w.values, w.indices, w.lane_row, lengths,
                                     reverse=r, **params)
                else:
                    one = one_p.bind(x[q], h0[q], w.values, w.indices, w.lane_row, lengths, hn_bias[q],
                                     reverse=r, **params)
                where = f"{mode} mode, direction {q}, lengths {use_lengths}"
                assert len(outs) == len(one)
                for got, want in zip(outs, one):
                    np.testing.assert_array_equal(np.asarray(got[q]), np.asarray(want), err_msg=where)
            assert np.all(np.isfinite(np.asarray(outs[0], np.float32)))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_gated_bidirectional_layer_is_one_launch_and_its_gradient_matches_the_reference(cell):
    # The public call on the GPU: the paired launch against the reference, forward and gradient.
    gates = 4 if cell == "lstm" else 3
    fwd, bwd = make_gated_twin_problem(31, gates, 256, 4, 12, 0.1, "float32")
    L = random_lengths(4, 12, 31)

    def run(directions, method):
        (w_f, x_f, c_f, h_f, b_f), (w_b, x_b, c_b, h_b, b_b) = directions
        if cell == "lstm":
            y, finals = js.sparse_lstm_bidirectional((x_f, x_b), ((c_f, h_f), (c_b, h_b)), (w_f, w_b),
                                                     seq_lengths=L, method=method)
        else:
            y, finals = js.sparse_gru_bidirectional((x_f, x_b), (h_f, h_b), (w_f, w_b), hn_bias=(b_f, b_b),
                                                    seq_lengths=L, method=method)
        return y, finals

    def loss(directions, method):
        y, finals = run(directions, method)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(f) for f in jax.tree_util.tree_leaves(finals))

    assert f"sprnn_{cell}_pair" in str(jax.make_jaxpr(lambda d: run(d, "native"))((fwd, bwd)))
    with jax.default_matmul_precision("highest"):
        for got, want in zip(jax.tree_util.tree_leaves(jax.jit(lambda d: run(d, "native"))((fwd, bwd))),
                             jax.tree_util.tree_leaves(run((fwd, bwd), "reference"))):
            assert rel_err(got, want) < TOLERANCE["float32"]
        g = jax.jit(js.grad(lambda d: loss(d, "native")))((fwd, bwd))
        g_ref = js.grad(lambda d: loss(d, "reference"))((fwd, bwd))
    for got, want in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        if jnp.issubdtype(got.dtype, jnp.floating):
            assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("gates", [4, 3])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("hidden, batch", [(256, 1), (300, 5), (1024, 8)])
def test_the_stacked_gated_backward_equals_one_call_per_direction_bitwise(gates, dtype, hidden, batch):
    # The backward recurrences of both directions (step order, one transposed layout, each with its
    # own pattern, operands and GRU hn_bias) in one launch, against one call per direction.
    from jax_sprnn import fallback
    from jax_sprnn.primitives import sprnn_gru_backward_p, sprnn_lstm_backward_p
    from jax_sprnn.stacked import sprnn_gru_backward_stack_p, sprnn_lstm_backward_stack_p
    from jax_sprnn.testing import gated_backward_problem

    fwd, bwd = make_gated_twin_problem(3 * hidden + batch, gates, hidden, batch, 15, 0.1, dtype)
    ws = (fwd[0], bwd[0])
    assert ws[0].meta_t == ws[1].meta_t
    problems = [gated_backward_problem(seed, gates, hidden, batch, 15, 0.1, dtype)
                for seed in (hidden, hidden + 1)]
    lengths = problems[0][3]
    operands = [p[2] for p in problems]
    kernels = [fallback.dense_from_packed(w.values, w.indices, w.lane_row, w.meta) for w in ws]
    layout = (jnp.stack([w.transposed_values() for w in ws]), _stack(ws, "indices_t"),
              _stack(ws, "lane_row_t"))
    stack_p, one_p = ((sprnn_lstm_backward_stack_p, sprnn_lstm_backward_p) if gates == 4
                      else (sprnn_gru_backward_stack_p, sprnn_gru_backward_p))
    stacked_ops = [jnp.stack(o) for o in zip(*operands)]
    for mode in _modes(ws[0].meta_t):
        outs = stack_p.bind(*stacked_ops, *layout, lengths, jnp.stack(kernels), reverse=(False, False),
                            meta=ws[0].meta_t, method="native", **_hooks(mode))
        for q, w in enumerate(ws):
            one = one_p.bind(*operands[q], w.transposed_values(), w.indices_t, w.lane_row_t, lengths,
                             kernels[q], meta=w.meta_t, method="native", **_hooks(mode))
            for got, want in zip(outs, one):
                np.testing.assert_array_equal(np.asarray(got[q]), np.asarray(want),
                                              err_msg=f"{mode} mode, direction {q}")
        assert np.all(np.isfinite(np.asarray(outs[0], np.float32)))
