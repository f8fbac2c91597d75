"""Check ``jax_sprnn.cost``'s cluster-mode step estimate against the cluster suite's measurements,
and refit its constants.

    python -m benchmarks.cost_fit benchmarks/results/cluster_sizes_2026-12-04.json [more.json ...]

A file is the cluster suite's JSON (wall-clock slopes) or `tools/kernel_time.py`'s (the kernel's own
device time, free of the host's jitter: `KT_CASES="simple 256 0.1 1 float16 ctas=8;..."
tools/gpu_check.sh kerneltime`); of the latter, the simple cell's cluster-mode rows count. Every
layout timed (the planner's, ``nN``: the layer on at most N CTAs) is one point: its measured µs per
step against ``cost.cluster_step_us`` for the layout and batch. The fit is a least-squares solve of
the estimate's linear form, ``a + planes * (b + c * warps * K_eff + (s + d * [N > 8]) * cols / 1024
+ e * [wide variant])`` with ``c`` held at ``KERNEL_SLOT_US``, on relative errors (each point
weighted by 1/measured), so that 2-µs and 10-µs steps count alike.
The constants in ``cost.py`` are rounded from its output.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

from jax_sprnn import cost, planner

#: The suite's peers that are not a cluster-mode layout of the layer.
NOT_CLUSTER = ("grid_mode", "grid_layout")


def layout_of(hidden: int, k: int, ctas: int, warps_per_cta: int, dtype: str) -> planner.LayoutMeta | None:
    """The layout meta of a timed layout: its register tier is the planner's for that thread count."""
    threads = warps_per_cta * planner.WARP
    reg = max((r for r, most in planner.H200.thread_limits(dtype) if r <= k and threads <= most),
              default=None)
    if reg is None:
        return None
    return planner.LayoutMeta(hidden, k, ctas * warps_per_cta, warps_per_cta, reg, 16, True, "timed")


def points(paths):
    """``(file, row, peer, meta, batch, measured µs)`` of every cluster-mode layout timed."""
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        if isinstance(result, list):  # tools/kernel_time.py: one row per case, its layout included
            for row in result:
                if row.get("cell") != "simple" or row.get("exchange") != "cluster":
                    continue
                meta = layout_of(row["hidden"], row["K"], row["ctas"], row["warps_per_cta"], row["dtype"])
                if meta is not None:
                    yield path, row, f"kt n{row['ctas']}", meta, row["batch"], row["us_per_step"]
            continue
        for row in result["rows"]:
            for name, peer in row.get("peers", {}).items():
                us = peer.get("us_per_step")
                if us is None or name in NOT_CLUSTER or not (name == "ours" or "ctas" in peer):
                    continue
                src = row if name == "ours" else peer
                if src.get("exchange", "cluster") != "cluster":
                    continue
                meta = layout_of(row["hidden"], src["K"], src["ctas"], src["warps_per_cta"], row["dtype"])
                if meta is not None:
                    yield path, row, name, meta, row["batch"], us


def features(meta: planner.LayoutMeta, batch: int, dtype: str) -> np.ndarray:
    """The estimate's linear form: ``[1, planes, planes * w * K_eff, planes * cols / 1024,
    planes * [N > 8] * cols / 1024, planes * [wide variant]]``."""
    planes = math.ceil(cost.batch_planes(meta, batch) / cost.cluster_replicas(meta, batch))
    k_eff = meta.reg_slots + cost.SMEM_SLOT_COST * (meta.slots_per_lane - meta.reg_slots)
    state = meta.num_cols / 1024
    wide_cluster = meta.num_ctas > cost.PORTABLE_CLUSTER_CTAS
    return np.array([1.0, planes, planes * meta.warps_per_cta * k_eff, planes * state,
                     planes * wide_cluster * state, planes * cost.wide_variant(meta, dtype)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    pts = list(points(args.results))
    rows, measured, estimated = [], [], []
    print(f"{'H':>5} {'dtype':8} {'B':>3} {'layout':12} {'CTAs x warps, K':>17} {'wide':>4}"
          f" {'measured':>8} {'estimate':>8} {'ratio':>6}")
    for _, row, name, meta, batch, us in pts:
        est = cost.cluster_step_us(meta, batch, dtype=row["dtype"])
        rows.append(features(meta, batch, row["dtype"]))
        measured.append(us)
        estimated.append(est)
        shape = f"{meta.num_ctas} x {meta.warps_per_cta}, {meta.slots_per_lane}"
        wide = "yes" if cost.wide_variant(meta, row["dtype"]) else ""
        print(f"{row['hidden']:5d} {row['dtype']:8} {batch:3d} {name:12} {shape:>17} {wide:>4}"
              f" {us:8.2f} {est:8.2f} {us / est:6.2f}")
    measured, estimated = np.array(measured), np.array(estimated)
    ratio = measured / estimated
    print(f"\n{len(pts)} points; measured / estimate: median {np.median(ratio):.2f}, "
          f"10-90% {np.percentile(ratio, 10):.2f}-{np.percentile(ratio, 90):.2f}")
    x = np.array(rows) / measured[:, None]
    # The slot rate is the grid fit's KERNEL_SLOT_US (shared by both modes): the others are solved.
    free = [0, 1, 3, 4, 5]
    target = np.ones(len(pts)) - x[:, 2] * cost.KERNEL_SLOT_US
    solved, *_ = np.linalg.lstsq(x[:, free], target, rcond=None)
    coef = np.zeros(6)
    coef[free], coef[2] = solved, cost.KERNEL_SLOT_US
    names = ["fixed", "plane", "slot (fixed)", "state (cols / 1024)", "wide cluster (N > 8, cols / 1024)",
             "wide variant"]
    print("least-squares constants (relative errors):",
          ", ".join(f"{n} {c:.4g}" for n, c in zip(names, coef)))
    fit_ratio = measured / (np.array(rows) @ coef)
    print(f"refit: measured / estimate median {np.median(fit_ratio):.2f}, "
          f"10-90% {np.percentile(fit_ratio, 10):.2f}-{np.percentile(fit_ratio, 90):.2f}")


if __name__ == "__main__":
    main()
