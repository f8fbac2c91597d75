"""sparse_rnn_bidirectional against a float64 NumPy bidirectional RNN and two sparse_rnn calls
(lengths, time_major, dtypes), its gradients, vmap, export, and its errors, both where the
directions share one layout (one paired call) and where they do not (two calls); the Flax modules
SparseBidirectional (linen and NNX) against nn.Bidirectional / nnx.Bidirectional of simple cells:
the same parameter tree, a real checkpoint's outputs, call keywords, pruning, the inference form."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _modules, pruning
from jax_sprnn.testing import (GRAD_TOLERANCE, TOLERANCE, make_problem, make_twin_problem, normal,
                               rel_err)

ACTS = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0), "identity": lambda z: z}


def numpy_rnn(x, h0, kernel, lengths, activation, reverse):
    """A float64 NumPy simple RNN with sparse_rnn's conventions (docs/format.md): ``x [B, T, H]``;
    past an example's length its outputs are zero and its state is held; ``reverse`` starts at
    the last valid step."""
    x, h = np.asarray(x, np.float64), np.array(h0, np.float64)
    kernel = np.asarray(kernel, np.float64)
    B, T, _ = x.shape
    y = np.zeros_like(x)
    for b in range(B):
        steps = range(lengths[b] - 1, -1, -1) if reverse else range(lengths[b])
        for t in steps:
            h[b] = ACTS[activation](x[b, t] + h[b] @ kernel)
            y[b, t] = h[b]
    return y, h


LAYOUTS = ("own", "shared")  # (and "forward": test_grads_match_the_reference)


def balanced_mask(seed, hidden, per_unit):
    """A mask in which every hidden unit (a column of the kernel) has ``per_unit`` inputs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((hidden, hidden), bool)
    for j in range(hidden):
        mask[rng.choice(hidden, per_unit, replace=False), j] = True
    return mask


