"""The linen modules: SparseRNN against nn.RNN(SparseRNNCell) and nn.SimpleCell, nn.RNN's
checkpoints (the same parameter tree, restored by orbax), apply without a mask, nn.RNN's call
keywords, Bidirectional, jit / vmap / grad, nn.scan over layers, decoding, the inference form."""

import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _modules, pruning
from jax_sprnn.flax import SparseRNN, SparseRNNCell

from jax_sprnn.testing import TOLERANCE, normal, rel_err

H, F, B, T = 24, 5, 3, 7


pytestmark = pytest.mark.usefixtures("exact_matmuls")


def random_inputs(seed, shape=(B, T, F)):
    return normal(seed, shape)


def init(model, seed, x):
    return model.init(jax.random.key(seed), x)


def cell_rnn(params, x, max_density=1.0, activation_fn="tanh", **call):
    """The same layer scanned by nn.RNN over the per-step cell (the same params tree)."""
    rnn = nn.RNN(SparseRNNCell(H, max_density=max_density, activation_fn=activation_fn))
    return rnn.apply({"params": params}, x, **call)


def randomize_kernel(variables, seed):
    """Give h/kernel fresh random values on its mask (so tests do not run on the orthogonal
    init alone) and zero off it, as training with the pruning tools keeps it."""
    mask = np.asarray(variables["sparsity"]["cell"]["h"]["kernel"].mask)
    kernel = np.random.default_rng(seed).standard_normal((H, H)).astype(np.float32)
    kernel *= 0.9 / np.sqrt(max(1.0, mask.mean() * H))
    params = jax.tree.map(lambda x: x, variables["params"])
    params["cell"]["h"]["kernel"] = jnp.asarray(np.where(mask, kernel, 0.0))
    return {**variables, "params": params}


@pytest.mark.parametrize("activation", ["tanh", "relu", "identity"])
@pytest.mark.parametrize("max_density", [1.0, 0.25])
def test_matches_nn_rnn_of_the_cell(activation, max_density):
    x = random_inputs(10)
    model = SparseRNN(H, max_density=max_density, activation_fn=activation)
    variables = randomize_kernel(init(model, 11, x), 12)
    out = model.apply(variables, x)
    ref = cell_rnn(variables["params"], x, max_density, activation)
    assert out.shape == (B, T, H)
    assert rel_err(out, ref) < TOLERANCE["float32"]


def test_init_masks_the_kernel_and_matches_the_cell_init():
    x = random_inputs(13)
    variables = init(SparseRNN(H, max_density=0.25, mask_seed=3), 14, x)
    packed = variables["sparsity"]["cell"]["h"]["kernel"]
    mask = np.asarray(packed.mask)
    np.testing.assert_array_equal(mask, pruning.initial_mask(H, 0.25, 3))
    kernel = np.asarray(variables["params"]["cell"]["h"]["kernel"])
    assert np.all(kernel[~mask] == 0) and np.all(kernel[mask] != 0)
    # The cell starts from the same mask.
    cell_params = nn.RNN(SparseRNNCell(H, max_density=0.25, mask_seed=3)).init(
        jax.random.key(14), x)["params"]["cell"]
    np.testing.assert_array_equal(np.asarray(cell_params["h"]["kernel"]) != 0, mask)
    # init under jit gives the same variables (up to the rounding of a compiled QR on a GPU).
    jitted = jax.jit(SparseRNN(H, max_density=0.25, mask_seed=3).init)(jax.random.key(14), x)
    assert jax.tree.structure(jitted) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(jitted)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def shapes_and_dtypes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)


@pytest.mark.parametrize("dtype,param_dtype", [(None, jnp.float32), (jnp.bfloat16, jnp.float32),
                                               (None, jnp.bfloat16)])
