"""The gated Flax modules: SparseLSTMCell / SparseGRUCell and the fused SparseLSTM / SparseGRU
(linen and NNX) against Flax's own nn.RNN(nn.LSTMCell) / nn.RNN(nn.GRUCell) and a float64 NumPy
LSTM and GRU: the same parameter trees and init values, checkpoints, call keywords, apply without
a mask, gradients, pruning of the gate kernels with the existing schedules, the inference form."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _modules, pruning
from jax_sprnn.testing import TOLERANCE, normal, rel_err

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
from jax_sprnn import nnx as jnnx  # noqa: E402 (after the importorskip of flax)
from jax_sprnn.flax import SparseGRU, SparseGRUCell, SparseLSTM, SparseLSTMCell  # noqa: E402
from nnx_training import train_while_pruning  # noqa: E402 (tests/, on the path under pytest)

H, F, B, T = 11, 5, 3, 7
LENGTHS = np.array([T, 4, 1], np.int32)

pytestmark = pytest.mark.usefixtures("exact_matmuls")

# name: (fused layer, cell, Flax's cell, the joined path of the recurrent kernels' mask)
LINEN = {
    "lstm": (SparseLSTM, SparseLSTMCell, nn.LSTMCell, "hi+hf+hg+ho"),
    "gru": (SparseGRU, SparseGRUCell, nn.GRUCell, "hr+hz+hn"),
}
RECURRENT = {"lstm": ("hi", "hf", "hg", "ho"), "gru": ("hr", "hz", "hn")}
GATES = {"lstm": 4, "gru": 3}


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_rnn(kind, params, x, carry, lengths, reverse=False):
    """A float64 NumPy LSTM / GRU with Flax linen's parameters and math, and sparse_rnn's
    conventions: past an example's length its outputs are zero and its carry is held."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["cell"])
    x = np.asarray(x, np.float64)
    y = np.zeros(x.shape[:2] + (H,))
    parts = [np.array(c, np.float64) for c in (carry if kind == "lstm" else (carry,))]
    for b in range(x.shape[0]):
        steps = range(lengths[b] - 1, -1, -1) if reverse else range(lengths[b])
        for t in steps:
            xt = x[b, t]
            if kind == "lstm":
                c, h = parts[0][b], parts[1][b]
                z = {g: xt @ p["i" + g]["kernel"] + h @ p["h" + g]["kernel"] + p["h" + g]["bias"]
                     for g in "ifgo"}
                c = sigmoid(z["f"]) * c + sigmoid(z["i"]) * np.tanh(z["g"])
                h = sigmoid(z["o"]) * np.tanh(c)
                parts[0][b], parts[1][b] = c, h
            else:
                h = parts[0][b]
                gate = {g: xt @ p["i" + g]["kernel"] + p["i" + g]["bias"] for g in "rzn"}
                r = sigmoid(gate["r"] + h @ p["hr"]["kernel"])
                z = sigmoid(gate["z"] + h @ p["hz"]["kernel"])
                n = np.tanh(gate["n"] + r * (h @ p["hn"]["kernel"] + p["hn"]["bias"]))
                h = (1 - z) * n + z * h
                parts[0][b] = h
            y[b, t] = h
    return y, (tuple(parts) if kind == "lstm" else parts[0])


def trained(kind, seed, x, max_density=1.0, sparsity=None):
    """Random params of nn.RNN(Flax's cell) (recurrent kernels masked by the layer's mask when
    ``sparsity`` is given, as training with the pruning tools keeps them), and the layer's
    variables."""
    layer, _, flax_cell, joined = LINEN[kind]
    params = nn.RNN(flax_cell(H)).init(jax.random.key(seed), x)["params"]
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)
                                                * (0.6 / np.sqrt(a.shape[0]) if a.ndim == 2 else 0.3)),
                          params)
    if sparsity is not None:
        mask = np.asarray(sparsity["cell"][joined]["kernel"].mask)
        for g, name in enumerate(RECURRENT[kind]):
            block = mask[:, g * H:(g + 1) * H]
            params["cell"][name]["kernel"] = jnp.where(block, params["cell"][name]["kernel"], 0.0)
    return params


