"""The README's examples run as written."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flax_quickstart_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "flax_quickstart.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "matches the trained model" in out.stdout
