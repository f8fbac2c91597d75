"""Pruning while training, as the tests of the NNX layers do it: Adam kept pruned
(``pruning.keep_pruned``), one ``nnx.jit`` step on a mean squared error, the model's masks pruned
in place every other step. Imported by those tests after their ``importorskip`` of flax."""

import jax.numpy as jnp
import optax
from flax import nnx

from jax_sprnn import nnx as jnnx
from jax_sprnn import pruning


def train_while_pruning(model, x, target, sparsities, after_step=None) -> int:
    """Run one training step per entry of ``sparsities``, pruning ``model`` to it first at every
    other step; ``after_step(step, sparsity)`` checks the model after each. Returns how many times
    the step was traced (a new mask must not retrace it: 1)."""
    optimizer = nnx.Optimizer(model, pruning.keep_pruned(optax.adam(1e-2)), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def train_step(model, optimizer):
        traces.append(1)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads, masks=jnnx.param_masks(model))
        return loss

    for step, sparsity in enumerate(sparsities):
        if step % 2 == 0:
            jnnx.prune(model, sparsity)
        train_step(model, optimizer)
        if after_step is not None:
            after_step(step, sparsity)
    return len(traces)
