"""Check ``jax_sprnn.cost``'s step estimates (cluster and grid mode) against measurements, and
refit their constants.

    python -m benchmarks.cost_fit benchmarks/results/kernel_time_*_h100_2026-12-0[56].json [more.json ...]
    python -m benchmarks.cost_fit <run.json> --picks   # ... and the planner's defaults the refit moves

A file is `tools/kernel_time.py`'s JSON (the kernel's own device time, free of the host's jitter:
`KT_CASES_FILE=tools/kt_cases/cluster_layouts.txt tools/gpu_check.sh kerneltime`; of it, the rows
of the simple cell, the GRU and the LSTM count: the planner weighs the gated cells' layouts with
the same estimates) or the cluster suite's (wall-clock slopes, ±0.3 µs a step of jitter: a check
of the cluster branch, too noisy to fit). Every layout timed is one point of its exchange mode's
branch (``nN``: a cluster of N CTAs; ``grid``: the grid's exchange): its measured µs per step
against ``cost.cluster_step_us`` or ``cost.persistent_step_us`` for the layout and batch.

Each branch is fitted on its own, a non-negative least-squares solve of its estimate's linear form
on relative errors (each point weighted by 1/measured, so that 2-µs and 10-µs steps count alike;
``--fit-all`` fits the wall-clock points too):

* cluster: ``a + planes * (b + c * warps * K_eff + l * K_eff + n * N + e * [wide variant]
  + (tile - 1) * (t + u * K_eff))``, all of it times ``cost.CLUSTER_SPLIT_FACTOR`` for a split
  variant in a run of the split era (``cost.split_factor``);
* grid: ``a + planes * (b + c * warps * K_eff) - g * (entries a narrow tile drops)``.

The constants in ``cost.py`` are rounded from its output. A cluster point's batch tile and planes
are the handler's of its day: runs before 2026-12-06 (the date in the file's name) kept the
layout's tile on every replica (``launch_before_narrowing``); later ones narrow it
(``cost.cluster_launch``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re

import numpy as np

from jax_sprnn import _constants, cost, planner

#: The suite's peers that are not a cluster-mode layout of the layer.
NOT_CLUSTER = ("grid_mode", "grid_layout")


def layout_of(hidden: int, k: int, ctas: int, warps_per_cta: int, dtype: str,
              gates: int = 1) -> planner.LayoutMeta | None:
    """The layout meta of a timed layout: its register tier is the planner's for that thread count."""
    threads = warps_per_cta * planner.WARP
    reg = max((r for r, most in planner.H200.thread_limits(dtype, gates) if r <= k and threads <= most),
              default=None)
    if reg is None:
        return None
    return planner.LayoutMeta(hidden, k, ctas * warps_per_cta, warps_per_cta, reg, 16, True, "timed",
                              gates=gates)


#: The forward kernels' gate counts, by tools/kernel_time.py's cell name (bidirectional and tile
#: cases are not one layout's forward step).
GATES = {"simple": 1, "gru": 3, "lstm": 4}


def points(paths, exchange: str = "cluster"):
    """``(file, row, peer, meta, batch, measured µs)`` of every layout timed in ``exchange`` mode
    (the grid's only from kernel-time files)."""
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        if isinstance(result, list):  # tools/kernel_time.py: one row per case, its layout included
            for row in result:
                if row.get("cell") not in GATES or row.get("exchange") != exchange:
                    continue
                meta = layout_of(row["hidden"], row["K"], row["ctas"], row["warps_per_cta"], row["dtype"],
                                 GATES[row["cell"]])
                if meta is not None and meta.exchange == exchange:
                    name = f"kt n{row['ctas']}" if exchange == "cluster" else "kt grid"
                    yield path, row, name, meta, row["batch"], row["us_per_step"]
            continue
        if exchange != "cluster":
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


#: The first day the handler narrowed a cluster-mode call's batch tile (one plane per replica).
NARROW_TILES_FROM = "2026-12-06"


