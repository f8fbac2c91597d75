"""Where a run's time goes: XLA compilations (counted through ``jax.monitoring``) and the phases of
the training loop, so that one run on a GPU says whether the device or the host sets the pace.

A training loop that keeps the device busy spends its wall time in the jitted steps alone: time
spent waiting for a batch, compiling, evaluating, saving or pruning is time the device may sit
idle. :class:`Phases` sums those, and :func:`loop_report` turns them into steps per second.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import threading
import time

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (and their seconds) by function name while installed.

    Usage: ``with CompileCounter() as compiles: ...``, then ``compiles.count``,
    ``compiles.seconds``, ``compiles.by_function()``. Compilations in any thread count.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.events: list[tuple[str, float]] = []

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            with self._lock:
                self.events.append((str(kwargs.get("fun_name", "?")), float(duration)))

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def seconds(self) -> float:
        return sum(d for _, d in self.events)

    def by_function(self) -> dict[str, dict]:
        """``{name: {"count": n, "seconds": s}}``, most seconds first."""
        out: dict[str, dict] = collections.defaultdict(lambda: {"count": 0, "seconds": 0.0})
        for name, seconds in self.events:
            out[name]["count"] += 1
            out[name]["seconds"] += seconds
        return {k: {"count": v["count"], "seconds": round(v["seconds"], 2)}
                for k, v in sorted(out.items(), key=lambda kv: -kv[1]["seconds"])}

    def since(self, mark: int) -> tuple[int, float]:
        """``(count, seconds)`` of the compilations after the first ``mark`` ones."""
        with self._lock:
            later = self.events[mark:]
        return len(later), sum(d for _, d in later)


def compile_all(jobs, threads: int | None = None, *, return_errors: bool = False) -> list:
    """``[jitted.lower(*args).compile() for jitted, args in jobs]``, the compilations in parallel
    threads (XLA releases the GIL while it compiles; the lowering, which traces Python, runs one
    at a time here). Call the results instead of the jitted functions: a jitted function's own
    cache does not see them. ``return_errors``: a job that fails gives its exception in its place
    instead of raising."""
    def guard(fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 (handed back to the caller, which reports it)
            if not return_errors:
                raise
            return e

    lowered = [guard(lambda j, a: j.lower(*a), jitted, args) for jitted, args in jobs]

    def compile_one(low):
        return low if isinstance(low, Exception) else guard(low.compile)

    threads = threads or max(1, min(len(lowered), os.cpu_count() or 1))
    if threads == 1 or len(lowered) <= 1:
        return [compile_one(low) for low in lowered]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(compile_one, lowered))


class Phases:
    """Wall seconds of named phases of a loop (``with phases("eval"): ...``), and the seconds of
    the compilations inside each (from ``compiles``)."""

    def __init__(self, compiles: CompileCounter):
        self.compiles = compiles
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.compiled: dict[str, tuple[int, float]] = collections.defaultdict(lambda: (0, 0.0))

    @contextlib.contextmanager
    def __call__(self, name: str):
        mark, began = self.compiles.count, time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - began
            count, seconds = self.compiles.since(mark)
            old = self.compiled[name]
            self.compiled[name] = (old[0] + count, old[1] + seconds)


#: Phases that happen once or every few hundred steps: the steady pace leaves them out.
OCCASIONAL = ("precompile", "eval", "checkpoint", "prune")


def loop_report(steps: int, wall: float, phases: Phases) -> dict:
    """The timing of one training loop: its wall time, compilations, and the seconds of each
    phase: ``input`` (waiting for the next batch: the device may idle), ``dispatch`` (the step
    calls: asynchronous, they return before the device is done unless it is far behind),
    ``log`` (reading losses of earlier steps: it waits for the device when the host is ahead),
    ``drain`` (waiting for the device before an occasional phase), and the occasional
    ``precompile`` (the step for every bucket, ahead), ``eval``, ``checkpoint`` and ``prune``, which
    then time host work alone.

    ``steady_steps_per_second`` leaves out the occasional phases and the step's compilations:
    it is the pace of training once every shape has compiled, input waits included. When the
    device sets the pace, ``input`` is near zero and the time sits in ``log`` or ``dispatch``."""
    compiles = sum(c for c, _ in phases.compiled.values())
    compile_seconds = sum(s for _, s in phases.compiled.values())
    report = {"steps": steps, "wall_seconds": round(wall, 2), "compiles": compiles,
              "compile_seconds": round(compile_seconds, 2)}
    report.update({f"{k}_seconds": round(v, 2) for k, v in sorted(phases.seconds.items())})
    left_out = phases.compiled["dispatch"][1] + sum(phases.seconds[k] for k in OCCASIONAL)
    report["steps_per_second"] = round(steps / max(wall, 1e-9), 2)
    report["steady_steps_per_second"] = round(steps / max(wall - left_out, 1e-9), 2)
    return report
