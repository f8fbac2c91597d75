"""Soak: many calls of jitted ``sparse_rnn``, ``sparse_lstm`` and ``sparse_gru`` (forward and
``jax.grad``) over a pool of pre-built problems, every result checked against the reference and
bitwise against its own first result, device memory sampled to catch leaks, and the deferred kernel
error polled (issue 8).

  python tools/soak.py [--calls 10000] [--seconds S] [--out soak.json]

On a GPU the pool is sized for the persistent kernel; elsewhere the same configurations shrink to
tiny layers so every code path runs in seconds on the C++ CPU kernel. The pool is small and fixed
(compile time stays bounded); calls visit it in shuffled rounds so neighbouring calls differ in
shape and dtype (stale state from the previous call would show). Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_sprnn as js
from jax_sprnn.testing import (GRAD_TOLERANCE, TOLERANCE, make_gated_problem, make_problem, on_gpu,
                               rel_err, run_gated)

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: int
    batch: int
    steps: int
    density: float
    dtype: str
    activation: str = "tanh"
    reverse: bool = False
    lengths: bool = False  # traced per-example lengths in [0, T]
    grad: bool = False     # also a jax.grad job
    cell: str = "simple"   # or "lstm", "gru" (sparse_lstm / sparse_gru; activation unused)

    @property
    def name(self) -> str:
        flags = ("-rev" if self.reverse else "") + ("-len" if self.lengths else "")
        kind = self.activation if self.cell == "simple" else self.cell
        return (f"H{self.hidden}-B{self.batch}-T{self.steps}-d{self.density}-{self.dtype}-"
                f"{kind}{flags}")

    def tiny(self) -> "Config":
        """The same structure at CPU-test size."""
        return dataclasses.replace(self, hidden=max(8, self.hidden // 16),
                                   batch=min(self.batch, 4), steps=min(self.steps, 12))


# Every layer fits the persistent kernel on an H200 at its batch (planner-checked); together they
# cover the three dtypes, the activations, reverse, traced lengths, 1..32 examples (full and partial
# batch tiles), register tiers from 0 to 32 slots and 1 to 16 warps per CTA.
GPU_POOL = (
    Config(1152, 4, 64, 0.1, "float16", grad=True),
    Config(300, 3, 20, 0.2, "float32", reverse=True, lengths=True, grad=True),
    Config(97, 1, 7, 0.3, "bfloat16", activation="relu"),
    Config(513, 8, 33, 0.1, "float16", activation="identity", lengths=True),
    Config(2304, 4, 16, 0.1, "float16", reverse=True),
    Config(256, 16, 50, 0.05, "bfloat16", lengths=True, grad=True),
    Config(1024, 2, 40, 0.1, "float32", activation="relu", reverse=True),
    Config(64, 2, 4, 0.5, "float32", grad=True),
    Config(768, 5, 25, 0.15, "bfloat16", activation="identity", reverse=True, lengths=True),
    Config(4096, 2, 8, 0.1, "float16", lengths=True),
    Config(200, 32, 12, 0.25, "float16", activation="relu", reverse=True, lengths=True, grad=True),
    Config(1536, 1, 100, 0.08, "float32"),
    # The gated cells' forward kernels, and (grad) their backward kernels.
    Config(1024, 4, 32, 0.1, "float16", cell="lstm", lengths=True, grad=True),
    Config(333, 5, 20, 0.2, "bfloat16", cell="gru", reverse=True, lengths=True, grad=True),
    Config(2048, 1, 24, 0.1, "float32", cell="lstm", reverse=True),
    Config(96, 9, 16, 0.3, "float16", cell="gru"),
)

GATES = {"lstm": 4, "gru": 3}


def pool(kind: str = "auto", max_configs: int | None = None) -> list[Config]:
    if kind == "auto":
        kind = "gpu" if on_gpu() else "tiny"
    configs = list(GPU_POOL if kind == "gpu" else (c.tiny() for c in GPU_POOL))
    return configs[:max_configs] if max_configs else configs


# ---------------------------------------------------------------------------------------------
# Jobs: one jitted function, its inputs (a few variants) and the reference answers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    name: str
    kind: str            # "forward" or "grad"
    dtype: str
    tol: float
    fn: object           # jitted
    variants: list       # argument tuples
    want: list           # per variant: list of host arrays
    first: list = dataclasses.field(default_factory=list)  # per variant: first result's bytes
    calls: int = 0
    max_err: float = 0.0

    def run(self, variant: int):
        return self.fn(*self.variants[variant])

    def check(self, variant: int, outs) -> str:
        """Compare one result with the reference and with its first result; '' if fine."""
        self.calls += 1
        got = [np.asarray(o) for o in jax.tree_util.tree_leaves(outs)]
        try:
            err = max(rel_err(g, w) for g, w in zip(got, self.want[variant]))
        except AssertionError as e:  # rel_err refuses non-finite outputs
            return f"{self.name} variant {variant}: {e}"
        self.max_err = max(self.max_err, err)
        if not err <= self.tol:
            return f"{self.name} variant {variant}: rel_err {err:.3g} > {self.tol:g}"
        blobs = [g.tobytes() for g in got]
        while len(self.first) <= variant:
            self.first.append(None)
        if self.first[variant] is None:
            self.first[variant] = blobs
        elif blobs != self.first[variant]:
            return f"{self.name} variant {variant}: not bitwise equal to its first result"
        return ""


def _lengths(rng, cfg: Config):
    if not cfg.lengths:
        return None
    lengths = rng.integers(0, cfg.steps + 1, size=cfg.batch)
    lengths[0] = cfg.steps  # one full example, and an empty one when there is room
    if cfg.batch > 2:
        lengths[-1] = 0
    return jnp.asarray(lengths, jnp.int32)


def gated_jobs(cfg: Config, rng, seed: int, device) -> list[Job]:
    """The forward job (two input variants) and the grad job of an LSTM or GRU configuration."""
    gates = GATES[cfg.cell]
    w, x, c0, h0, b_hn = make_gated_problem(seed, gates, cfg.hidden, cfg.batch, cfg.steps,
                                            cfg.density, cfg.dtype)
    lengths = _lengths(rng, cfg)
    x2 = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32), x.dtype)

    def forward(x, c0, h0, w, b_hn, lengths, method):
        return run_gated(gates, x, c0, h0, w, b_hn, seq_lengths=lengths, reverse=cfg.reverse,
                         method=method)

    reference = jax.jit(forward, static_argnums=6)
    variants = [(x, c0, h0, w, b_hn, lengths), (x2, c0, h0, w, b_hn, lengths)]
    want = [[np.asarray(a) for a in reference(*v, "reference")] for v in variants]
    jobs = [Job(f"forward {cfg.name}", "forward", cfg.dtype, TOLERANCE[cfg.dtype],
                jax.jit(lambda *a: forward(*a, "native")), _place(variants, device), want)]
    if cfg.grad:
        def loss(x, c0, h0, values, b_hn, w, lengths, method):
            outs = forward(x, c0, h0, w.replace(values=values), b_hn, lengths, method)
            return sum(jnp.sum(jnp.sin(o.astype(jnp.float32))) for o in outs)

        grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
        args = (x, c0, h0, w.values, b_hn, w, lengths)
        ref = jax.jit(grad, static_argnums=7)(*args, "reference")
        jobs.append(Job(f"grad {cfg.name}", "grad", cfg.dtype, GRAD_TOLERANCE[cfg.dtype],
                        jax.jit(lambda *a: grad(*a, "native")), _place([args], device),
                        [[np.asarray(g) for g in ref]]))
    return jobs


def build_jobs(configs, *, seed: int = 0, device=None) -> list[Job]:
    """Forward jobs (two input variants each) and grad jobs, with host references."""
    jobs = []
    for k, cfg in enumerate(configs):
        rng = np.random.default_rng(seed + 1000 + k)
        if cfg.cell != "simple":
            jobs += gated_jobs(cfg, rng, seed + k, device)
            continue
        dense, w, x, h0 = make_problem(seed + k, cfg.hidden, cfg.batch, cfg.steps, cfg.density,
                                       cfg.dtype)
        lengths = _lengths(rng, cfg)
        kw = dict(activation=cfg.activation, reverse=cfg.reverse)
        x2 = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32), x.dtype)

        def forward(x, h0, w, lengths, kw=kw):
            return js.sparse_rnn(x, h0, w, seq_lengths=lengths, method="native", **kw)

        reference = jax.jit(lambda x, h0, lengths, dense=dense, kw=kw:
                            js.reference_rnn(x, h0, dense, seq_lengths=lengths, **kw))
        variants = [(x, h0, w, lengths), (x2, h0, w, lengths)]
        want = [[np.asarray(a) for a in reference(v[0], h0, lengths)] for v in variants]
        jobs.append(Job(f"forward {cfg.name}", "forward", cfg.dtype, TOLERANCE[cfg.dtype],
                        jax.jit(forward), _place(variants, device), want))
        if cfg.grad:
            cot_y = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
            cot_h = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)

            def loss(x, h0, values, w, lengths, cot_y, cot_h, method, kw=kw):
                y, h = js.sparse_rnn(x, h0, w.replace(values=values), seq_lengths=lengths,
                                     method=method, **kw)
                return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(h.astype(jnp.float32) * cot_h)

            grad = jax.grad(loss, argnums=(0, 1, 2))
            # The truth: autodiff of the reference in the same storage dtype. It rounds the
            # forward state as the kernels do, so their relu masks agree (against a float32
            # forward a mask can flip by chance, and the gradient moves far past the tolerance).
            args = (x, h0, w.values, w, lengths, cot_y, cot_h)
            ref = jax.jit(grad, static_argnums=7)(*args, "reference")
            fn = jax.jit(lambda *a, grad=grad: grad(*a, "native"))
            jobs.append(Job(f"grad {cfg.name}", "grad", cfg.dtype, GRAD_TOLERANCE[cfg.dtype], fn,
                            _place([args], device), [[np.asarray(g) for g in ref]]))
    return jobs


def _place(variants, device):
    return variants if device is None else [jax.device_put(v, device) for v in variants]


# ---------------------------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------------------------

def pending_error() -> str | None:
    """The persistent kernel's deferred error ('' if none); None without the CUDA module/GPU."""
    cuda = js._native.cuda_module()
    if cuda is None or not on_gpu():
        return None
    return cuda.pending_error()


