"""Nsight Compute's metric logs (``ncu --csv --metrics ...``): one dict per kernel launch.

ncu writes one CSV row per (launch, metric), between lines of its own (``==PROF== ...``), and may
scale a metric's unit (``usecond``, ``Kinst``) unless asked for ``--print-units base``. Read here
once for the tools that time kernels this way (``tools/kernel_time.py``,
``benchmarks/probes/fixed_cost.py``).
"""

from __future__ import annotations

import csv
from pathlib import Path

#: a unit's factor to the base unit: nanoseconds for times, instructions for counts
UNITS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6,
         "second": 1e9, "s": 1e9, "inst": 1.0, "Kinst": 1e3, "Minst": 1e6, "Ginst": 1e9}


def launches(path: str | Path) -> list[dict]:
    """The launches of the log in launch order, each ``{"kernel": name, metric: value}`` with
    times in nanoseconds and counts in instructions. An unknown unit is an error, not a guess."""
    with open(path, newline="") as f:
        rows = [line for line in f if line.startswith('"')]
    by_id: dict[int, dict] = {}
    for row in csv.DictReader(rows):
        unit = row["Metric Unit"]
        if unit not in UNITS:
            raise ValueError(f"{path}: unknown unit {unit!r} of {row['Metric Name']}")
        launch = by_id.setdefault(int(row["ID"]), {"kernel": row["Kernel Name"]})
        launch[row["Metric Name"]] = float(row["Metric Value"].replace(",", "")) * UNITS[unit]
    return [by_id[i] for i in sorted(by_id)]