def launch_before_narrowing(meta: planner.LayoutMeta, batch: int, dtype: str) -> tuple[int, int, int]:
    """``cost.cluster_launch`` as the handler ran before NARROW_TILES_FROM: the layout's tile (a
    narrower one only for a batch of 1 or 2), on as many replicas as the device holds at once."""
    tile = _constants.batch_tile(meta.load_bytes // 4, batch)
    tiles = -(-batch // tile)
    held = cost.resident_clusters(meta.num_ctas, ctas_per_sm=cost.ctas_per_sm(meta, tile, dtype))
    replicas = max(1, min(tiles, held))
    return tile, replicas, -(-tiles // replicas)


def narrowed(path) -> bool:
    """Whether the run in ``path`` (its name dated YYYY-MM-DD) had the narrow-tile handler."""
    day = _day(path)
    return day is None or day >= NARROW_TILES_FROM


#: The first day of the H100 runs whose kernel compiled its small tiers' phase loop per exchange
#: mode (``cost.CLUSTER_SPLIT_FACTOR``; merged late on 2026-12-06, timed on that day only on an
#: H200): the cluster constants are fitted to the runs before it.
SPLIT_MODES_FROM = "2026-12-07"


def _day(path) -> str | None:
    day = re.search(r"\d{4}-\d{2}-\d{2}", str(path))
    return day.group(0) if day else None


def split_era(path) -> bool:
    """Whether the run in ``path`` (its name dated YYYY-MM-DD) had the split phase loop."""
    day = _day(path)
    return day is None or day >= SPLIT_MODES_FROM


def split_of(path) -> bool | None:
    """The ``split`` argument of ``cost.cluster_step_at`` for a point of the run in ``path``: the
    kernel's own (None) from the split era on, else False (its kernels had no split)."""
    return None if split_era(path) else False


def launch(path, meta: planner.LayoutMeta, batch: int, dtype: str) -> tuple[int, int, int]:
    if narrowed(path):
        return cost.cluster_launch(meta, batch, dtype)
    return launch_before_narrowing(meta, batch, dtype)


def estimate(path, meta: planner.LayoutMeta, batch: int, dtype: str) -> float:
    """The estimate for a point of the run in ``path``: ``cost.cluster_step_us`` with its day's
    launch, or ``cost.persistent_step_us`` for a grid-mode layout."""
    if meta.exchange == "grid":
        return cost.persistent_step_us(meta, batch)
    tile, _, planes = launch(path, meta, batch, dtype)
    return cost.cluster_step_at(meta, tile, planes, dtype, split=split_of(path))


#: Each branch's constants, in the order of its features' columns, as named in the output.
NAMES = {
    "cluster": ["fixed", "plane", "slot (warps * K_eff)", "lane (K_eff)", "CTA (N)", "wide variant",
                "entry (tile - 1)", "entry slot ((tile - 1) * K_eff)"],
    "grid": ["fixed", "plane", "slot (warps * K_eff)", "dropped entry"],
}

#: ... and as ``cost.py`` holds them.
CONSTANTS = {
    "cluster": ["CLUSTER_FIXED_US", "CLUSTER_PLANE_US", "CLUSTER_SLOT_US", "CLUSTER_LANE_US",
                "CLUSTER_CTA_US", "CLUSTER_WIDE_VARIANT_US", "CLUSTER_ENTRY_US", "CLUSTER_ENTRY_SLOT_US"],
    "grid": ["KERNEL_FIXED_US", "KERNEL_PLANE_US", "KERNEL_SLOT_US", "GRID_ENTRY_US"],
}


def features(path, meta: planner.LayoutMeta, batch: int, dtype: str) -> np.ndarray:
    """The estimate's linear form in its branch's constants (:data:`NAMES`), one column each."""
    k_eff = cost._slot_equivalents(meta)
    if meta.exchange == "grid":
        planes = cost.batch_planes(meta, batch)
        return np.array([1.0, planes, planes * meta.warps_per_cta * k_eff,
                         -cost.dropped_entries(meta, batch)])
    tile, _, planes = launch(path, meta, batch, dtype)
    # A split-era point's estimate carries the split's factor on every term (cost.cluster_step_at).
    factor = cost.split_factor(meta, tile, planes, dtype, split_of(path))
    return factor * planes * np.array([1.0 / planes, 1.0, meta.warps_per_cta * k_eff, k_eff,
                                       meta.num_ctas, cost.wide_variant(meta, dtype), tile - 1,
                                       (tile - 1) * k_eff])


def fit(x: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """The non-negative least-squares constants of ``x @ c ~ measured`` in relative error."""
    from scipy.optimize import nnls

    return nnls(x / measured[:, None], np.ones(len(measured)))[0]


def band(ratio: np.ndarray) -> str:
    return (f"median {np.median(ratio):.2f}, 10-90% {np.percentile(ratio, 10):.2f}-"
            f"{np.percentile(ratio, 90):.2f}, {ratio.min():.2f}-{ratio.max():.2f} in all")


#: The layer sizes whose defaults ``--picks`` compares (10% density, every cell, fp16 and fp32).
PICK_HIDDENS = (256, 384, 512, 768, 1024, 1152)


def defaults(hiddens=PICK_HIDDENS, dtypes=("float16", "float32"), cells=tuple(GATES)) -> dict:
    """The planner's default layout, ``(exchange, CTAs, warps a CTA, K, register slots)``, of a
    random layer at 10% for each ``(cell, hidden, dtype)``: what a change of constants moves."""
    import jax.numpy as jnp

    from jax_sprnn import SparseWeights

    out = {}
    for cell in cells:
        for hidden in hiddens:
            rng = np.random.default_rng(0)
            kernel = rng.standard_normal((hidden, GATES[cell] * hidden)).astype(np.float32)
            for dtype in dtypes:
                m = SparseWeights.from_dense(kernel, density=0.1, dtype=jnp.dtype(dtype),
                                             device=planner.H200).meta
                out[cell, hidden, dtype] = (m.exchange, m.num_ctas, m.warps_per_cta,
                                            m.slots_per_lane, m.reg_slots)
    return out


@contextlib.contextmanager
def constants(exchange: str, values):
    """``cost.py``'s constants of one branch set to ``values`` (in ``CONSTANTS`` order) inside."""
    names = CONSTANTS[exchange]
    kept = [getattr(cost, name) for name in names]
    try:
        for name, value in zip(names, values, strict=True):
            setattr(cost, name, float(value))
        yield
    finally:
        for name, value in zip(names, kept):
            setattr(cost, name, value)


def moved_defaults(exchange: str, values, **which) -> list[tuple]:
    """``(key, today's default, the default under values)`` of every default that ``values`` (one
    branch's constants, e.g. a refit) would move: the layouts to time before a refit lands
    (``tools/kt_cases``: today's default against ``ctas=N k=K``)."""
    before = defaults(**which)
    with constants(exchange, values):
        after = defaults(**which)
    return [(key, before[key], after[key]) for key in before if before[key] != after[key]]


def report(paths, exchange: str, fit_all: bool, picks: bool = False) -> None:
    """One branch's points against its estimate, and its refit (with ``picks``, the planner's
    defaults it would move)."""
    pts = list(points(paths, exchange))
    print(f"== {exchange} mode")
    if not pts:
        print("no points")
        return
    rows, measured, estimated, fitted = [], [], [], []
    print(f"{'H':>5} {'dtype':8} {'B':>3} {'layout':12} {'CTAs x warps, K':>17} {'wide':>4} {'tile':>4}"
          f" {'measured':>8} {'estimate':>8} {'ratio':>6}")
    for path, row, name, meta, batch, us in pts:
        est = estimate(path, meta, batch, row["dtype"])
        rows.append(features(path, meta, batch, row["dtype"]))
        measured.append(us)
        estimated.append(est)
        fitted.append(fit_all or name.startswith("kt "))
        shape = f"{meta.num_ctas} x {meta.warps_per_cta}, {meta.slots_per_lane}"
        wide = "yes" if cost.wide_variant(meta, row["dtype"]) else ""
        tile = (launch(path, meta, batch, row["dtype"])[0] if exchange == "cluster"
                else meta.load_bytes // 4 - cost.dropped_entries(meta, batch))
        print(f"{row['hidden']:5d} {row['dtype']:8} {batch:3d} {name:12} {shape:>17} {wide:>4} {tile:4d}"
              f" {us:8.2f} {est:8.2f} {us / est:6.2f}")
    measured, estimated, fitted = np.array(measured), np.array(estimated), np.array(fitted)
    print(f"\n{len(pts)} points; measured / estimate: {band(measured / estimated)}")
    if not fitted.any():
        print("no points to fit (kernel-time files, or --fit-all)")
        return
    x = np.array(rows)
    coef = fit(x[fitted], measured[fitted])
    print(f"non-negative least-squares constants ({int(fitted.sum())} points, relative errors):",
          ", ".join(f"{n} {c:.4g}" for n, c in zip(NAMES[exchange], coef)))
    print(f"refit: measured / estimate {band(measured / (x @ coef))}\n")
    if picks:
        moved = moved_defaults(exchange, coef)
        print(f"the refit moves {len(moved)} defaults (10%; exchange, CTAs, warps, K, register slots):")
        for key, before, after in moved:
            print(f"  {' '.join(map(str, key)):20s} {before} -> {after}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--fit-all", action="store_true",
                    help="fit the wall-clock points too (by default only the kernel-time ones)")
    ap.add_argument("--picks", action="store_true",
                    help="list the planner's defaults each refit would move (H = "
                         f"{', '.join(map(str, PICK_HIDDENS))}, every cell, fp16 and fp32)")
    args = ap.parse_args()
    for exchange in ("cluster", "grid"):
        report(args.results, exchange, args.fit_all, args.picks)


if __name__ == "__main__":
    main()
