"""Every recent NVIDIA GPU: the planner against the published specs of A100, L4, RTX 4090, H100 and
B200, the architectures the CUDA module is built for, and dispatch on a GPU the module has no code
for (made-up builds and devices: no GPU needed)."""

import dataclasses
import os
import pathlib
import re
import warnings

import numpy as np
import pytest

from jax_sprnn import _native, dispatch, planner, primitives
from jax_sprnn.dispatch import BACKWARD, FORWARD
from jax_sprnn.planner import DeviceSpec, LayoutMeta

# Published specs (CUDA programming guide, compute capabilities table; the vendors' data sheets):
# SM count, the opt-in shared memory per block, 1024 threads per block.
# Thread-block clusters came with sm_90.
A100 = DeviceSpec("NVIDIA A100-SXM4-80GB", 108, 166912, 1024, (8, 0), cluster_launch=False)
L4 = DeviceSpec("NVIDIA L4", 58, 101376, 1024, (8, 9), cluster_launch=False)
RTX_4090 = DeviceSpec("NVIDIA GeForce RTX 4090", 128, 101376, 1024, (8, 9), cluster_launch=False)
H100 = DeviceSpec("NVIDIA H100 80GB HBM3", 132, 232448, 1024, (9, 0))
B200 = DeviceSpec("NVIDIA B200", 148, 232448, 1024, (10, 0))
DEVICES = (A100, L4, RTX_4090, H100, B200)

RESERVE = planner.KERNEL_SMEM_RESERVE


def _plan(hidden, per_row, dtype, device, load_bytes=16):
    return planner.plan_layout(np.full(hidden, per_row), dtype, device, load_bytes=load_bytes)


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
def test_h2304_at_10_percent_fits_every_device(device):
    # The grid layout: 230 nonzeros a row sit in registers (no shared-memory weight tier); shared
    # memory holds one plane of staged h (H * 16 bytes at 16-byte loads), the reserve and 4
    # lengths. (Where the device has clusters the planner may take a cluster layout instead, which
    # fits too: tests/test_planner.py.)
    assert _plan(2304, 230, np.float16, device).fits
    device = dataclasses.replace(device, cluster_launch=False)
    plan = _plan(2304, 230, np.float16, device)
    assert plan.fits, plan.reason
    assert plan.num_ctas <= device.sm_count and plan.threads_per_cta <= 1024
    assert plan.smem_bytes == 2304 * 16 + RESERVE + 4 * 4
    # The batch: as many 4-example planes of staged h as the opt-in shared memory holds.
    planes = (device.smem_per_block - RESERVE) // (2304 * 16)
    assert planner.max_persistent_batch(plan, np.float16, device) == 4 * planes


@pytest.mark.parametrize("device, fits", [(A100, True), (L4, False), (RTX_4090, False),
                                          (H100, True), (B200, True)], ids=lambda x: getattr(x, "name", x))
def test_staged_h_over_99_kb_fits_the_big_shared_memories_only(device, fits):
    # H=6400 at 16-byte loads stages 6400 * 16 = 102400 bytes of h: more than the L4's and the RTX
    # 4090's 101376 bytes whatever the weights, well inside the A100's, the H100's and the B200's.
    plan = _plan(6400, 64, np.float16, device)
    assert plan.fits == fits, plan.reason
    if fits:
        assert plan.smem_bytes == 102400 + RESERVE + 16
    else:
        assert "does not fit on " + device.name in plan.reason
    # 4-byte loads stage a quarter of that (25600 bytes): it fits everywhere, one example a plane.
    assert _plan(6400, 64, np.float16, device, load_bytes=4).fits


@pytest.mark.parametrize("device, fits", [(A100, False), (L4, False), (RTX_4090, False),
                                          (H100, True), (B200, True)], ids=lambda x: getattr(x, "name", x))
def test_h8192_at_10_percent_needs_hopper_class_shared_memory(device, fits):
    # 819 nonzeros a row need K >= 32 slots a lane; at most 128 CTAs of up to 1024 threads hold
    # 8192 rows only with part of the slots in shared memory: ~198 KB per CTA on the H100, more than
    # the A100's 163 KB (and it needs more on fewer SMs).
    plan = _plan(8192, 819, np.float16, device)
    assert plan.fits == fits, plan.reason
    if fits:
        assert A100.smem_per_block < plan.smem_bytes <= device.smem_per_block


