"""Quickstart: a Flax model with a sparse recurrent layer, pruned gradually while it trains, then
exported in its packed form for inference.

The only change to the model is the recurrent layer: ``nn.RNN(nn.SimpleCell(H))`` becomes
``SparseRNN(H)`` (same parameters; the mask lives in the ``'sparsity'`` collection). Runs on CPU
in a few seconds: ``python examples/flax_quickstart.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_sprnn import pruning
from jax_sprnn.flax import SparseRNN

HIDDEN, FEATURES, BATCH, STEPS = 64, 8, 16, 24


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = SparseRNN(HIDDEN)(x)  # was: nn.RNN(nn.SimpleCell(HIDDEN))(x)
        return nn.Dense(1)(h)


def batch(rng):
    """A toy task: the running mean of the first input feature."""
    x = rng.standard_normal((BATCH, STEPS, FEATURES)).astype(np.float32)
    y = np.cumsum(x[..., :1], axis=1) / np.arange(1, STEPS + 1)[None, :, None]
    return jnp.asarray(x), jnp.asarray(y)


def main():
    rng = np.random.default_rng(0)
    model = Model()
    variables = model.init(jax.random.key(0), batch(rng)[0])
    params, sparsity = variables["params"], variables["sparsity"]

    # keep_pruned: pruned weights stay exactly zero, also through Adam's momentum.
    tx = pruning.keep_pruned(optax.adam(3e-3))
    opt_state = tx.init(params)

    @jax.jit  # compiled once: a new mask is new data, not a new program
    def train_step(params, sparsity, opt_state, x, y):
        def loss_fn(p):
            return jnp.mean((model.apply({"params": p, "sparsity": sparsity}, x) - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        masks = pruning.param_masks(params, sparsity)
        updates, opt_state = tx.update(grads, opt_state, params, masks=masks)
        return optax.apply_updates(params, updates), opt_state, loss

    # Zhu & Gupta's gradual schedule: dense until step 40, 90% sparse from step 160.
    schedule = pruning.cubic_schedule(0.0, 0.9, begin_step=40, end_step=160, frequency=20)
    for step in range(200):
        if schedule.is_update_step(step):
            params, sparsity = pruning.update_sparsity(params, sparsity, schedule(step))
        params, opt_state, loss = train_step(params, sparsity, opt_state, *batch(rng))
        if step % 40 == 0 or step == 199:
            print(f"step {step:3d}  sparsity {schedule(step):.2f}  loss {float(loss):.4f}")

    # One call: the packed inference form. model.apply runs it directly.
    trained = {"params": params, "sparsity": sparsity}
    inference = pruning.to_inference(trained)
    weights = inference["sparsity"]["SparseRNN_0"]["cell"]["h"]["kernel"]  # a jax_sprnn.SparseWeights
    print(weights)

    x, _ = batch(rng)
    served = jax.jit(model.apply)(inference, x)
    np.testing.assert_allclose(served, model.apply(trained, x), rtol=1e-5, atol=1e-6)
    assert abs(weights.density - 0.1) < 0.02
    print("inference output", served.shape, "matches the trained model")


if __name__ == "__main__":
    main()