def valid(lengths):
    return (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]


def random_carry(kind, seed, batch=(B,)):
    if kind == "lstm":
        return normal(seed, batch + (H,)) * 0.5, normal(seed + 1, batch + (H,)) * 0.5
    return normal(seed, batch + (H,)) * 0.5


def assert_carry_close(got, want, tol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) < tol


# ---- linen: parameters and init ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_params_are_flax_cells_and_init_matches(kind):
    layer, cell, flax_cell, joined = LINEN[kind]
    x = normal(1, (B, T, F))
    key = jax.random.key(2)
    dense = nn.RNN(flax_cell(H)).init(key, x)
    ours = layer(H).init(key, x)
    scanned = nn.RNN(cell(H)).init(key, x)
    assert set(ours) == {"params", "sparsity"} and set(scanned) == {"params"}
    for tree in (ours["params"], scanned["params"]):
        assert jax.tree.structure(tree) == jax.tree.structure(dense["params"])
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(dense["params"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same key, same values
    packed = ours["sparsity"]["cell"][joined]["kernel"]
    assert isinstance(packed, pruning.PackedMask) and packed.shape == (H, GATES[kind] * H)
    assert jax.tree.structure(ours["sparsity"], is_leaf=lambda v: isinstance(v, pruning.PackedMask)) \
        == jax.tree.structure({"cell": {joined: {"kernel": 0}}})


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_initial_mask_is_shared_by_cell_and_layer(kind):
    layer, cell, _, joined = LINEN[kind]
    x = normal(3, (B, T, F))
    variables = layer(H, max_density=0.4, mask_seed=5).init(jax.random.key(4), x)
    mask = np.asarray(variables["sparsity"]["cell"][joined]["kernel"].mask)
    np.testing.assert_array_equal(mask, pruning.initial_mask(H, 0.4, 5, GATES[kind]))
    cell_params = nn.RNN(cell(H, max_density=0.4, mask_seed=5)).init(jax.random.key(4), x)["params"]
    for params in (variables["params"], cell_params):
        kernel = np.concatenate([np.asarray(params["cell"][n]["kernel"]) for n in RECURRENT[kind]], 1)
        np.testing.assert_array_equal(kernel != 0, mask)
    # Both run the same recurrence on those params.
    out = layer(H, max_density=0.4, mask_seed=5).apply(variables, x)
    ref = nn.RNN(cell(H, max_density=0.4, mask_seed=5)).apply({"params": variables["params"]}, x)
    assert rel_err(out, ref) < TOLERANCE["float32"]


# ---- linen: outputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse,keep_order,time_major", [
    (False, False, False), (True, False, False), (True, True, True), (False, False, True)])
