"""What the suites share: their options, the forward reference, and the standard row of a case."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax.numpy as jnp

import jax_sprnn as js

from ..harness import Case, Peer, best_competitor, measure_all, ran
from ..peers_jax import auto_choice
from ..problems import SHORT, Layer
from ..report import Column, Recorder
from ..timing import Timing


@dataclasses.dataclass
class Context:
    out_dir: Path
    timing: Timing
    peers: list[Peer]
    quick: bool
    smoke: bool
    budget_s: float
    recorder: Recorder | None = None
    #: sweep filters (None: the suite's grid)
    hidden: tuple[int, ...] | None = None
    batch: tuple[int, ...] | None = None
    density: tuple[float, ...] | None = None
    dtype: tuple[str, ...] | None = None
    cell: tuple[str, ...] | None = None  # gated: the cells
    parts: tuple[str, ...] | None = None  # gated: capacity, training, forward (None: all)
    resume: Path | None = None
    verify: bool = False
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s


def forward_reference(layer: Layer, x, h0):
    """The final state in float32 math on the stored weight values: what every forward peer is
    checked against."""
    _, h = js.reference_rnn(x.astype(jnp.float32), h0.astype(jnp.float32), layer.kernel,
                            time_major=True)
    return h


def case_row(ctx: Context, layer: Layer, batch: int, peers=None, reference=forward_reference,
             **extra) -> dict:
    """Measure ``peers`` on one layer and batch; the row every table and plot reads."""
    peers = ctx.peers if peers is None else peers
    results = measure_all(peers, Case(layer, batch, ctx.timing, reference))
    release_torch_memory()
    best, best_us = best_competitor(peers, results)
    ours = results.get("ours")
    row = dict(layer.describe(), batch=batch, **extra, auto=auto_choice(layer, batch),
               peers=results, best_peer=best, best_us=best_us)
    if ran(ours) and best_us is not None:
        row["speedup_vs_best"] = best_us / ours["us_per_step"]
    return row


def dtype_support(rows) -> dict:
    """Per peer and dtype: "ran" if it ran in any row, else the first reason it did not."""
    support: dict = {}
    for row in rows:
        for name, result in row.get("peers", {}).items():
            seen = support.setdefault(name, {})
            if "us_per_step" in result:
                seen[row["dtype"]] = "ran"
            else:
                seen.setdefault(row["dtype"], result.get("skipped") or result.get("error"))
    return support


def release_torch_memory() -> None:
    """Give PyTorch's cached blocks back, so that JAX can allocate the next case."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def peer_header(peers) -> dict:
    """What the JSON says about each peer: its description and the dtypes it is tried in."""
    return {p.name: dict(title=p.title, dtypes_tried=list(p.dtypes)) for p in peers}


def us(name: str):
    return lambda row: row["peers"][name].get("us_per_step")


def case_columns(peers) -> list[Column]:
    """Configuration, µs per step of every peer, the best competitor and our speedup over it."""
    return [Column("H", lambda r: r["hidden"], 5), Column("dens", lambda r: r["density"], 5),
            Column("B", lambda r: r["batch"], 3), Column("dtype", lambda r: SHORT[r["dtype"]], 5),
            *[Column(p.name[:9], us(p.name), 9) for p in peers],
            Column("best", lambda r: r["best_peer"], 10),
            Column("x best", lambda r: r.get("speedup_vs_best"), 6),
            Column("relerr", lambda r: r["peers"]["ours"].get("rel_err"), 8),
            Column("auto", lambda r: r["auto"]["pick"], 18)]


def print_skips(row: dict, seen: set) -> None:
    """Why peers of a row did not run, each distinct reason once per suite."""
    for name, result in row["peers"].items():
        reason = result.get("skipped") or result.get("error")
        if reason and (name, reason) not in seen:
            seen.add((name, reason))
            print(f"    {name}: {'skipped' if 'skipped' in result else 'ERROR'}: {reason}", flush=True)
