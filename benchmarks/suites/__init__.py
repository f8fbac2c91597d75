"""The benchmark suites; each module has ``run(ctx)`` and ``columns(peers)`` for its table."""

from . import ablation, capacity, cluster, cpu, gated, paper, sweep, training

SUITES = {"ablation": ablation, "paper": paper, "sweep": sweep, "capacity": capacity, "training": training,
          "cpu": cpu, "cluster": cluster, "gated": gated}
