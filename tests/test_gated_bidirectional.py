"""sparse_lstm_bidirectional and sparse_gru_bidirectional against two sparse_lstm / sparse_gru calls
(bit for bit: each direction runs the same kernel on the same layout) and against the reference
(lengths, time_major, dtypes), their gradients, vmap (over the inputs, and over weight pairs: one
stacked call), export, the lowering of the paired call, and their errors; both where the
directions share one layout (one paired call) and where they do not (two calls). Runs on the CPU,
and on the GPU where there is one (there the paired call is one launch)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native
from jax_sprnn.testing import (GRAD_TOLERANCE, TOLERANCE, make_gated_problem,
                               make_gated_twin_problem, rel_err)

GATES = {"lstm": 4, "gru": 3}
LAYOUTS = ("shared", "own")


def problem(cell, seed, hidden=37, batch=3, steps=7, dtype="float32", layout="shared"):
    """Two directions' (weights, x, c0, h0, hn_bias): of one layout (``"shared"``: a twin pattern,
    one paired call) or of two (``"own"``: other densities, two calls)."""
    gates = GATES[cell]
    if layout == "shared":
        return make_gated_twin_problem(seed, gates, hidden, batch, steps, 0.2, dtype)
    fwd = make_gated_problem(seed, gates, hidden, batch, steps, 0.2, dtype)
    bwd = make_gated_problem(seed + 1, gates, hidden, batch, steps, 0.45, dtype)
    assert fwd[0].meta != bwd[0].meta
    return fwd, bwd


def bidirectional(cell, fwd, bwd, **kw):
    """The bidirectional call: ``(outputs, final states as a flat tuple)``."""
    if cell == "lstm":
        y, ((c_f, h_f), (c_b, h_b)) = js.sparse_lstm_bidirectional(
            (fwd[1], bwd[1]), ((fwd[2], fwd[3]), (bwd[2], bwd[3])), (fwd[0], bwd[0]), **kw)
        return y, (c_f, h_f, c_b, h_b)
    y, (h_f, h_b) = js.sparse_gru_bidirectional((fwd[1], bwd[1]), (fwd[3], bwd[3]), (fwd[0], bwd[0]),
                                                hn_bias=(fwd[4], bwd[4]), **kw)
    return y, (h_f, h_b)


def two_calls(cell, fwd, bwd, **kw):
    """The same as two one-direction calls."""
    finals, ys = [], []
    for (w, x, c0, h0, hn_bias), reverse in ((fwd, False), (bwd, True)):
        if cell == "lstm":
            y, (c, h) = js.sparse_lstm(x, (c0, h0), w, reverse=reverse, **kw)
            finals += [c, h]
        else:
            y, h = js.sparse_gru(x, h0, w, hn_bias=hn_bias, reverse=reverse, **kw)
            finals.append(h)
        ys.append(y)
    return jnp.concatenate(ys, axis=-1), tuple(finals)


def _as_time_major(direction):
    w, x, *rest = direction
    return (w, jnp.swapaxes(x, 0, 1), *rest)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("use_lengths", [False, True])
def test_equals_two_calls_and_the_reference(cell, dtype, time_major, use_lengths, layout):
    fwd, bwd = problem(cell, 11, dtype=dtype, layout=layout)
    if time_major:
        fwd, bwd = _as_time_major(fwd), _as_time_major(bwd)
    lengths = jnp.array([7, 0, 4], jnp.int32) if use_lengths else None
    kw = dict(time_major=time_major, seq_lengths=lengths)
    y, finals = bidirectional(cell, fwd, bwd, **kw)
    y_two, finals_two = two_calls(cell, fwd, bwd, **kw)
    assert y.shape == ((7, 3, 2 * 37) if time_major else (3, 7, 2 * 37))
    assert y.dtype == jnp.dtype(dtype)
    for got, want in zip((y, *finals), (y_two, *finals_two)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    y_ref, finals_ref = bidirectional(cell, fwd, bwd, method="reference", **kw)
    for got, want in zip((y, *finals), (y_ref, *finals_ref)):
        assert rel_err(got, want) < TOLERANCE[dtype]
    if use_lengths:  # past an example's length its outputs are zero in both halves
        assert not np.any(np.asarray(y[:, 1] if time_major else y[1], np.float32))
        assert not np.any(np.asarray(y[4:, 2] if time_major else y[2, 4:], np.float32))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cell", GATES)
def test_grads_equal_two_calls_and_the_reference(exact_matmuls, cell, layout):
    fwd, bwd = problem(cell, 5, hidden=29, steps=6, layout=layout)
    lengths = jnp.array([6, 2, 0], jnp.int32)
    probe = jax.random.normal(jax.random.key(0), (3, 6, 2 * 29))

    def loss(run, method, directions):
        y, finals = run(cell, *directions, seq_lengths=lengths, method=method)
        return jnp.sum(jnp.sin(y * probe)) + sum(jnp.sum(f ** 2) for f in finals)

    grads = {name: js.grad(loss, argnums=2)(run, method, (fwd, bwd))
             for name, run, method in (("paired", bidirectional, "native"),
                                       ("two", two_calls, "native"),
                                       ("reference", bidirectional, "reference"))}
    jaxpr = str(jax.make_jaxpr(js.grad(loss, argnums=2), static_argnums=(0, 1))(
        bidirectional, "native", (fwd, bwd)))
    assert (f"sprnn_{cell}_backward_pair" in jaxpr) == (layout == "shared")
    paired, two, ref = (jax.tree_util.tree_leaves(grads[k]) for k in ("paired", "two", "reference"))
    assert len(paired) == len(two) == len(ref) > 0
    for a, b, r in zip(paired, two, ref):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            continue
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
        assert rel_err(a, r) < GRAD_TOLERANCE["float32"]
    # every input the cell reads got a gradient: inputs, carries, values and the GRU's hn_bias
    used = (0, 1, 2, 3) if cell == "lstm" else (0, 1, 3, 4)  # (w, x, c0, h0, hn_bias)
    for direction in grads["paired"]:
        leaves = jax.tree_util.tree_leaves([direction[i] for i in used])
        assert all(np.any(np.asarray(g)) for g in leaves if jnp.issubdtype(g.dtype, jnp.floating))


@pytest.mark.parametrize("cell", GATES)
def test_vmap_over_inputs_and_over_weight_pairs(cell):
    fwd, bwd = problem(cell, 3, hidden=21, batch=2, steps=5)
    # a leading axis of inputs and carries folds into the batch
    extra = [(w, jnp.stack([x, 0.5 * x]), jnp.stack([c0, c0]), jnp.stack([h0, -h0]), b)
             for w, x, c0, h0, b in (fwd, bwd)]

    def run_inputs(x_f, c_f, h_f, x_b, c_b, h_b):
        return bidirectional(cell, (fwd[0], x_f, c_f, h_f, fwd[4]), (bwd[0], x_b, c_b, h_b, bwd[4]))

    args = [a for d in extra for a in d[1:4]]
    y, finals = jax.vmap(run_inputs)(*args)
    for i in range(2):
        y_i, finals_i = run_inputs(*(a[i] for a in args))
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(y_i), rtol=1e-6, atol=1e-6)
        for f, f_i in zip(finals, finals_i):
            np.testing.assert_allclose(np.asarray(f[i]), np.asarray(f_i), rtol=1e-6, atol=1e-6)
    # vmapped weight pairs (an ensemble: value sets of each direction's pattern): one stacked
    # forward call of 2 * 3 problems
    scales = (1.0, 0.5, -0.8)
    sets = [tuple(w.replace(values=(w.values * s).astype(w.values.dtype)) for w in (fwd[0], bwd[0]))
            for s in scales]
    w_f, w_b = (jax.tree_util.tree_map(lambda *a: jnp.stack(a), *(s[q] for s in sets)) for q in range(2))

    def run_weights(w_f, w_b):
        return bidirectional(cell, (w_f, *fwd[1:]), (w_b, *bwd[1:]))

    jaxpr = str(jax.make_jaxpr(jax.vmap(run_weights))(w_f, w_b))
    assert f"sprnn_{cell}_stack" in jaxpr and "scan[" not in jaxpr
    y, finals = jax.vmap(run_weights)(w_f, w_b)
    for k, (f_k, b_k) in enumerate(sets):
        y_k, finals_k = run_weights(f_k, b_k)
        np.testing.assert_array_equal(np.asarray(y[k]), np.asarray(y_k))
        for f, f_k in zip(finals, finals_k):
            np.testing.assert_array_equal(np.asarray(f[k]), np.asarray(f_k))


@pytest.mark.parametrize("cell", GATES)
def test_vmap_over_weight_sets_of_one_layer_is_one_stacked_call_and_so_is_its_gradient(cell):
    # An ensemble of one gated layer: the sets are the problems of one stacked forward call and of
    # one stacked backward recurrence; values and gradients are the per-set calls'.
    (w, x, c0, h0, hn_bias), _ = problem(cell, 12, hidden=17, batch=2, steps=4)
    ws = jax.tree_util.tree_map(lambda a: jnp.stack([a, a, a]), w)
    ws = ws.replace(values=ws.values * jnp.asarray([1.0, -0.5, 0.8], ws.values.dtype)[:, None])
    lengths = jnp.array([4, 2], jnp.int32)

    def loss(w):
        if cell == "lstm":
            y, (c, h) = js.sparse_lstm(x, (c0, h0), w, seq_lengths=lengths)
            return jnp.sum(y ** 2) + jnp.sum(c)
        y, h = js.sparse_gru(x, h0, w, hn_bias=hn_bias, seq_lengths=lengths)
        return jnp.sum(y ** 2) + jnp.sum(h)

    jaxpr = str(jax.make_jaxpr(jax.vmap(js.grad(loss)))(ws))
    assert f"sprnn_{cell}_backward_stack" in jaxpr and "scan[" not in jaxpr
    assert f"sprnn_{cell}_stack" in jaxpr or f"sprnn_{cell}_with_cells_stack" in jaxpr
    values, grads = jax.vmap(loss)(ws), jax.vmap(js.grad(loss))(ws)
    for i in range(3):
        w_i = jax.tree_util.tree_map(lambda a, i=i: a[i], ws)
        np.testing.assert_array_equal(np.asarray(values[i]), np.asarray(loss(w_i)))
        np.testing.assert_array_equal(np.asarray(grads.values[i]), np.asarray(js.grad(loss)(w_i).values))


@pytest.mark.parametrize("cell", GATES)
def test_export_round_trip(cell):
    fwd, bwd = problem(cell, 8, hidden=19, batch=2, steps=4)
    lengths = jnp.array([4, 1], jnp.int32)

    def f(w_f, w_b, x_f, x_b):
        return bidirectional(cell, (w_f, x_f, *fwd[2:]), (w_b, x_b, *bwd[2:]), seq_lengths=lengths)

    exported = jax.export.export(jax.jit(f), disabled_checks=js.export.disabled_checks())(
        fwd[0], bwd[0], fwd[1], bwd[1])
    restored = jax.export.deserialize(exported.serialize())
    for got, want in zip(jax.tree_util.tree_leaves(restored.call(fwd[0], bwd[0], fwd[1], bwd[1])),
                         jax.tree_util.tree_leaves(f(fwd[0], bwd[0], fwd[1], bwd[1]))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("cell", GATES)
def test_the_paired_call_is_one_gated_launch_on_cuda(cuda_targets_registered, cell):
    # Lowered for CUDA (never run): one gated forward call of both directions, stacked
    # [2, T, B, G*H] with B before T in memory, the backward direction's bit set in reverse.
    fwd, bwd = problem(cell, 2, hidden=300, batch=2, steps=7, dtype="float16")

    def forward(x_f, x_b):
        return bidirectional(cell, (fwd[0], x_f, *fwd[2:]), (bwd[0], x_b, *bwd[2:]), method="native")[0]

    checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _native.cuda_targets()]
    text = jax.export.export(jax.jit(forward), platforms=["cuda"], disabled_checks=checks)(
        fwd[1], bwd[1]).mlir_module()
    calls = [c for c in text.splitlines() if "stablehlo.custom_call @jax_sprnn" in c]
    assert len(calls) == 1 and f"@{_constants.ffi_target('gated_forward')}(" in calls[0]
    call = calls[0]
    assert "problems = 2 : i64" in call and "reverse = 2 : i64" in call
    assert f"gates = {GATES[cell]} : i64" in call
    assert "dense<[3, 1, 2, 0]>" in call
    assert f"tensor<2x7x2x{GATES[cell] * 300}xf16>" in call
    if cell == "gru":
        assert "tensor<2x300xf32>" in call  # both directions' hn_bias
    # The gradient: one paired forward (with the LSTM's cells) and one paired backward recurrence,
    # in step order (no reverse attribute), batch-major.
    assert fwd[0].meta_t == bwd[0].meta_t

    def grad(x_f, x_b):
        return jax.grad(lambda a, b: jnp.sum(forward(a, b).astype(jnp.float32)), argnums=(0, 1))(x_f, x_b)

    text = jax.export.export(jax.jit(grad), platforms=["cuda"], disabled_checks=checks)(
        fwd[1], bwd[1]).mlir_module()
    calls = [c for c in text.splitlines() if "stablehlo.custom_call @jax_sprnn" in c]
    names = [re.search(r"@(\w+)\(", c).group(1) for c in calls]
    assert sorted(names) == sorted([_constants.ffi_target("gated_forward"),
                                    _constants.ffi_target("gated_backward")])
    backward = next(c for c in calls if "gated_backward" in c)
    assert "problems = 2 : i64" in backward and "batch_major = 1 : i64" in backward
    assert "reverse" not in backward and "dense<[3, 1, 2, 0]>" in backward
    assert f"tensor<2x7x2x{GATES[cell] * 300}xf32>" in backward  # u, du


def test_malformed_calls_name_the_argument():
    fwd, bwd = problem("lstm", 1, hidden=13, batch=2, steps=3)
    carries = ((fwd[2], fwd[3]), (bwd[2], bwd[3]))
    with pytest.raises(TypeError, match="inputs must be a pair"):
        js.sparse_lstm_bidirectional(fwd[1], carries, (fwd[0], bwd[0]))
    with pytest.raises(TypeError, match=r"carry must be a pair"):
        js.sparse_lstm_bidirectional((fwd[1], bwd[1]), (fwd[2], fwd[3], bwd[2]), (fwd[0], bwd[0]))
    with pytest.raises(TypeError, match=r"carry\[1\] must be a pair \(c0, h0\)"):
        js.sparse_lstm_bidirectional((fwd[1], bwd[1]), ((fwd[2], fwd[3]), bwd[3]), (fwd[0], bwd[0]))
    with pytest.raises(ValueError, match="inputs: x_fwd is .* and x_bwd"):
        js.sparse_lstm_bidirectional((fwd[1], bwd[1][:, :2]), carries, (fwd[0], bwd[0]))
    with pytest.raises(ValueError, match=r"carry \(bwd\)\[1\] \(h0\) must be \[B, H\]"):
        js.sparse_lstm_bidirectional((fwd[1], bwd[1]), ((fwd[2], fwd[3]), (bwd[2], bwd[3][:1])),
                                     (fwd[0], bwd[0]))
    gru_f, gru_b = problem("gru", 1, hidden=13, batch=2, steps=3)
    with pytest.raises(ValueError, match="4"):  # an LSTM call given GRU weights: the gate count
        js.sparse_lstm_bidirectional((fwd[1], bwd[1]), carries, (gru_f[0], gru_b[0]))
    with pytest.raises(ValueError, match=r"inputs must be \[B, T, 3H\]"):  # LSTM inputs for a GRU
        js.sparse_gru_bidirectional((fwd[1], bwd[1]), (gru_f[3], gru_b[3]), (gru_f[0], gru_b[0]))
    with pytest.raises(ValueError, match=r"hn_bias must be \[H\] = \(13,\)"):
        js.sparse_gru_bidirectional((gru_f[1], gru_b[1]), (gru_f[3], gru_b[3]), (gru_f[0], gru_b[0]),
                                    hn_bias=(gru_f[4], gru_b[4][:5]))
    with pytest.raises(TypeError, match="hn_bias must be a pair"):
        js.sparse_gru_bidirectional((gru_f[1], gru_b[1]), (gru_f[3], gru_b[3]), (gru_f[0], gru_b[0]),
                                    hn_bias=gru_f[4])
    with pytest.raises(TypeError, match=r"weights\[1\] \(backward\) must be a jax_sprnn.SparseWeights"):
        js.sparse_gru_bidirectional((gru_f[1], gru_b[1]), (gru_f[3], gru_b[3]), (gru_f[0], None))
    with pytest.raises(ValueError, match="method"):
        js.sparse_gru_bidirectional((gru_f[1], gru_b[1]), (gru_f[3], gru_b[3]), (gru_f[0], gru_b[0]),
                                    method="fast")


# ---- Flax: SparseBidirectionalLSTM / SparseBidirectionalGRU --------------------------------------

nn = pytest.importorskip("flax.linen")
from jax_sprnn import _modules, pruning  # noqa: E402
from jax_sprnn.flax import SparseBidirectionalGRU, SparseBidirectionalLSTM  # noqa: E402

LINEN = {"lstm": (SparseBidirectionalLSTM, nn.LSTMCell, "hi+hf+hg+ho"),
         "gru": (SparseBidirectionalGRU, nn.GRUCell, "hr+hz+hn")}
RECURRENT = {"lstm": ("hi", "hf", "hg", "ho"), "gru": ("hr", "hz", "hn")}
FH, FF, FB, FT = 11, 5, 3, 7
FLENGTHS = np.array([FT, 4, 1], np.int32)


def dense_bidirectional(cell, time_major=False, **kw):
    flax_cell = LINEN[cell][1]
    return nn.Bidirectional(nn.RNN(flax_cell(FH, **kw)), nn.RNN(flax_cell(FH, **kw)),
                            time_major=time_major)


def random_params(cell, seed, x):
    """An nn.Bidirectional(nn.RNN(Flax's cell)) params tree with random kernels and biases, as
    training leaves them."""
    params = dense_bidirectional(cell).init(jax.random.key(seed), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)
                                              * (0.6 / np.sqrt(a.shape[0]) if a.ndim == 2 else 0.3)),
                        params)


def inside(lengths, time_major=False):
    mask = (np.arange(FT)[None] < np.asarray(lengths)[:, None])[..., None]
    return np.swapaxes(mask, 0, 1) if time_major else mask


@pytest.mark.parametrize("cell", GATES)
@pytest.mark.parametrize("time_major", [False, True])
def test_linen_is_nn_bidirectional_of_flax_cells(exact_matmuls, cell, time_major, monkeypatch):
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    layer, _, joined = LINEN[cell]
    x = jax.random.normal(jax.random.key(1), (FB, FT, FF))
    key = jax.random.key(2)
    # The same parameter tree and init values as nn.Bidirectional of Flax's cells; the masks at
    # the joined recurrent kernels' paths.
    dense_vars = dense_bidirectional(cell).init(key, x)
    variables = layer(FH).init(key, x)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(dense_vars["params"])
    for a, b in zip(jax.tree.leaves(dense_vars["params"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("forward_rnn", "backward_rnn"):
        assert isinstance(variables["sparsity"][name]["cell"][joined]["kernel"], pruning.PackedMask)
    # Its outputs and carries on trained params, with lengths, in either layout.
    params = random_params(cell, 3, x)
    tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
    call = dict(seq_lengths=FLENGTHS, return_carry=True, init_key=jax.random.key(4))
    model = layer(FH, time_major=time_major, carry_init=nn.initializers.normal(0.5))
    dense = dense_bidirectional(cell, carry_init=nn.initializers.normal(0.5), time_major=time_major)
    carry, out = model.apply({"params": params, "sparsity": variables["sparsity"]}, tm(x), **call)
    ref_carry, ref = dense.apply({"params": params}, tm(x), **call)
    assert out.shape == ((FT, FB, 2 * FH) if time_major else (FB, FT, 2 * FH))
    valid = inside(FLENGTHS, time_major)
    assert rel_err(np.where(valid, out, 0), np.where(valid, ref, 0)) < 1e-5
    assert np.all(np.asarray(out)[~np.broadcast_to(valid, out.shape)] == 0)
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(ref_carry)):
        assert rel_err(a, b) < 1e-5
    # initialize_carry: a carry for each direction, each as Flax's cell makes it from its key.
    carries = model.initialize_carry(jax.random.key(7), (FB, FF))
    flax_cell = LINEN[cell][1](FH, carry_init=nn.initializers.normal(0.5))
    for got, key in zip(carries, jax.random.split(jax.random.key(7))):
        want = flax_cell.initialize_carry(key, (FB, FF))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Params alone: the layer runs dense and says so once.
    with pytest.warns(UserWarning, match=f"{layer.__name__}.*runs dense"):
        alone = model.apply({"params": params}, tm(x), **call)[1]
    assert rel_err(alone, out) < 1e-6


@pytest.mark.parametrize("cell", GATES)
def test_linen_pruning_and_the_inference_form(exact_matmuls, cell):
    layer, _, joined = LINEN[cell]
    x = jax.random.normal(jax.random.key(5), (FB, FT, FF))
    model = layer(FH, max_density=0.5)
    variables = model.init(jax.random.key(6), x)
    params = random_params(cell, 7, x)
    pruned, sparsity = pruning.update_sparsity(params, variables["sparsity"], 0.7)
    for name in ("forward_rnn", "backward_rnn"):
        mask = np.asarray(sparsity[name]["cell"][joined]["kernel"].mask)
        counts = mask.sum(axis=0)
        assert np.all(counts == counts[0]), "row-balanced: one count per gate row"
        kernel = np.concatenate([np.asarray(pruned[name]["cell"][n]["kernel"])
                                 for n in RECURRENT[cell]], axis=1)
        assert np.all(kernel[~mask] == 0)
    trained = {"params": pruned, "sparsity": sparsity}
    out = jax.jit(lambda v: model.apply(v, x, seq_lengths=FLENGTHS))(trained)
    ref = dense_bidirectional(cell).apply({"params": pruned}, x, seq_lengths=FLENGTHS)
    valid = inside(FLENGTHS)
    assert rel_err(np.where(valid, out, 0), np.where(valid, ref, 0)) < 1e-5
    # The gradient is zero off the masks and Flax's on them.
    target = jax.random.normal(jax.random.key(8), out.shape)

    def loss(p, apply):
        return jnp.mean((jnp.where(valid, apply(p), 0) - target) ** 2)

    grads = jax.grad(loss)(pruned, lambda p: model.apply({"params": p, "sparsity": sparsity}, x,
                                                          seq_lengths=FLENGTHS))
    ref_grads = jax.grad(loss)(pruned, lambda p: dense_bidirectional(cell).apply(
        {"params": p}, x, seq_lengths=FLENGTHS))
    for name in ("forward_rnn", "backward_rnn"):
        mask = np.asarray(sparsity[name]["cell"][joined]["kernel"].mask)
        g = np.concatenate([np.asarray(grads[name]["cell"][n]["kernel"]) for n in RECURRENT[cell]], 1)
        r = np.concatenate([np.asarray(ref_grads[name]["cell"][n]["kernel"]) for n in RECURRENT[cell]],
                           1)
        assert np.all(g[~mask] == 0)
        assert rel_err(g[mask], r[mask]) < 1e-4
    # The inference form: packed weights in the collection, the same outputs.
    inference = pruning.to_inference(trained)
    for name in ("forward_rnn", "backward_rnn"):
        assert isinstance(inference["sparsity"][name]["cell"][joined]["kernel"], js.SparseWeights)
    served = jax.jit(lambda v: model.apply(v, x, seq_lengths=FLENGTHS))(inference)
    assert rel_err(served, out) < 1e-6


def test_linen_bad_arguments():
    x = jax.random.normal(jax.random.key(9), (FB, FT, FF))
    model = SparseBidirectionalLSTM(FH)
    variables = model.init(jax.random.key(0), x)
    carry = (jnp.zeros((FB, FH)), jnp.zeros((FB, FH)))
    with pytest.raises(ValueError, match="initial_carry must be a pair"):
        model.apply(variables, x, initial_carry=carry[0])
    with pytest.raises(ValueError, match=r"initial_carry\[1\] must be a tuple \(c, h\)"):
        model.apply(variables, x, initial_carry=(carry, carry[0]))
    with pytest.raises(ValueError, match=r"initial_carry\[0\]\[1\] \(h\) must be \[\*batch, H\]"):
        model.apply(variables, x, initial_carry=((carry[0], carry[1][:1]), carry))
    with pytest.raises(ValueError, match=r"seq_lengths must be \[\*batch\]"):
        model.apply(variables, x, seq_lengths=FLENGTHS[:2])


# ---- NNX: SparseBidirectionalLSTM / SparseBidirectionalGRU ---------------------------------------

nnx = pytest.importorskip("flax.nnx")
from jax_sprnn import nnx as jnnx  # noqa: E402

NNX = {"lstm": (jnnx.SparseBidirectionalLSTM, nnx.LSTMCell),
       "gru": (jnnx.SparseBidirectionalGRU, nnx.GRUCell)}


def nnx_dense(cell, seed):
    flax_cell = NNX[cell][1]
    rngs = nnx.Rngs(seed)
    return nnx.Bidirectional(nnx.RNN(flax_cell(FF, FH, rngs=rngs)), nnx.RNN(flax_cell(FF, FH, rngs=rngs)))


@pytest.mark.parametrize("cell", GATES)
def test_nnx_is_nnx_bidirectional_and_prunes(exact_matmuls, cell):
    layer = NNX[cell][0](FF, FH, rngs=nnx.Rngs(40))
    dense = nnx_dense(cell, 40)
    ours, theirs = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (layer, dense))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same rngs, same values
    x = jax.random.normal(jax.random.key(41), (FB, FT, FF))
    valid = inside(FLENGTHS)
    carry, out = layer(x, seq_lengths=FLENGTHS, return_carry=True)
    ref_carry, ref = dense(x, seq_lengths=FLENGTHS, return_carry=True)
    assert out.shape == (FB, FT, 2 * FH)
    assert rel_err(np.where(valid, out, 0), np.where(valid, ref, 0)) < 1e-5
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(ref_carry)):
        assert rel_err(a, b) < 1e-5
    # Pruned: each direction its own mask; still nnx.Bidirectional of the pruned parameters; the
    # inference form gives the same outputs.
    jnnx.prune(layer, 0.6)
    for rnn in (layer.forward_rnn, layer.backward_rnn):
        assert np.asarray(rnn.mask).mean() == pytest.approx(0.4, abs=0.05)
    nnx.update(dense, nnx.state(layer, nnx.Param))
    out, ref = layer(x, seq_lengths=FLENGTHS), dense(x, seq_lengths=FLENGTHS)
    assert rel_err(np.where(valid, out, 0), np.where(valid, ref, 0)) < 1e-5
    inference = jnnx.to_inference(layer)
    assert isinstance(inference.backward_rnn.sparsity.get_value(), js.SparseWeights)
    assert rel_err(nnx.jit(lambda m: m(x, seq_lengths=FLENGTHS))(inference), out) < 1e-6
    with pytest.raises(TypeError, match="reverse"):
        NNX[cell][0](FF, FH, reverse=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="inputs"):
        layer(jnp.zeros((FB, FT, FF + 1)))
