"""What the layer probes (bidirectional.py, weight_sets.py) share: their command line and the loop
that measures, prints and records one row per value of the swept argument."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import jax


def parser(description: str, *, dtype: str) -> argparse.ArgumentParser:
    """The layer's arguments: --hidden, --density, --dtype, --steps, --reps and --out."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--dtype", default=dtype, choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path)
    return ap


def sweep(args: argparse.Namespace, name: str, values, measure: Callable[[int], dict]) -> dict:
    """``measure(value)`` for each value of the swept argument ``name``: each row printed as it
    comes, all of them in ``args.out`` (JSON) with the device, jax and the arguments."""
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__,
              **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": {}}
    for value in values:
        row = measure(value)
        result["rows"][str(value)] = row
        print(f"{name}={value:3d} " + "  ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result