def memory_sample(device) -> dict | None:
    gc.collect()  # results of the last call are dropped before reading bytes_in_use
    stats = device.memory_stats()
    if not stats:
        return None  # the CPU client keeps no statistics
    return {"bytes_in_use": int(stats.get("bytes_in_use", 0)),
            "peak_bytes_in_use": int(stats.get("peak_bytes_in_use", 0))}


def run_soak(calls: int = 10_000, *, seconds: float | None = None, seed: int = 0,
             sample_every: int = 500, mem_slack_mib: float = 8.0, pool_kind: str = "auto",
             max_configs: int | None = None, max_failures: int = 5, verbose: bool = True) -> dict:
    """Run the soak; return a JSON-able summary whose ``ok`` says whether everything passed."""
    say = print if verbose else (lambda *a, **k: None)
    device = jax.devices()[0]
    configs = pool(pool_kind, max_configs)
    stale = pending_error()  # left by an earlier test in this process: reported, not counted
    t_build = time.perf_counter()
    jobs = build_jobs(configs, seed=seed)
    build_s = time.perf_counter() - t_build
    slots = [(j, v) for j, job in enumerate(jobs) for v in range(len(job.variants))]
    say(f"soak: {len(configs)} configurations, {len(jobs)} jobs ({len(slots)} job inputs) on "
        f"{device.device_kind}; references built in {build_s:.1f} s")

    rng = np.random.default_rng(seed)
    failures: list[str] = []
    samples: list[dict] = []
    done = 0
    start = time.perf_counter()
    warmup_s = None
    stopped_by_time = False

    def sample():
        mem = memory_sample(device)
        err = pending_error()
        if err:
            failures.append(f"pending kernel error after call {done}: {err}")
        row = {"call": done, "seconds": round(time.perf_counter() - start, 3), **(mem or {})}
        samples.append(row)
        say(f"  call {done:6d}  {row['seconds']:8.1f} s" +
            (f"  in use {mem['bytes_in_use'] / MIB:9.2f} MiB  peak "
             f"{mem['peak_bytes_in_use'] / MIB:9.2f} MiB" if mem else "") +
            f"  failures {len(failures)}")

    # The first round visits every job input in order: it compiles everything and is the warm-up
    # after which memory must stay flat; later rounds are shuffled.
    order = list(slots)
    warmup = len(order)
    while done < calls and len(failures) < max_failures:
        if not order:
            order = [slots[i] for i in rng.permutation(len(slots))]
        j, v = order.pop(0)
        message = jobs[j].check(v, jobs[j].run(v))  # check() synchronizes: one call in flight
        done += 1
        if message:
            failures.append(f"call {done}: {message}")
        if done == warmup:
            warmup_s = time.perf_counter() - start  # compiles included
        if done == warmup or (done > warmup and (done - warmup) % sample_every == 0):
            sample()
        if seconds is not None and time.perf_counter() - start > seconds:
            stopped_by_time = done < calls
            break
    wall = time.perf_counter() - start
    if not samples or samples[-1]["call"] != done:
        sample()
    final_error = pending_error()
    if final_error:
        failures.append(f"pending kernel error at the end: {final_error}")

    memory = _memory_summary(samples, warmup, mem_slack_mib)
    if memory.get("grew"):
        failures.append(f"device memory grew after warm-up by {memory['growth_bytes']} bytes "
                        f"(slack {memory['slack_bytes']})")
    max_err: dict[str, float] = {}
    for job in jobs:
        key = f"{job.kind}/{job.dtype}"
        max_err[key] = max(max_err.get(key, 0.0), job.max_err)
    summary = {
        "ok": not failures,
        "calls": done, "calls_requested": calls, "stopped_by_time_budget": stopped_by_time,
        "warmup_calls": min(warmup, done), "configs": [c.name for c in configs], "jobs": len(jobs),
        "job_calls": {job.name: job.calls for job in jobs},
        "wall_s": round(wall, 3), "calls_per_s": round(done / wall, 1) if wall > 0 else None,
        "warmup_s": None if warmup_s is None else round(warmup_s, 3),
        "steady_calls_per_s": (round((done - warmup) / (wall - warmup_s), 1)
                               if warmup_s is not None and done > warmup else None),
        "reference_build_s": round(build_s, 3),
        "backend": jax.default_backend(), "device": device.device_kind, "jax": jax.__version__,
        "memory": memory, "max_rel_err": max_err,
        "tolerance": {"forward": TOLERANCE, "grad": GRAD_TOLERANCE},
        "pending_error_at_start": stale or "", "pending_error_at_end": final_error,
        "failures": failures,
    }
    return summary


