"""Batch-sharded sparse_rnn over every visible GPU under plain jax.jit (tools/gpu_check.sh multi):
the sharded result equals one device's run on each shard, each device's custom call sees its own
batch shard, the forward program has no collective, and the gradient's has one all-reduce (the
weight gradient's)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jax_sprnn as js
from jax_sprnn.dispatch import FORWARD
from jax_sprnn.sharding import batch_sharding

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
                        r"(-start)?\(")


def collectives(text):
    return sorted(m.group(1) for m in COLLECTIVE.finditer(text))


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

run = jax.jit(lambda x, h0: js.sparse_rnn(x, h0, w, method="native"))
# One device, one shard at a time: the arithmetic each device does.
shards = [run(x[i:i + B // n], h0[i:i + B // n]) for i in range(0, B, B // n)]
y1, h1 = (jnp.concatenate(parts) for parts in zip(*shards))
xs = jax.device_put(x, batch_sharding(mesh))
hs = jax.device_put(h0, batch_sharding(mesh, ndim=2))
y2, h2 = run(xs, hs)
np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
hlo = run.lower(xs, hs).compile().as_text()
assert not collectives(hlo), f"the forward program has collectives: {collectives(hlo)}"
calls = re.findall(f"custom_call_target=\"{FORWARD}\"", hlo)
shapes = re.findall(r"f16\[(\d+),(\d+),(\d+)\][^\n]*custom-call", hlo)
assert shapes and all(int(b) == B // n for _, b, _ in shapes), shapes
print("sharded == one device per shard: True; collectives in the forward HLO: none; custom calls:",
      len(calls), "; per-device x shard shape [T, B/n, H]:", sorted(set(shapes)))
print("output sharding:", y2.sharding)


def loss(values, x, h):
    y, _ = js.sparse_rnn(x, h, w.replace(values=values), method="native")
    return jnp.sum(y.astype(jnp.float32) ** 2)


grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
g_values, g_x = grad(w.values, xs, hs)
# Against one device per shard: dx is the same arithmetic; the weight gradient is the shards' sum
# (float32 partial sums added in another order, then rounded to float16 once).
parts = [grad(w.values, x[i:i + B // n], h0[i:i + B // n]) for i in range(0, B, B // n)]
np.testing.assert_array_equal(np.asarray(g_x), np.asarray(jnp.concatenate([p[1] for p in parts])))
want = sum(p[0].astype(jnp.float32) for p in parts)
err = float(jnp.linalg.norm(g_values.astype(jnp.float32) - want) / jnp.linalg.norm(want))
assert err < 1e-2, err
found = collectives(grad.lower(w.values, xs, hs).compile().as_text())
assert found == ["all-reduce"], f"the gradient's collectives: {found}"
print("gradient: one all-reduce; dx == one device per shard: True; weight gradient vs the sum of "
      "the shards' (relative):", err, "; dx sharding:", g_x.sharding)
