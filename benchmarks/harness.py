"""Measure one peer on one layer: build it per sequence length, time it, check its output.

A :class:`Peer` is one way of running ``h_t = tanh(x_t + h_{t-1} @ kernel)`` over a sequence. For a
given layer, batch and sequence length its ``build`` returns a :class:`Runner`, or raises
:class:`Skip` with the reason it cannot run there. Every peer gets the same time-major inputs
``x [T, B, H]`` and ``h0 [B, H]``; ``Runner.prepare`` converts them to the peer's preferred layout
outside the timed region.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .problems import Layer, make_inputs, rel_err
from .timing import Timing, median_sample, per_step, wall_clock


class Skip(Exception):
    """A peer cannot run this configuration; the message says why."""


@dataclasses.dataclass
class Runner:
    run: Callable[..., Any]  # one whole sequence -> outputs (all of them, so nothing is elided)
    prepare: Callable[..., tuple] = lambda x, h0: (x, h0)
    clock: Callable = wall_clock
    #: picks from the outputs what is compared with the reference (None: nothing to compare)
    check: Callable | None = lambda out: out[1]
    info: dict = dataclasses.field(default_factory=dict)
    #: called once on prepared arguments after timing, to record what actually ran (kernel names)
    probe: Callable[..., dict] | None = None


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    title: str
    dtypes: tuple[str, ...]
    build: Callable[[Layer, int, int], Runner]  # (layer, batch, T) -> Runner
    #: why the peer cannot run in this process at all (None when it can)
    unavailable: Callable[[], str | None] = lambda: None
    #: whether it competes for "best peer" (ours and the synchronization floor do not)
    competitor: bool = True


def as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        return a.detach().float().cpu().numpy()
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


class Case:
    """One layer at one batch size: the rotated input sets per T and the reference, cached so that
    every peer sees the same data."""

    def __init__(self, layer: Layer, batch: int, timing: Timing, reference: Callable):
        self.layer, self.batch, self.timing, self._reference = layer, batch, timing, reference
        self._inputs: dict[int, list] = {}
        self._expected = None

    def inputs(self, T: int) -> list:
        if T not in self._inputs:
            self._inputs[T] = [make_inputs(T, self.batch, self.layer.hidden, self.layer.dtype, seed)
                               for seed in range(self.timing.rotate)]
        return self._inputs[T]

    def expected(self) -> np.ndarray:
        """The reference on the first input set at T1 (float32 math)."""
        if self._expected is None:
            self._expected = as_numpy(self._reference(self.layer, *self.inputs(self.timing.t1)[0]))
        return self._expected


def measure(peer: Peer, case: Case) -> dict:
    """Per-step time (slope), fixed cost and call time of one peer, or why it did not run."""
    layer, timing = case.layer, case.timing
    if layer.dtype not in peer.dtypes:
        return dict(skipped=f"{peer.name} does not support {layer.dtype} (supports "
                            f"{', '.join(peer.dtypes)})")
    reason = peer.unavailable()
    if reason:
        return dict(skipped=reason)
    result: dict = {}
    start = time.perf_counter()
    try:
        runners = {}
        t1 = timing.t1

        def time_at(T, warmup=timing.warmup):
            runner = runners[T] = peer.build(layer, case.batch, T)
            sets = [runner.prepare(*inp) for inp in case.inputs(T)]
            sample = median_sample(runner.run, sets, timing.reps, clock=runner.clock, warmup=warmup,
                                   max_seconds=timing.max_seconds, min_sample_s=timing.min_sample_s,
                                   max_calls=timing.max_calls)
            result.setdefault("calls_per_sample", {})[T] = sample.calls
            seconds = sample.seconds
            if T == t1 and runner.check is not None:
                result["rel_err"] = rel_err(as_numpy(runner.check(runner.run(*sets[0]))),
                                            case.expected())
            return seconds

        first = time_at(t1)
        t2, warmup = timing.t2, timing.warmup
        if first > timing.max_seconds:
            # A very slow peer (seconds per call): a shorter second length, one warm-up call.
            # The slope stays a per-step time; the run stays inside its 10 minutes.
            t2, warmup = t1 + max(1, (timing.t2 - t1) // 4), 1
            result["t2_shortened"] = t2
        result.update(per_step(lambda T: first if T == t1 else time_at(T, warmup), t1, t2))
        runner = runners[t2]
        if runner.probe is not None:
            result.update(runner.probe(*runner.prepare(*case.inputs(t2)[0])))
        result.update(runner.info)
    except Skip as e:
        return dict(skipped=str(e))
    except Exception as e:  # one failing peer must not hide the others
        return dict(error=f"{type(e).__name__}: {str(e)[:400]}")
    if not result["us_per_step"] > 0:
        result["note"] = "non-positive slope: the two lengths differ by less than the noise"
    result["measure_s"] = round(time.perf_counter() - start, 2)
    return result


def measure_all(peers, case: Case) -> dict:
    results = {peer.name: measure(peer, case) for peer in peers}
    jax.clear_caches()  # programs compiled for this size are not needed again
    return results


def ran(result: dict | None) -> bool:
    return bool(result) and "us_per_step" in result and math.isfinite(result["us_per_step"]) \
        and result["us_per_step"] > 0


def best_competitor(peers, results: dict) -> tuple[str | None, float | None]:
    """The fastest peer (per step) among the competitors that ran."""
    timed = [(results[p.name]["us_per_step"], p.name) for p in peers
             if p.competitor and ran(results.get(p.name))]
    if not timed:
        return None, None
    us, name = min(timed)
    return name, us
