"""NaN and Inf propagate alike on every path (docs/reliability.md): as the masked dense product
``act(x + h @ (mask * kernel))`` in IEEE arithmetic, where a pruned weight is a 0 that multiplies
every ``h[j]`` (0 * Inf and 0 * NaN are NaN). The native kernel, the pure-JAX reference
(``method="reference"``) and XLA's dense path (``"auto"`` where it prefers dense) must give the same
NaN, +Inf and -Inf positions, and the same finite values within the dtype's tolerance, for a NaN
or an Inf planted in the inputs or the initial state; so must their gradients.

The first test checks one step of the native kernel against float64 NumPy (the truth), at every
batch-tile width and instruction-set variant of the C++ kernel; the others compare the paths over
whole sequences (reverse, ragged lengths, three dtypes, three activations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import cost
from jax_sprnn.testing import GRAD_TOLERANCE, TOLERANCE, make_problem, rel_err

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="the C++ CPU kernel and its dense-path switch")
DTYPES = ["float32", "bfloat16", "float16"]
BADS = {"nan": np.nan, "inf": np.inf}  # where an Inf is planted, a -Inf is too (another spot)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def assert_same_nonfinite(out, want, tol, what=""):
    """Equal NaN, +Inf and -Inf positions; the finite rest within ``tol`` (rel_err)."""
    out, want = _f64(out), _f64(want)
    for name, kind in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        diff = np.argwhere(kind(out) != kind(want))
        assert diff.size == 0, (f"{what}: {name} at {len(diff)} positions differs, first "
                                f"{diff[:3].tolist()} ({kind(out).sum()} vs {kind(want).sum()})")
    finite = np.isfinite(want)
    assert rel_err(out[finite], want[finite]) < tol, what


def _plant(a, bad):
    """``a`` (inputs ``[B, T, H]`` or a state ``[B, H]``) with ``bad`` at one spot of example 1 and
    ``bad`` and ``-bad`` at two spots of example 3; the other examples stay finite."""
    if a.ndim == 3:  # a step in the middle
        return a.at[1, 3, 7].set(bad).at[3, 2, 4].set(bad).at[3, 2, 11].set(-bad)
    return a.at[1, 7].set(bad).at[3, 0].set(bad).at[3, 11].set(-bad)


# ---- one step of the native kernel against float64 NumPy ------------------------------------------

def _one_step_truth(dense, x, h0):
    """``x[:, 0] + h0 @ dense`` in float64 (the identity activation keeps the Infs), ``dense`` the
    stored (masked) kernel."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _f64(x)[:, 0] + _f64(h0) @ dense.astype(np.float64)


@on_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", list(BADS))
@pytest.mark.parametrize("batch", [1, 3, 6, 17])  # batch tiles of 1, 4, 8, 16 + 1
def test_native_step_is_the_dense_product(dtype, bad, batch):
    dense, w, x, h0 = make_problem(11, 77, batch, 1, 0.15, dtype)
    h0 = h0.at[batch - 1, 7].set(BADS[bad])
    if batch > 1:
        h0 = h0.at[0, 30].set(BADS[bad]).at[0, 31].set(-BADS[bad])
    y, h = js.sparse_rnn(x, h0, w, method="native", activation="identity")
    want = _one_step_truth(dense, x, h0)
    assert_same_nonfinite(y[:, 0], want, TOLERANCE[dtype], "y")
    assert_same_nonfinite(h, want, TOLERANCE[dtype], "h_final")
    if batch > 2:  # an example with a finite state stays finite: nothing leaks across the batch
        assert np.isfinite(_f64(y[1])).all()
    if bad == "inf":
        # Inf reaches the rows whose kernel holds that column (as +-Inf), NaN every other row
        assert np.isinf(want).any() and np.isnan(want).any()


@on_cpu
@pytest.mark.parametrize("isa", ["widest", "avx2", "baseline"])
@pytest.mark.parametrize("threads", ["1", "all"])
def test_native_step_on_every_isa_and_thread_split(isa, threads, monkeypatch):
    # big enough per step for the rows to be split over XLA's pool (as in test_cpu_kernels.py)
    if isa != "widest":
        monkeypatch.setenv("JAX_SPRNN_CPU_ISA", isa)
    if threads != "all":
        monkeypatch.setenv("JAX_SPRNN_CPU_THREADS", threads)
    dense, w, x, h0 = make_problem(12, 383, 6, 1, 0.2)
    h0 = h0.at[2, 100].set(np.inf).at[4, 5].set(np.nan).at[5, 382].set(-np.inf)
    y, _ = js.sparse_rnn(x, h0, w, method="native", activation="identity")
    assert_same_nonfinite(y[:, 0], _one_step_truth(dense, x, h0), 1e-5, "y")


# ---- the three paths over whole sequences ---------------------------------------------------------

def _run(method, w, x, h0, lengths, activation, monkeypatch=None):
    """Outputs, final state and their pullback of finite cotangents (0.3 for every output, 1 for
    the final state) to x, h0 and the values, in one jit. ``monkeypatch`` given: on XLA's dense
    path (the CPU's ``auto`` told that dense is faster; the decision is taken while lowering)."""
    def run(x, h0, values):
        return js.sparse_rnn(x, h0, w.replace(values=values), method=method, activation=activation,
                             reverse=True, seq_lengths=lengths)

    def outputs_and_grads(x, h0, values):
        (y, h), pullback = jax.vjp(run, x, h0, values)
        return (y, h, *pullback((jnp.full_like(y, 0.3), jnp.ones_like(h))))

    if monkeypatch is None:
        return jax.jit(outputs_and_grads)(x, h0, w.values)
    asked = []
    with monkeypatch.context() as patch:
        patch.setattr(cost, "cpu_prefers_dense",
                      lambda *a, **k: asked.append(a) or (True, "test: the dense path"))
        out = jax.jit(outputs_and_grads)(x, h0, w.values)
    assert len(asked) == 3, "the forward, backward and weight gradient each lower the dense path"
    return out