def test_matches_nn_rnn_of_flax_cell_and_numpy(kind, reverse, keep_order, time_major):
    layer, cell, flax_cell, _ = LINEN[kind]
    x = normal(6, (B, T, F))
    params = trained(kind, 7, x)
    sparsity = layer(H).init(jax.random.key(0), x)["sparsity"]
    carry0 = random_carry(kind, 8)
    xs = jnp.swapaxes(x, 0, 1) if time_major else x
    call = dict(initial_carry=carry0, seq_lengths=LENGTHS, return_carry=True,
                time_major=time_major, reverse=reverse, keep_order=keep_order)
    carry, out = layer(H).apply({"params": params, "sparsity": sparsity}, xs, **call)
    ref_carry, ref = nn.RNN(flax_cell(H)).apply({"params": params}, xs, **call)
    step_carry, stepped = nn.RNN(cell(H)).apply({"params": params}, xs, **call)
    if time_major:
        out, ref, stepped = (jnp.swapaxes(a, 0, 1) for a in (out, ref, stepped))
    inside = valid(LENGTHS)
    # nn.RNN's values past an example's length depend on the padding; ours are zero.
    assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < TOLERANCE["float32"]
    assert np.all(np.asarray(out)[~np.broadcast_to(inside, out.shape)] == 0)
    assert rel_err(stepped, ref) < TOLERANCE["float32"]
    assert_carry_close(carry, ref_carry, TOLERANCE["float32"])
    assert_carry_close(step_carry, ref_carry, TOLERANCE["float32"])
    # The float64 truth (outputs at their positions).
    want, want_carry = numpy_rnn(kind, params, x, carry0, LENGTHS, reverse)
    at_positions = out if keep_order or not reverse else \
        _modules.flip_padded(out, jnp.asarray(LENGTHS), time_major=False)
    assert rel_err(at_positions, want) < TOLERANCE["float32"]
    assert_carry_close(carry, want_carry, TOLERANCE["float32"])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_batch_dims_jit_vmap_and_default_carry(kind):
    layer, _, flax_cell, _ = LINEN[kind]
    x = normal(9, (2, B, T, F))
    params = trained(kind, 10, x)
    variables = {"params": params, "sparsity": layer(H).init(jax.random.key(0), x)["sparsity"]}
    model = layer(H, carry_init=nn.initializers.normal(0.4))
    out = jax.jit(model.apply)(variables, x, init_key=jax.random.key(11))
    ref = nn.RNN(flax_cell(H, carry_init=nn.initializers.normal(0.4))).apply(
        {"params": params}, x, init_key=jax.random.key(11))
    assert out.shape == (2, B, T, H)
    assert rel_err(out, ref) < TOLERANCE["float32"]
    batched = jax.vmap(model.apply, in_axes=(None, 0))(variables, x)
    looped = jnp.stack([model.apply(variables, xi) for xi in x])
    assert rel_err(batched, looped) < 1e-6


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bfloat16_recurrence(kind):
    layer = LINEN[kind][0]
    x = normal(12, (B, T, F))
    model = layer(H, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(13), x)
    assert variables["sparsity"]["cell"][LINEN[kind][3]]["kernel"].dtype == "bfloat16"
    variables = {**variables, "params": trained(kind, 14, x)}
    carry, out = model.apply(variables, x, return_carry=True)
    # Flax's dtypes: a bfloat16 cell on the float32 carry its initialize_carry makes gives float32.
    flax_carry, flax_out = nn.RNN(LINEN[kind][2](H, dtype=jnp.bfloat16), return_carry=True).apply(
        {"params": variables["params"]}, x)
    assert out.dtype == flax_out.dtype == jnp.float32
    assert [c.dtype for c in carry] == [c.dtype for c in flax_carry]
    assert rel_err(out, layer(H).apply(variables, x)) < 5 * TOLERANCE["bfloat16"]
    # So the carry streams: chunk by chunk in lax.scan, the carry keeps its dtype.
    chunk = lambda c, xc: model.apply(variables, xc, initial_carry=c, return_carry=True)  # noqa: E731
    init_carry = model.initialize_carry(jax.random.key(0), (B, F))
    streamed_carry, _ = jax.lax.scan(chunk, init_carry, jnp.stack([x, x]))
    assert_carry_close(streamed_carry, model.apply(variables, jnp.concatenate([x, x], 1),
                                                   return_carry=True)[0], 5 * TOLERANCE["bfloat16"])


