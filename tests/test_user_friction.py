"""What a new user met (issue 18, items 3 and 7): NaN weights pruned away silently, reference_rnn
refusing SparseWeights, a chaotic quickstart, jax.grad refusing SparseWeights, a slow first
from_dense, and an orbax round trip of the inference form that needed a target."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import pruning
from jax_sprnn.testing import GRAD_TOLERANCE, make_problem, rel_err

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---- NaN and inf weights ---------------------------------------------------------------------

def kernel_with(bad_at, value, hidden=32, seed=0):
    kernel = np.random.default_rng(seed).standard_normal((hidden, hidden)).astype(np.float32)
    for i, j in bad_at:
        kernel[i, j] = value
    return kernel


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_from_dense_refuses_nan_weights_and_names_them(density):
    # They were dropped: at density 1.0 a 32x32 kernel with one NaN packed 1023 weights.
    kernel = kernel_with([(3, 4), (7, 1), (9, 9)], np.nan)
    with pytest.raises(ValueError, match=r"kernel has 3 NaN entries \(first at \[3, 4\]\)"):
        js.SparseWeights.from_dense(kernel, density=density)
    with pytest.raises(ValueError, match="3 NaN"):  # with a mask too
        js.SparseWeights.from_dense(kernel, np.ones(kernel.shape, bool))


def test_from_dense_refuses_infinite_weights():
    kernel = kernel_with([(0, 5)], -np.inf)
    with pytest.raises(ValueError, match=r"kernel has 1 infinite entries \(first at \[0, 5\]\)"):
        js.SparseWeights.from_dense(kernel, density=0.2)


def test_finite_kernel_at_density_one_keeps_every_weight():
    assert js.SparseWeights.from_dense(kernel_with([], 0.0), density=1.0).nnz == 32 * 32


def test_pruning_refuses_nan_weights_and_names_the_kernel():
    kernel = kernel_with([(2, 6)], np.nan)
    with pytest.raises(ValueError, match=r"kernel has 1 NaN entries \(first at \[2, 6\]\)"):
        pruning.magnitude_mask(kernel, 0.5)
    with pytest.raises(ValueError, match=r"kernels\['b'\] \(layer 1\) has 1 NaN"):
        pruning.magnitude_masks({"a": kernel_with([], 0.0), "b": np.stack([np.ones_like(kernel), kernel])},
                                0.5)
    mask = np.ones(kernel.shape, bool)
    with pytest.raises(ValueError, match=r"the kernel at params/layer/kernel has 1 NaN"):
        pruning.update_sparsity({"layer": {"kernel": kernel}}, {"layer": {"kernel": mask}}, 0.5)
    with pytest.raises(ValueError, match=r"1 NaN entries \(first at \[1, 2, 6\]\)"):  # stacked
        pruning.pack_inference(np.stack([np.ones_like(kernel), kernel]), np.stack([mask, mask]))


# ---- reference_rnn takes what sparse_rnn takes -----------------------------------------------

def test_reference_rnn_takes_sparse_weights(exact_matmuls):
    dense, w, x, h0 = make_problem(3, 40, 2, 9, 0.2)
    y_w, h_w = js.reference_rnn(x, h0, w, seq_lengths=np.array([9, 4]), reverse=True)
    y_d, h_d = js.reference_rnn(x, h0, dense, seq_lengths=np.array([9, 4]), reverse=True)
    np.testing.assert_array_equal(np.asarray(y_w), np.asarray(y_d))
    np.testing.assert_array_equal(np.asarray(h_w), np.asarray(h_d))


@pytest.mark.parametrize("kernel", [{"kernel": 1}, None, "dense"])
def test_reference_rnn_names_what_its_kernel_must_be(kernel):
    _, _, x, h0 = make_problem(3, 8, 1, 2, 0.5)
    with pytest.raises(TypeError, match=r"kernel must be a dense \[H, H\] array or a "
                                        r"jax_sprnn.SparseWeights"):
        js.reference_rnn(x, h0, kernel)


# ---- the README quickstart -------------------------------------------------------------------

def test_readme_quickstart_is_contractive_and_agrees_with_the_reference():
    # Its kernel had spectral radius 2.2: native and reference diverged by 0.6 (correct chaos).
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    scope = {}
    exec(compile(block, "README.md quickstart", "exec"), scope)
    radius = np.abs(np.linalg.eigvals(np.asarray(scope["weights"].to_dense()))).max()
    assert radius < 1.0
    assert float(jnp.abs(scope["y"] - scope["y_ref"]).max()) < 1e-5
    assert isinstance(scope["grads"], js.SparseWeights)


# ---- gradients with respect to SparseWeights -------------------------------------------------

def loss_of(x, h0):
    return lambda w: jnp.sum(jnp.tanh(js.sparse_rnn(x, h0, w)[0]) ** 2)


def test_jax_grad_refuses_sparse_weights_and_js_grad_differentiates_the_values():
    _, w, x, h0 = make_problem(4, 40, 2, 6, 0.25)
    loss = loss_of(x, h0)
    with pytest.raises(TypeError, match="allow_int"):  # jax's own refusal, which js.grad avoids
        jax.grad(loss)(w)
    want = jax.grad(lambda v: loss(w.replace(values=v)))(w.values)
    got = js.grad(loss)(w)
    assert isinstance(got, js.SparseWeights) and got.meta == w.meta
    np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want))
    assert all(getattr(got, n).dtype == jax.dtypes.float0 for n in w.INDEX_LEAVES)
    jitted = jax.jit(js.grad(loss))(w)
    assert rel_err(jitted.values, want) < GRAD_TOLERANCE["float32"]  # jit may fuse differently


def test_value_and_grad_of_a_params_tree_holding_sparse_weights():
    _, w, x, h0 = make_problem(5, 40, 2, 6, 0.25)
    params = {"rnn": w, "bias": jnp.full((40,), 0.1)}

    def loss(p, x):
        y, _ = js.sparse_rnn(x + p["bias"], h0, p["rnn"])
        return jnp.sum(y ** 2), y.shape

    (value, shape), grads = js.value_and_grad(loss, has_aux=True)(params, x)
    want_value, (want_w, want_b) = jax.value_and_grad(
        lambda v, b: loss({"rnn": w.replace(values=v), "bias": b}, x)[0], argnums=(0, 1))(
        w.values, params["bias"])
    assert float(value) == float(want_value) and shape == (2, 6, 40)
    np.testing.assert_array_equal(np.asarray(grads["rnn"].values), np.asarray(want_w))
    np.testing.assert_array_equal(np.asarray(grads["bias"]), np.asarray(want_b))
    # Several argnums, and grad's (gradient, aux) order.
    (g_params, g_x), aux = js.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    assert aux == (2, 6, 40) and g_x.shape == x.shape
    np.testing.assert_array_equal(np.asarray(g_params["rnn"].values), np.asarray(want_w))
    with pytest.raises(ValueError, match="argnums"):
        js.grad(loss, argnums=2)(params, x)


# ---- checkpoints of the inference form -------------------------------------------------------

def raw_leaves(w: js.SparseWeights, as_list: bool = False):
    """A SparseWeights as a checkpointer restores it without a target."""
    leaves = {n: np.asarray(getattr(w, n)) for n in w.LEAVES}
    return [leaves[n] for n in w.LEAVES] if as_list else leaves


def assert_same_weights(got, want):
    assert isinstance(got, js.SparseWeights)
    assert (got.meta, got.meta_t) == (want.meta, want.meta_t)
    for name in want.LEAVES:
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("as_list", [False, True])
def test_from_restored_repacks_raw_leaves_to_the_same_layout(dtype, as_list):
    # as_list: checkpoints written before SparseWeights named its leaves
    dense, w, _, _ = make_problem(6, 48, 1, 1, 0.2, dtype)
    want = pruning.pack_inference(dense, dense != 0, dtype=dtype)
    variables = {"params": {"x": np.ones(3)},
                 "sparsity": {"layer": {"h": {"kernel": raw_leaves(want, as_list)}}}}
    got = pruning.from_restored(variables)
    assert_same_weights(got["sparsity"]["layer"]["h"]["kernel"], want)
    assert got["params"] is variables["params"]


def test_from_restored_repacks_stacked_layers():
    layers = [make_problem(seed, 40, 1, 1, d)[0] for seed, d in ((7, 0.1), (8, 0.3))]
    kernel = np.stack(layers)
    want = pruning.pack_inference(kernel, kernel != 0)
    assert_same_weights(pruning.from_restored({"stack": raw_leaves(want)})["stack"], want)


def test_from_restored_points_training_checkpoints_to_a_target():
    packed = pruning.PackedMask.create(np.eye(16, dtype=bool))
    raw = {n: np.asarray(getattr(packed, n)) for n in packed.LEAVES}
    with pytest.raises(ValueError, match="restore it with a target"):
        pruning.from_restored({"sparsity": {"h": {"kernel": raw}}})


def test_orbax_round_trip_of_the_inference_form_without_a_target(tmp_path):
    nn = pytest.importorskip("flax.linen")
    ocp = pytest.importorskip("orbax.checkpoint")
    from jax_sprnn.flax import SparseRNN

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(SparseRNN(32)(x))

    model = Model()
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 7, 5)).astype(np.float32))
    variables = model.init(jax.random.key(0), x)
    params, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.8)
    inference = pruning.to_inference({"params": params, "sparsity": sparsity})
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "inference", inference)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "inference")  # no target: raw leaves
    with pytest.raises(TypeError, match="from_restored"):
        model.apply(restored, x)
    back = pruning.from_restored(restored)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(inference)
    np.testing.assert_array_equal(np.asarray(model.apply(back, x)),
                                  np.asarray(model.apply(inference, x)))


def test_sparse_weights_leaves_are_named():
    _, w, _, _ = make_problem(10, 16, 1, 1, 0.5)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(w)[0]]
    assert paths == [f".{n}" for n in ("values", "indices", "lane_row", "indices_t", "lane_row_t",
                                        "perm_t")]


# ---- SparseWeights as a value ------------------------------------------------------------------

def test_sparse_weights_print_everywhere_they_appear():
    """A repr that reads the index leaves only where they hold integers here: a gradient (float0
    index leaves), a tracer inside jit or vmap, and an eval_shape tree print too."""
    _, w, x, h0 = make_problem(0, 9, 2, 3, 0.4)
    eager = repr(w)
    assert re.search(r"nnz=\d+, density=0\.\d{4}", eager)
    grads = js.grad(lambda w: js.sparse_rnn(x, h0, w)[0].sum())(w)
    shapes = jax.eval_shape(lambda w: w, w)
    seen = []
    jax.jit(lambda w: seen.append(repr(w)) or 0)(w)
    jax.vmap(lambda w: seen.append(repr(w)) or 0)(jax.tree.map(lambda a: jnp.stack([a, a]), w))
    for text in [repr(grads), repr(shapes), *seen]:
        assert text.startswith("SparseWeights(shape=(9, 9), dtype=float32, K=") and "nnz" not in text
        assert eager.endswith(text.split("dtype=float32, ")[1])  # the same layout fields


def test_sparse_weights_compare_by_identity():
    """== and hash are identity (as for the arrays they hold): a bool, never an array's ambiguous
    truth value, so SparseWeights work in lists, sets and as dict keys."""
    import copy
    _, w, _, _ = make_problem(1, 9, 2, 3, 0.4)
    twin = copy.deepcopy(w)
    assert (w == w) is True and (w == twin) is False and (w != twin) is True
    assert w in [w] and twin not in [w] and len({w, twin, w}) == 2
    mask = pruning.PackedMask.create(np.eye(9, dtype=bool), dtype=jnp.float32)
    assert (mask == copy.deepcopy(mask)) is False and mask in {mask: 1}


@pytest.mark.parametrize("density", [jnp.float32(0.3), np.array(0.3), np.float16(0.3), 0.3])
def test_from_dense_takes_a_density_of_any_real_scalar_type(density):
    kernel = np.random.default_rng(2).standard_normal((10, 10)).astype(np.float32)
    w = js.SparseWeights.from_dense(kernel, density=density)
    assert w.nnz == 30


@pytest.mark.parametrize("density", [True, np.array([0.3]), "0.3", 1.5, -0.1, jnp.array(0.3 + 1j)])
def test_from_dense_names_a_density_that_is_not_a_real_number_in_the_unit_interval(density):
    kernel = np.random.default_rng(2).standard_normal((10, 10)).astype(np.float32)
    with pytest.raises(ValueError, match=r"density must be a number in \[0, 1\], got"):
        js.SparseWeights.from_dense(kernel, density=density)


def test_grad_takes_numpy_integer_argnums_as_jax_grad_does():
    _, w, x, h0 = make_problem(3, 9, 2, 3, 0.4)

    def loss(w, x):
        return js.sparse_rnn(x, h0, w)[0].sum()
    want = js.grad(loss, argnums=(0, 1))(w, x)
    one = js.grad(loss, argnums=np.int64(0))(w, x)
    both = js.grad(loss, argnums=(np.int32(0), np.int64(-1)))(w, x)
    assert isinstance(one, js.SparseWeights) and np.array_equal(one.values, want[0].values)
    assert np.array_equal(both[0].values, want[0].values) and np.array_equal(both[1], want[1])
    for bad in (True, (0.5,), "0", (2,), ()):
        with pytest.raises(ValueError, match="argnums must name positional arguments"):
            js.grad(loss, argnums=bad)(w, x)
