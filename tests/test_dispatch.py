"""What runs where: jax_sprnn.dispatch's decisions for made-up builds and devices (no GPU needed), the
CPU lowering of the fallback, and the primitives' named parameters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_sprnn as js
from jax_sprnn import _constants, _native, cost, dispatch, layout, planner, primitives
from jax_sprnn.dispatch import BACKWARD, FORWARD, GATED_BACKWARD, WEIGHT_GRAD
from jax_sprnn.planner import H200, LayoutMeta
from jax_sprnn.testing import TOLERANCE, make_problem, rel_err


def _meta(hidden, nnz_per_row, dtype=np.float16) -> LayoutMeta:
    return LayoutMeta.from_plan(planner.plan_layout(np.full(hidden, nnz_per_row), dtype, H200))


@pytest.fixture
def h200_build(monkeypatch):
    """A CUDA module with every target, on an H200."""
    monkeypatch.setattr(_native, "cuda_targets", lambda: frozenset(_native.TARGETS))
    monkeypatch.setattr(_native, "current_device_spec", lambda: H200)


@pytest.fixture
def no_cuda_build(monkeypatch):
    monkeypatch.setattr(_native, "cuda_targets", lambda: frozenset())


def test_cpu_takes_the_kernel_where_the_module_was_built(monkeypatch):
    big = _meta(1024, 102)  # 10%: the C++ kernel wins at every batch (benchmarks, cpu suite)
    assert dispatch.on_cpu("auto", big, 4, 100, forward=True) == dispatch.Decision(
        "kernel", "the CPU module is built")
    monkeypatch.setattr(_native, "has_cpu_kernels", lambda: False)
    decision = dispatch.on_cpu("auto", big, 4, 100, forward=True)
    assert decision.path == "fallback" and "CPU module was not built" in decision.warning
    with pytest.raises(RuntimeError, match="method='native': the CPU module"):
        dispatch.on_cpu("native", big, 4, 100, forward=True)


@pytest.mark.parametrize("hidden, per_row, batch, steps, forward, path", [
    (1024, 102, 1, 100, True, "kernel"),     # 10% from H=512 on: the kernel, any batch
    (512, 51, 4, 100, True, "kernel"),
    (256, 26, 1, 100, True, "fallback"),     # H=256 at 10%: dense at B=1 ...
    (256, 26, 4, 100, True, "kernel"),       # ... the kernel from B=4 (dense rebuilds K per call)
    (256, 26, 16, 100, True, "kernel"),
    (256, 26, 4, 100, False, "kernel"),      # the backward pieces win from H=256
    (256, 26, 1, 100, False, "kernel"),      # ... at B=1 too, where the forward is dense
    (1024, 102, 4, 2, True, "kernel"),       # a short call: the dense path would rebuild K
    (1024, 102, 4, 2, False, "kernel"),
    (256, 26, 4, 2, True, "fallback"),       # ... which is cheap at H=256
    (1024, 280, 4, 16, True, "kernel"),      # 16 steps do not pay for rebuilding K, even at 27%
    (1024, 280, 4, 100, True, "fallback"),   # 27% (0.375 with padding) at a small batch: dense
    (1024, 280, 16, 100, True, "kernel"),
    (512, 256, 16, 100, False, "fallback"),  # 50%: dense everywhere
])
def test_cpu_auto_takes_the_faster_path(hidden, per_row, batch, steps, forward, path):
    meta = _meta(hidden, per_row, np.float32)
    decision = dispatch.on_cpu("auto", meta, batch, steps, forward=forward)
    assert decision.path == path, decision.why
    assert decision.warning is None  # the faster path is no surprise
    # 'native' always runs the C++ kernel
    assert dispatch.on_cpu("native", meta, batch, steps, forward=forward).path == "kernel"


def test_cpu_auto_lowers_a_small_layer_to_dense_and_a_large_one_to_the_kernel():
    def hlo(hidden, density, batch):
        dense, w, x, h0 = make_problem(3, hidden, batch, 20, density)
        return jax.jit(lambda x, h0: js.sparse_rnn(x, h0, w)).lower(x, h0).as_text()
    with jax.default_device(jax.devices("cpu")[0]):
        assert FORWARD not in hlo(128, 0.1, 1)
        assert FORWARD in hlo(128, 0.1, 4)
        assert FORWARD in hlo(640, 0.1, 1)


def test_recurrences_without_a_cuda_build(no_cuda_build):
    meta = _meta(256, 26)
    decision = dispatch.on_cuda_recurrence(FORWARD, meta, 4, np.float16, "auto")
    assert decision.path == "fallback"
    assert decision.why == f"the CUDA module of jax_sprnn was not built with {FORWARD}"
    assert decision.warning.startswith(f"jax_sprnn: {FORWARD} uses the dense XLA path")
    with pytest.raises(ValueError, match=rf"persistent CUDA kernel \({BACKWARD}\) cannot run"):
        dispatch.on_cuda_recurrence(BACKWARD, meta, 4, np.float16, "native")


def test_recurrences_on_an_h200(h200_build):
    meta = _meta(2304, 230)
    assert meta.fits
    assert dispatch.on_cuda_recurrence(FORWARD, meta, 4, np.float16, "auto").path == "kernel"
    # At 10% the kernel is expected faster up to its batch limit (24; two planes a pass)...
    assert not any(cost.auto_prefers_dense(meta, b, np.float16)[0] for b in (16, 20, 24))
    # ... at 30% and B=20 (two two-plane passes and one) the dense step: "auto" takes it, silently...
    dense_meta = _meta(2304, 691)
    assert not cost.auto_prefers_dense(dense_meta, 16, np.float16)[0]
    assert cost.auto_prefers_dense(dense_meta, 20, np.float16)[0]
    decision = dispatch.on_cuda_recurrence(FORWARD, dense_meta, 20, np.float16, "auto")
    assert decision.path == "fallback" and "faster here" in decision.why
    # ... but "native" keeps the kernel, and so does the backward (its dense path is float32).
    assert dispatch.on_cuda_recurrence(FORWARD, dense_meta, 20, np.float16, "native").path == "kernel"
    assert dispatch.on_cuda_recurrence(BACKWARD, dense_meta, 20, np.float16, "auto").path == "kernel"
    too_big = planner.max_persistent_batch(meta, np.float16, H200) + 1
    decision = dispatch.on_cuda_recurrence(FORWARD, meta, too_big, np.float16, "auto")
    assert decision.path == "fallback" and "exceeds the persistent kernel's limit" in decision.warning
    with pytest.raises(ValueError, match="exceeds the persistent kernel's limit"):
        dispatch.on_cuda_recurrence(FORWARD, meta, too_big, np.float16, "native")


@pytest.mark.parametrize("planned_for", ["H200", "grid"])
@pytest.mark.parametrize("gates", [3, 4])
def test_the_gated_backward_kernel_fits_its_staged_cotangents(h200_build, gates, planned_for):
    """The transposed gated layout stages G*H cotangents an example: its batch limit is the one
    its own kernel has (smaller than the forward's), and past it "auto" takes the XLA scan with a
    warning that says what the shared memory holds, while "native" raises. Planned for the H200
    the layouts take clusters (the GRU's at least); planned for a GPU without clusters, the grid."""
    H = 1024
    device = H200 if planned_for == "H200" else dataclasses.replace(H200, cluster_launch=False)
    fwd, bwd = layout.plan_layouts(np.full(gates * H, 102), np.full(H, gates * 102), np.float16, device,
                                   gates=gates)
    meta_t = LayoutMeta.from_plan(bwd)
    assert meta_t.fits and meta_t.transposed and meta_t.num_cols == gates * H
    limit = planner.max_persistent_batch(meta_t, np.float16, H200)
    assert 0 < limit < planner.max_persistent_batch(LayoutMeta.from_plan(fwd), np.float16, H200)
    # The limit is where the staged copies of G*H columns (and the carries) stop fitting: one copy
    # of the whole batch in grid mode, two copies of a replica's slice on each cluster the H200
    # holds at once in cluster mode (16 CTAs or fewer).
    tile = meta_t.load_bytes // 4
    weights = planner.weight_smem_bytes(meta_t.slots_per_lane, meta_t.reg_slots,
                                        meta_t.threads_per_cta, np.float16)

    def smem(batch, copies):
        cell = _constants.cell_state_smem_bytes(batch, tile, meta_t.warps_per_cta, gates, True)
        return _constants.persistent_smem_bytes(gates * H, batch, tile, weights, copies, cell)
    budget = H200.smem_per_block - planner.KERNEL_SMEM_RESERVE
    in_cluster = meta_t.num_ctas <= planner.MAX_CLUSTER_CTAS
    # (so both modes' limits are checked: without clusters the grid, on the H200 the GRU's cluster)
    assert in_cluster == (planned_for == "H200") or (gates == 4 and planned_for == "H200")
    if not in_cluster:
        assert smem(limit, 1) <= budget < smem(limit + 1, 1)
    else:
        replicas = cost.resident_clusters(meta_t.num_ctas, H200.sm_count)
        slice_ = limit // replicas
        assert limit == slice_ * replicas and slice_ % tile == 0
        assert smem(slice_, 2) <= budget < smem(slice_ + tile, 2)
        assert smem(limit, 1) > budget  # (more than one staged copy of the whole batch holds)
    assert dispatch.on_cuda_recurrence(GATED_BACKWARD, meta_t, limit, np.float16, "auto").path == "kernel"
    decision = dispatch.on_cuda_recurrence(GATED_BACKWARD, meta_t, limit + 1, np.float16, "auto")
    assert decision.path == "fallback"
    assert f"limit of {limit}" in decision.warning and f"{gates * H} values an example" in decision.warning
    with pytest.raises(ValueError, match=rf"\({GATED_BACKWARD}\) cannot run this layer: batch"):
        dispatch.on_cuda_recurrence(GATED_BACKWARD, meta_t, limit + 1, np.float16, "native")


def test_a_layout_that_does_not_fit_says_why(h200_build):
    meta = _meta(8192, 8192, np.float32)  # dense: no register and shared-memory split holds it
    assert not meta.fits
    assert dispatch.cuda_fit(meta, 1, np.float32) == (False, meta.reason)
    assert dispatch.on_cuda_recurrence(FORWARD, meta, 1, np.float32, "auto").why == meta.reason


def test_weight_grad_on_an_h200(h200_build):
    sparse, dense = _meta(2304, 4), _meta(2304, 230)
    assert not cost.weight_grad_prefers_dense(sparse, 16, 1)[0]
    decision = dispatch.on_cuda_weight_grad(sparse, 300, 16, 2304, 1, "auto")
    assert decision.path == "kernel"
    assert decision.time_chunks == dispatch.weight_grad_time_chunks(sparse, 1, 300, H200.sm_count) > 1
    # Where the einsum is expected faster, "auto" takes it without a warning; "native" does not.
    assert cost.weight_grad_prefers_dense(dense, 16, 1)[0]
    decision = dispatch.on_cuda_weight_grad(dense, 300, 16, 2304, 1, "auto")
    assert decision.path == "fallback" and decision.warning is None
    assert dispatch.on_cuda_weight_grad(dense, 300, 16, 2304, 1, "native").path == "kernel"
    # A layer too wide for one CTA's shared memory falls back with a warning, or raises.
    wide = H200.smem_per_block // 8 + 1
    decision = dispatch.on_cuda_weight_grad(sparse, 10, 1, wide, 1, "auto")
    assert decision.path == "fallback" and "bytes of shared memory per CTA" in decision.warning
    with pytest.raises(ValueError, match="weight-gradient kernel cannot run: H="):
        dispatch.on_cuda_weight_grad(sparse, 10, 1, wide, 1, "native")


def test_weight_grad_without_its_cuda_target(monkeypatch, no_cuda_build):
    meta = _meta(256, 26)
    decision = dispatch.on_cuda_weight_grad(meta, 10, 4, 256, 1, "auto")
    assert decision.path == "fallback" and decision.why == "the CUDA module of jax_sprnn was not built"
    monkeypatch.setattr(_native, "cuda_targets", lambda: frozenset({FORWARD, BACKWARD}))
    with pytest.raises(ValueError, match=f"not built with {WEIGHT_GRAD}"):
        dispatch.on_cuda_weight_grad(meta, 10, 4, 256, 1, "native")


def test_cpu_fallback_lowering_runs_and_warns_once(monkeypatch):
    # Without the CPU module every primitive lowers its pure-JAX fallback; forward and gradient
    # still match the reference, and the warning comes once.
    monkeypatch.setattr(_native, "has_cpu_kernels", lambda: False)
    monkeypatch.setattr(primitives, "_warned", set())
    # On the CPU even where a GPU is the default backend: the CPU lowering is what is tested.
    with jax.default_device(jax.devices("cpu")[0]):
        _check_cpu_fallback()


def _check_cpu_fallback():
    dense, w, x, h0 = make_problem(7, 40, 3, 6, 0.3)

    def loss(values, x):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), reverse=True)
        return jnp.sum(y ** 2) + jnp.sum(h)

    def loss_ref(kernel, x):
        y, h = js.reference_rnn(x, h0, kernel, reverse=True)
        return jnp.sum(y ** 2) + jnp.sum(h)

    with pytest.warns(RuntimeWarning, match="CPU module was not built") as record:
        value, (dvalues, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w.values, x)
    assert sum("CPU module" in str(r.message) for r in record) == 1
    value_ref, (dkernel, dx_ref) = jax.value_and_grad(loss_ref, argnums=(0, 1))(dense, x)
    assert rel_err(value, value_ref) < TOLERANCE["float32"]
    assert rel_err(dx, dx_ref) < 1e-4
    assert rel_err(dvalues, w.gather(dkernel).values) < 1e-4


def test_a_misspelled_parameter_is_an_error():
    dense, w, x, h0 = make_problem(1, 16, 2, 3, 0.5)
    x_tm = jnp.swapaxes(x, 0, 1)
    lengths = jnp.full((2,), 3, jnp.int32)
    with pytest.raises(TypeError, match="activaton"):
        primitives.sprnn_forward_p.bind(x_tm, h0, w.values, w.indices, w.lane_row, lengths,
                                        activaton="tanh", reverse=False, meta=w.meta, method="auto")
