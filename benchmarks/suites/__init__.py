"""The benchmark suites; each module has ``run(ctx)`` and ``columns(peers)`` for its table."""

from . import capacity, paper, sweep, training

SUITES = {"paper": paper, "sweep": sweep, "capacity": capacity, "training": training}
