"""The NNX modules: SparseRNN against nnx.RNN(SparseRNNCell) and nnx.SimpleCell, nnx.RNN's
parameters (the same tree, restored by orbax), a layer without a mask, call keywords,
Bidirectional, grad, pruning in place without recompiling, and the inference copy."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_sprnn as js
from jax_sprnn import _modules, pruning
from jax_sprnn import nnx as jnnx

from jax_sprnn.testing import TOLERANCE, normal, rel_err
from nnx_training import train_while_pruning  # (tests/, on the path under pytest)

H, F, B, T = 20, 4, 3, 6


pytestmark = pytest.mark.usefixtures("exact_matmuls")


def random_inputs(seed, shape=(B, T, F)):
    return normal(seed, shape)


def randomize_kernel(layer, seed):
    """Fresh random values on the layer's mask (zero off it), so tests do not rest on the init."""
    mask = layer.mask if isinstance(layer, jnnx.SparseRNN) else np.ones((H, H), bool)
    kernel = np.random.default_rng(seed).standard_normal((H, H)).astype(np.float32)
    kernel *= 0.9 / np.sqrt(max(1.0, mask.mean() * H))
    cell = layer.cell if isinstance(layer, jnnx.SparseRNN) else layer
    cell.dense_h.kernel[...] = jnp.asarray(np.where(mask, kernel, 0.0))


def cell_twin(layer: jnnx.SparseRNN) -> jnnx.SparseRNNCell:
    """A cell holding the layer's parameters (a copy of its cell)."""
    cell = jnnx.SparseRNNCell(F, H, max_density=layer.max_density, rngs=nnx.Rngs(0))
    nnx.update(cell, nnx.state(layer.cell, nnx.Param))
    return cell


@pytest.mark.parametrize("reverse,keep_order,use_lengths", [
    (False, False, False), (False, False, True), (True, False, True), (True, True, False)])
def test_matches_nnx_rnn_of_the_cell(reverse, keep_order, use_lengths):
    rng = np.random.default_rng(1)
    layer = jnnx.SparseRNN(F, H, max_density=0.3, rngs=nnx.Rngs(2))
    randomize_kernel(layer, 3)
    x = random_inputs(4)
    lengths = jnp.asarray(rng.integers(1, T + 1, size=B)) if use_lengths else None
    carry0 = jnp.asarray(rng.standard_normal((B, H)).astype(np.float32) * 0.5)
    call = dict(initial_carry=carry0, seq_lengths=lengths, return_carry=True, reverse=reverse,
                keep_order=keep_order)
    carry, out = layer(x, **call)
    ref_carry, ref = nnx.RNN(cell_twin(layer))(x, **call)
    valid = np.ones((B, T), bool) if lengths is None else np.arange(T)[None] < np.asarray(lengths)[:, None]
    assert rel_err(np.where(valid[..., None], out, 0), np.where(valid[..., None], ref, 0)) < 1e-5
    assert rel_err(carry, ref_carry) < 1e-5


def shapes_and_dtypes(state):
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), nnx.to_pure_dict(state))


def test_simple_cell_drop_in():
    """Same rngs give nnx.SimpleCell's weights, and the same outputs."""
    simple = nnx.SimpleCell(F, H, rngs=nnx.Rngs(5))
    cell = jnnx.SparseRNNCell(F, H, rngs=nnx.Rngs(5))
    layer = jnnx.SparseRNN(F, H, rngs=nnx.Rngs(5))
    for module in (cell, layer.cell):
        for name in ("dense_h", "dense_i"):
            np.testing.assert_array_equal(np.asarray(getattr(module, name).kernel[...]),
                                          np.asarray(getattr(simple, name).kernel[...]))
    x = random_inputs(6)
    ref = nnx.RNN(simple)(x)
    assert rel_err(nnx.RNN(cell)(x), ref) < TOLERANCE["float32"]
    assert rel_err(layer(x), ref) < TOLERANCE["float32"]


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_params_are_nnx_rnn_simple_cells(param_dtype):
    """nnx.state(..., nnx.Param) has nnx.RNN(nnx.SimpleCell)'s names, nesting, shapes and dtypes
    (the cell's, nnx.SimpleCell's); the mask is a Sparsity variable beside it."""
    if param_dtype == jnp.bfloat16 and jax.default_backend() != "cpu":
        pytest.skip("the bfloat16 orthogonal init (QR) traces only on the CPU backend")

    def build(make):  # shapes alone: the CPU has no bfloat16 QR for the orthogonal init
        return nnx.state(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param)
    dense = build(lambda r: nnx.RNN(nnx.SimpleCell(F, H, param_dtype=param_dtype, rngs=r)))
    sparse = build(lambda r: jnnx.SparseRNN(F, H, param_dtype=param_dtype, rngs=r))
    assert jax.tree.structure(nnx.to_pure_dict(sparse)) == jax.tree.structure(nnx.to_pure_dict(dense))
    assert shapes_and_dtypes(sparse) == shapes_and_dtypes(dense)
    assert shapes_and_dtypes(build(lambda r: jnnx.SparseRNNCell(F, H, param_dtype=param_dtype,
                                                                rngs=r))) == \
        shapes_and_dtypes(build(lambda r: nnx.SimpleCell(F, H, param_dtype=param_dtype, rngs=r)))
    layer = jnnx.SparseRNN(F, H, rngs=nnx.Rngs(0))
    assert isinstance(layer.sparsity.get_value(), pruning.PackedMask)
    assert set(nnx.to_pure_dict(nnx.state(layer, jnnx.Sparsity))) == {"sparsity"}


