"""Pruning: magnitude masks, the cubic schedule, PackedMask repacking into a fixed layout, the
optax wrapper, mask changes without recompiling, export, and orbax save / restore."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import pruning
from jax_sprnn.flax import SparseRNN

from jax_sprnn.testing import rel_err

optax = pytest.importorskip("optax")  # a declared dependency; skip cleanly if absent

H = 32


@pytest.fixture(autouse=True)
def exact_matmuls():
    """GPUs run float32 matmuls at reduced precision by default; these comparisons are at 1e-5."""
    with jax.default_matmul_precision("highest"):
        yield


def random_kernel(seed, shape=(H, H), scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


# ---- masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,axis", [("layer", None), ("global", None), ("per_row", 1),
                                         ("row_balanced", 0)])
def test_magnitude_mask_keeps_the_largest(rule, axis):
    kernel = random_kernel(1)
    mask = pruning.magnitude_mask(kernel, 0.75, rule=rule)
    assert mask.dtype == bool and mask.shape == kernel.shape
    mag = np.abs(kernel)
    if axis is None:
        assert mask.sum() == round(0.25 * H * H)
        assert mag[mask].min() >= mag[~mask].max()
    else:
        counts = mask.sum(axis=axis)
        assert np.all(counts == round(0.25 * H))
        kept = np.where(mask, mag, np.inf).min(axis=axis)
        dropped = np.where(mask, -np.inf, mag).max(axis=axis)
        assert np.all(kept >= dropped)


def test_global_threshold_is_shared_across_layers():
    kernels = {"a": random_kernel(2), "b": random_kernel(3, scale=3.0)}
    masks = pruning.magnitude_masks(kernels, 0.8, rule="global")
    total = sum(int(m.sum()) for m in masks.values())
    assert total == round(0.2 * 2 * H * H)
    assert masks["b"].sum() > 2 * masks["a"].sum()  # the larger layer keeps more
    per_layer = pruning.magnitude_masks(kernels, 0.8, rule="layer")
    assert per_layer["a"].sum() == per_layer["b"].sum() == round(0.2 * H * H)


def test_masks_are_nested_along_a_schedule():
    kernel = random_kernel(4)
    current = np.ones((H, H), bool)
    for sparsity in (0.3, 0.6, 0.9):
        new = pruning.magnitude_mask(kernel * current, sparsity, current=current)
        assert not np.any(new & ~current)
        current = new
    assert current.sum(axis=0).tolist() == [round(0.1 * H)] * H


def test_balanced_pattern_counts():
    pattern = pruning.balanced_pattern(40, 7, seed=5)
    assert np.all(pattern.sum(axis=0) == 7) and np.all(pattern.sum(axis=1) == 7)
    assert not np.array_equal(pattern, pruning.balanced_pattern(40, 7, seed=6))


# ---- schedule ---------------------------------------------------------------------------------

def test_cubic_schedule():
    s = pruning.cubic_schedule(0.1, 0.9, begin_step=100, end_step=1000, frequency=100)
    assert s(0) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert s(1000) == pytest.approx(0.9) and s(5000) == pytest.approx(0.9)
    # Zhu & Gupta, eq. 1, at an update step.
    assert s(400) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 300 / 900) ** 3)
    assert s(450) == s(400)  # held between updates
    values = [s(t) for t in range(0, 1200, 10)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert [t for t in range(0, 1200, 50) if s.is_update_step(t)] == list(range(100, 1001, 100))
    assert float(jax.jit(s)(jnp.asarray(400))) == pytest.approx(s(400), rel=1e-6)
    for bad, name in ((dict(initial_sparsity=-0.1), "initial_sparsity"),
                      (dict(final_sparsity=1.5), "final_sparsity"),
                      (dict(initial_sparsity=0.5, final_sparsity=0.2), "final_sparsity"),
                      (dict(end_step=50), "end_step"), (dict(frequency=0), "frequency")):
        args = {**dict(initial_sparsity=0.0, final_sparsity=0.9, begin_step=100, end_step=1000,
                       frequency=10), **bad}
        with pytest.raises(ValueError, match=name):
            pruning.cubic_schedule(**args)


# ---- PackedMask ---------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,max_density", [(32, 1.0), (45, 0.2)])
def test_new_masks_pack_into_the_same_layout(hidden, max_density):
    packed = pruning.PackedMask.for_density(hidden, max_density, seed=1)
    rows, cols = packed.row_budget, packed.col_budget
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((3, 5, hidden)).astype(np.float32))
    h0 = jnp.asarray(rng.standard_normal((3, hidden)).astype(np.float32) * 0.5)
    for sparsity in (1 - max_density, 0.85, 0.97):
        kernel = random_kernel(int(sparsity * 100), (hidden, hidden), 0.3)
        mask, _ = pruning.fit_to_budgets(
            pruning.magnitude_mask(kernel, sparsity), np.abs(kernel), rows, cols)
        new = packed.with_mask(mask)
        assert jax.tree.structure(new) == jax.tree.structure(packed)
        weights = new.weights(kernel)
        weights.validate()
        np.testing.assert_array_equal(weights.mask(), mask)
        np.testing.assert_array_equal(np.asarray(weights.to_dense()), np.where(mask, kernel, 0))
        y, _ = js.sparse_rnn(x, h0, weights)
        ref, _ = js.reference_rnn(x, h0, np.where(mask, kernel, 0))
        assert rel_err(y, ref) < 1e-5


def test_over_budget_masks_raise_or_are_fitted():
    packed = pruning.PackedMask.for_density(H, 0.25)
    kernel = random_kernel(8)
    too_dense = pruning.magnitude_mask(kernel, 0.5)
    with pytest.raises(ValueError, match="row budget"):
        packed.with_mask(too_dense)
    fitted, dropped = pruning.fit_to_budgets(too_dense, np.abs(kernel), packed.row_budget,
                                             packed.col_budget)
    assert dropped == too_dense.sum() - fitted.sum() > 0
    assert fitted.sum(axis=0).max() <= packed.row_budget
    assert not np.any(fitted & ~too_dense)
    packed.with_mask(fitted)
    with pytest.raises(ValueError, match="mask"):
        packed.with_mask(too_dense[:-1])
    with pytest.raises(TypeError, match="mask"):
        packed.with_mask(too_dense.astype(np.float32))


# ---- training ----------------------------------------------------------------------------------

def model_and_data(seed, max_density=1.0, batch=2, steps=5, features=3):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, steps, features)).astype(np.float32))
    target = jnp.asarray(rng.standard_normal((batch, steps, H)).astype(np.float32) * 0.5)
    model = SparseRNN(H, max_density=max_density)
    return model, model.init(jax.random.key(seed), x), x, target


def test_update_sparsity_zeroes_pruned_weights_and_keeps_the_layout():
    model, variables, x, _ = model_and_data(10)
    params, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.75)
    packed = sparsity["cell"]["h"]["kernel"]
    mask = np.asarray(packed.mask)
    assert np.all(mask.sum(axis=0) == H // 4)
    kernel = np.asarray(params["cell"]["h"]["kernel"])
    assert np.all(kernel[~mask] == 0)
    np.testing.assert_array_equal(kernel[mask],
                                  np.asarray(variables["params"]["cell"]["h"]["kernel"])[mask])
    assert jax.tree.structure(sparsity) == jax.tree.structure(variables["sparsity"])
    np.testing.assert_array_equal(np.asarray(params["cell"]["i"]["kernel"]),
                                  np.asarray(variables["params"]["cell"]["i"]["kernel"]))


def test_update_sparsity_trims_to_the_budgets_only_what_it_took_back():
    """A target above the layout's density asks for more weights than the budgets hold: the trim
    drops the pruned weights the new mask took back, never a live one (so no warning), and the
    mask stays nested and within the budgets."""
    _, variables, _, _ = model_and_data(11, max_density=0.25)
    current = np.asarray(variables["sparsity"]["cell"]["h"]["kernel"].mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.7,
                                              rule="layer")
    mask = np.asarray(sparsity["cell"]["h"]["kernel"].mask)
    assert mask.sum(axis=0).max() <= sparsity["cell"]["h"]["kernel"].row_budget
    assert not (mask & ~current).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # row-balanced masks within the budget need no trimming
        pruning.update_sparsity(variables["params"], variables["sparsity"], 0.8)


def test_keep_pruned_holds_pruned_weights_at_zero():
    params = {"w": jnp.asarray(random_kernel(12, (6, 6))), "b": jnp.ones((6,))}
    mask = pruning.magnitude_mask(params["w"], 0.5)
    masks = {"w": jnp.asarray(mask), "b": jnp.ones((), bool)}
    tx = pruning.keep_pruned(optax.adam(0.1))
    plain = optax.adam(0.1)
    state, plain_state = tx.init(params), plain.init(params)
    grads = {"w": jnp.asarray(random_kernel(13, (6, 6))), "b": jnp.ones((6,))}
    updates, state = tx.update(grads, state, params, masks=masks)
    new = optax.apply_updates(params, updates)
    # Pruned weights land on exactly zero, live ones move as with the plain optimizer.
    assert np.all(np.asarray(new["w"])[~mask] == 0)
    masked_grads = {"w": jnp.where(mask, grads["w"], 0), "b": grads["b"]}
    plain_updates, _ = plain.update(masked_grads, plain_state, params)
    np.testing.assert_allclose(np.asarray(updates["w"])[mask], np.asarray(plain_updates["w"])[mask])
    np.testing.assert_allclose(np.asarray(updates["b"]), np.asarray(plain_updates["b"]))
    # A sparser mask takes effect in one step despite the optimizer's momentum.
    mask2 = mask & pruning.magnitude_mask(np.asarray(new["w"]), 0.75)
    updates, state = tx.update(grads, state, new, masks={"w": jnp.asarray(mask2), "b": masks["b"]})
    newer = optax.apply_updates(new, updates)
    assert np.all(np.asarray(newer["w"])[~mask2] == 0)
    assert np.all(np.asarray(newer["w"])[mask2] != np.asarray(new["w"])[mask2])
    with pytest.raises(ValueError, match="masks"):
        tx.update(grads, state, params)


def test_mask_changes_do_not_recompile_the_training_step():
    model, variables, x, target = model_and_data(20)
    tx = pruning.keep_pruned(optax.adam(1e-2))
    params, sparsity = variables["params"], variables["sparsity"]
    opt_state = tx.init(params)
    traces = []

    @jax.jit
    def train_step(params, sparsity, opt_state, x, target):
        traces.append(1)  # runs only while tracing
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p, "sparsity": sparsity}, x) - target) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params,
                                       masks=pruning.param_masks(params, sparsity))
        return optax.apply_updates(params, updates), opt_state, loss

    schedule = pruning.cubic_schedule(0.0, 0.9, begin_step=2, end_step=8, frequency=2)
    densities, outputs = [], []
    for step in range(10):
        if schedule.is_update_step(step):
            params, sparsity = pruning.update_sparsity(params, sparsity, schedule(step))
            densities.append(float(np.asarray(sparsity["cell"]["h"]["kernel"].mask).mean()))
            outputs.append(model.apply({"params": params, "sparsity": sparsity}, x))
        params, opt_state, loss = train_step(params, sparsity, opt_state, x, target)
        mask = np.asarray(sparsity["cell"]["h"]["kernel"].mask)
        assert np.all(np.asarray(params["cell"]["h"]["kernel"])[~mask] == 0)
    assert len(traces) == 1, "a new mask must not retrace the step"
    assert densities == sorted(densities, reverse=True) and len(set(densities)) == len(densities)
    assert densities[-1] == pytest.approx(0.1, abs=1 / H)
    # The mask is really used: the same params under an earlier mask give other outputs.
    assert rel_err(outputs[0], outputs[-1]) > 1e-3


def test_to_inference_of_stacked_layers():
    kernels = random_kernel(30, (3, H, H))
    masks = pruning.magnitude_masks(kernels, 0.8, rule="global")
    packed = pruning.pack_inference(kernels, masks)
    assert packed.values.shape[0] == 3
    for i in range(3):
        layer = jax.tree.map(lambda v, i=i: v[i], packed)
        np.testing.assert_array_equal(np.asarray(layer.to_dense()), np.where(masks[i], kernels[i], 0))


def test_orbax_save_and_restore(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model, variables, x, _ = model_and_data(40, max_density=0.5)
    params, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.7)
    trained = {"params": params, "sparsity": sparsity}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", trained)
    checkpointer.wait_until_finished()
    # The target comes from a fresh init: the layouts are a function of the module's attributes.
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(trained)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(model.apply(restored, x)),
                                  np.asarray(model.apply(trained, x)))


def test_bad_arguments():
    kernel = random_kernel(50)
    with pytest.raises(ValueError, match="sparsity"):
        pruning.magnitude_mask(kernel, 1.5)
    with pytest.raises(ValueError, match="rule"):
        pruning.magnitude_mask(kernel, 0.5, rule="random")
    with pytest.raises(TypeError, match="method"):  # method= is the execution path, not a rule
        pruning.update_sparsity({"w": kernel}, {"w": np.ones(kernel.shape, bool)}, 0.5,
                                method="layer")
    with pytest.raises(ValueError, match="kernel"):
        pruning.magnitude_mask(kernel[0], 0.5)
    with pytest.raises(ValueError, match="max_density"):
        pruning.PackedMask.for_density(H, 1.5)
    with pytest.raises(ValueError, match="sparsity holds no masks"):
        pruning.update_sparsity({"w": kernel}, {}, 0.5)
    with pytest.raises(ValueError, match="params"):
        pruning.update_sparsity({"w": kernel}, {"v": np.ones((H, H), bool)}, 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        pruning.to_inference({"params": {}})
    with pytest.warns(RuntimeWarning, match="rounds to none, so the mask removes every weight"):
        assert not pruning.magnitude_mask(kernel, 0.99).any()  # 1% of H = 32 per row: 0.32
    # a 0/1 float mask is refused, not skipped (keep_pruned would then protect nothing)
    with pytest.raises(TypeError, match=r"the mask at w is float32; masks are boolean"):
        pruning.param_masks({"w": kernel}, {"w": np.ones(kernel.shape, np.float32)})
    with pytest.raises(ValueError, match=r"current\['w'\] must have its kernel's shape"):
        pruning.magnitude_masks({"w": kernel}, 0.5, current={"w": np.ones((H, H // 2), bool)})


def test_public_names_do_not_clash():
    """Each public name means one thing: the package and its pruning module share none, and the
    pruning rules are not the execution methods."""
    from jax_sprnn import api

    assert not set(js.__all__) & set(pruning.__all__)
    assert all(hasattr(js, name) for name in js.__all__)
    assert all(hasattr(pruning, name) for name in pruning.__all__)
    assert not set(pruning.RULES) & set(api.METHODS)


# --- edges found by an audit of the pruning API (twenty-first session) ---------------------------

def test_a_layout_bound_update_stays_nested_when_the_kernel_is_dense_off_the_mask():
    """A dense checkpoint restored into a max_density < 1 layer (docs/flax.md): the kernel is not
    zero off the current mask, and the budgets' trim must not trade live weights for pruned ones."""
    import flax.linen as nn
    H = 8
    x = jnp.ones((1, 3, H))
    sparsity = SparseRNN(H, max_density=0.5).init(jax.random.key(0), x)["sparsity"]
    params = nn.RNN(nn.SimpleCell(H)).init(jax.random.key(7), x)["params"]
    current = np.asarray(sparsity["cell"]["h"]["kernel"].mask)
    new_params, new_sparsity = pruning.update_sparsity(params, sparsity, 0.3)
    new = np.asarray(new_sparsity["cell"]["h"]["kernel"].mask)
    assert not (new & ~current).any()
    kernel = np.asarray(new_params["cell"]["h"]["kernel"])
    assert not ((kernel != 0) & ~current).any()


