"""The README's examples run as written: its ```python blocks, read from README.md at test time, and
examples/flax_quickstart.py."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

# `y, h_T = ...  # [B, T, H], [B, H]`: names bound by a line, and the shapes its comment states.
_ANNOTATED = re.compile(r"^(?P<names>[\w ,]+?)\s*=[^=].*#\s*(?P<shapes>\[[^#]*\])")


def readme_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def stated_shapes(block: str) -> list[tuple[str, str]]:
    """``(name, shape expression)`` for each assignment whose comment states its shapes."""
    out = []
    for line in block.splitlines():
        m = _ANNOTATED.match(line)
        if not m:
            continue
        names = [n.strip() for n in m["names"].split(",")]
        shapes = re.findall(r"\[[^\]]*\]", m["shapes"])
        if len(names) == len(shapes):
            out.extend(zip(names, shapes))
    return out


def test_readme_python_blocks_run():
    # On the default backend, as a reader runs them (the export block exports for that backend).
    blocks = readme_blocks()
    assert blocks, "README.md has no ```python block"
    namespace: dict = {}
    checked = 0
    for i, block in enumerate(blocks):  # in order, one namespace
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        for name, shape in stated_shapes(block):
            want = tuple(eval(shape, namespace))
            assert np.shape(namespace[name]) == want, (name, shape, want)
            checked += 1
    assert checked, "no README line states the shapes it returns (`# [B, T, H]`)"
    arrays = [v for v in jax.tree_util.tree_leaves(
        [v for k, v in namespace.items() if not k.startswith("__")])
        if isinstance(v, (jax.Array, np.ndarray)) and np.issubdtype(v.dtype, np.floating)]
    assert arrays
    for a in arrays:
        assert np.all(np.isfinite(np.asarray(a, np.float32)))


def test_flax_quickstart_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "flax_quickstart.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "matches the trained model" in out.stdout