def test_nnx_rnn_checkpoint_restores_into_sparse_rnn(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    rnn = nnx.RNN(nnx.SimpleCell(F, H, rngs=nnx.Rngs(30)))
    kernel = np.random.default_rng(31).standard_normal((H, H)).astype(np.float32) * 0.9 / H ** 0.5
    rnn.cell.dense_h.kernel[...] = jnp.asarray(kernel)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "rnn", nnx.state(rnn, nnx.Param))
    checkpointer.wait_until_finished()
    layer = jnnx.SparseRNN(F, H, rngs=nnx.Rngs(0))
    nnx.update(layer, checkpointer.restore(tmp_path / "rnn", nnx.state(layer, nnx.Param)))
    x = random_inputs(32)
    assert rel_err(layer(x), rnn(x)) < TOLERANCE["float32"]


def test_without_a_mask_the_layer_is_dense_until_pruned(monkeypatch):
    monkeypatch.setattr(_modules, "_warned_no_mask", set())
    layer = jnnx.SparseRNN(F, H, max_density=0.5, rngs=nnx.Rngs(33))
    layer.sparsity.set_value(None)
    kernel = np.random.default_rng(34).standard_normal((H, H)).astype(np.float32) * 0.9 / H ** 0.5
    layer.cell.dense_h.kernel[...] = jnp.asarray(kernel)  # dense: off the initial mask too
    x = random_inputs(35)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer(x)
        jitted = nnx.jit(lambda m: m(x))(layer)
    no_mask = [w for w in caught if "no mask" in str(w.message)]
    assert len(no_mask) == 1 and "runs dense" in str(no_mask[0].message)
    assert "prune" in str(no_mask[0].message)  # and says how to add one
    assert no_mask[0].filename == __file__  # the user's line, not one inside jax_sprnn or Flax
    ref = nnx.RNN(cell_twin(layer))(x)
    assert rel_err(out, ref) < TOLERANCE["float32"] and rel_err(jitted, ref) < TOLERANCE["float32"]
    assert layer.mask.all()
    masks = jnnx.param_masks(layer)
    assert masks["cell"]["dense_h"]["kernel"].shape == ()  # nothing to keep at zero yet
    jnnx.prune(layer, 0.75)  # the mask arrives: the initial layout, then magnitudes
    assert isinstance(layer.sparsity.get_value(), pruning.PackedMask)
    assert layer.mask.mean() == pytest.approx(0.25)
    assert np.all(np.asarray(layer.cell.dense_h.kernel[...])[~layer.mask] == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = layer(x)
    assert rel_err(out, nnx.RNN(cell_twin(layer))(x)) < TOLERANCE["float32"]


def test_initial_mask_and_bidirectional():
    layer = jnnx.SparseRNN(F, H, max_density=0.25, mask_seed=2, rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(layer.mask, pruning.initial_mask(H, 0.25, 2))
    assert np.all(np.asarray(layer.cell.dense_h.kernel[...])[~layer.mask] == 0)
    fwd, bwd = (jnnx.SparseRNN(F, H, rngs=nnx.Rngs(s)) for s in (8, 9))
    randomize_kernel(fwd, 10)
    randomize_kernel(bwd, 11)
    x = random_inputs(12)
    lengths = jnp.asarray([T, 3, 1])
    out = nnx.Bidirectional(fwd, bwd)(x, seq_lengths=lengths)
    ref = nnx.Bidirectional(nnx.RNN(cell_twin(fwd)), nnx.RNN(cell_twin(bwd)))(x, seq_lengths=lengths)
    valid = (np.arange(T)[None] < np.asarray(lengths)[:, None])[..., None]
    assert out.shape == (B, T, 2 * H)
    assert rel_err(np.where(valid, out, 0), np.where(valid, ref, 0)) < 1e-5


def test_jit_and_grad():
    layer = jnnx.SparseRNN(F, H, max_density=0.3, rngs=nnx.Rngs(13))
    randomize_kernel(layer, 14)
    x = random_inputs(15)
    target = random_inputs(16, (B, T, H))
    loss = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
    grads = nnx.jit(nnx.grad(loss))(layer)
    cell = cell_twin(layer)
    ref = nnx.grad(lambda c: jnp.mean((nnx.RNN(c)(x) - target) ** 2))(cell)
    g = np.asarray(grads["cell"]["dense_h"]["kernel"][...])
    assert np.all(g[~layer.mask] == 0), "the gradient must be exactly zero off the mask"
    assert rel_err(g[layer.mask], np.asarray(ref["dense_h"]["kernel"][...])[layer.mask]) < 1e-4
    assert rel_err(grads["cell"]["dense_i"]["kernel"][...], ref["dense_i"]["kernel"][...]) < 1e-4


def test_pruning_in_place_does_not_recompile():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.rnn = jnnx.SparseRNN(F, H, rngs=rngs)
            self.head = nnx.Linear(H, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.rnn(x))

    model = Model(nnx.Rngs(20))
    x, target = random_inputs(21), random_inputs(22, (B, T, 2))
    densities = []

    def check(step, sparsity):
        if step % 2 == 0:  # (a step that pruned)
            densities.append(model.rnn.mask.mean())
        kernel = np.asarray(model.rnn.cell.dense_h.kernel[...])
        assert np.all(kernel[~model.rnn.mask] == 0)

    traces = train_while_pruning(model, x, target, (0.5, 0.5, 0.8, 0.8, 0.95, 0.95), check)
    assert traces == 1, "a new mask must not retrace the step"
    assert densities == sorted(densities, reverse=True) and densities[-1] < 0.1

    inference = jnnx.to_inference(model)
    assert isinstance(inference.rnn.sparsity.get_value(), js.SparseWeights)
    assert not hasattr(inference.rnn.cell, "dense_h")
    assert isinstance(model.rnn.sparsity.get_value(), pruning.PackedMask)  # original untouched
    assert rel_err(nnx.jit(lambda m: m(x))(inference), model(x)) < 1e-6
    planned = jnnx.to_inference(model, batch=7)  # a layout planned for the batch it will run
    assert planned.rnn.sparsity.get_value().meta.reason.endswith("planned for batch 7")
    assert rel_err(nnx.jit(lambda m: m(x))(planned), model(x)) < 1e-6


def test_bad_arguments_name_the_argument():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="hidden"):
        jnnx.SparseRNN(F, 0, rngs=rngs)
    with pytest.raises(ValueError, match="in_features"):
        jnnx.SparseRNNCell(-1, H, rngs=rngs)
    with pytest.raises(ValueError, match="max_density"):
        jnnx.SparseRNN(F, H, max_density=2.0, rngs=rngs)
    with pytest.raises(ValueError, match="activation_fn"):
        jnnx.SparseRNNCell(F, H, activation_fn="softplus", rngs=rngs)
    with pytest.raises(ValueError, match="method"):
        jnnx.SparseRNN(F, H, method="dense", rngs=rngs)
    layer = jnnx.SparseRNN(F, H, rngs=rngs)
    with pytest.raises(ValueError, match="inputs"):
        layer(random_inputs(1, (B, T, F + 1)))
    with pytest.raises(ValueError, match="initial_carry"):
        layer(random_inputs(1), initial_carry=jnp.zeros((B + 1, H)))
    with pytest.raises(ValueError, match="no jax_sprnn.nnx.SparseRNN"):
        jnnx.prune(nnx.Linear(2, 2, rngs=rngs), 0.5)
