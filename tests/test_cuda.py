"""GPU-only tests of the persistent CUDA kernel (skipped without a GPU and the CUDA module)."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import jax_sprnn as js
from jax_sprnn import _native, cost, planner
from jax_sprnn.dispatch import cuda_fit
from jax_sprnn.primitives import sprnn_forward_p

from jax_sprnn.testing import TOLERANCE, make_problem, rel_err, transpose_ops

pytestmark = pytest.mark.gpu


def _native_fn():
    return jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="native"))


def test_thread_limits_match_the_build():
    cuda = _native.cuda_module()
    spec = _native.current_device_spec()
    for dtype, table in (("float16", spec.max_threads_16), ("float32", spec.max_threads_32)):
        assert sorted(r for r, _ in table) == sorted(cuda.supported_reg_slots(dtype))
        local = {}
        for rs, most in table:
            attrs = cuda.kernel_attributes(dtype, 4, rs, 0, most)
            assert attrs["max_threads_per_block"] >= most, (dtype, rs)
            local[rs] = attrs["local_bytes"]
        # A few words at most: 24 bytes of spills in the largest register tiers (fp32 RS=96, 16-bit
        # RS=192) since cluster mode's batch slice, plus, since the non-finite phases, the ABI frame
        # of their out-of-line call (touched only in a phase whose state holds an Inf or NaN). On
        # the H200 (2026-12-03): 16-bit tiers up to 48 bytes, fp32 up to 64 (RS=96): docs/design.md.
        assert max(local.values()) <= 64, (dtype, local)
        # The two-plane variants (tile 4) hold 4 more accumulators next to the same register tier:
        # up to 104-112 bytes of local memory in the tightest tiers (nvcc 13.0, sm_90; docs/design.md).
        pairs = {rs: cuda.kernel_attributes(dtype, 4, rs, 0, most, planes_per_pass=2)["local_bytes"]
                 for rs, most in table}
        assert max(pairs.values()) <= 112, (dtype, pairs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_long_sequence_4096(dtype):
    dense, w, x, h0 = make_problem(1, 300, 3, 4096, 0.1, dtype)
    y, h = _native_fn()(x, h0, w)
    y_ref, h_ref = js.reference_rnn(x, h0, dense)
    assert rel_err(y, y_ref) < TOLERANCE[dtype] and rel_err(h, h_ref) < TOLERANCE[dtype]


def test_largest_admitted_layer_at_10_percent():
    # H=8192 at 10% in fp16: the planner admits it (the capacity target); it runs and is right.
    dense, w, x, h0 = make_problem(2, 8192, 4, 32, 0.1, "float16")
    assert w.meta.fits, w.meta.reason
    assert cuda_fit(w.meta, 4, jnp.float16)[0]
    y, h = _native_fn()(x, h0, w)
    y_ref, h_ref = js.reference_rnn(x, h0, dense)
    assert rel_err(y, y_ref) < TOLERANCE["float16"]


def test_repeated_calls_have_no_stale_state():
    dense, w, x, h0 = make_problem(3, 513, 4, 20, 0.1, "float16")
    f = _native_fn()
    first = np.asarray(f(x, h0, w)[0])
    rng = np.random.default_rng(3)
    others = [jnp.asarray(rng.standard_normal(x.shape), x.dtype) for _ in range(3)]
    for i in range(1000):
        xi = others[i % 3] if i % 2 else x
        y, _ = f(xi, h0, w)
        if i % 100 == 0 or i == 999:
            want = first if not i % 2 else np.asarray(js.reference_rnn(xi, h0, dense)[0])
            got = np.asarray(y)
            if not i % 2:
                np.testing.assert_array_equal(got, want)  # bitwise repeatable
            else:
                assert rel_err(got, want) < TOLERANCE["float16"]


def test_forced_timeout_is_reported_and_the_next_call_works():
    dense, w, x, h0 = make_problem(4, 300, 2, 16, 0.1, "float16")
    x_tm = jnp.swapaxes(x, 0, 1)
    lengths = jnp.full((2,), 16, jnp.int32)
    params = dict(activation="tanh", reverse=False, meta=w.meta, method="native")
    y, h = sprnn_forward_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths, **params,
                                spin_timeout_us=2000, debug_stall_cta=0)
    # Never a silent wrong number: the kernel's last CTA fills every output with NaN.
    assert np.all(np.isnan(np.asarray(y, np.float32))) and np.all(np.isnan(np.asarray(h, np.float32)))
    # Reported by the next call, even an unrelated one, and the report names the call that failed.
    _, w2, x2, h02 = make_problem(5, 200, 3, 7, 0.1, "float32")
    with pytest.raises(Exception, match=r"call #\d+ \(jax_sprnn_forward_hooked, \w+, T=16, B=2, H=300, "
                                        r"(grid mode|cluster mode, \d+ CTAs)\), timed out"):
        jax.block_until_ready(js.sparse_rnn(x2, h02, w2, method="native"))
    y, h = sprnn_forward_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths, **params)
    y_ref, _ = js.reference_rnn(x_tm, h0, dense, time_major=True)
    assert rel_err(y, y_ref) < TOLERANCE["float16"]


def test_sync_errors_fail_the_call_whose_kernel_failed(monkeypatch):
    # JAX_SPRNN_SYNC_ERRORS=1: the handler waits for its own kernel, so the stalled call itself
    # raises, naming itself, and leaves nothing for the next call.
    dense, w, x, h0 = make_problem(6, 300, 2, 16, 0.1, "float16")
    x_tm = jnp.swapaxes(x, 0, 1)
    lengths = jnp.full((2,), 16, jnp.int32)
    params = dict(activation="tanh", reverse=False, meta=w.meta, method="native")
    monkeypatch.setenv("JAX_SPRNN_SYNC_ERRORS", "1")
    with pytest.raises(Exception, match=r"this persistent kernel call, call #\d+ \(jax_sprnn_forward_hooked, "
                                        r"\w+, T=16, B=2, H=300, .*timed out"):
        jax.block_until_ready(sprnn_forward_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths,
                                                   **params, spin_timeout_us=2000, debug_stall_cta=0))
    y, _ = sprnn_forward_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths, **params)
    y_ref, _ = js.reference_rnn(x_tm, h0, dense, time_major=True)
    assert rel_err(y, y_ref) < TOLERANCE["float16"]
    monkeypatch.delenv("JAX_SPRNN_SYNC_ERRORS")
    assert _native.cuda_module().pending_error() == ""


def test_auto_falls_back_when_the_batch_does_not_fit():
    dense, w, x, h0 = make_problem(5, 4608, 2, 4, 0.1, "float16")
    limit = planner.max_persistent_batch(w.meta, jnp.float16, _native.current_device_spec())
    big = limit + 4
    xb = jnp.tile(x, (big // 2 + 1, 1, 1))[:big]
    hb = jnp.tile(h0, (big // 2 + 1, 1))[:big]
    with pytest.raises(ValueError, match="exceeds the persistent kernel's limit"):
        js.sparse_rnn(xb, hb, w, method="native")
    with pytest.warns(RuntimeWarning, match="dense XLA path"):
        y, _ = js.sparse_rnn(xb, hb, w, method="auto")
    assert rel_err(y, js.reference_rnn(xb, hb, dense)[0]) < TOLERANCE["float16"]


def test_auto_takes_the_dense_path_where_the_kernel_is_slower():
    # H=2304 at 30% and B=20 in fp16: five batch planes (two two-plane passes and one) make the
    # kernel slower than a dense step (jax_sprnn/cost.py), so auto lowers to XLA's dense matmul;
    # native keeps the kernel.
    dense, w, x, h0 = make_problem(8, 2304, 20, 6, 0.3, "float16")
    assert cost.auto_prefers_dense(w.meta, 20, jnp.float16)[0]
    auto = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="auto"))
    with pytest.warns(RuntimeWarning, match="faster here"):  # warned once, when first lowered
        hlo = auto.lower(x, h0, w).as_text()
    assert "jax_sprnn_forward" not in hlo
    y, _ = auto(x, h0, w)
    y_native, _ = js.sparse_rnn(x, h0, w, method="native")
    with jax.default_matmul_precision("highest"):
        y_ref, _ = js.reference_rnn(x, h0, dense)
    assert rel_err(y, y_ref) < TOLERANCE["float16"] and rel_err(y_native, y_ref) < TOLERANCE["float16"]


def test_pending_error_is_empty_after_good_calls():
    dense, w, x, h0 = make_problem(6, 200, 2, 8, 0.2, "float32")
    jax.block_until_ready(_native_fn()(x, h0, w))
    assert _native.cuda_module().pending_error() == ""


@pytest.mark.parametrize("exchange_mode", ["auto", "grid", "cluster"])
@pytest.mark.parametrize("batch", [5, 8])
def test_a_batch_major_call_runs_without_transposes_and_matches(exchange_mode, batch):
    # batch_major: x and y are [B, T, H] in memory; the kernel indexes them so, and XLA's swapaxes
    # around the call become bitcasts. The same bits as the time-major call (ragged, reverse).
    dense, w, x, h0 = make_problem(31 + batch, 300, batch, 11, 0.1, "float16")
    lengths = jnp.asarray(np.random.default_rng(batch).integers(0, 12, batch), jnp.int32)
    hooks = {} if exchange_mode == "auto" else {"exchange_mode": exchange_mode}

    def call(x, h0, batch_major):
        y, h = sprnn_forward_p.bind(jnp.swapaxes(x, 0, 1), h0, w.values, w.indices, w.lane_row, lengths,
                                    activation="tanh", reverse=True, meta=w.meta, method="native",
                                    batch_major=batch_major, **hooks)
        return jnp.swapaxes(y, 0, 1), h
    batch_major = jax.jit(lambda x, h0: call(x, h0, True))
    time_major = jax.jit(lambda x, h0: call(x, h0, False))
    for got, want in zip(batch_major(x, h0), time_major(x, h0)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    y_ref, _ = js.reference_rnn(x, h0, dense, seq_lengths=lengths, reverse=True)
    assert rel_err(batch_major(x, h0)[0], y_ref) < TOLERANCE["float16"]
    assert transpose_ops(batch_major.lower(x, h0).compile().as_text()) == []
    assert transpose_ops(time_major.lower(x, h0).compile().as_text()) != []  # what the layout saves


@pytest.mark.parametrize("cell, hidden", [("simple", 300), ("simple", 2304), ("lstm", 300), ("gru", 300)])
def test_a_call_without_lengths_runs_every_step_like_full_lengths(cell, hidden):
    # Without seq_lengths the kernel gets no lengths operand and runs all T steps for every
    # example: the same bits as lengths of T passed explicitly (tests/test_cuda_lowering.py checks
    # that the operand is empty). (H = 300 runs in cluster mode, 2304 in grid mode.)
    B, T = 6, 9
    gates = {"simple": 1, "lstm": 4, "gru": 3}[cell]
    rng = np.random.default_rng(gates + hidden)
    w = js.SparseWeights.from_dense((rng.standard_normal((hidden, gates * hidden)) * 0.1).astype(np.float16),
                                    density=0.1)
    x = jnp.asarray(rng.standard_normal((B, T, gates * hidden)), jnp.float16)
    h0 = jnp.asarray(rng.standard_normal((B, hidden)) * 0.5, jnp.float16)

    @jax.jit
    def run(x, h0, seq_lengths=None):
        kw = dict(method="native", seq_lengths=seq_lengths)
        if cell == "lstm":
            return js.sparse_lstm(x, (h0, h0), w, **kw)
        if cell == "gru":
            return js.sparse_gru(x, h0, w, **kw)
        return js.sparse_rnn(x, h0, w, **kw)
    got, want = run(x, h0), run(x, h0, jnp.full((B,), T, jnp.int32))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))  # (NaN would equal NaN below)
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