def test_fewer_sms_mean_more_shared_memory_per_cta():
    # The L4 and the RTX 4090 have the same shared memory per block; the L4's 58 SMs put more warps
    # in each CTA, and their float32 weight slots spill to shared memory beyond its 99 KB.
    assert _plan(4608, 461, np.float32, RTX_4090).fits
    plan = _plan(4608, 461, np.float32, L4)
    assert not plan.fits and "(58 SMs, 101376 bytes" in plan.reason


@pytest.mark.parametrize("hidden, per_row, dtype", [
    (1024, 102, np.float16), (2304, 230, np.float16), (4608, 461, np.float16),
    (1024, 1024, np.float32), (2048, 205, np.float32)])
def test_capacity_follows_shared_memory(hidden, per_row, dtype):
    # The largest batch never shrinks with more shared memory per block, nor with more SMs at equal
    # shared memory (in cluster mode they hold more replicas of a small layer's cluster).
    batch = {d.name: planner.max_persistent_batch(_plan(hidden, per_row, dtype, d), dtype, d)
             for d in DEVICES}
    assert batch[L4.name] <= batch[RTX_4090.name] <= batch[A100.name] <= batch[H100.name]
    assert 0 < batch[H100.name] <= batch[B200.name]
    assert batch[A100.name] < batch[H100.name]


# ---- the architectures of the CUDA module ----------------------------------------------------------

_CMAKE = pathlib.Path(__file__).resolve().parents[1] / "CMakeLists.txt"


def _cmake_default() -> tuple[str, ...]:
    match = re.search(r'set\(JAX_SPRNN_DEFAULT_CUDA_ARCHITECTURES "([^"]+)"\)', _CMAKE.read_text())
    assert match, "CMakeLists.txt no longer sets JAX_SPRNN_DEFAULT_CUDA_ARCHITECTURES"
    return tuple(match.group(1).split(";"))


def _parse(cmake: tuple[str, ...]) -> _native.CudaArchitectures:
    """CMake's meaning of an architecture list: N-real SASS, N-virtual PTX, plain N both."""
    sass = tuple(a.removesuffix("-real") for a in cmake if not a.endswith("-virtual"))
    ptx = tuple(a.removesuffix("-virtual") for a in cmake if not a.endswith("-real"))
    return _native.CudaArchitectures(cmake, sass, ptx)


DEFAULT = _parse(_cmake_default())


def test_the_default_build_has_sass_for_every_recent_gpu_and_ptx_for_newer_ones():
    assert DEFAULT.sass == ("80", "86", "89", "90", "100") and DEFAULT.ptx == ("100",)
    assert [DEFAULT.kernel_image(d.compute_capability) for d in DEVICES] == [
        "sm_80", "sm_89", "sm_89", "sm_90", "sm_100"]
    assert DEFAULT.kernel_image((8, 7)) == "sm_86"         # Jetson Orin: sm_86 SASS runs on 8.7
    assert DEFAULT.kernel_image((10, 3)) == "sm_100"       # B300
    assert DEFAULT.kernel_image((12, 0)) == "compute_100"  # RTX 50xx: the driver JITs the PTX
    assert DEFAULT.kernel_image((7, 5)) is None            # T4: older than every image


def test_arch_specific_sass_runs_on_its_own_compute_capability_only():
    archs = _native.CudaArchitectures(("90a-real",), ("90a",), ())
    assert archs.kernel_image((9, 0)) == "sm_90a" and archs.kernel_image((10, 0)) is None