NAMES = ("y", "h_final", "dx", "dh0", "dvalues")


def _problem(dtype, where, bad, *, ragged):
    dense, w, x, h0 = make_problem(13, 45, 5, 9, 0.15, dtype)
    if where == "x":
        x = _plant(x, BADS[bad])
    else:
        h0 = _plant(h0, BADS[bad])
    # ragged: example 2 runs no step, example 3 stops after its Inf (its state stays finite: tanh)
    lengths = np.array([9, 6, 0, 5, 9], np.int32) if ragged else None
    return w, x, h0, lengths


@on_cpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["x", "h0"])
@pytest.mark.parametrize("bad", list(BADS))
def test_paths_agree(dtype, where, bad, monkeypatch):
    w, x, h0, lengths = _problem(dtype, where, bad, ragged=True)
    native = _run("native", w, x, h0, lengths, "tanh")
    reference = _run("reference", w, x, h0, lengths, "tanh")
    dense = _run("auto", w, x, h0, lengths, "tanh", monkeypatch)
    assert np.isnan(_f64(reference[0])).any() or bad != "nan"  # the case poisons something
    for i, name in enumerate(NAMES):
        tol = TOLERANCE[dtype] if i < 2 else GRAD_TOLERANCE[dtype]
        assert_same_nonfinite(native[i], reference[i], tol, f"native {name}")
        assert_same_nonfinite(dense[i], reference[i], tol, f"dense {name}")
    assert np.isfinite(_f64(native[0])[0]).all() and np.isfinite(_f64(native[2])[0]).all()


@on_cpu
@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("where", ["x", "h0"])
@pytest.mark.parametrize("bad", list(BADS))
def test_paths_agree_for_every_activation(activation, where, bad, monkeypatch):
    # Full lengths: a state that turned NaN is then never held past its example's end (below).
    w, x, h0, lengths = _problem("float32", where, bad, ragged=False)
    native = _run("native", w, x, h0, lengths, activation)
    reference = _run("reference", w, x, h0, lengths, activation)
    dense = _run("auto", w, x, h0, lengths, activation, monkeypatch)
    for i, name in enumerate(NAMES):
        tol = TOLERANCE["float32"] if i < 2 else GRAD_TOLERANCE["float32"]
        assert_same_nonfinite(native[i], reference[i], tol, f"native {name}")
        assert_same_nonfinite(dense[i], reference[i], tol, f"dense {name}")


@on_cpu
def test_a_state_held_past_its_length_poisons_only_autodiffs_weight_gradient(monkeypatch):
    # The documented difference: example 1's last step (position 0, reverse) makes its state NaN in
    # one unit, held for three more steps. The native and dense paths sum h_before * dz over the
    # steps that ran, where h_before is finite; autodiff of the reference also multiplies the held
    # steps' zero cotangent by the held state (0 * NaN).
    dense, w, x, h0 = make_problem(13, 45, 5, 9, 0.15)
    x = x.at[1, 0, 7].set(np.nan)
    lengths = np.array([9, 6, 9, 9, 9], np.int32)
    native = _run("native", w, x, h0, lengths, "relu")
    reference = _run("reference", w, x, h0, lengths, "relu")
    dense = _run("auto", w, x, h0, lengths, "relu", monkeypatch)
    for i, name in enumerate(NAMES):
        assert_same_nonfinite(dense[i], native[i], GRAD_TOLERANCE["float32"], f"dense {name}")
        if i < 4:
            assert_same_nonfinite(reference[i], native[i], GRAD_TOLERANCE["float32"], name)
    assert np.isnan(_f64(native[1])[1]).any() and np.isfinite(_f64(native[4])).all()
    assert np.isnan(_f64(reference[4])).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["x", "h0"])
def test_native_forward_matches_the_reference_on_this_backend(dtype, where):
    # Not CPU-only: on a GPU this checks the CUDA kernel (docs/reliability.md says where it stands).
    w, x, h0, lengths = _problem(dtype, where, "inf", ragged=True)
    x = x.at[4, 6, 20].set(np.nan)
    native = js.sparse_rnn(x, h0, w, method="native", reverse=True, seq_lengths=lengths)
    reference = js.sparse_rnn(x, h0, w, method="reference", reverse=True, seq_lengths=lengths)
    for out, want, name in zip(native, reference, NAMES):
        assert_same_nonfinite(out, want, TOLERANCE[dtype], name)


@pytest.mark.parametrize("method", ["native", "reference"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_nan_past_the_lengths_reaches_no_gradient(method, activation):
    # Inputs past an example's length are ignored: NaN there changes neither outputs nor gradients.
    dense, w, x, h0 = make_problem(14, 45, 5, 7, 0.15)
    lengths = np.array([7, 3, 0, 5, 7], np.int32)
    past = jnp.arange(7)[None, :, None] >= lengths[:, None, None]
    clean = _run(method, w, jnp.where(past, 0.0, x), h0, lengths, activation)
    poisoned = _run(method, w, jnp.where(past, jnp.nan, x), h0, lengths, activation)
    for a, b, name in zip(poisoned, clean, NAMES):
        assert rel_err(a, b) < 1e-6, name  # rel_err also asserts that a is finite
