"""Per-step latency of the persistent forward kernel against dense lax.scan and the sync floor.

Run on a GPU: ``python benchmarks/bench_forward.py [--quick] [--out results.json]``.

Method: every figure is the median over ``--reps`` timed calls (after warm-up) of a jitted function,
with inputs rotated over ``--rotate`` sets so that the L2 cache does not flatter it. Per-step time is
the slope between two sequence lengths, ``(t(T2) - t(T1)) / (T2 - T1)``, which removes the fixed
per-call cost (dispatch, launch, workspace reset); that fixed cost is reported separately.
The synchronization floor runs the kernel's own exchange protocol with no compute on the same grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable (appended,
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # so an installed jax_sprnn still wins)

import jax_sprnn as js
from jax_sprnn.layout import bank_conflicts

from benchmarks.peers_jax import dense_scan, sync_floor_fn
from benchmarks.problems import DTYPES, row_balanced_kernel
from benchmarks.timing import median_time, per_step


def slope(fn_for_T, make_args, args, rotate=None):
    """(µs per step, fixed µs per call) of ``fn_for_T(T)(*make_args(T, seed))``."""
    def time_at(T):
        sets = [make_args(T, seed) for seed in range(rotate or args.rotate)]
        return median_time(fn_for_T(T), sets, args.reps)
    r = per_step(time_at, args.t1, args.t2)
    return r["us_per_step"], r["fixed_us"]


def bench_config(hidden, density, batch, dtype, args):
    dt = DTYPES[dtype]
    kernel, mask = row_balanced_kernel(hidden, density)
    t0 = time.perf_counter()
    w = js.SparseWeights.from_dense(kernel, mask, dtype=dt)
    pack_s = time.perf_counter() - t0
    meta = w.meta
    row = dict(hidden=hidden, density=density, batch=batch, dtype=dtype, nnz=int(mask.sum()),
               K=meta.slots_per_lane, ctas=meta.num_ctas, warps_per_cta=meta.warps_per_cta,
               reg_slots=meta.reg_slots, fits=meta.fits, pack_s=round(pack_s, 2),
               bank_conflicts=bank_conflicts(np.asarray(w.indices), meta.load_bytes))
    kernel_d = jnp.asarray(kernel, dt)

    def make_args(T, seed):
        r = np.random.default_rng(seed)
        x = jnp.asarray(r.standard_normal((batch, T, hidden)).astype(np.float32), dt)
        h0 = jnp.asarray(r.standard_normal((batch, hidden)).astype(np.float32) * 0.5, dt)
        return x, h0

    # correctness at this size, against the float32 reference
    x, h0 = make_args(args.t1, 99)
    y, _ = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, method="native"))(x, h0, w)
    y_ref, _ = js.reference_rnn(x.astype(jnp.float32), h0.astype(jnp.float32),
                                jnp.asarray(kernel_d, jnp.float32))
    row["rel_err"] = float(jnp.linalg.norm((y.astype(jnp.float32) - y_ref).ravel()) /
                           jnp.linalg.norm(y_ref.ravel()))

    native = jax.jit(lambda x, h0: js.sparse_rnn(x, h0, w, method="native"))
    row["sparse_us"], row["sparse_fixed_us"] = slope(lambda T: native, make_args, args)
    dense = jax.jit(lambda x, h0: dense_scan(x, h0, kernel_d))
    row["dense_us"], row["dense_fixed_us"] = slope(lambda T: dense, make_args, args)
    if args.floor:
        dummy = lambda T, seed: (jnp.zeros((1,), jnp.float32),)
        row["floor_us"], _ = slope(lambda T: sync_floor_fn(meta, batch, T), dummy, args, rotate=1)
    if args.ablation:
        w_plain = js.SparseWeights.from_dense(kernel_d, mask, dtype=dt, bank_aware=False)
        unordered = jax.jit(lambda x, h0: js.sparse_rnn(x, h0, w_plain, method="native"))
        row["unordered_us"], _ = slope(lambda T: unordered, make_args, args)
        row["unordered_conflicts"] = bank_conflicts(np.asarray(w_plain.indices),
                                                       w_plain.meta.load_bytes)
    row["speedup_vs_dense"] = row["dense_us"] / row["sparse_us"]
    if "floor_us" in row:
        row["x_floor"] = row["sparse_us"] / row["floor_us"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench_forward.json")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rotate", type=int, default=4)
    p.add_argument("--t1", type=int, default=64)
    p.add_argument("--t2", type=int, default=512)
    p.add_argument("--no-floor", dest="floor", action="store_false")
    p.add_argument("--ablation", action="store_true", default=True)
    args = p.parse_args()
    configs = [(1152, 0.1, 4, "float16"), (2304, 0.1, 4, "float16"), (2304, 0.3, 4, "float16"),
               (4608, 0.1, 4, "float16"), (2304, 0.1, 4, "float32"), (2304, 0.1, 4, "bfloat16"),
               (2304, 0.1, 1, "float16"), (2304, 0.1, 16, "float16"), (4608, 0.3, 4, "float16"),
               (8192, 0.1, 4, "float16")]
    if args.quick:
        configs = configs[:4]
    info = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
                t1=args.t1, t2=args.t2, reps=args.reps, rotate=args.rotate)
    rows = []
    header = (f"{'H':>5} {'dens':>5} {'B':>3} {'dtype':>8} {'K':>3} {'CTA':>4} {'wpc':>3} "
              f"{'sparse':>7} {'dense':>7} {'floor':>6} {'xdense':>6} {'xfloor':>6} {'unord':>6} "
              f"{'fixed':>6} {'relerr':>8}")
    print(info)
    print(header)
    for cfg in configs:
        try:
            row = bench_config(*cfg, args)
        except Exception as e:  # keep going: one failing size must not hide the rest
            row = dict(zip(("hidden", "density", "batch", "dtype"), cfg), error=repr(e)[:300])
            print("FAILED", cfg, row["error"])
            rows.append(row)
            continue
        rows.append(row)
        print(f"{row['hidden']:>5} {row['density']:>5} {row['batch']:>3} {row['dtype']:>8} "
              f"{row['K']:>3} {row['ctas']:>4} {row['warps_per_cta']:>3} {row['sparse_us']:>7.2f} "
              f"{row['dense_us']:>7.2f} {row.get('floor_us', float('nan')):>6.2f} "
              f"{row['speedup_vs_dense']:>6.2f} {row.get('x_floor', float('nan')):>6.2f} "
              f"{row.get('unordered_us', float('nan')):>6.2f} {row['sparse_fixed_us']:>6.1f} "
              f"{row['rel_err']:>8.1e}", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