def test_the_cuda_module_exports_the_architectures_it_was_built_for():
    # tools/gpu_check.sh builds for the GPU's own architecture unless CUDA_ARCHS=all, and says which
    # in JAX_SPRNN_EXPECTED_CUDA_ARCHS; a plain build uses CMakeLists.txt's default.
    archs = _native.cuda_architectures()
    if archs is None:
        pytest.skip(f"the CUDA module is not loaded: {_native.unavailable_reason('_sprnn_cuda')}")
    expected = os.environ.get("JAX_SPRNN_EXPECTED_CUDA_ARCHS", "all")
    want = DEFAULT if expected == "all" else _parse(tuple(expected.split(";")))
    assert archs.cmake == want.cmake, f"the CUDA module was built for {archs.cmake}, not {want.cmake}"
    assert (archs.sass, archs.ptx) == (want.sass, want.ptx)


# ---- dispatch on a GPU the module has no code for -----------------------------------------------

T4 = DeviceSpec("Tesla T4", 40, 65536, 1024, (7, 5))


def _on(monkeypatch, device, archs=DEFAULT):
    monkeypatch.setattr(_native, "cuda_targets", lambda: frozenset(_native.TARGETS))
    monkeypatch.setattr(_native, "cuda_architectures", lambda: archs)
    monkeypatch.setattr(_native, "current_device_spec", lambda: device)


def _meta(device):
    return LayoutMeta.from_plan(_plan(1024, 102, np.float16, device))


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name)
def test_the_kernel_runs_on_every_device_of_the_default_build(monkeypatch, device):
    _on(monkeypatch, device)
    assert dispatch.cuda_fit(_meta(device), 4, np.float16) == (True, "fits")


def test_a_gpu_without_code_in_the_module_falls_back_with_one_warning(monkeypatch):
    _on(monkeypatch, T4)
    meta = _meta(T4)
    ok, why = dispatch.cuda_fit(meta, 4, np.float16)
    assert not ok
    assert "no code for Tesla T4 (compute capability 7.5)" in why
    assert "sm_80, sm_86, sm_89, sm_90, sm_100" in why and "compute_100" in why
    decisions = [dispatch.on_cuda_recurrence(FORWARD, meta, 4, np.float16, "auto"),
                 dispatch.on_cuda_recurrence(BACKWARD, meta, 4, np.float16, "auto"),
                 dispatch.on_cuda_weight_grad(meta, 10, 4, 1024, 1, "auto")]
    assert all(d.path == "fallback" and d.why == why for d in decisions)
    # Every primitive of the call says the same thing, and the user sees it once.
    monkeypatch.setattr(primitives, "_warned", set())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for d in decisions:
            primitives._warn_once(d.warning)
    assert len(record) == 1 and "do not run on this GPU; using the dense XLA path" in str(
        record[0].message)
    with pytest.raises(ValueError, match=r"method='native'.*no code for Tesla T4"):
        dispatch.on_cuda_recurrence(FORWARD, meta, 4, np.float16, "native")
    with pytest.raises(ValueError, match=r"weight-gradient kernel cannot run: .*no code for Tesla"):
        dispatch.on_cuda_weight_grad(meta, 10, 4, 1024, 1, "native")


def test_a_narrowed_build_refuses_the_gpus_it_left_out(monkeypatch):
    hopper_only = _parse(("90-real",))
    _on(monkeypatch, A100, hopper_only)
    ok, why = dispatch.cuda_fit(_meta(A100), 4, np.float16)
    assert not ok and "SASS sm_90 and PTX none" in why and "CMAKE_CUDA_ARCHITECTURES" in why
    _on(monkeypatch, H100, hopper_only)
    assert dispatch.cuda_fit(_meta(H100), 4, np.float16)[0]


def test_a_gpu_without_cooperative_launch_is_refused(monkeypatch):
    no_coop = DeviceSpec("made-up", 108, 166912, 1024, (8, 0), cooperative_launch=False)
    _on(monkeypatch, no_coop)
    ok, why = dispatch.cuda_fit(_meta(no_coop), 4, np.float16)
    assert not ok and "cooperative launches" in why
    decision = dispatch.on_cuda_recurrence(FORWARD, _meta(no_coop), 4, np.float16, "auto")
    assert decision.path == "fallback" and "do not run on this GPU" in decision.warning
    with pytest.raises(ValueError, match="cooperative launches"):
        dispatch.on_cuda_recurrence(BACKWARD, _meta(no_coop), 4, np.float16, "native")