def problem(seed, hidden=37, batch=3, steps=9, dtype="float32", layout="own"):
    """Two directions' (dense kernel, weights, x, h0), of different kernels. ``layout="own"``:
    different densities, so different layouts (two calls); ``"shared"``: the backward mask is
    the forward one with its rows and columns permuted, another pattern with the same row and
    column counts, which packs to the same layout (one paired call); ``"forward"``: two masks of
    the same count per unit but different counts per input, planned to one forward layout (a
    paired forward call) and two transposed ones (two backward calls in the gradient)."""
    if layout == "shared":
        return make_twin_problem(seed, hidden, batch, steps, 0.2, dtype)
    if layout == "forward":  # (the first mask seeds that plan so)
        for trial in range(seed, seed + 1000, 10):
            pair = [make_problem(seed + 100 * q, hidden, batch, steps, 0.2, dtype,
                                 mask=balanced_mask(trial + q, hidden, max(1, hidden // 10)))
                    for q in range(2)]
            if pair[0][1].meta == pair[1][1].meta and pair[0][1].meta_t != pair[1][1].meta_t:
                return tuple(pair)
        raise AssertionError(f"no pair of masks with one layout and two transposed ones at H={hidden}")
    fwd = make_problem(seed, hidden, batch, steps, 0.2, dtype)
    bwd = make_problem(seed + 100, hidden, batch, steps, 0.35, dtype)
    assert fwd[1].meta != bwd[1].meta
    return fwd, bwd


def runs_paired(*args, **kw) -> bool:
    """Whether this call of sparse_rnn_bidirectional is one paired call (else two calls)."""
    jaxpr = str(jax.make_jaxpr(lambda *a: js.sparse_rnn_bidirectional(*a, **kw))(*args))
    return "sprnn_forward_pair" in jaxpr


def as64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("use_lengths", [False, True])
def test_matches_numpy_and_two_calls(dtype, time_major, use_lengths, layout):
    (k_f, w_f, x_f, h_f), (k_b, w_b, x_b, h_b) = problem(1, dtype=dtype, layout=layout)
    B, T, H = x_f.shape
    lengths = np.array([T, 4, 0], np.int32) if use_lengths else None
    tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
    args = ((tm(x_f), tm(x_b)), (h_f, h_b), (w_f, w_b))
    kw = dict(time_major=time_major, seq_lengths=lengths)
    assert runs_paired(*args, **kw) == (layout != "own")
    assert not runs_paired(*args, **kw, method="reference")
    y, (hT_f, hT_b) = js.sparse_rnn_bidirectional(*args, **kw)
    assert y.shape == ((T, B, 2 * H) if time_major else (B, T, 2 * H)) and y.dtype == x_f.dtype
    # Two separate calls: the same arithmetic, so the same bits.
    kw = dict(time_major=time_major, seq_lengths=lengths)
    y_f, g_f = js.sparse_rnn(tm(x_f), h_f, w_f, **kw)
    y_b, g_b = js.sparse_rnn(tm(x_b), h_b, w_b, reverse=True, **kw)
    for got, want in ((y, jnp.concatenate([y_f, y_b], -1)), (hT_f, g_f), (hT_b, g_b)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The float64 truth, on the inputs as stored.
    L = np.full(B, T) if lengths is None else lengths
    r_f, s_f = numpy_rnn(as64(x_f), as64(h_f), k_f, L, "tanh", False)
    r_b, s_b = numpy_rnn(as64(x_b), as64(h_b), k_b, L, "tanh", True)
    y_bt = tm(y)
    tol = TOLERANCE[dtype]
    assert rel_err(y_bt[..., :H], r_f) < tol and rel_err(y_bt[..., H:], r_b) < tol
    assert rel_err(hT_f, s_f) < tol and rel_err(hT_b, s_b) < tol
    if use_lengths:  # past an example's length both halves are zero
        assert np.all(np.asarray(y_bt)[1, 4:] == 0) and np.all(np.asarray(y_bt)[2] == 0)
        np.testing.assert_array_equal(np.asarray(hT_b[2]), np.asarray(h_b[2]))


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_activations_and_methods(activation, layout):
    (k_f, w_f, x_f, h_f), (k_b, w_b, x_b, h_b) = problem(2, hidden=19, batch=2, steps=5, layout=layout)
    L = np.array([5, 3], np.int32)
    outs = {m: js.sparse_rnn_bidirectional((x_f, x_b), (h_f, h_b), (w_f, w_b), seq_lengths=L,
                                           activation=activation, method=m)
            for m in ("auto", "native", "reference")}
    r_f, s_f = numpy_rnn(x_f, h_f, k_f, L, activation, False)
    r_b, s_b = numpy_rnn(x_b, h_b, k_b, L, activation, True)
    for y, (hT_f, hT_b) in outs.values():
        assert rel_err(y, np.concatenate([r_f, r_b], -1)) < 1e-5
        assert rel_err(hT_f, s_f) < 1e-5 and rel_err(hT_b, s_b) < 1e-5


@pytest.mark.parametrize("hidden, layout", [(29, "own"), (29, "shared"), (64, "forward"),
                                            (256, "shared")])
def test_grads_match_the_reference(exact_matmuls, hidden, layout):
    (k_f, w_f, x_f, h_f), (k_b, w_b, x_b, h_b) = problem(3, hidden=hidden, batch=3, steps=7,
                                                         layout=layout)
    L = np.array([7, 5, 2], np.int32)
    cot = normal(4, (3, 7, 2 * hidden))
    cot_h = normal(5, (2, 3, hidden))

    def loss(ws, xs, h0s):
        y, hs = js.sparse_rnn_bidirectional(xs, h0s, ws, seq_lengths=L)
        return jnp.sum(y * cot) + jnp.sum(jnp.stack(hs) * cot_h)

    args = ((w_f, w_b), (x_f, x_b), (h_f, h_b))
    jaxpr = str(jax.make_jaxpr(js.grad(loss, argnums=(0, 1, 2)))(*args))
    assert ("sprnn_forward_pair" in jaxpr) == (layout != "own")
    assert ("sprnn_backward_pair" in jaxpr) == (layout == "shared")
    g_w, g_x, g_h = jax.jit(js.grad(loss, argnums=(0, 1, 2)))(*args)
    assert isinstance(g_w[0], js.SparseWeights) and isinstance(g_w[1], js.SparseWeights)

    def ref_loss(kernels, xs, h0s):  # pure JAX, dense kernels, HIGHEST precision
        y_f, s_f = js.reference_rnn(xs[0], h0s[0], kernels[0], seq_lengths=L)
        y_b, s_b = js.reference_rnn(xs[1], h0s[1], kernels[1], seq_lengths=L, reverse=True)
        return (jnp.sum(jnp.concatenate([y_f, y_b], -1) * cot)
                + jnp.sum(jnp.stack([s_f, s_b]) * cot_h))

    r_k, r_x, r_h = jax.grad(ref_loss, argnums=(0, 1, 2))(
        (jnp.asarray(k_f), jnp.asarray(k_b)), (x_f, x_b), (h_f, h_b))
    tol = GRAD_TOLERANCE["float32"]
    for i, (w, dense) in enumerate(((w_f, k_f), (w_b, k_b))):
        mask = dense != 0
        # The gradient of the packed values, as a dense matrix on the pattern.
        g_dense = np.asarray(w.replace(values=g_w[i].values).to_dense())
        assert rel_err(g_dense[mask], np.asarray(r_k[i])[mask]) < tol
        assert rel_err(g_x[i], r_x[i]) < tol and rel_err(g_h[i], r_h[i]) < tol


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_over_the_inputs_and_lengths(layout):
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = problem(6, hidden=21, batch=2, steps=6, layout=layout)
    xs_f, xs_b = normal(7, (4,) + x_f.shape), normal(8, (4,) + x_b.shape)
    lengths = jnp.array([[6, 1], [0, 6], [3, 3], [2, 5]], jnp.int32)

    def f(x_f, x_b, L):
        return js.sparse_rnn_bidirectional((x_f, x_b), (h_f, h_b), (w_f, w_b), seq_lengths=L)

    y, (hT_f, hT_b) = jax.vmap(f)(xs_f, xs_b, lengths)
    for i in range(4):
        yi, (fi, bi) = f(xs_f[i], xs_b[i], lengths[i])
        assert rel_err(y[i], yi) < 1e-6 and rel_err(hT_f[i], fi) < 1e-6
        assert rel_err(hT_b[i], bi) < 1e-6


def test_vmap_over_weight_pairs_is_one_stacked_call():
    # An ensemble of three bidirectional layers of one layout: 6 problems of one stacked call,
    # forward and backward, each set as its own call would give.
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = problem(14, hidden=23, batch=2, steps=6, layout="shared")
    scales = jnp.asarray([1.0, -0.6, 0.8])
    ws = tuple(jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), w) for w in (w_f, w_b))
    ws = tuple(w.replace(values=w.values * scales[:, None]) for w in ws)
    L = np.array([6, 3], np.int32)

    def loss(ws, xs):
        y, hs = js.sparse_rnn_bidirectional(xs, (h_f, h_b), ws, seq_lengths=L)
        return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.stack(hs)), y

    grads = jax.vmap(js.grad(loss, argnums=(0, 1), has_aux=True), in_axes=(0, None))
    jaxpr = str(jax.make_jaxpr(grads)(ws, (x_f, x_b)))
    # (the weight gradients still loop over the sets: one kernel a set)
    assert "sprnn_forward_stack" in jaxpr and "sprnn_backward_stack" in jaxpr
    (g_w, g_x), y = grads(ws, (x_f, x_b))
    for i in range(3):
        w_i = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], w) for w in ws)
        (r_w, r_x), r_y = js.grad(loss, argnums=(0, 1), has_aux=True)(w_i, (x_f, x_b))
        np.testing.assert_allclose(np.asarray(y[i]), np.asarray(r_y), rtol=1e-6, atol=1e-6)
        for q in range(2):
            np.testing.assert_allclose(np.asarray(g_w[q].values[i]), np.asarray(r_w[q].values),
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.asarray(g_x[q][i]), np.asarray(r_x[q]), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_round_trip(layout):
    pytest.importorskip("flatbuffers")
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = problem(9, hidden=23, batch=2, steps=5, layout=layout)
    L = np.array([5, 2], np.int32)

    def model(xs, h0s, ws, L):
        return js.sparse_rnn_bidirectional(xs, h0s, ws, seq_lengths=L)

    args = ((x_f, x_b), (h_f, h_b), (w_f, w_b), L)
    blob = js.export.serialize(js.export.export(model)(*args))  # SparseWeights as arguments
    y, hs = js.export.deserialize(blob).call(*args)
    want_y, want_hs = jax.jit(model)(*args)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-6, atol=1e-6)
    for a, b in zip(hs, want_hs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_malformed_pairs_name_the_argument():
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = problem(10, hidden=16, batch=2, steps=3)
    xs, hs, ws = (x_f, x_b), (h_f, h_b), (w_f, w_b)
    call = js.sparse_rnn_bidirectional
    with pytest.raises(TypeError, match=r"inputs must be a pair \(x_fwd, x_bwd\).*got Array"):
        call(x_f, hs, ws)
    with pytest.raises(TypeError, match=r"h0 must be a pair .*tuple of length 3"):
        call(xs, (h_f, h_b, h_b), ws)
    with pytest.raises(TypeError, match=r"weights must be a pair"):
        call(xs, hs, w_f)
    with pytest.raises(TypeError, match=r"weights\[1\] \(backward\) must be a jax_sprnn.SparseWeights"):
        call(xs, hs, (w_f, np.zeros((16, 16), np.float32)))
    _, w_wide, _, _ = make_problem(11, 24, 2, 3, 0.3)
    with pytest.raises(ValueError, match=r"weights: the forward kernel is \(16, 16\) and the "
                                         r"backward \(24, 24\).*same hidden size"):
        call(xs, hs, (w_f, w_wide))
    with pytest.raises(TypeError, match=r"weights: .* float32 and the backward bfloat16"):
        call(xs, hs, (w_f, w_b.astype(jnp.bfloat16)))
    with pytest.raises(ValueError, match=r"inputs: x_fwd is float32\[2, 3, 16\] and x_bwd "
                                         r"float32\[2, 2, 16\]"):
        call((x_f, x_b[:, :2]), hs, ws)
    with pytest.raises(TypeError, match=r"h0: h0_fwd .* and h0_bwd float16"):
        call(xs, (h_f, h_b.astype(jnp.float16)), ws)
    with pytest.raises(ValueError, match=r"h0 must be \[B, H\]"):  # sparse_rnn's own checks
        call(xs, (h_f[:1], h_b[:1]), ws)
    with pytest.raises(ValueError, match="method"):
        call(xs, hs, ws, method="fused")
    with pytest.raises(ValueError, match="seq_lengths"):
        call(xs, hs, ws, seq_lengths=np.array([4, 1]))


# ---- the Flax modules ------------------------------------------------------------------------

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
from jax_sprnn import nnx as jnnx  # noqa: E402 (after the importorskip of flax)
from jax_sprnn.flax import SparseBidirectional  # noqa: E402
from nnx_training import train_while_pruning  # noqa: E402 (tests/, on the path under pytest)

pytestmark = pytest.mark.usefixtures("exact_matmuls")  # comparisons at 1e-5 (tests/conftest.py)

H, F, B, T = 13, 5, 3, 7
LENGTHS = np.array([T, 4, 1], np.int32)


def dense_bidirectional():
    return nn.Bidirectional(nn.RNN(nn.SimpleCell(H)), nn.RNN(nn.SimpleCell(H)))


def trained_dense_params(seed, x):
    """An nn.Bidirectional(nn.RNN(nn.SimpleCell)) params tree with random (not orthogonal)
    recurrent kernels and biases, as training leaves them."""
    params = dense_bidirectional().init(jax.random.key(seed), x)["params"]
    rng = np.random.default_rng(seed)
    for name in ("forward_rnn", "backward_rnn"):
        cell = params[name]["cell"]
        cell["h"]["kernel"] = jnp.asarray(rng.standard_normal((H, H)).astype(np.float32) * 0.9 / H ** 0.5)
        cell["i"]["bias"] = jnp.asarray(rng.standard_normal(H).astype(np.float32) * 0.3)
    return params


def valid(lengths, time_major=False):
    """[B, T, 1] (or [T, B, 1]) booleans: the positions inside each example's length."""
    inside = (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]
    return np.swapaxes(inside, 0, 1) if time_major else inside


def test_linen_params_are_nn_bidirectionals_and_init_matches():
    x = normal(20, (B, T, F))
    key = jax.random.key(21)
    dense = dense_bidirectional().init(key, x)
    variables = SparseBidirectional(H).init(key, x)
    assert set(variables) == {"params", "sparsity"}
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(dense["params"])
    for a, b in zip(jax.tree.leaves(dense["params"]), jax.tree.leaves(variables["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same key, same values
    # The masks sit at the kernels' own paths.
    packed = jax.tree.leaves(variables["sparsity"], is_leaf=lambda v: isinstance(v, pruning.PackedMask))
    assert len(packed) == 2 and all(isinstance(p, pruning.PackedMask) for p in packed)
    assert jax.tree.structure(variables["sparsity"], is_leaf=lambda v: isinstance(v, pruning.PackedMask)) \
        == jax.tree.structure({d: {"cell": {"h": {"kernel": 0}}} for d in ("forward_rnn", "backward_rnn")})


def test_linen_loads_an_nn_bidirectional_checkpoint(tmp_path, monkeypatch):
    ocp = pytest.importorskip("orbax.checkpoint")
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    x = normal(22, (B, T, F))
    params = trained_dense_params(23, x)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "birnn", params)
    checkpointer.wait_until_finished()
    model = SparseBidirectional(H)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    restored = checkpointer.restore(tmp_path / "birnn", abstract)
    carry0 = (normal(24, (B, H)) * 0.5, normal(25, (B, H)) * 0.5)
    call = dict(initial_carry=carry0, seq_lengths=LENGTHS, return_carry=True)
    (ref_f, ref_b), ref = dense_bidirectional().apply({"params": params}, x, **call)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (c_f, c_b), out = model.apply({"params": restored}, x, **call)
        jitted = jax.jit(lambda p: model.apply({"params": p}, x, **call))(restored)[1]
    no_mask = [str(w.message) for w in caught if "no mask" in str(w.message)]
    assert len(no_mask) == 1 and "SparseBidirectional" in no_mask[0] and "runs dense" in no_mask[0]
    inside = valid(LENGTHS)
    assert out.shape == (B, T, 2 * H)
    # nn.RNN's values past an example's length depend on the padding; ours are zero.
    assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < TOLERANCE["float32"]
    assert np.all(np.asarray(out)[~np.broadcast_to(inside, out.shape)] == 0)
    assert rel_err(c_f, ref_f) < TOLERANCE["float32"] and rel_err(c_b, ref_b) < TOLERANCE["float32"]
    assert rel_err(jitted, out) < 1e-6
    # With init's masks (all ones at max_density 1): the same, and no warning.
    sparsity = model.init(jax.random.key(0), x)["sparsity"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        masked = model.apply({"params": restored, "sparsity": sparsity}, x, **call)[1]
    assert rel_err(masked, out) < 1e-6


@pytest.mark.parametrize("time_major", [False, True])
def test_linen_call_keywords_and_batch_dims(time_major, exact_matmuls):
    x = normal(26, (B, T, F))
    params = trained_dense_params(27, x)
    tm = (lambda a: jnp.swapaxes(a, 0, 1)) if time_major else (lambda a: a)
    model = SparseBidirectional(H, carry_init=nn.initializers.normal(0.5), time_major=time_major)
    dense = nn.Bidirectional(nn.RNN(nn.SimpleCell(H, carry_init=nn.initializers.normal(0.5))),
                             nn.RNN(nn.SimpleCell(H, carry_init=nn.initializers.normal(0.5))),
                             time_major=time_major)
    call = dict(seq_lengths=LENGTHS, return_carry=True, init_key=jax.random.key(28))
    variables = {"params": params, "sparsity": model.init(jax.random.key(0), x)["sparsity"]}
    carry, out = model.apply(variables, tm(x), **call)
    ref_carry, ref = dense.apply({"params": params}, tm(x), **call)
    assert out.shape == ((T, B, 2 * H) if time_major else (B, T, 2 * H))
    inside = valid(LENGTHS)
    out, ref = tm(out), tm(ref)
    assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < 1e-5
    for a, b in zip(carry, ref_carry):  # init_key split between the directions, as nn.Bidirectional
        assert rel_err(a, b) < 1e-5
    # reverse / keep_order are accepted and ignored, as nn.Bidirectional does.
    again = model.apply(variables, tm(x), seq_lengths=LENGTHS, init_key=jax.random.key(28),
                        reverse=True, keep_order=False)
    np.testing.assert_array_equal(np.asarray(tm(again)), np.asarray(out))
    # Several batch dimensions fold into one.
    xs = normal(29, (2, B, T, F))
    lengths = np.stack([LENGTHS, LENGTHS[::-1]])
    carry0 = (normal(30, (2, B, H)), normal(31, (2, B, H)))
    batch_first = jnp.moveaxis(xs, 2, 0) if time_major else xs
    carry, out = model.apply(variables, batch_first, seq_lengths=lengths, initial_carry=carry0,
                             return_carry=True)
    flat_x = xs.reshape(2 * B, T, F)
    flat_carry, flat = model.apply(variables, tm(flat_x), seq_lengths=lengths.reshape(-1),
                                   initial_carry=tuple(c.reshape(2 * B, H) for c in carry0),
                                   return_carry=True)
    out = jnp.moveaxis(out, 0, 2) if time_major else out
    np.testing.assert_array_equal(np.asarray(out).reshape(2 * B, T, 2 * H), np.asarray(tm(flat)))
    for a, b in zip(carry, flat_carry):
        np.testing.assert_array_equal(np.asarray(a).reshape(2 * B, H), np.asarray(b))


def test_linen_grad_pruning_and_inference(exact_matmuls):
    x = normal(30, (B, T, F))
    target = normal(31, (B, T, 2 * H))
    model = SparseBidirectional(H, max_density=0.5)
    variables = model.init(jax.random.key(32), x)
    params = jax.tree.map(lambda a: a, variables["params"])
    dense_params = trained_dense_params(33, x)
    for name in ("forward_rnn", "backward_rnn"):  # random kernels on init's masks
        mask = np.asarray(variables["sparsity"][name]["cell"]["h"]["kernel"].mask)
        params[name]["cell"]["h"]["kernel"] = jnp.where(
            mask, dense_params[name]["cell"]["h"]["kernel"] * 1.4, 0.0)
    sparsity = variables["sparsity"]

    def loss(p, apply):
        return jnp.mean((apply(p) - target) ** 2)

    dense = dense_bidirectional()
    grads = jax.grad(loss)(params, lambda p: model.apply({"params": p, "sparsity": sparsity}, x))
    ref = jax.grad(loss)(params, lambda p: dense.apply({"params": p}, x))
    for name in ("forward_rnn", "backward_rnn"):
        mask = np.asarray(sparsity[name]["cell"]["h"]["kernel"].mask)
        g = np.asarray(grads[name]["cell"]["h"]["kernel"])
        assert np.all(g[~mask] == 0), "the gradient must be exactly zero off the mask"
        assert rel_err(g[mask], np.asarray(ref[name]["cell"]["h"]["kernel"])[mask]) < 1e-4
        assert rel_err(grads[name]["cell"]["i"]["kernel"], ref[name]["cell"]["i"]["kernel"]) < 1e-4
    # Pruning: both directions' masks, row-balanced, nested; outputs are the dense layer's with
    # the pruned params.
    pruned, new_sparsity = pruning.update_sparsity(params, sparsity, 0.75)
    for name in ("forward_rnn", "backward_rnn"):
        mask = np.asarray(new_sparsity[name]["cell"]["h"]["kernel"].mask)
        assert np.all(mask.sum(axis=0) == H - round(0.75 * H))
        assert not np.any(mask & ~np.asarray(sparsity[name]["cell"]["h"]["kernel"].mask))
        assert np.all(np.asarray(pruned[name]["cell"]["h"]["kernel"])[~mask] == 0)
    trained = {"params": pruned, "sparsity": new_sparsity}
    out = jax.jit(model.apply)(trained, x, seq_lengths=LENGTHS)
    ref = dense.apply({"params": pruned}, x, seq_lengths=LENGTHS)
    inside = valid(LENGTHS)
    assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < 1e-5
    masks = pruning.param_masks(pruned, new_sparsity)
    assert masks["backward_rnn"]["cell"]["h"]["kernel"].shape == (H, H)
    # The inference form: packed weights in the collection, no dense recurrent kernels.
    inference = pruning.to_inference(trained)
    for name in ("forward_rnn", "backward_rnn"):
        assert "h" not in inference["params"][name]["cell"]
        assert isinstance(inference["sparsity"][name]["cell"]["h"]["kernel"], js.SparseWeights)
    served = jax.jit(model.apply)(inference, x, seq_lengths=LENGTHS)
    assert rel_err(served, out) < 1e-6


def test_linen_bad_arguments():
    x = normal(34, (B, T, F))
    variables = SparseBidirectional(H).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"initial_carry must be a pair"):
        SparseBidirectional(H).apply(variables, x, initial_carry=jnp.zeros((B, H)))
    with pytest.raises(ValueError, match=r"initial_carry\[1\] must be \[\*batch, H\]"):
        SparseBidirectional(H).apply(variables, x, initial_carry=(jnp.zeros((B, H)),
                                                                  jnp.zeros((B, H + 1))))
    with pytest.raises(ValueError, match="seq_lengths"):
        SparseBidirectional(H).apply(variables, x, seq_lengths=np.ones(B + 1, np.int32))
    with pytest.raises(ValueError, match="method"):
        SparseBidirectional(H, method="fused").init(jax.random.key(0), x)


# ---- NNX -------------------------------------------------------------------------------------

def nnx_dense(seed):
    rngs = nnx.Rngs(seed)
    return nnx.Bidirectional(nnx.RNN(nnx.SimpleCell(F, H, rngs=rngs)),
                             nnx.RNN(nnx.SimpleCell(F, H, rngs=rngs)))


def test_nnx_params_match_nnx_bidirectional_and_its_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    layer = jnnx.SparseBidirectional(F, H, rngs=nnx.Rngs(40))
    dense = nnx_dense(40)
    ours, theirs = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (layer, dense))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same rngs, same values
    # A trained nnx.Bidirectional checkpoint restores into the layer.
    rng = np.random.default_rng(41)
    for rnn in (dense.forward_rnn, dense.backward_rnn):
        rnn.cell.dense_h.kernel[...] = jnp.asarray(rng.standard_normal((H, H)).astype(np.float32)
                                                   * 0.9 / H ** 0.5)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "birnn", nnx.state(dense, nnx.Param))
    checkpointer.wait_until_finished()
    nnx.update(layer, checkpointer.restore(tmp_path / "birnn", nnx.state(layer, nnx.Param)))
    x = normal(42, (B, T, F))
    carry, out = layer(x, seq_lengths=LENGTHS, return_carry=True)
    ref_carry, ref = dense(x, seq_lengths=LENGTHS, return_carry=True)
    inside = valid(LENGTHS)
    assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < TOLERANCE["float32"]
    for a, b in zip(carry, ref_carry):
        assert rel_err(a, b) < TOLERANCE["float32"]
    tm_out = layer(jnp.swapaxes(x, 0, 1), time_major=True, seq_lengths=LENGTHS)
    np.testing.assert_array_equal(np.asarray(jnp.swapaxes(tm_out, 0, 1)), np.asarray(out))


def test_nnx_pruning_training_and_inference():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.rnn = jnnx.SparseBidirectional(F, H, rngs=rngs)
            self.head = nnx.Linear(2 * H, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.rnn(x, seq_lengths=LENGTHS))

    model = Model(nnx.Rngs(43))
    x, target = normal(44, (B, T, F)), normal(45, (B, T, 2))

    def check(step, sparsity):
        for rnn in (model.rnn.forward_rnn, model.rnn.backward_rnn):
            assert rnn.mask.mean() == pytest.approx(1 - sparsity, abs=0.05)
            assert np.all(np.asarray(rnn.cell.dense_h.kernel[...])[~rnn.mask] == 0)

    traces = train_while_pruning(model, x, target, (0.5, 0.5, 0.8, 0.8), check)
    assert traces == 1, "a new mask must not retrace the step"
    # The pruned layer is nnx.Bidirectional of its parameters.
    dense = nnx_dense(0)
    nnx.update(dense, nnx.state(model.rnn, nnx.Param))
    inside = valid(LENGTHS)
    out, ref = model.rnn(x, seq_lengths=LENGTHS), dense(x, seq_lengths=LENGTHS)
    assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < 1e-5
    inference = jnnx.to_inference(model)
    assert isinstance(inference.rnn.backward_rnn.sparsity.get_value(), js.SparseWeights)
    assert rel_err(nnx.jit(lambda m: m(x))(inference), model(x)) < 1e-6


def test_nnx_bad_arguments():
    with pytest.raises(TypeError, match="reverse"):
        jnnx.SparseBidirectional(F, H, reverse=True, rngs=nnx.Rngs(0))
    layer = jnnx.SparseBidirectional(F, H, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="inputs"):
        layer(normal(0, (B, T, F + 1)))
    with pytest.raises(ValueError, match=r"initial_carry\[0\]"):
        layer(normal(0, (B, T, F)), initial_carry=(jnp.zeros((B + 1, H)), jnp.zeros((B, H))))