def test_a_mask_that_needs_more_weights_takes_back_the_largest_pruned_ones():
    kernel = np.arange(1, 17, dtype=np.float32).reshape(4, 4)  # magnitude grows with position
    current = pruning.magnitude_mask(kernel, 0.75, rule="layer")  # the last row
    grown = pruning.magnitude_mask(kernel, 0.5, rule="layer", current=current)
    assert current[3].all() and grown[3].all()
    np.testing.assert_array_equal(np.sort(kernel[grown & ~current]), [9, 10, 11, 12])


def test_a_float64_kernel_is_ranked_in_its_own_precision():
    tiny = np.array([[1e-50, 2e-50], [3e-50, 4e-50]])
    np.testing.assert_array_equal(pruning.magnitude_mask(tiny, 0.5, rule="layer"),
                                  [[False, False], [True, True]])
    huge = np.array([[1e300, 2e300], [3e300, 4e300]])  # finite: not "infinite entries"
    assert pruning.magnitude_mask(huge, 0.75, rule="layer")[1, 1]
    with pytest.raises(TypeError, match="kernel must hold real floating-point weights"):
        pruning.magnitude_mask(tiny.astype(np.complex64), 0.5)


def test_stacked_16_bit_packing_refuses_weights_beyond_the_range():
    kernel = np.full((2, 8, 8), 1e5, np.float32)
    with pytest.raises(ValueError, match="beyond the range of float16"):
        pruning.pack_inference(kernel, np.ones(kernel.shape, bool), dtype="float16")


