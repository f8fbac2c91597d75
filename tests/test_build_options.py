"""The persistent kernels' translation units, which CMakeLists.txt generates (per recurrence and dtype a
lookup unit, and for the simple cell's recurrences one per group of batch tile and planes a pass),
and its JAX_SPRNN_KERNEL_DTYPES
option: the kernels of a subset of the dtypes, for kernel experiments on a GPU machine, the other
dtypes' units compiled to stubs that hold no kernel. Configured here (CMake, Ninja and nvcc; no GPU
needed)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("cmake", "ninja", "nvcc"))
    or importlib.util.find_spec("nanobind") is None,
    reason="needs cmake, ninja, nvcc and nanobind")


def _configure(build_dir, dtypes):
    return subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", "-DJAX_SPRNN_CUDA=ON",
         "-DCMAKE_CUDA_ARCHITECTURES=90-real", f"-DPython_EXECUTABLE={sys.executable}",
         f"-DJAX_SPRNN_KERNEL_DTYPES={dtypes}"],
        capture_output=True, text=True, timeout=300)


RECURRENCES = ("forward", "backward", "lstm", "gru", "lstm_backward", "gru_backward")
GROUPS = ("tile1_pp1", "tile2_pp1", "tile4_pp1", "tile4_pp2")
GROUPED = ("forward", "backward")  # (the recurrences whose groups compile in units of their own)


def _unit_defines(build_ninja):
    """{kernel unit name: its DEFINES line} from Ninja's build file."""
    defines = {}
    for unit, block in re.findall(r"build \S*generated/instances/(\w+)\.cu\.o: (.*?)\n\n", build_ninja, re.S):
        found = re.search(r"DEFINES = (.*)", block)  # (none where the unit has no definition)
        defines[unit] = found.group(1) if found else ""
    return defines


def _handler_defines(build_dir):
    """The DEFINES line of cuda/cuda_persistent.cu, whose handler refuses a dtype left out."""
    block = re.search(r"build \S*cuda/cuda_persistent\.cu\.o: (.*?)\n\n",
                      (build_dir / "build.ninja").read_text(), re.S).group(1)
    return re.search(r"DEFINES = (.*)", block).group(1)


def test_kernel_dtypes_stub_every_unit_of_a_dtype_left_out(tmp_path):
    done = _configure(tmp_path, "f16")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    defines = _unit_defines((tmp_path / "build.ninja").read_text())
    assert sorted(defines) == sorted(f"{r}_{d}_{g}" for r in RECURRENCES for d in ("f32", "f16", "bf16")
                                     for g in (GROUPS if r in GROUPED else ()) + ("lookup",))
    for unit, line in defines.items():
        dtype = unit.split("_")[-2 if unit.endswith("lookup") else -3]
        assert ("JAX_SPRNN_KERNEL_STUB" in line) == (dtype != "f16"), (unit, line)
        assert "JAX_SPRNN_KERNEL_DTYPE_MASK" not in line  # (a new subset rebuilds only the stubs)
    assert "JAX_SPRNN_KERNEL_DTYPE_MASK=2" in _handler_defines(tmp_path)  # bit 1: Dtype::kF16
    # A lookup unit declares every other group of its recurrence and dtype extern; each group unit
    # instantiates its own.
    units = tmp_path / "generated" / "instances"
    lookup = (units / "backward_bf16_lookup.cu").read_text()
    assert "lookup_persistent_kernel<Direction::kBackward, Dtype::kBF16>" in lookup
    for group in GROUPS:
        tile, pp = group.removeprefix("tile").split("_pp")
        args = f"Direction::kBackward, Dtype::kBF16, {tile}, {pp}, false"
        assert f"JAX_SPRNN_EXTERN_GROUP({args})" in lookup
        assert f"JAX_SPRNN_INSTANTIATE_GROUP({args})" in (units / f"backward_bf16_{group}.cu").read_text()
    # A gated recurrence's lookup unit instantiates its groups itself.
    assert "JAX_SPRNN_EXTERN_GROUP" not in (units / "gru_backward_bf16_lookup.cu").read_text()
    # A stub unit compiles in seconds to an object that holds the lookup and no kernel.
    stub = "CMakeFiles/sprnn_cuda_kernels.dir/generated/instances/lstm_f32_lookup.cu.o"
    built = subprocess.run(["ninja", "-C", str(tmp_path), stub], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stdout[-3000:]
    symbols = subprocess.run(["nm", "-C", str(tmp_path / stub)], capture_output=True, text=True).stdout
    assert "lookup_persistent_kernel<(jax_sprnn::cuda::Direction)2, (jax_sprnn::cuda::Dtype)0>" in symbols
    assert "sprnn_persistent_kernel" not in symbols


def test_kernel_dtypes_default_to_all_and_refuse_an_unknown_one(tmp_path):
    done = _configure(tmp_path / "all", "f32;f16;bf16")
    assert done.returncode == 0, done.stderr[-2000:]
    defines = _unit_defines((tmp_path / "all" / "build.ninja").read_text())
    assert defines and not any("JAX_SPRNN_KERNEL_STUB" in line for line in defines.values())
    assert "JAX_SPRNN_KERNEL_DTYPE_MASK=7" in _handler_defines(tmp_path / "all")
    bad = _configure(tmp_path / "bad", "f16;half")
    assert bad.returncode != 0
    assert "JAX_SPRNN_KERNEL_DTYPES holds f32, f16 and bf16, not 'half'" in bad.stderr


def test_the_installed_cuda_module_leaves_no_kernel_symbol_undefined():
    """A kernel group that no unit instantiates would leave the module's lookup with an undefined
    symbol, which a shared module tolerates until the first call: none of jax_sprnn's may be."""
    spec = importlib.util.find_spec("jax_sprnn._sprnn_cuda")
    module = spec.origin if spec is not None else None
    if module is None or shutil.which("nm") is None:
        pytest.skip("no CUDA module built (or no nm)")
    undefined = subprocess.run(["nm", "-D", "-C", "--undefined-only", str(module)], capture_output=True,
                               text=True, check=True).stdout
    assert [line for line in undefined.splitlines() if "jax_sprnn" in line] == []
