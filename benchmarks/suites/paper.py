"""paper: the configurations of Zhu et al. (ICLR 2018) on this GPU, against every peer, and their
"a 5x larger model at about 2x the time" claim restated for this GPU's capacity.

The claim here: take the largest layer the persistent kernel runs at 10% density (fp16, B=4; its
nonzeros N = 0.1 H_s^2) and a dense layer with 5x fewer weights (H_d = sqrt(N / 5), rounded down to
a multiple of 128). It holds when our step at H_s takes at most 2x the dense step at H_d, for the
dense lax.scan and for the best dense peer measured.
"""

from __future__ import annotations

import math

from jax_sprnn import _native

from .. import plots
from ..problems import DTYPES, Layer
from ..report import Column
from .capacity import largest_hidden
from .common import Context, case_columns, case_row, print_skips

# (label, H, density, B, dtype)
CONFIGS = [("paper 2304/30%", 2304, 0.3, 4, "float16"), ("paper 1152/10%", 1152, 0.1, 4, "float16")]
MORE = [("cuDNN-persistent-eligible", 1024, 0.1, 8, "float16"),
        ("paper 2304/30% fp32", 2304, 0.3, 4, "float32"),
        ("paper 1152/10% fp32", 1152, 0.1, 4, "float32")]
SMOKE = [("smoke 64/30%", 64, 0.3, 4, "float16")]

CLAIM_DENSITY, CLAIM_BATCH, CLAIM_DTYPE, SIZE_RATIO, TIME_RATIO = 0.1, 4, "float16", 5, 2
DENSE_PEERS = ("dense", "cudnn", "cuda_graph")


def claim_sizes(smoke: bool) -> tuple[int, int]:
    """(H_s, H_d): the largest persistent sparse layer and the dense layer 5x smaller."""
    if smoke:
        hidden, step = 256, 32
    else:
        device = _native.current_device_spec()
        hidden = largest_hidden(CLAIM_DENSITY, DTYPES[CLAIM_DTYPE], device, batch=CLAIM_BATCH)
        step = 128
    nnz = int(round(CLAIM_DENSITY * hidden)) * hidden
    return hidden, max(step, int(math.sqrt(nnz / SIZE_RATIO)) // step * step)


def run(ctx: Context) -> None:
    seen: set = set()
    for config in SMOKE if ctx.smoke else CONFIGS:
        measure_config(ctx, config, seen)
    claim(ctx, seen)
    for config in [] if ctx.smoke or ctx.quick else MORE:
        measure_config(ctx, config, seen)
    ctx.recorder.set(plots=[str(plots.per_step_bars(ctx.recorder.rows, ctx.out_dir / "paper.png",
                                                    "µs per step, every peer (log scale)"))])


def measure_config(ctx: Context, config, seen: set) -> None:
    label, hidden, density, batch, dtype = config
    if ctx.over_budget():
        ctx.recorder.add(dict(label=label, hidden=hidden, density=density, batch=batch,
                              dtype=dtype, not_run="time budget"))
        return
    row = case_row(ctx, Layer.make(hidden, density, dtype), batch, label=label)
    ctx.recorder.add(row)
    print_skips(row, seen)


def claim(ctx: Context, seen: set) -> None:
    h_s, h_d = claim_sizes(ctx.smoke)
    sparse = case_row(ctx, Layer.make(h_s, CLAIM_DENSITY, CLAIM_DTYPE), CLAIM_BATCH,
                      peers=[p for p in ctx.peers if p.name in ("ours", "floor")],
                      label=f"claim: largest sparse H={h_s}")
    ctx.recorder.add(sparse)
    dense = case_row(ctx, Layer.make(h_d, 1.0, CLAIM_DTYPE), CLAIM_BATCH,
                     peers=[p for p in ctx.peers if p.name in DENSE_PEERS],
                     label=f"claim: dense H={h_d} (1/{SIZE_RATIO} the weights)")
    ctx.recorder.add(dense)
    print_skips(sparse, seen)
    print_skips(dense, seen)
    ctx.recorder.set(claim=claim_summary(sparse, dense, h_s, h_d))
    print_claim(ctx.recorder.payload["claim"])


def claim_summary(sparse: dict, dense: dict, h_s: int, h_d: int) -> dict:
    ours = sparse["peers"].get("ours", {}).get("us_per_step")
    lax_scan = dense["peers"].get("dense", {}).get("us_per_step")
    best = dense.get("best_us")
    ratio = lambda d: ours / d if ours and d and ours > 0 and d > 0 else None
    out = dict(definition=(f"sparse: the largest H the persistent kernel runs at "
                           f"{CLAIM_DENSITY:.0%} density ({CLAIM_DTYPE}, B={CLAIM_BATCH}); dense: "
                           f"H_d = sqrt(nonzeros / {SIZE_RATIO}) rounded down to a multiple of 128; "
                           f"holds when t_sparse(H_s) <= {TIME_RATIO} x t_dense(H_d) per step"),
               sparse_hidden=h_s, sparse_nonzeros=sparse["nnz"], dense_hidden=h_d,
               dense_weights=h_d * h_d, size_ratio=sparse["nnz"] / (h_d * h_d),
               sparse_us=ours, dense_scan_us=lax_scan, best_dense_peer=dense.get("best_peer"),
               best_dense_us=best, time_ratio_vs_dense_scan=ratio(lax_scan),
               time_ratio_vs_best_dense=ratio(best))
    for key in ("dense_scan", "best_dense"):
        r = out[f"time_ratio_vs_{key}"]
        out[f"holds_vs_{key}"] = None if r is None else bool(r <= TIME_RATIO)
    return out


def print_claim(c: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    print(f"claim ({c['definition']}):\n  sparse H={c['sparse_hidden']} ({c['sparse_nonzeros']} "
          f"nonzeros) {fmt(c['sparse_us'])} µs/step; dense H={c['dense_hidden']} "
          f"({c['dense_weights']} weights, {c['size_ratio']:.2f}x fewer) lax.scan "
          f"{fmt(c['dense_scan_us'])} µs/step, best dense {c['best_dense_peer']} "
          f"{fmt(c['best_dense_us'])} µs/step\n  time ratio vs lax.scan "
          f"{fmt(c['time_ratio_vs_dense_scan'])} (holds: {c['holds_vs_dense_scan']}), vs best dense "
          f"{fmt(c['time_ratio_vs_best_dense'])} (holds: {c['holds_vs_best_dense']})", flush=True)


def columns(peers):
    return [Column("label", lambda r: r["label"], 34), *case_columns(peers)]