def test_packing_refuses_a_mask_that_is_not_boolean():
    kernel = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    for k in (kernel[0], kernel):  # one layer, and a stack (nn.scan)
        for mask in (k, np.full(k.shape, 0.1, np.float32)):
            with pytest.raises(TypeError, match="mask must be a boolean array"):
                pruning.pack_inference(k, mask)


def test_keep_pruned_refuses_masks_that_would_broadcast_or_miss_parameters():
    optax = pytest.importorskip("optax")
    params = {"w": jnp.ones((8, 8))}
    tx = pruning.keep_pruned(optax.adam(1e-2))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"mask at \['w'\] has shape \(8,\)"):
        tx.update(params, state, params, masks={"w": jnp.ones((8,), bool)})
    with pytest.raises(ValueError, match="masks must have the structure of params"):
        tx.update(params, state, params, masks={"v": jnp.ones((8, 8), bool)})
    with pytest.raises(ValueError, match="where params has no parameter"):
        pruning.masks_at_paths(params, {("W",): np.ones((8, 8), bool)})
    with pytest.raises(ValueError, match=r"has shape \(2, 8\), its parameter \(8, 8\)"):
        pruning.masks_at_paths(params, {("w",): np.ones((2, 8), bool)})


def test_a_joined_mask_is_split_at_its_kernels_widths():
    params = {"c": {"hi": {"kernel": jnp.ones((8, 8))}, "hf": {"kernel": jnp.ones((8, 16))}}}
    sparsity = {"c": {"hi+hf": {"kernel": np.ones((8, 24), bool)}}}
    new_params, _ = pruning.update_sparsity(params, sparsity, 0.5)
    assert jax.tree.map(jnp.shape, new_params) == jax.tree.map(jnp.shape, params)


