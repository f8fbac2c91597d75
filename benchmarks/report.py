"""Where results go: a JSON file rewritten after every row (a run cut short keeps what it measured),
a printed table, and the environment the numbers were taken in."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax

from jax_sprnn import _native


def environment() -> dict:
    info = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:],
                jax_sprnn_cuda_module=_native.cuda_module() is not None,
                jax_default_matmul_precision=str(
                    getattr(jax.config, "jax_default_matmul_precision", None)))
    if _native.cuda_module() is not None and jax.default_backend() == "gpu":
        info["device_properties"] = dict(_native.cuda_module().device_properties(0))
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    return info


def _clean(value):
    """JSON without NaN/inf (they become null) and with tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # NumPy scalars
        return _clean(value.item())
    return value


class Column:
    def __init__(self, header: str, get: Callable[[dict], object], width: int = 8):
        self.header, self.get, self.width = header, get, width

    def cell(self, row: dict) -> str:
        try:
            value = self.get(row)
        except (KeyError, TypeError):
            value = None
        if value is None:
            text = "-"
        elif isinstance(value, float):
            text = f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
        else:
            text = str(value)
        return text.rjust(self.width)


class Recorder:
    """Collects a suite's rows, prints each as it comes, and keeps ``<out>/<suite>.json`` current."""

    def __init__(self, out_dir: Path, suite: str, columns: Sequence[Column], header: dict):
        self.path = Path(out_dir) / f"{suite}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.payload = dict(suite=suite, **header, rows=[])
        self._printed_header = False

    @property
    def rows(self) -> list:
        return self.payload["rows"]

    def print_header(self):
        print(" ".join(c.header.rjust(c.width) for c in self.columns), flush=True)
        self._printed_header = True

    def add(self, row: dict, *, echo: bool = True) -> None:
        self.rows.append(row)
        if echo:
            if not self._printed_header:
                self.print_header()
            print(" ".join(c.cell(row) for c in self.columns), flush=True)
        self.save()

    def set(self, **items) -> None:
        self.payload.update(items)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(self.payload), indent=1))
        os.replace(tmp, self.path)
