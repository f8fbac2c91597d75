"""The constants that Python and the kernels share have one source, jax_sprnn/_constants.py.

The compiled modules export what they were built with (through the header CMake generates from
that file); these tests compare it with the file, and check that the planner's tables are derived
from it. The CPU module is always built, so this runs in CI without a GPU.
"""

import itertools

import pytest

from jax_sprnn import _constants, _native, planner

_MODULES = {"cpu": _native.cpu_module(), "cuda": _native.cuda_module()}


def _compiled(platform):
    module = _MODULES[platform]
    if module is None:
        pytest.skip(f"the {platform} module is not loaded: "
                    f"{_native.unavailable_reason(f'_sprnn_{platform}')}")
    return module.constants()


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_compiled_values_are_the_python_ones(platform):
    compiled = _compiled(platform)
    assert sorted(compiled) == sorted(_constants.EXPORTED)
    for name in _constants.EXPORTED:
        want = getattr(_constants, name)
        if not callable(want):
            assert compiled[name] == want, name


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_compiled_formulas_are_the_python_ones(platform):
    compiled = _compiled(platform)
    sizes = (0, 1, 3, 17, 64, 1000, 8192)
    for batch, hidden in itertools.product(sizes, sizes):
        assert (compiled["cuda_workspace_bytes"](batch, hidden)
                == _constants.cuda_workspace_bytes(batch, hidden)), (batch, hidden)
        for pairs in (0, 1, 5, 16):
            assert (compiled["weight_grad_smem_bytes"](hidden, batch, pairs)
                    == _constants.weight_grad_smem_bytes(hidden, batch, pairs)), (hidden, batch, pairs)
        assert (compiled["weight_grad_smem_bytes"](hidden, batch)
                == _constants.weight_grad_smem_bytes(hidden, batch))
    for hidden, batch, tile, weights, buffers in itertools.product(
            (1, 63, 256, 2304), (1, 3, 16, 21), (1, 2, 4), (0, 4, 4100), (1, 2)):
        assert (compiled["persistent_smem_bytes"](hidden, batch, tile, weights, buffers)
                == _constants.persistent_smem_bytes(hidden, batch, tile, weights, buffers))
        assert (compiled["persistent_smem_bytes"](hidden, batch, tile, weights, buffers, 528)
                == _constants.persistent_smem_bytes(hidden, batch, tile, weights, buffers, 528))
    for batch, tile, warps, gates, transposed in itertools.product(
            (1, 3, 16, 21), (1, 2, 4), (1, 7, 32), (1, 3, 4), (False, True)):
        assert (compiled["cell_state_smem_bytes"](batch, tile, warps, gates, transposed)
                == _constants.cell_state_smem_bytes(batch, tile, warps, gates, transposed))
    for layout_tile, batch in itertools.product((1, 2, 4), range(0, 12)):
        assert (compiled["batch_tile"](layout_tile, batch)
                == _constants.batch_tile(layout_tile, batch)), (layout_tile, batch)
    for words, tile, backward, threads, pp, wide, tiles in itertools.product(
            (0, 8, 16, 17, 24, 32, 33, 64), (1, 2, 4), (False, True), (256, 384, 512, 768), (1, 2),
            (False, True), (False, True)):
        assert (compiled["split_modes"](words, tile, backward, threads, pp, wide, tiles)
                == _constants.split_modes(words, tile, backward, threads, pp, wide, tiles)), (
            words, tile, backward, threads, pp, wide, tiles)
    for k in range(0, 300):
        assert (compiled["weight_grad_slots_per_thread"](k)
                == _constants.weight_grad_slots_per_thread(k)), k


def test_split_modes_is_the_kernels_rule():
    """The variants measured with and without the split (RESULTS.md): the forward's tier of 32
    words splits at tiles 1-2 only, a backward's tiers of up to 16 words, a tile of 4 only at 384
    threads or fewer, never a two-plane, wide or tile-layout variant."""
    split = _constants.split_modes
    assert split(32, 1, False, 640) and split(32, 2, False, 640) and not split(32, 4, False, 384)
    assert not split(33, 1, False, 384)
    assert split(16, 1, True, 512) and not split(24, 1, True, 256)
    assert split(16, 4, False, 384) and not split(16, 4, False, 512)
    assert not split(8, 4, False, 384, planes_per_pass=2)
    assert not split(8, 1, False, 512, wide=True) and not split(8, 1, False, 512, tiles=True)


