"""jax.export: a jitted model that uses the op serializes, and runs in a fresh process."""

import importlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
import jax_sprnn.export

from jax_sprnn._native import TARGETS
from jax_sprnn.testing import make_problem, rel_err

pytest.importorskip("flatbuffers")


def test_export_round_trip_in_a_fresh_process(tmp_path, exact_matmuls):
    dense, w, x, h0 = make_problem(0, 40, 3, 7, 0.2)

    @jax.jit
    def model(x, h0, values):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), method="native")
        return jnp.tanh(y).sum(axis=-1), h

    with pytest.raises(ValueError, match="custom calls"):  # without the opt-in, export refuses
        jax.export.export(model)(x, h0, w.values)
    exported = jax.export.export(model, disabled_checks=jax_sprnn.export.disabled_checks())(
        x, h0, w.values)
    assert "jax_sprnn_forward" in exported.mlir_module()
    (tmp_path / "model.bin").write_bytes(exported.serialize())
    np.save(tmp_path / "x.npy", np.asarray(x))
    np.save(tmp_path / "h0.npy", np.asarray(h0))
    np.save(tmp_path / "values.npy", np.asarray(w.values))
    script = textwrap.dedent(f"""
        import jax, numpy as np
        import jax_sprnn  # registers the FFI targets the program calls
        d = {str(tmp_path)!r}
        exp = jax.export.deserialize(bytearray(open(d + "/model.bin", "rb").read()))
        s, h = exp.call(np.load(d + "/x.npy"), np.load(d + "/h0.npy"), np.load(d + "/values.npy"))
        np.save(d + "/s.npy", np.asarray(s)); np.save(d + "/h.npy", np.asarray(h))
    """)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # the parent holds the GPU
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(tmp_path),
                   timeout=300)
    want_s, want_h = model(x, h0, w.values)
    # The same kernel; the surrounding XLA ops are compiled anew, so allow reduction-order rounding.
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), np.asarray(want_s), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "h.npy"), np.asarray(want_h), rtol=1e-5, atol=1e-6)
    y_ref, _ = js.reference_rnn(x, h0, dense)
    assert rel_err(np.load(tmp_path / "s.npy"), jnp.tanh(y_ref).sum(axis=-1)) < 1e-5


def run_fresh(script: str, cwd) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python process (no jax_sprnn imported unless it does so)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # the parent holds the GPU
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=300)


def test_js_export_is_reachable_from_the_package(tmp_path):
    # `import jax_sprnn as js; js.export` raised AttributeError when the submodule was not imported.
    done = run_fresh("""
        import jax_sprnn as js
        assert callable(js.export.export) and callable(js.export.serialize)
        from jax_sprnn import _constants
        assert len(js.export.disabled_checks()) == len(_constants.PRODUCTION_TARGET_KINDS)
    """, tmp_path)
    assert done.returncode == 0, done.stderr


