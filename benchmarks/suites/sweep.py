"""sweep: hidden size x batch x density x dtype, every peer, and where dense overtakes us.

The full grid (160 cases) does not fit one 10-minute run: split it with --dtype / --hidden, and
pass the previous run's sweep.json to --resume to measure only the cases it lacks (its rows are
kept, so the plots cover everything measured so far). Cases left when the time budget runs out are
recorded as not run.
"""

from __future__ import annotations

import itertools
import json
import math

from .. import plots
from ..problems import Layer, row_balanced_kernel
from .common import Context, case_columns, case_row, print_skips

GRID = dict(hidden=(1152, 2304, 4608, 8192), batch=(1, 4, 16, 64),
            density=(0.01, 0.05, 0.1, 0.2, 0.3), dtype=("float16", "float32"))
QUICK = dict(hidden=(2304, 4608), batch=(4, 16), density=(0.05, 0.1, 0.3), dtype=("float16",))
SMOKE = dict(hidden=(64,), batch=(2,), density=(0.1, 0.3), dtype=("float16",))

KEY = ("hidden", "batch", "density", "dtype")


def grid(ctx: Context) -> dict:
    base = SMOKE if ctx.smoke else QUICK if ctx.quick else GRID
    return {name: getattr(ctx, name) or values for name, values in base.items()}


def _done(ctx: Context) -> dict:
    """Rows of a previous run that measured their case (kept, and not measured again)."""
    if ctx.resume is None:
        return {}
    rows = json.loads(ctx.resume.read_text())["rows"]
    return {tuple(r[k] for k in KEY): r for r in rows if "peers" in r}


def run(ctx: Context) -> None:
    g = grid(ctx)
    done = _done(ctx)
    seen: set = set()
    ctx.recorder.set(grid=g)
    in_grid = set(itertools.product(g["hidden"], g["batch"], g["density"], g["dtype"]))
    for key, row in done.items():  # a previous part's cases outside this grid stay in the results
        if key not in in_grid:
            ctx.recorder.add(row, echo=False)
    # H and density outermost: one random kernel per (H, density), one packing per dtype.
    for hidden, density in itertools.product(g["hidden"], g["density"]):
        base = None
        for dtype in g["dtype"]:
            layer = None
            for batch in g["batch"]:
                key = (hidden, batch, density, dtype)
                if key in done:
                    ctx.recorder.add(done[key], echo=False)
                    continue
                if ctx.over_budget():
                    ctx.recorder.add(dict(zip(KEY, key), not_run="time budget"), echo=False)
                    continue
                base = base or row_balanced_kernel(hidden, density)
                layer = layer or Layer.make(hidden, density, dtype, base=base)
                row = case_row(ctx, layer, batch)
                ctx.recorder.add(row)
                print_skips(row, seen)
    skipped = sum("not_run" in r for r in ctx.recorder.rows)
    if skipped:
        print(f"{skipped} cases not run (time budget); rerun with --resume "
              f"{ctx.recorder.path} to measure them", flush=True)
    cross = crossovers(ctx.recorder.rows)
    ctx.recorder.set(crossovers=cross)
    ctx.recorder.set(plots=[str(p) for p in plots.sweep_speedup(ctx.recorder.rows, cross,
                                                                ctx.out_dir)])


def crossover(points) -> float | None:
    """The density from which the best peer beats us: the first fall of our speedup below 1
    (interpolated on log speedup), the lowest density if we never win, None if we always win."""
    if points and points[0][1] < 1:
        return points[0][0]
    for (d0, s0), (d1, s1) in zip(points, points[1:]):
        if s0 >= 1 > s1:
            return d0 + (d1 - d0) * math.log(s0) / (math.log(s0) - math.log(s1))
    return None


def crossovers(rows) -> dict:
    """``"dtype/H/B"`` -> :func:`crossover` over the densities where both we and a peer ran."""
    cells: dict = {}
    for r in rows:
        if r.get("speedup_vs_best"):
            cells.setdefault(f"{r['dtype']}/{r['hidden']}/{r['batch']}", []).append(
                (r["density"], r["speedup_vs_best"]))
    return {key: crossover(sorted(points)) for key, points in cells.items()}


def columns(peers):
    return case_columns(peers)
