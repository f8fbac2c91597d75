"""Property-based tests (hypothesis): the packer, the planner, the CPU kernel against the reference,
and the public API under malformed arguments. Bounded example counts keep CI time fixed."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import jax_sprnn as js
from jax_sprnn import api, layout, planner
from jax_sprnn.layout import lane_of_slot

from jax_sprnn.testing import DTYPES, TOLERANCE, rel_err

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def masks(draw, max_hidden=48):
    hidden = draw(st.integers(1, max_hidden))
    kind = draw(st.sampled_from(["random", "dense", "empty", "single", "rows", "cols"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random":
        mask = rng.random((hidden, hidden)) < draw(st.floats(0.0, 1.0))
    elif kind == "dense":
        mask = np.ones((hidden, hidden), bool)
    elif kind == "empty":
        mask = np.zeros((hidden, hidden), bool)
    elif kind == "single":
        mask = np.zeros((hidden, hidden), bool)
        mask[rng.integers(hidden), rng.integers(hidden)] = True
    else:  # whole empty rows or columns of U
        mask = rng.random((hidden, hidden)) < 0.4
        cut = rng.random(hidden) < 0.5
        if kind == "rows":
            mask[:, cut] = False
        else:
            mask[cut, :] = False
    return mask, seed


@SETTINGS
@given(masks(), st.sampled_from(list(DTYPES)), st.sampled_from([4, 8, 16]))
def test_packing_round_trips_and_stores_each_nonzero_once(mask_seed, dtype, load_bytes):
    mask, seed = mask_seed
    hidden = mask.shape[0]
    kernel = np.asarray(jnp.asarray(np.random.default_rng(seed).standard_normal(mask.shape),
                                    DTYPES[dtype]))
    w = js.SparseWeights.from_dense(kernel, mask, load_bytes=load_bytes)
    w.validate()
    dense = np.asarray(w.to_dense())
    np.testing.assert_array_equal(dense, np.where(mask, kernel, 0).astype(dense.dtype))
    idx = np.asarray(w.indices)
    rows = np.asarray(w.lane_row)[lane_of_slot(w.meta)]
    real = idx >= 0
    pairs = idx[real].astype(np.int64) * hidden + rows[real]
    assert np.unique(pairs).size == pairs.size == mask.sum()


@SETTINGS
@given(masks(max_hidden=80), st.sampled_from([4, 8, 16]))
def test_bank_order_never_worse_than_unordered(mask_seed, load_bytes):
    mask, _ = mask_seed
    rows, cols = np.nonzero(mask.T)
    hidden = mask.shape[0]
    plan = planner.plan_layout(np.bincount(rows, minlength=hidden), np.float16, load_bytes=load_bytes)
    aware = layout.pack_pattern(rows, cols, plan)
    plain = layout.pack_pattern(rows, cols, plan, bank_aware=False)
    conflicts = [layout.bank_conflicts(p.indices, load_bytes) for p in (aware, plain)]
    assert conflicts[0] <= conflicts[1]


def _some_layout_fits(nnz, dtype, device, load_bytes=16) -> bool:
    """Whether any layout of the kernel's model fits ``device``: every slot size K, every width of
    CTA and every register tier whose instantiation runs that width, not only the planner's picks
    (the fewest warps per CTA, the largest tier). Shared memory: staged h, the slots beyond the
    register tier, the kernel's reserve."""
    pair_bytes = 8 if np.dtype(dtype).itemsize == 4 else 4
    for k in planner.SLOT_SIZES:
        if 32 * k < nnz.max():
            continue
        warps = planner.pack_rows_into_warps(planner.lanes_per_row(nnz, k))[2]
        for warps_per_cta in range(1, device.max_threads_per_block // 32 + 1):
            threads = 32 * warps_per_cta
            if -(-warps // warps_per_cta) > device.sm_count:
                continue
            for reg_slots, most_threads in device.thread_limits(dtype):
                smem = (nnz.size * load_bytes + (k - reg_slots) * threads * pair_bytes
                        + planner.KERNEL_SMEM_RESERVE)
                if reg_slots <= k and threads <= most_threads and smem <= device.smem_per_block:
                    return True
    return False


_LAYERS_AND_DEVICES = (st.integers(1, 3000), st.integers(0, 2**31 - 1), st.integers(1, 200),
                       st.integers(8, 228), st.sampled_from([128, 256, 512, 1024]),
                       st.sampled_from(list(DTYPES)))


def _layer_and_device(hidden, seed, sms, smem_kb, max_threads):
    device = planner.DeviceSpec(name="made-up", sm_count=sms, smem_per_block=smem_kb * 1024,
                                max_threads_per_block=max_threads)
    return np.random.default_rng(seed).integers(0, hidden + 1, size=hidden), device


@SETTINGS
@given(*_LAYERS_AND_DEVICES)
def test_planner_fits_exactly_when_some_layout_does(hidden, seed, sms, smem_kb, max_threads, dtype):
    nnz, device = _layer_and_device(hidden, seed, sms, smem_kb, max_threads)
    plan = planner.plan_layout(nnz, DTYPES[dtype], device)
    assert plan.slots_per_lane * 32 >= nnz.max()  # a valid layout for the CPU kernel either way
    event(f"fits: {plan.fits}")
    assert plan.fits == _some_layout_fits(nnz, DTYPES[dtype], device), plan.reason


@SETTINGS
@given(*_LAYERS_AND_DEVICES)
def test_planner_never_exceeds_its_budget(hidden, seed, sms, smem_kb, max_threads, dtype):
    nnz, device = _layer_and_device(hidden, seed, sms, smem_kb, max_threads)
    assume(_some_layout_fits(nnz, DTYPES[dtype], device))  # hypothesis fails if this rejects most
    plan = planner.plan_layout(nnz, DTYPES[dtype], device)
    assert plan.fits, plan.reason
    limits = dict(device.thread_limits(DTYPES[dtype]))
    assert plan.num_ctas <= sms
    assert plan.threads_per_cta <= min(max_threads, limits[plan.reg_slots])
    assert plan.reg_slots <= plan.slots_per_lane
    pair_bytes = 8 if dtype == "float32" else 4
    weights_smem = (plan.slots_per_lane - plan.reg_slots) * plan.threads_per_cta * pair_bytes
    assert hidden * plan.load_bytes + weights_smem + planner.KERNEL_SMEM_RESERVE <= plan.smem_bytes
    assert plan.smem_bytes <= device.smem_per_block
    lanes = planner.lanes_per_row(nnz, plan.slots_per_lane)
    assert planner.pack_rows_into_warps(lanes)[2] <= plan.num_warps


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 4), st.integers(1, 12), st.floats(0.0, 1.0),
       st.sampled_from(list(DTYPES)), st.sampled_from(["tanh", "relu", "identity"]),
       st.booleans(), st.integers(0, 2**31 - 1), st.floats(0.1, 4.0))