def test_export_wrapper_allows_only_our_targets_and_round_trips_sparse_weights(tmp_path):
    dense, w, x, h0 = make_problem(1, 40, 2, 6, 0.25)
    model = lambda x, h0, w: js.sparse_rnn(x, h0, w)  # not jitted: the wrapper jits it
    exported = js.export.export(model)(x, h0, w)  # SparseWeights as an argument
    assert set(exported.disabled_safety_checks) == set(js.export.disabled_checks())
    allowed = {c.is_custom_call() for c in exported.disabled_safety_checks}
    # forward, backward, weight gradient, the gated cells' forward and (CPU) backward
    assert allowed == set(TARGETS) and len(allowed) == 5
    assert all(name.startswith("jax_sprnn_") for name in allowed)
    blob = js.export.serialize(exported)
    (tmp_path / "model.bin").write_bytes(blob)
    for name, a in (("x", x), ("h0", h0), ("dense", dense)):
        np.save(tmp_path / f"{name}.npy", np.asarray(a))
    # Another process: deserializing a SparseWeights argument needs only `import jax_sprnn`.
    done = run_fresh("""
        import numpy as np, jax_sprnn as js
        exp = js.export.deserialize(open("model.bin", "rb").read())
        w = js.SparseWeights.from_dense(np.load("dense.npy"), np.load("dense.npy") != 0)
        y, h = exp.call(np.load("x.npy"), np.load("h0.npy"), w)
        np.save("y.npy", np.asarray(y))
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    want, _ = js.sparse_rnn(x, h0, w)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(want))


def test_loading_without_importing_jax_sprnn_names_the_target(tmp_path):
    _, w, x, h0 = make_problem(2, 24, 2, 4, 0.3)
    exported = js.export.export(lambda x, h0: js.sparse_rnn(x, h0, w, method="native"))(x, h0)
    (tmp_path / "model.bin").write_bytes(js.export.serialize(exported))
    done = run_fresh("""
        import jax, numpy as np
        exp = jax.export.deserialize(bytearray(open("model.bin", "rb").read()))
        exp.call(np.zeros((2, 4, 24), np.float32), np.zeros((2, 24), np.float32))
    """, tmp_path)
    assert done.returncode != 0
    assert "jax_sprnn_forward" in done.stderr  # the hint docs/export.md points to


def test_serialize_without_flatbuffers_names_the_extra(monkeypatch):
    exported = js.export.export(lambda x: x * 2)(jnp.ones(3))
    monkeypatch.setitem(sys.modules, "flatbuffers", None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'jax_sprnn\[export\]'"):
        js.export.serialize(exported)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'jax_sprnn\[export\]'"):
        js.export.deserialize(b"")


def test_reloading_export_keeps_its_registrations():
    # jax.export refuses a second registration of a name; a reload must not make the import fail.
    importlib.reload(jax_sprnn.export)
    dense, w, x, h0 = make_problem(3, 16, 1, 2, 0.5)
    exported = js.export.export(lambda x, h0, w: js.sparse_rnn(x, h0, w))(x, h0, w)
    assert js.export.deserialize(js.export.serialize(exported)).in_tree == exported.in_tree


def test_a_program_serialized_with_its_vjp_is_differentiable_after_loading():
    dense, w, x, h0 = make_problem(2, 24, 2, 5, 0.3)
    loss = lambda x, h0, w: jnp.sum(js.sparse_rnn(x, h0, w)[0] ** 2)  # noqa: E731
    exported = js.export.export(loss)(x, h0, w)
    loaded = js.export.deserialize(js.export.serialize(exported, vjp_order=1))
    got = jax.grad(loaded.call, argnums=(0, 1))(x, h0, w)
    want = jax.grad(loss, argnums=(0, 1))(x, h0, w)
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-6
    with pytest.raises(ValueError, match="vjp_order must be a non-negative integer"):
        js.export.serialize(exported, vjp_order=-1)


# ---- symbolic shapes (jax.export shape polymorphism) -------------------------------------------

def _layer(cell, method):
    """``(f, gates)``: one layer's call ``f(x, h0, lengths) -> (y, h_T)`` on fixed weights."""
    from jax_sprnn.testing import make_gated_problem
    if cell == "simple":
        _, w, _, _ = make_problem(4, 9, 1, 1, 0.4)
        return (lambda x, h0, n: js.sparse_rnn(x, h0, w, seq_lengths=n, method=method)), 1
    gates = {"lstm": 4, "gru": 3}[cell]
    w, *_ = make_gated_problem(4, gates, 9, 1, 1, 0.4)
    if cell == "lstm":
        return (lambda x, h0, n: js.sparse_lstm(x, (h0, h0), w, seq_lengths=n, method=method)), 4
    return (lambda x, h0, n: js.sparse_gru(x, h0, w, seq_lengths=n, reverse=True, method=method)), 3


@pytest.mark.parametrize("method", ["auto", "native"])
@pytest.mark.parametrize("cell", ["simple", "lstm", "gru"])
def test_a_program_exported_with_a_symbolic_batch_and_length_runs_every_shape(cell, method):
    """A serving program exported once for every batch and length (``b``, ``t``): on the CPU it
    runs the C++ kernel (which takes any size), forward and gradient, equal to the direct call."""
    f, gates = _layer(cell, method)

    def forward_and_grad(x, h0, n):
        def loss(x, h0):
            y, final = f(x, h0, n)
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(c ** 2) for c in jax.tree.leaves(final))
        return f(x, h0, n), jax.grad(loss, argnums=(0, 1))(x, h0)

    b, t = jax.export.symbolic_shape("b, t")
    shapes = (jax.ShapeDtypeStruct((b, t, gates * 9), jnp.float32),
              jax.ShapeDtypeStruct((b, 9), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32))
    if jax.default_backend() == "gpu" and method == "native":  # (a launch needs a known batch)
        with pytest.raises(ValueError, match="the batch is symbolic"):
            js.export.export(jax.jit(forward_and_grad))(*shapes)
        return
    exported = js.export.export(jax.jit(forward_and_grad))(*shapes)
    if jax.default_backend() == "cpu":  # (elsewhere a kernel or XLA's dense path, by its rules)
        assert "jax_sprnn_" in exported.mlir_module()
    loaded = js.export.deserialize(js.export.serialize(exported))
    rng = np.random.default_rng(5)
    for batch, steps in [(1, 1), (3, 7), (6, 2)]:
        x = jnp.asarray(rng.standard_normal((batch, steps, gates * 9)), jnp.float32)
        h0 = jnp.asarray(rng.standard_normal((batch, 9)) * 0.5, jnp.float32)
        n = jnp.asarray(rng.integers(0, steps + 1, batch), jnp.int32)
        got, want = loaded.call(x, h0, n), forward_and_grad(x, h0, n)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert g.shape == w.shape and rel_err(g, w) < 1e-5


def test_a_program_for_the_gpu_with_a_symbolic_batch_takes_the_dense_path(monkeypatch):
    """The persistent kernel's launch is planned for a known batch: exported for ``cuda`` with a
    symbolic one, ``auto`` lowers XLA's dense path (with a warning) and ``native`` says why not."""
    from jax_sprnn import primitives
    monkeypatch.setattr(primitives, "_warned", set())
    f, _ = _layer("simple", "auto")
    b, t = jax.export.symbolic_shape("b, t")
    shapes = (jax.ShapeDtypeStruct((b, t, 9), jnp.float32), jax.ShapeDtypeStruct((b, 9), jnp.float32),
              jax.ShapeDtypeStruct((b,), jnp.int32))
    with pytest.warns(RuntimeWarning, match="symbolic"):
        exported = js.export.export(jax.jit(f), platforms=["cuda"])(*shapes)
    assert "jax_sprnn_" not in exported.mlir_module()
    f, _ = _layer("simple", "native")
    with pytest.raises(ValueError, match="method='native'.*the batch is symbolic"):
        js.export.export(jax.jit(f), platforms=["cuda"])(*shapes)