def _memory_summary(samples, warmup, slack_mib) -> dict:
    rows = [s for s in samples if "bytes_in_use" in s and s["call"] >= warmup]
    if not rows:
        return {"available": False, "samples": samples}
    used = [s["bytes_in_use"] for s in rows]
    peaks = [s["peak_bytes_in_use"] for s in rows]
    slack = int(max(slack_mib * MIB, 0.01 * used[0]))
    return {"available": True, "first_bytes": used[0], "last_bytes": used[-1], "max_bytes": max(used),
            "peak_first_bytes": peaks[0], "peak_last_bytes": peaks[-1],
            "growth_bytes": max(used) - used[0], "peak_growth_bytes": peaks[-1] - peaks[0],
            "slack_bytes": slack, "grew": max(used) - used[0] > slack, "samples": samples}


def print_summary(s: dict) -> None:
    print(f"soak {'PASSED' if s['ok'] else 'FAILED'}: {s['calls']} calls "
          f"({'stopped by the time budget, ' if s['stopped_by_time_budget'] else ''}"
          f"{s['calls_requested']} requested) over {len(s['configs'])} configurations / {s['jobs']} "
          f"jobs in {s['wall_s']:.1f} s on {s['device']} (jax {s['jax']}): {s['calls_per_s']} "
          f"calls/s, {s['steady_calls_per_s']} after the warm-up round ({s['warmup_s']} s with "
          f"compiles)")
    m = s["memory"]
    if m["available"]:
        print(f"  memory in use: first {m['first_bytes']} last {m['last_bytes']} max {m['max_bytes']} "
              f"bytes (growth {m['growth_bytes']}, slack {m['slack_bytes']}); peak "
              f"{m['peak_first_bytes']} -> {m['peak_last_bytes']}")
        if m["peak_growth_bytes"] > m["slack_bytes"]:
            print(f"  warning: the peak grew by {m['peak_growth_bytes']} bytes after warm-up")
    else:
        print("  memory: the device keeps no statistics (CPU)")
    for key, err in sorted(s["max_rel_err"].items()):
        kind, dtype = key.split("/")
        print(f"  max rel err {key:18s} {err:.3g}  (tolerance {s['tolerance'][kind][dtype]:g})")
    if s["pending_error_at_start"]:
        print(f"  note: a pending kernel error was left before the soak: {s['pending_error_at_start']}")
    for f in s["failures"]:
        print("  FAILURE:", f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=None, help="stop after this much wall time")
    p.add_argument("--out", help="write the summary as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=500, help="calls between memory samples")
    p.add_argument("--mem-slack-mib", type=float, default=8.0,
                   help="allowed growth of bytes in use after warm-up (or 1%% of it, if more)")
    p.add_argument("--pool", choices=("auto", "gpu", "tiny"), default="auto",
                   help="layer sizes: gpu, tiny (CPU), or auto by backend")
    p.add_argument("--configs", type=int, default=None, help="use only the first N configurations")
    p.add_argument("--max-failures", type=int, default=5, help="stop after this many failures")
    p.add_argument("--hang-timeout", type=float, default=1800,
                   help="dump all stacks and exit 1 after this many seconds (0: never)")
    a = p.parse_args(argv)
    if a.hang_timeout > 0:
        faulthandler.dump_traceback_later(a.hang_timeout, exit=True)
    s = run_soak(a.calls, seconds=a.seconds, seed=a.seed, sample_every=a.sample_every,
                 mem_slack_mib=a.mem_slack_mib, pool_kind=a.pool, max_configs=a.configs,
                 max_failures=a.max_failures)
    faulthandler.cancel_dump_traceback_later()
    print_summary(s)
    if a.out:
        Path(a.out).write_text(json.dumps(s, indent=1) + "\n")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