def test_cpu_kernel_matches_reference(hidden, batch, steps, density, dtype, activation, reverse,
                                      seed, scale):
    rng = np.random.default_rng(seed)
    mask = rng.random((hidden, hidden)) < density
    gain = 0.9 if activation != "identity" else 0.5  # identity: keep the state bounded
    kernel = (rng.standard_normal((hidden, hidden)).astype(np.float32) * gain
              / np.sqrt(max(1, mask.sum() / hidden)))
    dt = DTYPES[dtype]
    kernel = np.asarray(jnp.asarray(kernel * mask, dt).astype(jnp.float32))
    w = js.SparseWeights.from_dense(kernel, mask, dtype=dt)
    x = jnp.asarray(rng.standard_normal((batch, steps, hidden)) * scale, dt)  # large scale saturates
    h0 = jnp.asarray(rng.standard_normal((batch, hidden)) * 0.5, dt)
    lengths = rng.integers(0, steps + 1, size=batch).astype(np.int32)
    kw = dict(activation=activation, reverse=reverse, seq_lengths=lengths)
    y, h = js.sparse_rnn(x, h0, w, method="native", **kw)
    y_ref, h_ref = js.reference_rnn(x, h0, kernel, **kw)
    tol = TOLERANCE[dtype] * (3 if activation == "identity" else 1)
    assert rel_err(y, y_ref) < tol and rel_err(h, h_ref) < tol


