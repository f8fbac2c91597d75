"""Data parallelism on forced CPU devices with plain ``jax.jit``: a batch-sharded input runs the
recurrence on every device's own shard, with no collective in the forward pass and one all-reduce
(the weight gradient's) in the backward pass, and the results equal one device's.

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
import json, re
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax_sprnn as js
import jax_sprnn.export
from jax_sprnn import sharding
from jax_sprnn.dispatch import BACKWARD, FORWARD, GATED_BACKWARD, GATED_FORWARD
from jax_sprnn.flax import SparseRNN

# The C++ kernel, whatever auto would pick for these small layers: its partitioning is tested.
native = dict(method="native")

COLLECTIVE = re.compile(r"= (\(.*?\)|\S+) (all-gather|all-reduce|all-to-all|collective-permute|"
                        r"reduce-scatter)(-start)?\(")
CALL = re.compile(r'= \(?(\w+\[[\d,]*\]).* custom-call\(.*custom_call_target="([\w]+)"')

def compiled(fn, *args):
    return fn.lower(*args).compile().as_text()

def collectives(text):
    found = {}  # kind -> the shapes it moves
    for m in COLLECTIVE.finditer(text):
        found.setdefault(m.group(2), []).append(re.sub(r"\{[\d,]*\}", "", m.group(1)))
    return found

def call_shapes(text, target):
    # The first result of each custom call of `target`: the per-device [T, B, H].
    return [m.group(1) for m in CALL.finditer(text) if m.group(2) == target]

def batch_entry(a, dim=0):
    # The mesh axes that split dimension `dim` of `a` (a name, a list of names, or None).
    spec = tuple(a.sharding.spec) + (None,) * a.ndim
    return spec[dim]

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

assert js._native.has_cpu_kernels(), f"imported {js.__file__} without its compiled module"
out = {"devices": len(jax.devices())}
devices = np.array(jax.devices())
mesh4 = Mesh(devices, ("data",))
mesh2 = Mesh(devices[:2], ("data",))
mesh2x2 = Mesh(devices.reshape(2, 2), ("replica", "data"))
rng = np.random.default_rng(2024)
H, B, T = 32, 8, 6
kernel = (rng.standard_normal((H, H)) * 0.3).astype(np.float32)
w = js.SparseWeights.from_dense(kernel, density=0.3)
x = jnp.asarray(rng.standard_normal((B, T, H)).astype(np.float32))
h0 = jnp.asarray(rng.standard_normal((B, H)).astype(np.float32) * 0.5)
lengths = jnp.asarray(rng.integers(0, T + 1, size=B))
put = lambda a, mesh, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
one_device = jax.jit(lambda x, h, l: js.sparse_rnn(x, h, w, seq_lengths=l, reverse=True, **native))

def per_shard(n):
    # One device, one batch shard at a time: the arithmetic each device of an n-way split does.
    step = B // n
    parts = [one_device(x[i:i + step], h0[i:i + step], lengths[i:i + step])
             for i in range(0, B, step)]
    return [jnp.concatenate(p) for p in zip(*parts)]

# Forward, plain jit: x, h0, lengths batch-sharded over 4, 2 and 2x2 devices.
fwd = jax.jit(lambda x, h, l: js.sparse_rnn(x, h, w, seq_lengths=l, reverse=True, **native))
full = one_device(x, h0, lengths)
for name, mesh, entry in (("mesh4", mesh4, "data"), ("mesh2", mesh2, "data"),
                          ("mesh2x2", mesh2x2, ("replica", "data"))):
    args = (put(x, mesh, entry), put(h0, mesh, entry), put(lengths, mesh, entry))
    y, h_final = fwd(*args)
    text = compiled(fwd, *args)
    shards = per_shard(mesh.devices.size)
    out[name] = dict(
        collectives=collectives(text), calls=call_shapes(text, FORWARD),
        spec=batch_entry(y), h_spec=batch_entry(h_final),
        bitwise=bool(np.array_equal(y, shards[0]) and np.array_equal(h_final, shards[1])),
        err=max(rel(y, full[0]), rel(h_final, full[1])))

# h0 and lengths left unsharded: the partitioner slices them on each device, still no collective.
plain = jax.jit(lambda x, h: js.sparse_rnn(x, h, w, **native))
xs = put(x, mesh4, "data")
y, _ = plain(xs, h0)
out["unsharded_h0"] = dict(collectives=collectives(compiled(plain, xs, h0)),
                           err=rel(y, js.sparse_rnn(x, h0, w, **native)[0]))

# The steps or the hidden units sharded: gathered (the control: the counter sees collectives),
# each device runs the whole problem, and the answer is one device's.
for name, spec in (("t_sharded", (None, "data")), ("h_sharded", (None, None, "data"))):
    xs = put(x, mesh2, *spec)
    y, h_final = plain(xs, h0)
    text = compiled(plain, xs, h0)
    ref = jax.jit(lambda x, h: js.sparse_rnn(x, h, w, **native))(x, h0)
    out[name] = dict(collectives=collectives(text), calls=call_shapes(text, FORWARD),
                     bitwise=bool(np.array_equal(y, ref[0]) and np.array_equal(h_final, ref[1])))

# A batch of 6 constrained to 4 devices: XLA pads the shards (jax 0.10) or splits the axis into
# 2-device sub-axes (0.11, which no PartitionSpec names); either way the call runs whole, not on
# padded shards. The result is replicated: jax 0.11 cannot name a sub-axis output sharding.
uneven = jax.jit(lambda x, h: jax.lax.with_sharding_constraint(js.sparse_rnn(
    jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh4, P("data"))), h, w, **native)[0],
    NamedSharding(mesh4, P())))
text = compiled(uneven, x[:6], h0[:6])
out["uneven"] = dict(calls=call_shapes(text, FORWARD),
                     bitwise=bool(np.array_equal(
                         uneven(x[:6], h0[:6]),
                         jax.jit(lambda x, h: js.sparse_rnn(x * 2, h, w, **native)[0])(x[:6], h0[:6]))))

# Gradient: one all-reduce, of the weight gradient; dx stays batch-sharded.
def loss(values, x, h):
    y, h_final = js.sparse_rnn(x, h, w.replace(values=values), reverse=True, **native)
    return jnp.sum(jnp.tanh(y) ** 2) + jnp.sum(h_final ** 2)
grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
args = (w.values, put(x, mesh4, "data"), put(h0, mesh4, "data"))
g = grad(*args)
ref = jax.grad(loss, argnums=(0, 1, 2))(w.values, x, h0)
text = compiled(grad, *args)
out["grad"] = dict(collectives=collectives(text), slots=int(w.values.shape[0]),
                   calls=call_shapes(text, BACKWARD),
                   dx_spec=batch_entry(g[1]), dvalues_spec=batch_entry(g[0]),
                   err=max(rel(a, b) for a, b in zip(g, ref)))

# The gated cells' training: the forward recurrence (the LSTM's with its cell states) and the
# backward one run on each device's batch shard; only the parameter gradients are summed.
for cell, G in (("lstm", 4), ("gru", 3)):
    wg = js.SparseWeights.from_dense((rng.standard_normal((H, G * H)) * 0.2).astype(np.float32),
                                     density=0.3)
    xg = jnp.asarray(rng.standard_normal((B, T, G * H)).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(H).astype(np.float32) * 0.1)

    def gated_loss(values, bias, x, h, cell=cell, wg=wg):
        if cell == "lstm":
            y, (_, h_final) = js.sparse_lstm(x, (h, h), wg.replace(values=values), seq_lengths=lengths,
                                             **native)
        else:
            y, h_final = js.sparse_gru(x, h, wg.replace(values=values), hn_bias=bias,
                                       seq_lengths=lengths, **native)
        return jnp.sum(y ** 2) + jnp.sum(h_final ** 2)
    argnums = (0, 2, 3) if cell == "lstm" else (0, 1, 2, 3)  # (the LSTM has no hn_bias)
    gated_grad = jax.jit(jax.grad(gated_loss, argnums=argnums))
    args = (wg.values, bias, put(xg, mesh4, "data"), put(h0, mesh4, "data"))
    g = gated_grad(*args)
    ref = jax.grad(gated_loss, argnums=argnums)(wg.values, bias, xg, h0)
    text = compiled(gated_grad, *args)
    out["gated_grad_" + cell] = dict(
        collectives=collectives(text), width=G * H,
        calls=call_shapes(text, GATED_BACKWARD), forward_calls=call_shapes(text, GATED_FORWARD),
        dx_spec=batch_entry(g[-2]), err=max(rel(a, b) for a, b in zip(g, ref)))

# Per-example gradients (vmap over the sharded batch): each device's examples are its own groups.
per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
args = (w.values, put(x[:, None], mesh4, "data"), put(h0[:, None], mesh4, "data"))
g = per_example(*args)
ref = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(w.values, x[:, None], h0[:, None])
out["per_example"] = dict(collectives=collectives(compiled(per_example, *args)), err=rel(g, ref),
                          spec=batch_entry(g))

# The GSPMD partitioner (Shardy off) takes the same callbacks.
jax.config.update("jax_use_shardy_partitioner", False)
gspmd_fwd = jax.jit(lambda x, h: js.sparse_rnn(x, h, w, **native))
gspmd_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
xs, hs = put(x, mesh4, "data"), put(h0, mesh4, "data")
out["gspmd"] = dict(fwd=collectives(compiled(gspmd_fwd, xs, hs)),
                    grad=collectives(compiled(gspmd_grad, w.values, xs, hs)),
                    err=rel(gspmd_fwd(xs, hs)[0], js.sparse_rnn(x, h0, w, **native)[0]))
jax.config.update("jax_use_shardy_partitioner", True)

# Flax: both directions of nn.Bidirectional under plain jit.
model = nn.Bidirectional(SparseRNN(H, max_density=0.5, **native), SparseRNN(H, max_density=0.5, **native))
inputs = jnp.asarray(rng.standard_normal((B, T, 5)).astype(np.float32))
variables = model.init(jax.random.key(0), inputs)
inputs_s = put(inputs, mesh4, "data")
apply = jax.jit(model.apply)
train = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({**variables, "params": p}, x) ** 2)))
out["flax"] = dict(err=rel(apply(variables, inputs_s), model.apply(variables, inputs)),
                   collectives=collectives(compiled(apply, variables, inputs_s)),
                   grad=collectives(compiled(train, variables["params"], inputs_s)),
                   calls=call_shapes(compiled(apply, variables, inputs_s), FORWARD))

# SparseRNN(mesh=...): the module constrains unsharded inputs to the batch sharding.
single = SparseRNN(H, max_density=0.5, **native)
single_vars = single.init(jax.random.key(1), inputs)
meshed = jax.jit(SparseRNN(H, max_density=0.5, mesh=mesh4, **native).apply)
out["flax_mesh"] = dict(err=rel(meshed(single_vars, inputs), single.apply(single_vars, inputs)),
                        calls=call_shapes(compiled(meshed, single_vars, inputs), FORWARD))

# The wrapper: constrains replicated inputs to the batch sharding.
wrapped = jax.jit(lambda x, h: sharding.sparse_rnn_sharded(x, h, w, mesh=mesh4, **native))
y, _ = wrapped(x, h0)
text = compiled(wrapped, x, h0)
out["wrapper"] = dict(collectives=collectives(text), calls=call_shapes(text, FORWARD),
                      err=rel(y, js.sparse_rnn(x, h0, w, **native)[0]), spec=batch_entry(y))
try:
    sharding.sparse_rnn_sharded(x[:6], h0[:6], w, mesh=mesh4)
    out["indivisible"] = "no error"
except ValueError as e:
    out["indivisible"] = str(e)

# jax.export of a 4-device program: the exported module holds no process-local partitioning
# callback (the deserialized program gathers the batch instead), and it computes the same.
bs = NamedSharding(mesh4, P("data"))
exportable = jax.jit(lambda x, h: js.sparse_rnn(x, h, w, **native), in_shardings=(bs, bs))
exported = jax.export.export(exportable, disabled_checks=jax_sprnn.export.disabled_checks())(
    x, h0)
out["export"] = dict(partitioning_call="CustomSPMDPartitioning" in exported.mlir_module(),
                     err=rel(exported.call(put(x, mesh4, "data"), put(h0, mesh4, "data"))[0],
                             js.sparse_rnn(x, h0, w, **native)[0]))
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
                          timeout=600, cwd=package_root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_four_devices(results):
    assert results["devices"] == 4


@pytest.mark.parametrize("name,devices", [("mesh4", 4), ("mesh2", 2), ("mesh2x2", 4)])
def test_plain_jit_forward_runs_each_shard_without_collectives(results, name, devices):
    r = results[name]
    assert r["collectives"] == {}
    assert r["calls"] and all(s == f"f32[6,{8 // devices},32]" for s in r["calls"]), r["calls"]
    want = ["replica", "data"] if name == "mesh2x2" else "data"
    assert r["spec"] == r["h_spec"] == want
    # Each device computes what one device computes on that shard, bit for bit.
    assert r["bitwise"]
    assert r["err"] < 1e-6


def test_unsharded_h0_is_sliced_not_gathered(results):
    assert results["unsharded_h0"]["collectives"] == {}
    assert results["unsharded_h0"]["err"] < 1e-6


@pytest.mark.parametrize("name", ["t_sharded", "h_sharded"])
def test_steps_or_hidden_sharded_are_gathered_and_correct(results, name):
    r = results[name]
    assert "all-gather" in r["collectives"]
    assert r["calls"] and all(s == "f32[6,8,32]" for s in r["calls"]), r["calls"]
    assert r["bitwise"]


def test_uneven_batch_runs_whole_not_on_padded_shards(results):
    assert results["uneven"]["calls"] == ["f32[6,6,32]"]
    assert results["uneven"]["bitwise"]


def test_gradient_has_one_all_reduce_of_the_weight_gradient(results):
    r = results["grad"]
    assert r["collectives"] == {"all-reduce": [f"f32[1,{r['slots']}]"]}
    assert r["calls"] and all(s == "f32[6,2,32]" for s in r["calls"]), r["calls"]
    assert r["dx_spec"] == "data" and r["dvalues_spec"] is None
    assert r["err"] < 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_training_runs_each_shard_and_sums_only_parameter_gradients(results, cell):
    r = results["gated_grad_" + cell]
    assert set(r["collectives"]) == {"all-reduce"}, r["collectives"]
    assert r["calls"] and all(s == f"f32[6,2,{r['width']}]" for s in r["calls"]), r["calls"]
    assert r["forward_calls"] and all(s == "f32[6,2,32]" for s in r["forward_calls"]), r["forward_calls"]
    assert r["dx_spec"] == "data"
    assert r["err"] < 1e-5


def test_per_example_gradients_need_no_collective(results):
    assert results["per_example"]["collectives"] == {}
    assert results["per_example"]["spec"] == "data"
    assert results["per_example"]["err"] < 1e-5


def test_gspmd_partitioner_too(results):
    r = results["gspmd"]
    assert r["fwd"] == {}
    assert list(r["grad"]) == ["all-reduce"] and len(r["grad"]["all-reduce"]) == 1
    assert r["err"] < 1e-6


def test_flax_bidirectional_under_plain_jit(results):
    r = results["flax"]
    assert r["err"] < 1e-6
    assert r["collectives"] == {}
    assert len(r["calls"]) == 2 and all(s == "f32[6,2,32]" for s in r["calls"]), r["calls"]
    # Training: only parameter gradients are summed; no activation is gathered.
    assert set(r["grad"]) == {"all-reduce"}


def test_flax_mesh_attribute_splits_unsharded_inputs(results):
    assert results["flax_mesh"]["err"] < 1e-6
    assert results["flax_mesh"]["calls"] == ["f32[6,2,32]"]


def test_wrapper_splits_replicated_inputs(results):
    r = results["wrapper"]
    assert "all-gather" not in r["collectives"]
    assert r["calls"] and all(s == "f32[6,2,32]" for s in r["calls"]), r["calls"]
    assert r["spec"] == "data"
    assert r["err"] < 1e-6


def test_indivisible_batch_is_a_clear_error(results):
    assert "divisible" in results["indivisible"]


def test_export_of_a_mesh_program(results):
    assert not results["export"]["partitioning_call"]
    assert results["export"]["err"] < 1e-6


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
    with pytest.raises(ValueError, match=r"batch_dim must lie in \[0, ndim=2\)"):
        sharding.batch_sharding(mesh, ndim=2, batch_dim=3)
    y, _ = sharding.sparse_rnn_sharded(x, h0, w, mesh=mesh)  # one device: still correct
    np.testing.assert_array_equal(np.asarray(y), np.asarray(js.sparse_rnn(x, h0, w)[0]))