# ---- linen: checkpoints and no mask ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_flax_checkpoint_restores_into_cell_and_layer(kind, tmp_path, monkeypatch):
    ocp = pytest.importorskip("orbax.checkpoint")
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    layer, cell, flax_cell, _ = LINEN[kind]
    x = normal(15, (B, T, F))
    params = trained(kind, 16, x)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "rnn", params)
    checkpointer.wait_until_finished()
    ref = nn.RNN(flax_cell(H)).apply({"params": params}, x)
    # nn.RNN(SparseGRUCell(H)) loads nn.RNN(nn.GRUCell(H))'s checkpoint unchanged.
    target = jax.eval_shape(lambda: nn.RNN(cell(H)).init(jax.random.key(0), x))["params"]
    restored = checkpointer.restore(tmp_path / "rnn", target)
    assert rel_err(nn.RNN(cell(H)).apply({"params": restored}, x), ref) < TOLERANCE["float32"]
    # So does the fused layer: dense, with one warning that names it.
    model = layer(H)
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    restored = checkpointer.restore(tmp_path / "rnn", target)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.apply({"params": restored}, x)
        jitted = jax.jit(model.apply)({"params": restored}, x)
    no_mask = [w for w in caught if "no mask" in str(w.message)]
    assert len(no_mask) == 1 and layer.__name__ in str(no_mask[0].message)
    assert "runs dense" in str(no_mask[0].message)
    assert no_mask[0].filename == __file__  # the user's line, not one inside jax_sprnn or Flax
    assert rel_err(out, ref) < TOLERANCE["float32"] and rel_err(jitted, ref) < TOLERANCE["float32"]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_params_alone_run_dense_even_where_apply_may_write_the_mask(kind, monkeypatch):
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    layer, _, flax_cell, _ = LINEN[kind]
    x = normal(18, (B, T, F))
    params = trained(kind, 19, x)  # dense: off the layer's initial mask too
    ref = nn.RNN(flax_cell(H)).apply({"params": params}, x)
    with pytest.warns(UserWarning, match="runs dense"):
        out, state = layer(H, max_density=0.5).apply({"params": params}, x, mutable=True)
    assert rel_err(out, ref) < TOLERANCE["float32"] and "sparsity" not in state


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_training_form_checkpoint_round_trip(kind, tmp_path):
    """The sparsity collection, with its joined key, saves and restores with a target."""
    ocp = pytest.importorskip("orbax.checkpoint")
    layer = LINEN[kind][0]
    x = normal(17, (B, T, F))
    model = layer(H, max_density=0.5)
    variables = model.init(jax.random.key(18), x)
    params, sparsity = pruning.update_sparsity(trained(kind, 19, x, sparsity=variables["sparsity"]),
                                               variables["sparsity"], 0.7)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "train", {"params": params, "sparsity": sparsity})
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    restored = checkpointer.restore(tmp_path / "train", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure({"params": params, "sparsity": sparsity})
    np.testing.assert_array_equal(np.asarray(model.apply(restored, x)),
                                  np.asarray(model.apply({"params": params, "sparsity": sparsity}, x)))


# ---- linen: gradients, pruning, inference ------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_grads_match_flax_and_vanish_off_the_mask(kind):
    layer, _, flax_cell, joined = LINEN[kind]
    x = normal(20, (B, T, F))
    model = layer(H, max_density=0.5)
    sparsity = model.init(jax.random.key(21), x)["sparsity"]
    params = trained(kind, 22, x, sparsity=sparsity)
    target = normal(23, (B, T, H))

    def loss(p, apply):
        return jnp.mean((apply(p) - target) ** 2)

    grads = jax.grad(loss)(params, lambda p: model.apply({"params": p, "sparsity": sparsity}, x))
    ref = jax.grad(loss)(params, lambda p: nn.RNN(flax_cell(H)).apply({"params": p}, x))
    mask = np.asarray(sparsity["cell"][joined]["kernel"].mask)
    for g, name in enumerate(RECURRENT[kind]):
        block = mask[:, g * H:(g + 1) * H]
        got, want = np.asarray(grads["cell"][name]["kernel"]), np.asarray(ref["cell"][name]["kernel"])
        assert np.all(got[~block] == 0), "the gradient must be exactly zero off the mask"
        assert rel_err(got[block], want[block]) < 1e-4
    other = [(path, g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
             if path[1].key not in RECURRENT[kind] or path[2].key == "bias"]
    ref_flat = dict(jax.tree_util.tree_flatten_with_path(ref)[0])
    for path, g in other:  # input kernels and every bias (hn's inside the reset gate's product)
        assert rel_err(g, ref_flat[path]) < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradual_pruning_of_the_gate_kernels(kind):
    """cubic_schedule + update_sparsity + keep_pruned on the fused kernel: every gate row keeps
    the same count (row-balanced), masks are nested, pruned weights stay zero, the step compiles
    once, and the layer stays Flax's cell on the pruned params. to_inference then packs it."""
    optax = pytest.importorskip("optax")
    layer, _, flax_cell, joined = LINEN[kind]

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(layer(H, name="rnn")(x, seq_lengths=LENGTHS))

    model = Model()
    x, y = normal(24, (B, T, F)), normal(25, (B, T, 2))
    variables = model.init(jax.random.key(26), x)
    params, sparsity = variables["params"], variables["sparsity"]
    tx = pruning.keep_pruned(optax.adam(1e-2))
    opt_state = tx.init(params)
    traces = []

    @jax.jit
    def train_step(params, sparsity, opt_state):
        traces.append(1)
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p, "sparsity": sparsity}, x) - y) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params,
                                       masks=pruning.param_masks(params, sparsity))
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    schedule = pruning.cubic_schedule(0.0, 0.75, begin_step=1, end_step=7, frequency=2)
    previous = np.ones((H, GATES[kind] * H), bool)
    for step in range(9):
        if schedule.is_update_step(step):
            params, sparsity = pruning.update_sparsity(params, sparsity, schedule(step))
            mask = np.asarray(sparsity["rnn"]["cell"][joined]["kernel"].mask)
            counts = mask.sum(axis=0)  # every gate row of every unit
            assert np.all(counts == counts[0]), "row_balanced: one count per gate row"
            assert not np.any(mask & ~previous), "masks are nested"
            previous = mask
        params, opt_state, _ = train_step(params, sparsity, opt_state)
        kernel = np.concatenate([np.asarray(params["rnn"]["cell"][n]["kernel"])
                                 for n in RECURRENT[kind]], axis=1)
        assert np.all(kernel[~previous] == 0)
    assert len(traces) == 1, "a new mask must not retrace the step"
    assert previous.mean() == pytest.approx(round(0.25 * H) / H)
    # The layer is Flax's cell on the pruned params.
    rnn_vars = {"params": params["rnn"], "sparsity": sparsity["rnn"]}
    out = layer(H).apply(rnn_vars, x, seq_lengths=LENGTHS)
    ref = nn.RNN(flax_cell(H)).apply({"params": params["rnn"]}, x, seq_lengths=LENGTHS)
    inside = valid(LENGTHS)
    assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < 1e-5
    # The inference form: the packed kernel, no dense recurrent kernels (biases stay).
    inference = pruning.to_inference({"params": params, "sparsity": sparsity})
    cell_params = inference["params"]["rnn"]["cell"]
    for name in RECURRENT[kind]:
        assert "kernel" not in cell_params.get(name, {})
    if kind == "lstm":
        assert all(cell_params[n]["bias"].shape == (H,) for n in RECURRENT[kind])
    else:
        assert set(cell_params) == {"ir", "iz", "in", "hn"} and set(cell_params["hn"]) == {"bias"}
    packed = inference["sparsity"]["rnn"]["cell"][joined]["kernel"]
    assert isinstance(packed, js.SparseWeights) and packed.shape == (H, GATES[kind] * H)
    np.testing.assert_array_equal(packed.mask(), previous)
    served = jax.jit(model.apply)(inference, x)
    assert rel_err(served, model.apply({"params": params, "sparsity": sparsity}, x)) < 1e-6