_BAD = [
    ("inputs rank", lambda x, h0, w: (x[0], h0, w, {}), ValueError),
    ("inputs dtype int", lambda x, h0, w: (x.astype(jnp.int32), h0, w, {}), TypeError),
    ("inputs float64", lambda x, h0, w: (np.asarray(x, np.float64), h0, w, {}), TypeError),
    ("h0 batch", lambda x, h0, w: (x, jnp.concatenate([h0, h0[:1]]), w, {}), ValueError),
    ("h0 hidden", lambda x, h0, w: (x, h0[:, :-1], w, {}), ValueError),
    ("h0 rank", lambda x, h0, w: (x, h0[0], w, {}), ValueError),
    ("h0 dtype", lambda x, h0, w: (x, h0.astype(jnp.float16), w, {}), TypeError),
    ("lengths negative",
     lambda x, h0, w: (x, h0, w, {"seq_lengths": -np.ones(len(x), np.int32)}), ValueError),
    ("lengths too long",
     lambda x, h0, w: (x, h0, w, {"seq_lengths": np.full(len(x), 99, np.int32)}), ValueError),
    ("lengths shape",
     lambda x, h0, w: (x, h0, w, {"seq_lengths": np.ones((len(x), 1), np.int32)}), ValueError),
    ("lengths float", lambda x, h0, w: (x, h0, w, {"seq_lengths": np.ones(len(x), np.float32)}), TypeError),
    ("activation", lambda x, h0, w: (x, h0, w, {"activation": "gelu"}), ValueError),
    ("method", lambda x, h0, w: (x, h0, w, {"method": "gpu"}), ValueError),
    ("weights", lambda x, h0, w: (x, h0, np.eye(x.shape[-1]), {}), TypeError),
    ("empty batch, h0 not", lambda x, h0, w: (x[:0], h0, w, {}), ValueError),
]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(_BAD), st.integers(2, 20), st.integers(1, 3), st.integers(1, 5),
       st.sampled_from(api.METHODS))
def test_malformed_arguments_raise_clear_errors(case, hidden, batch, steps, method):
    name, corrupt, error = case
    w = js.SparseWeights.from_dense(np.eye(hidden, dtype=np.float32) * 0.5, density=0.5)
    x = jnp.ones((batch, steps, hidden), jnp.float32)
    h0 = jnp.zeros((batch, hidden), jnp.float32)
    x, h0, w, kw = corrupt(x, h0, w)
    kw.setdefault("method", method)
    with pytest.raises(error):
        js.sparse_rnn(x, h0, w, **kw)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(["nan", "inf"]))
def test_nonfinite_inputs_propagate_like_the_reference(seed, kind):
    rng = np.random.default_rng(seed)
    hidden, batch, steps = 16, 2, 5
    kernel = rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.3
    w = js.SparseWeights.from_dense(kernel, density=0.5)
    x = rng.standard_normal((batch, steps, hidden)).astype(np.float32)
    b, t, i = rng.integers(batch), rng.integers(steps), rng.integers(hidden)
    x[b, t, i] = np.nan if kind == "nan" else np.inf
    y, _ = js.sparse_rnn(jnp.asarray(x), jnp.zeros((batch, hidden)), w, method="native")
    y_ref, _ = js.reference_rnn(jnp.asarray(x), jnp.zeros((batch, hidden)), w.to_dense())
    y, y_ref = np.asarray(y), np.asarray(y_ref)
    # the poisoned position itself matches exactly (NaN stays NaN; tanh(inf) = 1), and other
    # examples never see it
    assert np.array_equal(np.isnan(y[b, t, i]), np.isnan(y_ref[b, t, i]))
    other = [k for k in range(batch) if k != b]
    assert np.all(np.isfinite(y[other]))