def test_params_are_nn_rnn_simple_cells(dtype, param_dtype):
    """Names, nesting, shapes and dtypes of nn.RNN(nn.SimpleCell) (and the cell's of
    nn.SimpleCell); at max_density 1 the same key even gives the same values."""
    if param_dtype == jnp.bfloat16 and jax.default_backend() != "cpu":
        pytest.skip("the bfloat16 orthogonal init (QR) traces only on the CPU backend")
    x = random_inputs(15)
    attrs = dict(dtype=dtype, param_dtype=param_dtype)
    # nn.RNN's scan needs a carry of the steps' output dtype (float32 inputs promote).
    carry = jnp.zeros((B, H), jnp.float32 if dtype is None else dtype)
    key = jax.random.key(16)
    dense_init = lambda: nn.RNN(nn.SimpleCell(H, **attrs)).init(key, x, initial_carry=carry)  # noqa: E731
    sparse_init = lambda: SparseRNN(H, **attrs).init(key, x)  # noqa: E731
    # Shapes alone (the CPU has no bfloat16 QR for the orthogonal init).
    dense, sparse = jax.eval_shape(dense_init), jax.eval_shape(sparse_init)
    assert set(sparse) == {"params", "sparsity"}
    assert jax.tree.structure(sparse["params"]) == jax.tree.structure(dense["params"])
    assert shapes_and_dtypes(sparse["params"]) == shapes_and_dtypes(dense["params"])
    # The mask sits at the kernel's own path.
    assert isinstance(sparse["sparsity"]["cell"]["h"]["kernel"], pruning.PackedMask)
    assert jax.tree.structure(sparse["sparsity"], is_leaf=lambda v: isinstance(v, pruning.PackedMask)) == \
        jax.tree.structure({"cell": {"h": {"kernel": 0}}})
    cell = jax.eval_shape(lambda: SparseRNNCell(H, **attrs).init(key, carry, x[:, 0]))
    simple = jax.eval_shape(lambda: nn.SimpleCell(H, **attrs).init(key, carry, x[:, 0]))
    assert shapes_and_dtypes(cell) == shapes_and_dtypes(simple)
    assert shapes_and_dtypes(cell["params"]) == shapes_and_dtypes(dense["params"]["cell"])
    if param_dtype == jnp.float32:
        for a, b in zip(jax.tree.leaves(dense_init()["params"]),
                        jax.tree.leaves(sparse_init()["params"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nn_rnn_checkpoint_restores_into_sparse_rnn(tmp_path, monkeypatch):
    """A trained nn.RNN(nn.SimpleCell) checkpoint, saved by orbax, restores into SparseRNN's
    params and gives nn.RNN's outputs: alone (dense, one warning) and with init's mask."""
    ocp = pytest.importorskip("orbax.checkpoint")
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    x = random_inputs(18)
    dense = nn.RNN(nn.SimpleCell(H))
    trained = dense.init(jax.random.key(19), x)
    # Weights unlike the init's (a random, not orthogonal, recurrent kernel).
    kernel = np.random.default_rng(20).standard_normal((H, H)).astype(np.float32) * 0.9 / H ** 0.5
    trained["params"]["cell"]["h"]["kernel"] = jnp.asarray(kernel)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "rnn", trained["params"])
    checkpointer.wait_until_finished()

    model = SparseRNN(H)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    params = checkpointer.restore(tmp_path / "rnn", abstract)
    assert jax.tree.structure(params) == jax.tree.structure(trained["params"])
    ref = dense.apply(trained, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.apply({"params": params}, x)
        jitted = jax.jit(model.apply)({"params": params}, x)
    no_mask = [w for w in caught if "no mask" in str(w.message)]
    assert len(no_mask) == 1, [str(w.message) for w in caught]
    assert "runs dense" in str(no_mask[0].message)
    assert "update_sparsity" in str(no_mask[0].message)  # and says how to add one
    assert rel_err(out, ref) < TOLERANCE["float32"]
    assert rel_err(jitted, ref) < TOLERANCE["float32"]
    # With init's mask (all ones at max_density 1) the same, and no warning.
    sparsity = model.init(jax.random.key(0), x)["sparsity"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        masked = model.apply({"params": params, "sparsity": sparsity}, x)
    assert rel_err(masked, ref) < TOLERANCE["float32"]
    # Restored without a target too (plain nested dicts of arrays).
    untargeted = checkpointer.restore(tmp_path / "rnn")
    assert rel_err(model.apply({"params": untargeted, "sparsity": sparsity}, x), ref) < \
        TOLERANCE["float32"]


def test_without_a_mask_the_layer_is_dense_until_pruned(monkeypatch):
    """params alone: dense even where max_density < 1 (the kernel counts in full, unlike init's
    mask); the mask arrives with update_sparsity on init's collection."""
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    x = random_inputs(81)
    model = SparseRNN(H, max_density=0.5)
    variables = init(model, 82, x)
    params = jax.tree.map(lambda a: a, variables["params"])
    full = np.random.default_rng(83).standard_normal((H, H)).astype(np.float32) * 0.9 / H ** 0.5
    params["cell"]["h"]["kernel"] = jnp.asarray(full)
    with pytest.warns(UserWarning, match="runs dense"):
        out = model.apply({"params": params}, x)
    dense = nn.RNN(nn.SimpleCell(H)).apply({"params": params}, x)
    assert rel_err(out, dense) < TOLERANCE["float32"]
    # Dense too where apply may write the collection: only init makes a mask.
    out, state = model.apply({"params": params}, x, mutable=True)
    assert rel_err(out, dense) < TOLERANCE["float32"] and "sparsity" not in state
    masked = model.apply({"params": params, "sparsity": variables["sparsity"]}, x)
    assert rel_err(masked, dense) > 1e-2  # init's mask would have pruned half the kernel
    pruned, sparsity = pruning.update_sparsity(params, variables["sparsity"], 0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = model.apply({"params": pruned, "sparsity": sparsity}, x)
    assert rel_err(out, cell_rnn(pruned, x, 0.5)) < TOLERANCE["float32"]


@pytest.mark.parametrize("reverse,keep_order,use_lengths,time_major", [
    (False, False, False, False), (False, False, True, True), (True, False, True, False),
    (True, False, False, True), (True, True, True, True), (True, True, False, False)])
def test_call_keywords_match_nn_rnn(reverse, keep_order, use_lengths, time_major):
    rng = np.random.default_rng(20)
    x = random_inputs(21)
    model = SparseRNN(H, max_density=0.5)
    variables = randomize_kernel(init(model, 22, x), 23)
    carry0 = jnp.asarray(rng.standard_normal((B, H)).astype(np.float32) * 0.5)
    lengths = jnp.asarray(rng.integers(1, T + 1, size=B)) if use_lengths else None
    xs = jnp.swapaxes(x, 0, 1) if time_major else x
    call = dict(initial_carry=carry0, seq_lengths=lengths, return_carry=True,
                time_major=time_major, reverse=reverse, keep_order=keep_order)
    carry, out = model.apply(variables, xs, **call)
    ref_carry, ref = cell_rnn(variables["params"], xs, 0.5, **call)
    if time_major:
        out, ref = jnp.swapaxes(out, 0, 1), jnp.swapaxes(ref, 0, 1)
    valid = np.ones((B, T), bool) if lengths is None else np.arange(T)[None] < np.asarray(lengths)[:, None]
    # nn.RNN's values past an example's length depend on the padding; ours are zero.
    assert rel_err(np.where(valid[..., None], out, 0), np.where(valid[..., None], ref, 0)) < 1e-5
    assert np.all(np.asarray(out)[~valid] == 0)
    assert rel_err(carry, ref_carry) < 1e-5


def test_attributes_set_call_defaults():
    x = random_inputs(24)
    variables = randomize_kernel(init(SparseRNN(H), 25, x), 26)
    by_attr = SparseRNN(H, reverse=True, keep_order=True, return_carry=True).apply(variables, x)
    by_call = SparseRNN(H).apply(variables, x, reverse=True, keep_order=True, return_carry=True)
    for a, b in zip(by_attr, by_call):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_several_batch_dims_and_no_batch():
    x = random_inputs(27, (2, 3, T, F))
    model = SparseRNN(H)
    variables = randomize_kernel(init(model, 28, x), 29)
    out = model.apply(variables, x)
    assert out.shape == (2, 3, T, H)
    flat = model.apply(variables, x.reshape(6, T, F))
    assert rel_err(np.asarray(out).reshape(6, T, H), flat) < 1e-6
    single = model.apply(variables, x[0, 0])  # [T, F]: no batch dimension at all
    assert single.shape == (T, H)
    assert rel_err(single, flat[0]) < 1e-6


def test_bidirectional():
    x = random_inputs(30)
    lengths = jnp.asarray([T, 4, 2])
    sparse = nn.Bidirectional(SparseRNN(H), SparseRNN(H))
    variables = sparse.init(jax.random.key(31), x)
    for name, seed in (("forward_rnn", 32), ("backward_rnn", 33)):
        layer = randomize_kernel({"params": variables["params"][name],
                                  "sparsity": variables["sparsity"][name]}, seed)
        variables["params"][name] = layer["params"]
    out = sparse.apply(variables, x, seq_lengths=lengths)
    cells = nn.Bidirectional(nn.RNN(SparseRNNCell(H)), nn.RNN(SparseRNNCell(H)))
    ref = cells.apply({"params": variables["params"]}, x, seq_lengths=lengths)
    valid = (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]
    assert out.shape == (B, T, 2 * H)
    assert rel_err(np.where(valid, out, 0), np.where(valid, ref, 0)) < 1e-5


def test_jit_vmap_and_grad():
    x = random_inputs(40)
    model = SparseRNN(H, max_density=0.25)
    variables = randomize_kernel(init(model, 41, x), 42)
    eager = model.apply(variables, x)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, x)), np.asarray(eager),
                               rtol=1e-6, atol=1e-7)
    xs = random_inputs(43, (4, B, T, F))
    batched = jax.vmap(model.apply, in_axes=(None, 0))(variables, xs)
    looped = jnp.stack([model.apply(variables, xi) for xi in xs])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-5, atol=1e-6)

    target = random_inputs(44, (B, T, H))
    def loss(params, apply):
        return jnp.mean((apply(params) - target) ** 2)
    grads = jax.grad(loss)(variables["params"], lambda p: model.apply({**variables, "params": p}, x))
    ref = jax.grad(loss)(variables["params"], lambda p: cell_rnn(p, x, 0.25))
    mask = np.asarray(variables["sparsity"]["cell"]["h"]["kernel"].mask)
    g = np.asarray(grads["cell"]["h"]["kernel"])
    assert np.all(g[~mask] == 0), "the gradient must be exactly zero off the mask"
    assert rel_err(g[mask], np.asarray(ref["cell"]["h"]["kernel"])[mask]) < 1e-4
    for name in ("kernel", "bias"):
        assert rel_err(grads["cell"]["i"][name], ref["cell"]["i"][name]) < 1e-4


def test_nn_scan_over_layers():
    layers = 3

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return SparseRNN(H, max_density=0.5)(h), None

    stack = nn.scan(Block, variable_axes={"params": 0, "sparsity": 0},
                    split_rngs={"params": True}, length=layers)()
    x = random_inputs(50, (B, T, H))
    variables = stack.init(jax.random.key(51), x, None)
    kernel = variables["params"]["SparseRNN_0"]["cell"]["h"]["kernel"]
    assert kernel.shape == (layers, H, H)
    single = SparseRNN(H, max_density=0.5)

    def layer_by_layer(variables):
        h = x
        for i in range(layers):
            layer = jax.tree.map(lambda v, i=i: v[i],
                                 {"params": variables["params"]["SparseRNN_0"],
                                  "sparsity": variables["sparsity"]["SparseRNN_0"]})
            h = single.apply(layer, h)
        return h

    apply = jax.jit(stack.apply)
    out, _ = apply(variables, x, None)
    assert rel_err(out, layer_by_layer(variables)) < 1e-5
    # Stacked masks prune layer by layer, keep one shared layout, and export stacked.
    params, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.75)
    masks = np.asarray(sparsity["SparseRNN_0"]["cell"]["h"]["kernel"].mask)
    assert masks.shape == (layers, H, H) and np.all(masks.sum(axis=1) == H // 4)
    pruned = {"params": params, "sparsity": sparsity}
    out, _ = apply(pruned, x, None)
    assert rel_err(out, layer_by_layer(pruned)) < 1e-5
    served, _ = jax.jit(stack.apply)(pruning.to_inference(pruned), x, None)
    assert rel_err(served, out) < 1e-6


def test_step_by_step_decoding_matches_the_sequence():
    x = random_inputs(60)
    model = SparseRNN(H, max_density=0.25)
    variables = randomize_kernel(init(model, 61, x), 62)
    carry, out = model.apply(variables, x, return_carry=True)
    cell = SparseRNNCell(H, max_density=0.25)
    step = jax.jit(lambda c, xt: cell.apply({"params": variables["params"]["cell"]}, c, xt))
    c = cell.initialize_carry(jax.random.key(0), (B, F))
    outs = []
    for t in range(T):
        c, y = step(c, x[:, t])
        outs.append(y)
    assert rel_err(jnp.stack(outs, 1), out) < 1e-5
    assert rel_err(c, carry) < 1e-5


def test_bfloat16_recurrence():
    x = random_inputs(63)
    model = SparseRNN(H, dtype=jnp.bfloat16)
    variables = randomize_kernel(init(model, 64, x), 65)
    assert variables["sparsity"]["cell"]["h"]["kernel"].dtype == "bfloat16"
    carry, out = model.apply(variables, x, return_carry=True)
    # The recurrence runs in bfloat16; its results come back in the carry's float32, so that the
    # carry fed back chunk by chunk (lax.scan) keeps its dtype.
    assert out.dtype == carry.dtype == jnp.float32
    chunk = lambda c, xc: model.apply(variables, xc, initial_carry=c, return_carry=True)  # noqa: E731
    _, outs = jax.lax.scan(chunk, jnp.zeros_like(carry), jnp.stack([x, x]))
    assert rel_err(outs[1], model.apply(variables, jnp.concatenate([x, x], 1))[:, x.shape[1]:]) < 1e-6
    assert model.apply(variables, x, initial_carry=carry.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    ref = SparseRNN(H).apply(variables, x)  # same params in float32
    assert rel_err(out, ref) < 5 * TOLERANCE["bfloat16"]


def test_inference_form_runs_the_packed_weights():
    x = random_inputs(70)
    model = SparseRNN(H, max_density=0.5)
    variables = randomize_kernel(init(model, 71, x), 72)
    params, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.8)
    trained = {"params": params, "sparsity": sparsity}
    inference = pruning.to_inference(trained)
    assert "h" not in inference["params"]["cell"]
    packed = inference["sparsity"]["cell"]["h"]["kernel"]
    assert isinstance(packed, js.SparseWeights)
    np.testing.assert_array_equal(packed.mask(), np.asarray(sparsity["cell"]["h"]["kernel"].mask))
    assert packed.meta.num_slots < sparsity["cell"]["h"]["kernel"].meta.num_slots  # tighter layout
    out = jax.jit(model.apply)(inference, x)
    assert rel_err(out, model.apply(trained, x)) < 1e-6
    # The packed weights run through the functional API too.
    proj = x @ params["cell"]["i"]["kernel"] + params["cell"]["i"]["bias"]
    y, _ = js.sparse_rnn(proj, jnp.zeros((B, H)), packed)
    assert rel_err(y, out) < 1e-5


@pytest.mark.filterwarnings("ignore:update_sparsity")
@pytest.mark.parametrize("layer", ["SparseRNN", "SparseGRU", "SparseLSTM", "SparseBidirectionalGRU"])
def test_msgpack_round_trip_of_the_training_and_inference_forms(layer):
    """flax.serialization (msgpack) saves the masks and the packed weights: restored into
    init's target, a pruned model gives its outputs again; the inference form also restores
    without a target through pruning.from_restored, and a target of another layout is refused."""
    import jax_sprnn.flax as jf
    x = random_inputs(90)
    model = getattr(jf, layer)(H, max_density=0.5)
    variables = init(model, 91, x)
    _, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.8)
    params = variables["params"]  # nonzero off the new mask too: only the mask prunes them
    trained = {"params": params, "sparsity": sparsity}
    want = model.apply(trained, x)
    target = init(model, 92, x)
    # the target's mask is init's (density 0.5), not the trained one (0.2): restoring must replace it
    assert rel_err(model.apply({"params": params, "sparsity": target["sparsity"]}, x), want) > 1e-3
    restored = flax.serialization.from_bytes(target, flax.serialization.to_bytes(trained))
    np.testing.assert_array_equal(model.apply(restored, x), want)
    inference = pruning.to_inference(trained)
    data = flax.serialization.to_bytes(inference)
    np.testing.assert_array_equal(model.apply(flax.serialization.from_bytes(inference, data), x),
                                  want)
    raw = pruning.from_restored(flax.serialization.msgpack_restore(data))
    np.testing.assert_array_equal(model.apply(raw, x), want)
    other = getattr(jf, layer)(H + 8, max_density=0.5)
    with pytest.raises(ValueError, match="target's layout"):
        flax.serialization.from_bytes(init(other, 93, random_inputs(94)),
                                      flax.serialization.to_bytes(trained))