def test_the_schedule_holds_its_initial_value_and_whole_steps():
    schedule = pruning.cubic_schedule(0.2, 0.9, 10, 20, 2)
    assert schedule(3) == 0.2
    for bad in (dict(begin_step=1.7), dict(frequency=0.5)):
        args = dict(initial_sparsity=0.0, final_sparsity=0.9, begin_step=1, end_step=9, frequency=1)
        with pytest.raises(ValueError, match="must be a whole number of steps"):
            pruning.cubic_schedule(**{**args, **bad})
    with pytest.raises(ValueError, match="step must be a whole number"):
        schedule.is_update_step(13.9)


def test_pruning_errors_name_what_is_wrong():
    kernel = np.random.default_rng(1).normal(size=(8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="current must be a pytree of masks with the structure"):
        pruning.magnitude_masks({"a": kernel}, 0.5, current=[np.ones((8, 8), bool)])
    with pytest.raises(TypeError, match="sparsity must be a number"):
        pruning.magnitude_mask(kernel, "0.5")
    with pytest.raises(ValueError, match="budgets must be non-negative"):
        pruning.fit_to_budgets(np.ones((8, 8), bool), np.abs(kernel), -1, 8)
    with pytest.raises(ValueError, match="scores must have the mask's shape"):
        pruning.fit_to_budgets(np.ones((8, 8), bool), np.abs(kernel[:4]), 4, 4)
    _, variables, _, _ = model_and_data(3)
    packed = pruning.to_inference(variables)
    with pytest.raises(ValueError, match="sparsity is the inference form"):
        pruning.update_sparsity(variables["params"], packed["sparsity"], 0.5)


def test_to_inference_packs_kernels_held_in_lists_and_refuses_what_it_cannot_pack():
    """Params in lists (a model's layers as a sequence) lose their packed kernels like nested dicts
    do; a plain boolean mask, or a mask leaf without a kernel's rank, is an error, not a kernel left
    dense in silence."""
    H = 12
    rng = np.random.default_rng(4)
    mask = pruning.PackedMask.for_density(H, 0.5, seed=2)
    kernels = [rng.normal(size=(H, H)).astype(np.float32) for _ in range(2)]
    bias = np.zeros(H, np.float32)
    variables = {"params": {"layers": [{"kernel": kernels[0], "bias": bias}, {"kernel": kernels[1]}]},
                 "sparsity": {"layers": [{"kernel": mask}, {"kernel": mask}]}}
    out = pruning.to_inference(variables)
    assert isinstance(out["params"]["layers"], list)
    assert [sorted(layer) for layer in out["params"]["layers"]] == [["bias"], []]
    for i, layer in enumerate(out["sparsity"]["layers"]):
        w = layer["kernel"]
        assert isinstance(w, js.SparseWeights)
        np.testing.assert_array_equal(np.asarray(w.to_dense()), np.where(mask.mask, kernels[i], 0))
    plain = {"params": {"w": kernels[0]}, "sparsity": {"w": np.asarray(mask.mask)}}
    with pytest.raises(ValueError, match=r"the masks at w are boolean arrays: pack each"):
        pruning.to_inference(plain)
    flat = {"params": {"w": kernels[0]}, "sparsity": {"w": np.ones(H, bool)}}
    with pytest.raises(ValueError, match=r"the mask at w has shape \(12,\); a mask has its kernel"):
        pruning.to_inference(flat)
    with pytest.raises(ValueError, match=r"the mask at w has shape \(12,\)"):
        pruning.update_sparsity(flat["params"], flat["sparsity"], 0.5)
    with pytest.raises(ValueError, match="cannot drop w/0: it is an item of a sequence"):
        pruning.to_inference({"params": {"w": [kernels[0]]}, "sparsity": {"w": [mask]}})


def test_inference_packing_takes_the_batch_to_plan_for():
    model, variables, x, _ = model_and_data(44, max_density=0.5)
    params, sparsity = pruning.update_sparsity(variables["params"], variables["sparsity"], 0.7)
    trained = {"params": params, "sparsity": sparsity}
    planned = pruning.to_inference(trained, batch=16)
    weights = planned["sparsity"]["cell"]["h"]["kernel"]
    assert weights.meta.reason.endswith("planned for batch 16")
    np.testing.assert_array_equal(np.asarray(model.apply(planned, x)),
                                  np.asarray(model.apply(pruning.to_inference(trained), x)))
    kernel, mask = random_kernel(45), np.asarray(sparsity["cell"]["h"]["kernel"].mask)
    assert pruning.pack_inference(kernel, mask, batch=3).meta.reason.endswith("planned for batch 3")
    stacked = pruning.pack_inference(np.stack([kernel] * 2), np.stack([mask] * 2), batch=3)
    assert stacked.meta.reason.endswith("planned for batch 3")
    assert pruning.PackedMask.for_density(H, 0.2, batch=5).meta.reason.endswith("planned for batch 5")
    with pytest.raises(ValueError, match=r"batch \(the batch to plan the layout for\)"):
        pruning.to_inference(trained, batch=0)