def test_bad_arguments_name_the_argument():
    x = normal(27, (B, T, F))
    variables = SparseLSTM(H).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"initial_carry must be a tuple \(c, h\)"):
        SparseLSTM(H).apply(variables, x, initial_carry=jnp.zeros((B, H)))
    with pytest.raises(ValueError, match=r"initial_carry\[1\] \(h\) must be \[\*batch, H\]"):
        SparseLSTM(H).apply(variables, x, initial_carry=(jnp.zeros((B, H)), jnp.zeros((B, H + 1))))
    gru = SparseGRU(H).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"initial_carry must be \[\*batch, H\]"):
        SparseGRU(H).apply(gru, x, initial_carry=(jnp.zeros((B, H)),))
    with pytest.raises(ValueError, match="max_density"):
        SparseGRU(H, max_density=0.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="max_density"):
        nn.RNN(SparseLSTMCell(H, max_density=1.5)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="method"):
        SparseLSTM(H, method="cudnn").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"carry must be a tuple \(c, h\)"):
        SparseLSTMCell(H).init(jax.random.key(0), jnp.zeros((B, H)), x[:, 0])
    with pytest.raises(ValueError, match="carry must be"):
        SparseGRUCell(H).init(jax.random.key(0), jnp.zeros((B, H + 1)), x[:, 0])
    with pytest.raises(ValueError, match="seq_lengths"):
        SparseGRU(H).apply(gru, x, seq_lengths=np.ones(B + 1, np.int32))


