"""jax.export: a jitted model that uses the op serializes, and runs in a fresh process."""

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
