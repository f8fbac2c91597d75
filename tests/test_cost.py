"""The GPU path choices of method="auto": the per-step models against the H200 runs they were fitted
to (benchmarks/results/sweep_2026-11-30.json, whose dense figures are XLA's dense lax.scan, and
training_2026-11-30.json for the weight gradient)."""

import json
import pathlib

import numpy as np
import pytest

from jax_sprnn import cost
from jax_sprnn.layout import LayoutMeta

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks/results"
SWEEP = RESULTS / "sweep_2026-11-30.json"
TRAINING = RESULTS / "training_2026-11-30.json"


def _measured():
    rows = json.loads(SWEEP.read_text())["rows"]
    out = []
    for r in rows:
        peers = r.get("peers", {})
        measured = all("us_per_step" in peers.get(k, {}) for k in ("ours", "dense"))
        if r["dtype"] == "float16" and measured:
            meta = LayoutMeta(r["hidden"], r["K"], r["ctas"] * r["warps_per_cta"],
                              r["warps_per_cta"], r["reg_slots"], 16, True, "fits")
            out.append((meta, r["batch"], peers["ours"]["us_per_step"],
                        peers["dense"]["us_per_step"]))
    return out


def test_the_sweep_is_there():
    assert len(_measured()) >= 30


def test_auto_never_picks_a_clearly_slower_path():
    for meta, batch, ours, dense in _measured():
        prefers_dense, why = cost.auto_prefers_dense(meta, batch, np.float16)
        picked = dense if prefers_dense else ours
        where = f"H={meta.hidden} K={meta.slots_per_lane} B={batch}: ours {ours:.2f}, dense {dense:.2f}"
        assert picked <= 1.35 * min(ours, dense), where + f", picked {picked:.2f} ({why})"
        if ours >= 1.5 * dense:
            assert prefers_dense, where
        if dense >= 1.5 * ours:
            assert not prefers_dense, where


def test_the_kernel_model_follows_the_measurements():
    ratios = [cost.persistent_step_us(m, b) / ours for m, b, ours, _ in _measured()]
    assert 0.7 < min(ratios) and max(ratios) < 1.45
    assert 0.9 < np.median(ratios) < 1.1


def test_more_batch_planes_cost_more_and_float32_stays_on_the_kernel():
    meta = LayoutMeta(2304, 24, 128 * 18, 18, 24, 16, True, "fits")
    times = [cost.persistent_step_us(meta, b) for b in (1, 4, 5, 8, 16)]
    assert times[0] == times[1] < times[2] == times[3] < times[4]
    assert cost.auto_prefers_dense(meta, 16, np.float16)[0]
    assert not cost.auto_prefers_dense(meta, 4, np.float16)[0]
    assert not cost.auto_prefers_dense(meta, 16, np.float32)[0]


@pytest.mark.parametrize("hidden", [4608, 8192])
def test_dense_estimate_grows_with_the_weights(hidden):
    assert cost.dense_step_us(hidden // 4, np.float16) == cost.DENSE_MIN_US  # a fixed cost per step
    assert cost.dense_step_us(2 * hidden, np.float16) > cost.dense_step_us(hidden, np.float16)


def test_gpu_path_of_a_layer():
    # Which GPU path a layer's forward lowers to (planned for this machine's GPU, else an H200).
    from jax_sprnn import _native
    from jax_sprnn.dispatch import gpu_path

    if "jax_sprnn_forward" not in _native.cuda_targets():
        pytest.skip("the CUDA module was not built")
    import jax.numpy as jnp
    import jax_sprnn as js

    rng = np.random.default_rng(0)
    w = js.SparseWeights.from_dense(rng.standard_normal((2304, 2304)).astype(np.float32),
                                    density=0.3, dtype=jnp.float16, device=_native.current_device_spec())
    assert gpu_path(w.meta, 4, jnp.float16)[0] == "persistent"
    path, why = gpu_path(w.meta, 16, jnp.float16)
    if cost.auto_prefers_dense(w.meta, 16, jnp.float16)[0]:
        assert path == "dense" and "µs per step" in why
    assert gpu_path(w.meta, 16, jnp.float16, method="native")[0] == "persistent"
    assert gpu_path(w.meta, 16, jnp.float16, target="jax_sprnn_backward")[0] == "persistent"
    too_big, why = gpu_path(w.meta, 10_000, jnp.float16, method="native")
    assert too_big == "dense" and "exceeds the persistent kernel's limit" in why


def test_weight_grad_choice_matches_the_training_runs():
    rows = json.loads(TRAINING.read_text())["rows"]
    assert len(rows) >= 5
    for r in rows:
        meta = LayoutMeta(r["hidden"], r["K"], r["ctas"] * r["warps_per_cta"], r["warps_per_cta"],
                          0, 16, True, "fits")
        kernel, dense = (r["peers"][k]["us_per_step"] for k in ("wgrad", "wgrad_xla"))
        prefers_dense, why = cost.weight_grad_prefers_dense(meta, r["batch"], 1)
        picked = dense if prefers_dense else kernel
        assert picked <= 1.35 * min(kernel, dense), (r["hidden"], r["density"], r["batch"], why)


def test_weight_grad_stays_on_the_kernel_when_the_dense_product_is_large():
    meta = LayoutMeta(16384, 8, 132 * 8, 8, 8, 16, True, "fits")  # 1 GiB of float32 [H, H]
    prefers_dense, why = cost.weight_grad_prefers_dense(meta, 4, 2)
    assert not prefers_dense and "MiB" in why
