"""Batch-sharded sparse_rnn over every visible GPU (tools/gpu_check.sh multi): the sharded result
equals the single-device one, each device's custom call sees its own batch shard, and the compiled
program gathers no activations."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jax_sprnn as js
from jax_sprnn.sharding import batch_sharding, sparse_rnn_sharded

devices = jax.devices()
n = len(devices)
print("devices:", devices)
assert n >= 2, "needs at least two GPUs"
mesh = Mesh(np.array(devices), ("data",))
rng = np.random.default_rng(0)
H, B, T = 1152, 4 * n, 64
kernel = (rng.standard_normal((H, H)) / np.sqrt(0.1 * H)).astype(np.float32)
w = js.SparseWeights.from_dense(kernel, density=0.1, dtype=jnp.float16)
x = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float16)
h0 = jnp.zeros((B, H), jnp.float16)

single = jax.jit(lambda x, h0: js.sparse_rnn(x, h0, w, method="native"))
y1, h1 = single(x, h0)
xs = jax.device_put(x, batch_sharding(mesh))
hs = jax.device_put(h0, batch_sharding(mesh, ndim=2))
sharded = jax.jit(lambda x, h0: sparse_rnn_sharded(x, h0, w, mesh=mesh, method="native"))
y2, h2 = sharded(xs, hs)
np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
hlo = sharded.lower(xs, hs).compile().as_text()
calls = re.findall(r"custom_call_target=\"jax_sprnn_forward\"", hlo)
assert "all-gather" not in hlo, "the compiled program gathers activations"
shapes = re.findall(r"f16\[(\d+),(\d+),(\d+)\][^\n]*custom-call", hlo)
print("sharded == single device: True; all-gather in HLO: False; custom calls:", len(calls),
      "; per-device x shard shape [T, B/n, H]:", sorted(set(shapes)))
print("output sharding:", y2.sharding)
