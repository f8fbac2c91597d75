"""Data parallelism on 4 forced CPU devices: sharded results equal unsharded ones, every device
runs the recurrence on its own shard, and the compiled HLO gathers no activations.

XLA's device count is fixed when jax initializes, so the checks run in a fresh interpreter with
``--xla_force_host_platform_device_count=4`` and report back as JSON.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jax_sprnn as js
from jax_sprnn import sharding

WORKER = r"""
import json
import jax, jax.numpy as jnp, numpy as np
import jax_sprnn as js
from jax_sprnn import sharding
from jax_sprnn.flax import SparseRNN

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

def hlo(fn, *args):
    return fn.lower(*args).compile().as_text()

assert js._native.has_cpu_kernels(), f"imported {js.__file__} without its compiled module"
out = {"devices": len(jax.devices())}
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(2024)
H, B, T = 32, 8, 6
kernel = (rng.standard_normal((H, H)) * 0.3).astype(np.float32)
w = js.SparseWeights.from_dense(kernel, density=0.3)
x = jnp.asarray(rng.standard_normal((B, T, H)).astype(np.float32))
h0 = jnp.asarray(rng.standard_normal((B, H)).astype(np.float32) * 0.5)
lengths = jnp.asarray(rng.integers(0, T + 1, size=B))
xs = jax.device_put(x, sharding.batch_sharding(mesh, "data", ndim=3))
hs = jax.device_put(h0, sharding.batch_sharding(mesh, "data", ndim=2))
ls = jax.device_put(lengths, sharding.batch_sharding(mesh, "data", ndim=1))

fwd = jax.jit(lambda x, h, l, w: sharding.sparse_rnn_sharded(
    x, h, w, mesh=mesh, seq_lengths=l, reverse=True))
y, h_final = fwd(xs, hs, ls, w)
y_ref, h_ref = js.sparse_rnn(x, h0, w, seq_lengths=lengths, reverse=True)
out["forward_err"] = max(rel(y, y_ref), rel(h_final, h_ref))
out["output_spec"] = str(y.sharding.spec)
text = hlo(fwd, xs, hs, ls, w)
out["forward_all_gathers"] = text.count("all-gather")
calls = [l for l in text.splitlines() if "jax_sprnn_forward" in l and "custom-call" in l]
out["forward_calls"] = len(calls)
out["local_shape_in_call"] = all(f"f32[{T},{B // 4},{H}]" in l for l in calls)

plain = jax.jit(lambda x, h, w: js.sparse_rnn(x, h, w))
out["plain_all_gathers"] = hlo(plain, xs, hs, w).count("all-gather")

def loss(values, x, h):
    y, _ = sharding.sparse_rnn_sharded(x, h, w.replace(values=values), mesh=mesh)
    return jnp.sum(jnp.tanh(y) ** 2)
grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
g_values, g_x = grad(w.values, xs, hs)
ref = jax.grad(lambda v, x: jnp.sum(jnp.tanh(js.sparse_rnn(x, h0, w.replace(values=v))[0]) ** 2),
               argnums=(0, 1))(w.values, x)
out["grad_err"] = max(rel(g_values, ref[0]), rel(g_x, ref[1]))
out["grad_all_gathers"] = hlo(grad, w.values, xs, hs).count("all-gather")

model = SparseRNN(H, max_density=0.5, mesh=mesh)
inputs = jnp.asarray(rng.standard_normal((B, T, 5)).astype(np.float32))
variables = model.init(jax.random.key(0), inputs)
inputs_s = jax.device_put(inputs, sharding.batch_sharding(mesh, "data", ndim=3))
apply = jax.jit(model.apply)
out["module_err"] = rel(apply(variables, inputs_s), SparseRNN(H, max_density=0.5).apply(variables, inputs))
out["module_all_gathers"] = hlo(apply, variables, inputs_s).count("all-gather")
train = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({**variables, "params": p}, x) ** 2)))
out["module_grad_all_gathers"] = hlo(train, variables["params"], inputs_s).count("all-gather")

try:
    sharding.sparse_rnn_sharded(x[:6], h0[:6], w, mesh=mesh)
    out["indivisible"] = "no error"
except ValueError as e:
    out["indivisible"] = str(e)
print("RESULTS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(js.__file__)))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # cwd: `python -c` puts the working directory first on sys.path; from the repository root that
    # would import the uninstalled source tree, without its compiled module.
    proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True,
                          timeout=300, cwd=package_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_four_devices(results):
    assert results["devices"] == 4


def test_sharded_results_equal_unsharded(results):
    assert results["forward_err"] < 1e-6
    assert results["grad_err"] < 1e-5
    assert results["module_err"] < 1e-6
    assert "data" in results["output_spec"]


def test_each_device_runs_its_own_shard(results):
    assert results["forward_calls"] >= 1
    assert results["local_shape_in_call"], "the custom call should see B / 4 examples"


def test_no_all_gather_of_activations(results):
    # Control: without shard_map XLA gathers the batch to run the custom call replicated.
    assert results["plain_all_gathers"] > 0
    assert results["forward_all_gathers"] == 0
    assert results["grad_all_gathers"] == 0
    assert results["module_all_gathers"] == 0
    assert results["module_grad_all_gathers"] == 0


def test_indivisible_batch_is_a_clear_error(results):
    assert "divisible" in results["indivisible"]


def test_bad_mesh_arguments():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    kernel = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    w = js.SparseWeights.from_dense(kernel, density=0.5)
    x, h0 = np.zeros((2, 3, 8), np.float32), np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="batch_axis"):
        sharding.sparse_rnn_sharded(x, h0, w, mesh=mesh, batch_axis="model")
    with pytest.raises(TypeError, match="mesh"):
        sharding.sparse_rnn_sharded(x, h0, w, mesh="data")
    with pytest.raises(ValueError, match="seq_lengths"):
        sharding.sparse_rnn_sharded(x, h0, w, mesh=mesh, seq_lengths=np.array([4, 1]))
    y, _ = sharding.sparse_rnn_sharded(x, h0, w, mesh=mesh)  # one device: still correct
    np.testing.assert_array_equal(np.asarray(y), np.asarray(js.sparse_rnn(x, h0, w)[0]))
