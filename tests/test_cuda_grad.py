"""GPU-only tests of training on the GPU: the persistent backward recurrence and the sampled weight
gradient (skipped without a GPU and the CUDA module). tests/test_grad.py also runs here, on the
same kernels, at small shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _native, dispatch, fallback
from jax_sprnn.dispatch import weight_grad_time_chunks
from jax_sprnn.primitives import sprnn_backward_p, sprnn_weight_grad_p

from jax_sprnn.testing import GRAD_TOLERANCE, make_problem, rel_err

pytestmark = pytest.mark.gpu


def _loss(method, w, **kw):
    def loss(x, h0, values, cot_y, cot_h):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), method=method, **kw)
        return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h.astype(jnp.float32) * cot_h)
    return loss


def _problem_grads(seed, hidden, batch, steps, density, dtype, **kw):
    """(native grads, float32 reference grads) of a random loss, w.r.t. x, h0 and the values."""
    dense, w, x, h0 = make_problem(seed, hidden, batch, steps, density, dtype)
    rng = np.random.default_rng(seed + 1)
    cot_y = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    cot_h = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    native = jax.jit(jax.grad(_loss("native", w, **kw), argnums=(0, 1, 2)))(x, h0, w.values, cot_y, cot_h)
    w32 = w.astype(jnp.float32)
    ref = jax.jit(jax.grad(_loss("reference", w32, **kw), argnums=(0, 1, 2)))(
        x.astype(jnp.float32), h0.astype(jnp.float32), w32.values, cot_y, cot_h)
    return native, ref


def test_grad_runs_our_kernels_not_a_dense_fallback():
    dense, w, x, h0 = make_problem(1, 301, 3, 11, 0.1, "float16")
    cot = jnp.ones(x.shape, jnp.float32)
    hlo = jax.jit(jax.grad(_loss("native", w), argnums=(0, 1, 2))).lower(
        x, h0, w.values, cot, jnp.ones(h0.shape, jnp.float32)).as_text()
    for target in (dispatch.FORWARD, dispatch.BACKWARD, dispatch.WEIGHT_GRAD):
        assert target in hlo, target


def test_backward_kernels_share_the_forward_launch_bounds():
    cuda = _native.cuda_module()
    spec = _native.current_device_spec()
    for dtype, table in (("float16", spec.max_threads_16), ("bfloat16", spec.max_threads_16),
                         ("float32", spec.max_threads_32)):
        local = {}
        for rs, most in table:
            for tile in (1, 2, 4):
                attrs = cuda.kernel_attributes(dtype, tile, rs, 0, most, backward=True)
                assert attrs["max_threads_per_block"] >= most, (dtype, rs, tile)
                local[rs, tile] = attrs["local_bytes"]
        # A few words at most (outside the slot loop): 56 since cluster mode, 80 since the non-finite
        # phases' out-of-line call (its ABI frame, touched only in such a phase): docs/design.md.
        assert max(local.values()) <= 80, (dtype, local)
        pairs = {rs: cuda.kernel_attributes(dtype, 4, rs, 0, most, backward=True,
                                            planes_per_pass=2)["local_bytes"] for rs, most in table}
        assert max(pairs.values()) <= 112, (dtype, pairs)  # the two-plane variants (test_cuda.py)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("reverse", [False, True])
def test_grads_at_odd_shapes_with_lengths(dtype, reverse):
    lengths = np.array([37, 20, 0, 1, 36], np.int32)
    native, ref = _problem_grads(2, 389, 5, 37, 0.13, dtype, reverse=reverse, seq_lengths=lengths)
    # float32 to 1e-4 (the bound); 16-bit storage rounds y and dx per step: 4x the forward
    # tolerance, GRAD_TOLERANCE (two recurrences, each within the forward's bound).
    tol = 1e-4 if dtype == "float32" else GRAD_TOLERANCE[dtype]
    for a, b, name in zip(native, ref, ("dx", "dh0", "dvalues")):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_grads_other_activations_float32(activation):
    native, ref = _problem_grads(3, 200, 3, 16, 0.2, "float32", activation=activation)
    for a, b in zip(native, ref):
        assert rel_err(a, b) < 1e-4


def test_grads_of_a_large_layer():
    native, ref = _problem_grads(4, 2304, 4, 48, 0.1, "float16")
    for a, b, name in zip(native, ref, ("dx", "dh0", "dvalues")):
        assert rel_err(a, b) < GRAD_TOLERANCE["float16"], (name, rel_err(a, b))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("reverse", [False, True])
def test_weight_grad_kernel_with_time_chunks(groups, reverse):
    # A small layer over many steps: the kernel splits time into chunks and sums them in order.
    dense, w, x, h0 = make_problem(5, 64, 6, 300, 0.3, "float32")
    assert weight_grad_time_chunks(w.meta, groups, 300, _native.current_device_spec().sm_count) > 1
    rng = np.random.default_rng(5)
    y = jnp.asarray(rng.standard_normal((300, 6, 64)), jnp.float32)
    lengths = jnp.asarray([300, 17, 0, 299, 150, 1], jnp.int32)
    dz = jnp.asarray(rng.standard_normal((300, 6, 64)), jnp.float32)
    dz = jnp.where((jnp.arange(300)[:, None] < lengths[None, :])[:, :, None], dz, 0.0)
    params = dict(groups=groups, reverse=reverse, meta=w.meta)
    (got,) = jax.jit(lambda *a: sprnn_weight_grad_p.bind(*a, **params, method="native"))(
        y, h0, dz, w.indices, w.lane_row, lengths)
    want = fallback.weight_grad(y, h0, dz, w.indices, w.lane_row, lengths, **params)
    assert got.shape == (groups, w.indices.shape[0])
    assert rel_err(got, want) < 1e-5
    assert np.all(np.asarray(got)[:, np.asarray(w.indices) < 0] == 0)


def test_weight_grad_is_bitwise_deterministic():
    dense, w, x, h0 = make_problem(6, 700, 4, 64, 0.1, "bfloat16")
    cot = jnp.asarray(np.random.default_rng(6).standard_normal(x.shape), jnp.float32)
    g = jax.jit(jax.grad(_loss("native", w), argnums=2))
    first = np.asarray(g(x, h0, w.values, cot, jnp.zeros(h0.shape, jnp.float32)), np.float32)
    for _ in range(5):
        again = np.asarray(g(x, h0, w.values, cot, jnp.zeros(h0.shape, jnp.float32)), np.float32)
        np.testing.assert_array_equal(first, again)


def test_backward_forced_timeout_is_reported_and_the_next_call_works():
    dense, w, x, h0 = make_problem(7, 300, 2, 16, 0.1, "float16")
    y_tm = jnp.swapaxes(x, 0, 1)  # any [T, B, H] values stand in for the forward outputs
    lengths = jnp.full((2,), 16, jnp.int32)
    dy = jnp.ones_like(y_tm)
    args = (jnp.tanh(y_tm), h0, w.transposed_values(), w.indices_t, w.lane_row_t, lengths, dy,
            jnp.zeros_like(h0))
    params = dict(activation="tanh", reverse=False, meta=w.meta_t, method="native")
    dx, dh0 = sprnn_backward_p.bind(*args, **params, spin_timeout_us=2000, debug_stall_cta=0)
    assert np.all(np.isnan(np.asarray(dx, np.float32)))  # never a silent wrong number
    with pytest.raises(Exception, match="timed out"):  # reported by the next call
        jax.block_until_ready(sprnn_backward_p.bind(*args, **params))
    dx, dh0 = sprnn_backward_p.bind(*args, **params)
    want_dx, want_dh0 = fallback.backward(*args, activation="tanh", reverse=False, meta=w.meta_t)
    assert rel_err(dx, want_dx) < GRAD_TOLERANCE["float16"]
    assert rel_err(dh0, want_dh0) < GRAD_TOLERANCE["float16"]
