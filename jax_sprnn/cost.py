"""Per-step time estimates that let ``method="auto"`` pick the faster GPU path for the forward pass.

The persistent kernel wins by 2-7x at small batches, but every 4-example batch plane adds a pass
over the slots and over staged h, while a dense cuBLAS step costs about the same from B=1 to B=16.
So at B=16 and H <= 2304 in 16-bit storage the dense path can win (benchmarks/RESULTS.md, sweep).

Both models are fitted to the H200 sweep of 2026-11-30 (``benchmarks/results/sweep_fp16_2026-11-30.json``,
jax 0.11.2, fp16, H 1152-8192, B 1-16, density 1-30%); ``tests/test_cost.py`` checks them against it.

* Kernel: ``a + planes * (b + c * warps_per_cta * K_eff)`` µs, where ``K_eff`` weights the
  shared-memory tier's slots by :data:`jax_sprnn.planner.SMEM_SLOT_COST`: one step walks every plane,
  and a CTA's warps share its SM. Within about ±35% of every measured point, mostly ±15%.
* Dense (16-bit): ``max(DENSE_MIN_US, 2 * H**2 / DENSE_BYTES_PER_US)`` µs: a fixed cost per step
  (launches, a small GEMM's latency) until the weights' bytes take longer to read.

Only 16-bit storage is ever sent to the dense path: float32 must stay at full float32 precision,
which makes its dense step several times slower than the fp16 one, and the kernel won every measured
fp32 point. Other GPUs use the same constants; they are estimates, so ``auto`` switches only when
the kernel is expected to be :data:`SWITCH_MARGIN` times slower.
"""

from __future__ import annotations

import numpy as np

from .layout import LayoutMeta
from .planner import SMEM_SLOT_COST

KERNEL_FIXED_US = 1.6
KERNEL_PLANE_US = 1.85
KERNEL_SLOT_US = 0.0033  # per plane, per warp of a CTA and per (register-equivalent) slot
DENSE_MIN_US = 8.5
DENSE_BYTES_PER_US = 3.3e6  # ~3.3 TB/s: the H200's HBM rate as a dense GEMV step sees it
SWITCH_MARGIN = 1.25


def batch_planes(meta: LayoutMeta, batch: int) -> int:
    """The batch planes (tiles of ``load_bytes / 4`` examples) one kernel step walks."""
    return -(-batch // max(1, meta.load_bytes // 4))


def persistent_step_us(meta: LayoutMeta, batch: int) -> float:
    """Estimated µs per step of the persistent forward kernel for this layout and batch."""
    k_eff = meta.reg_slots + SMEM_SLOT_COST * (meta.slots_per_lane - meta.reg_slots)
    per_plane = KERNEL_PLANE_US + KERNEL_SLOT_US * meta.warps_per_cta * k_eff
    return KERNEL_FIXED_US + batch_planes(meta, batch) * per_plane


def dense_step_us(hidden: int, dtype) -> float:
    """Estimated µs per step of XLA's dense recurrence in 16-bit storage."""
    return max(DENSE_MIN_US, np.dtype(dtype).itemsize * hidden * hidden / DENSE_BYTES_PER_US)


def auto_prefers_dense(meta: LayoutMeta, batch: int, dtype) -> tuple[bool, str]:
    """Whether ``method="auto"`` should run the dense XLA path although the kernel fits, and why."""
    if np.dtype(dtype).itemsize != 2:
        return False, "float32 storage: the persistent kernel"
    kernel, dense = persistent_step_us(meta, batch), dense_step_us(meta.hidden, dtype)
    why = (f"estimated {kernel:.1f} µs per step for the persistent kernel ({batch_planes(meta, batch)} "
           f"batch planes) against {dense:.1f} µs for XLA's dense step")
    return kernel > SWITCH_MARGIN * dense, why
