"""benchmarks.timing: a timed sample is a group of back-to-back calls, sized by the warm-up, with
the inputs rotated across the group, and a clock returns seconds per call of its group."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import timing  # noqa: E402


def _fixed_clock(seconds_per_call):
    """A clock that runs the group and says each call took ``seconds_per_call``."""
    def clock(fn, group):
        for args in group:
            fn(*args)
        return seconds_per_call
    return clock


@pytest.mark.parametrize("min_sample_s, max_calls, calls", [
    (0.0045, 32, 5),   # 4.5 ms of 1-ms calls: five
    (0.1, 8, 8),       # capped
    (0.0, 32, 1),      # no minimum: one call a sample
    (0.0005, 32, 1),   # a call already longer than the minimum
])
def test_a_sample_holds_the_calls_that_last_the_minimum_and_rotates_inputs(min_sample_s, max_calls,
                                                                          calls):
    seen = []
    sample = timing.median_sample(seen.append, [(0,), (1,), (2,)], 3, clock=_fixed_clock(0.001),
                                  warmup=2, min_sample_s=min_sample_s, max_calls=max_calls)
    assert sample.calls == calls
    assert sample.seconds == 0.001
    assert seen == [0, 1] + [i % 3 for i in range(3 * calls)]  # warm-up, then 3 groups in rotation


def test_a_slow_peer_stops_after_the_minimum_of_samples_counting_every_call():
    seen = []
    timing.median_sample(seen.append, [(0,)], 20, clock=_fixed_clock(0.001), warmup=1,
                         min_sample_s=0.005, max_calls=32, max_seconds=0.012, min_reps=2)
    # groups of 5 calls of 1 ms: 10 ms after two groups, 15 ms (past 12) after the third
    assert len(seen) == 1 + 3 * 5


def test_the_wall_clock_gives_seconds_per_call_of_its_group():
    def call(x):
        time.sleep(0.02)
        return jnp.asarray(x) + 1
    per_call = timing.wall_clock(call, [(1.0,)] * 4)
    # 0.08 if the group's time were not divided by its calls; the upper bound is halfway there, as
    # a loaded 2-core CI machine measured 0.0412 (the bound was 0.04)
    assert 0.02 <= per_call < 0.06