def test_weight_grad_threads_cover_every_slot_of_a_lane():
    for k in range(1, 300):
        spt = _constants.weight_grad_slots_per_thread(k)
        assert spt in (8, 16)
        assert spt >= min(k, 16)  # one thread covers a short lane, at most 16 slots otherwise


def test_planner_thread_limits_are_the_widest_compiled_variant():
    for tiers, limits in ((_constants.PERSISTENT_TIERS_16, planner.H200.max_threads_16),
                          (_constants.PERSISTENT_TIERS_32, planner.H200.max_threads_32)):
        assert [rs for rs, _ in limits] == list(tiers)
        for rs, most in limits:
            assert most in (tiers[rs].narrow_threads, tiers[rs].wide_threads)
            assert most >= tiers[rs].narrow_threads and most >= tiers[rs].wide_threads
    assert planner.KERNEL_SMEM_RESERVE == _constants.KERNEL_SMEM_RESERVE


def test_header_generation_rejects_a_bad_table(monkeypatch):
    monkeypatch.setitem(_constants.PERSISTENT_TIERS_32, 8, _constants.Tier(384, 256, 4))
    with pytest.raises(ValueError, match="wide variant must raise"):
        _constants.cxx_header()


def test_batch_tile_is_the_narrowest_power_of_two_that_holds_the_batch():
    """A batch of one or two runs on a narrower tile than the layout's; more take the layout's."""
    assert [_constants.batch_tile(4, b) for b in (1, 2, 3, 4, 5, 33)] == [1, 2, 4, 4, 4, 4]
    assert [_constants.batch_tile(2, b) for b in (1, 2, 3)] == [1, 2, 2]
    assert [_constants.batch_tile(1, b) for b in (1, 2, 7)] == [1, 1, 1]


def test_max_persistent_batch_is_the_largest_the_handler_accepts():
    """The planner's grid-mode batch limit is exactly where the handler's shared-memory plan stops
    fitting (it once ignored the lengths, promising B=900 at H=64 float32 where the handler took
    888). (Cluster mode's: tests/test_planner.py.)"""
    import dataclasses

    import numpy as np

    grid_only = dataclasses.replace(planner.H200, cluster_launch=False)
    for hidden, nnz, dtype in ((64, 6, np.float32), (256, 26, np.float16), (1024, 100, np.float32)):
        plan = planner.plan_layout(np.full(hidden, nnz), dtype, grid_only)
        assert plan.fits
        tile = plan.load_bytes // 4
        weights = planner.weight_smem_bytes(plan.slots_per_lane, plan.reg_slots, plan.threads_per_cta,
                                            dtype)
        budget = planner.H200.smem_per_block - _constants.KERNEL_SMEM_RESERVE
        most = planner.max_persistent_batch(plan, dtype, grid_only)
        assert most >= tile
        assert _constants.persistent_smem_bytes(hidden, most, tile, weights) <= budget
        assert _constants.persistent_smem_bytes(hidden, most + 1, tile, weights) > budget


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_registered_targets_carry_the_abi_version(platform):
    """A program exported against another calling convention names other targets, so loading it
    fails with "no handler registered" instead of miscomputing."""
    module = _MODULES[platform]
    if module is None:
        pytest.skip(f"the {platform} module is not loaded")
    names = set(module.registrations())
    if platform == "cuda":
        names |= set(module.testing_registrations())
    kinds = _constants.PRODUCTION_TARGET_KINDS + (
        _constants.TESTING_TARGET_KINDS if platform == "cuda" else ())
    if platform == "cuda":
        kinds = tuple(k for k in kinds if k not in _constants.CPU_ONLY_TARGET_KINDS)
    assert names == {f"jax_sprnn_{kind}_v{_constants.FFI_ABI_VERSION}" for kind in kinds}
    assert set(_native.TARGETS) == {_constants.ffi_target(k) for k in _constants.PRODUCTION_TARGET_KINDS}