def test_bad_arguments_name_the_argument():
    x = random_inputs(80)
    with pytest.raises(ValueError, match="features"):
        init(SparseRNN(0), 0, x)
    with pytest.raises(ValueError, match="max_density"):
        init(SparseRNN(H, max_density=0.0), 0, x)
    with pytest.raises(ValueError, match="activation_fn"):
        init(SparseRNN(H, activation_fn=jax.nn.sigmoid), 0, x)
    with pytest.raises(ValueError, match="activation_fn"):
        nn.RNN(SparseRNNCell(H, activation_fn="gelu")).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="dtype"):
        init(SparseRNN(H, dtype=jnp.int32), 0, x)
    with pytest.raises(ValueError, match="method"):
        init(SparseRNN(H, method="fast"), 0, x)
    with pytest.raises(ValueError, match="inputs"):
        init(SparseRNN(H), 0, x[0, 0, :])
    variables = init(SparseRNN(H), 0, x)
    with pytest.raises(ValueError, match="initial_carry"):
        SparseRNN(H).apply(variables, x, initial_carry=jnp.zeros((B, H + 1)))
    with pytest.raises(ValueError, match="seq_lengths"):
        SparseRNN(H).apply(variables, x, seq_lengths=jnp.ones((B + 1,), jnp.int32))
    with pytest.raises(TypeError, match="PackedMask"):
        SparseRNN(H).apply({"params": variables["params"],
                            "sparsity": {"cell": {"h": {"kernel": np.ones((H, H), bool)}}}}, x)
    with pytest.raises(flax.errors.ScopeParamShapeError, match="/cell/h"):
        params = jax.tree.map(lambda a: a, variables["params"])
        params["cell"]["h"]["kernel"] = jnp.zeros((H + 1, H + 1))
        SparseRNN(H).apply({"params": params, "sparsity": variables["sparsity"]}, x)
    with pytest.raises(ValueError, match="carry"):
        SparseRNNCell(H).init(jax.random.key(0), jnp.zeros((B, H + 2)), x[:, 0])