# ---- NNX ----------------------------------------------------------------------------------------

NNX = {"lstm": (jnnx.SparseLSTM, jnnx.SparseLSTMCell, nnx.LSTMCell),
       "gru": (jnnx.SparseGRU, jnnx.SparseGRUCell, nnx.GRUCell)}


def nnx_recurrent(kind, module):
    cell = module.cell
    return [cell.hi, cell.hf, cell.hg, cell.ho] if kind == "lstm" else [cell.dense_h]


def randomize(module, seed):
    """Random weights in a layer (or an nnx.RNN), so tests do not rest on the init."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    fresh = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32)
                                               * (0.6 / np.sqrt(a.shape[0]) if a.ndim == 2 else 0.3)),
                         nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, fresh)
    nnx.update(module, state)


def nnx_twin(kind, layer):
    """nnx.RNN(Flax's nnx cell) holding the layer's parameters."""
    rnn = nnx.RNN(NNX[kind][2](F, H, rngs=nnx.Rngs(0)))
    nnx.update(rnn, nnx.state(layer, nnx.Param))
    return rnn


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nnx_state_matches_flax_and_outputs(kind):
    layer_cls, cell_cls, flax_cell = NNX[kind]
    layer = layer_cls(F, H, rngs=nnx.Rngs(30))
    dense = nnx.RNN(flax_cell(F, H, rngs=nnx.Rngs(30)))
    scanned = nnx.RNN(cell_cls(F, H, rngs=nnx.Rngs(30)))
    want = nnx.to_pure_dict(nnx.state(dense, nnx.Param))
    for module in (layer, scanned):
        got = nnx.to_pure_dict(nnx.state(module, nnx.Param))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same rngs, same values
    randomize(layer, 31)
    x = normal(32, (B, T, F))
    carry0 = random_carry(kind, 33)
    rnn = nnx_twin(kind, layer)
    for reverse, keep_order in ((False, False), (True, False), (True, True)):
        call = dict(initial_carry=carry0, seq_lengths=LENGTHS, return_carry=True, reverse=reverse,
                    keep_order=keep_order)
        carry, out = layer(x, **call)
        ref_carry, ref = rnn(x, **call)
        inside = valid(LENGTHS)
        assert rel_err(np.where(inside, out, 0), np.where(inside, ref, 0)) < TOLERANCE["float32"]
        assert_carry_close(carry, ref_carry, TOLERANCE["float32"])
    nnx.update(scanned, nnx.state(layer, nnx.Param))
    assert rel_err(scanned(x, initial_carry=carry0), rnn(x, initial_carry=carry0)) < 1e-5
    assert rel_err(layer(jnp.swapaxes(x, 0, 1), time_major=True),
                   jnp.swapaxes(rnn(x), 0, 1)) < TOLERANCE["float32"]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nnx_bfloat16_results_have_flax_dtypes(kind):
    layer_cls, _, flax_cell = NNX[kind]
    layer = layer_cls(F, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(34))
    rnn = nnx.RNN(flax_cell(F, H, dtype=jnp.bfloat16, rngs=nnx.Rngs(34)), return_carry=True)
    x = normal(35, (B, T, F))
    carry, out = layer(x, return_carry=True)
    ref_carry, ref = rnn(x)
    assert out.dtype == ref.dtype == jnp.float32
    assert [c.dtype for c in jax.tree.leaves(carry)] == [c.dtype for c in jax.tree.leaves(ref_carry)]
    assert rel_err(out, ref) < 5 * TOLERANCE["bfloat16"]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nnx_without_a_mask_runs_dense_until_pruned(kind, monkeypatch):
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    layer = NNX[kind][0](F, H, max_density=0.5, rngs=nnx.Rngs(34))
    layer.sparsity.set_value(None)
    randomize(layer, 35)  # dense: off the initial mask too
    x = normal(36, (B, T, F))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(x)
        jitted = nnx.jit(lambda m: m(x))(layer)
    no_mask = [str(w.message) for w in caught if "no mask" in str(w.message)]
    assert len(no_mask) == 1 and type(layer).__name__ in no_mask[0]
    ref = nnx_twin(kind, layer)(x)
    assert rel_err(out, ref) < TOLERANCE["float32"] and rel_err(jitted, ref) < TOLERANCE["float32"]
    jnnx.prune(layer, 0.75)
    assert isinstance(layer.sparsity.get_value(), pruning.PackedMask)
    assert layer.mask.shape == (H, GATES[kind] * H)
    assert np.all(layer.mask.sum(axis=0) == round(0.25 * H))  # every gate row
    kernel = np.concatenate([np.asarray(lin.kernel[...]) for lin in nnx_recurrent(kind, layer)], 1)
    assert np.all(kernel[~layer.mask] == 0)
    assert rel_err(layer(x), nnx_twin(kind, layer)(x)) < TOLERANCE["float32"]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nnx_training_pruning_and_inference(kind):
    layer_cls = NNX[kind][0]

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.rnn = layer_cls(F, H, rngs=rngs)
            self.head = nnx.Linear(H, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.rnn(x, seq_lengths=LENGTHS))

    model = Model(nnx.Rngs(37))
    x, target = normal(38, (B, T, F)), normal(39, (B, T, 2))

    def check(step, sparsity):
        kernel = np.concatenate([np.asarray(lin.kernel[...])
                                 for lin in nnx_recurrent(kind, model.rnn)], 1)
        assert np.all(kernel[~model.rnn.mask] == 0)

    traces = train_while_pruning(model, x, target, (0.5, 0.5, 0.8, 0.8), check)
    assert traces == 1, "a new mask must not retrace the step"
    assert model.rnn.mask.mean() == pytest.approx(round(0.2 * H) / H)
    inference = jnnx.to_inference(model)
    assert isinstance(inference.rnn.sparsity.get_value(), js.SparseWeights)
    if kind == "lstm":
        assert not hasattr(inference.rnn.cell.hi, "kernel") and inference.rnn.cell.hi.bias.shape == (H,)
    else:
        assert not hasattr(inference.rnn.cell, "dense_h")
    assert rel_err(nnx.jit(lambda m: m(x))(inference), model(x)) < 1e-6


def test_nnx_bad_arguments():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="hidden_features"):
        jnnx.SparseLSTM(F, 0, rngs=rngs)
    with pytest.raises(ValueError, match="max_density"):
        jnnx.SparseGRUCell(F, H, max_density=0.0, rngs=rngs)
    with pytest.raises(ValueError, match="method"):
        jnnx.SparseGRU(F, H, method="dense", rngs=rngs)
    layer = jnnx.SparseLSTM(F, H, rngs=rngs)
    with pytest.raises(ValueError, match="inputs"):
        layer(normal(0, (B, T, F + 1)))
    with pytest.raises(ValueError, match=r"initial_carry must be a tuple \(c, h\)"):
        layer(normal(0, (B, T, F)), initial_carry=jnp.zeros((B, H)))
    with pytest.raises(ValueError, match=r"carry must be a tuple \(c, h\)"):
        layer.cell(jnp.zeros((B, H)), normal(0, (B, F)))
