"""Load the native modules and register their XLA FFI targets (one name per target on every platform).

A module that was not built is no error: the package lowers its pure-JAX fallback instead. A
module that was built but does not load is one: importing warns with the loader's message, and
:func:`unavailable_reason` gives it to whoever reports the missing kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import pathlib
import sys
import warnings

import jax

from . import _constants
from . import planner as _planner

TARGETS = tuple(_constants.ffi_target(kind) for kind in _constants.PRODUCTION_TARGET_KINDS)

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_reasons: dict[str, str] = {}  # module name -> why it is not loaded


def _builds_for_other_pythons(directory: pathlib.Path, name: str) -> list[pathlib.Path]:
    """Compiled files of module ``name`` in ``directory`` that this interpreter does not load."""
    mine = {name + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES}
    return sorted(p for p in directory.glob(f"{name}.*")
                  if p.suffix in (".so", ".pyd") and p.name not in mine)


def _installed_elsewhere(name: str) -> list[pathlib.Path]:
    """Loadable builds of ``name`` in other copies of jax_sprnn on sys.path."""
    found = []
    for entry in sys.path:
        directory = (pathlib.Path(entry or ".") / "jax_sprnn").resolve()
        if directory != _PACKAGE_DIR:
            found += [directory / (name + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES
                      if (directory / (name + suffix)).is_file()]
    return found


def _not_built_reason(name: str) -> str:
    reason = f"jax_sprnn.{name} was not built"
    stale = _builds_for_other_pythons(_PACKAGE_DIR, name)
    if stale:
        reason += (f" for this Python: {', '.join(p.name for p in stale)} in {_PACKAGE_DIR} is "
                   f"for another interpreter (this one loads "
                   f"{name}{importlib.machinery.EXTENSION_SUFFIXES[0]}); rebuild it")
    others = _installed_elsewhere(name)
    if others:
        reason += (f"; this jax_sprnn was imported from {_PACKAGE_DIR}, while an installed copy "
                   f"with the module is at {others[0].parent}: run from outside the source tree, "
                   f"or install in editable mode (pip install -e .)")
    return reason


def _load(name: str):
    """The compiled module ``jax_sprnn.<name>``, or None (with the reason kept) when it is absent
    or does not load."""
    full = f"jax_sprnn.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name != full:  # the module exists, but something it imports does not
            raise
        _reasons[name] = _not_built_reason(name)
    except (ImportError, OSError) as e:  # built, but the loader refused it (a library, a symbol)
        path = getattr(e, "path", None)
        _reasons[name] = f"{full} was built but failed to load: {e}"
        if path and path not in str(e):
            _reasons[name] += f" ({path})"
        warnings.warn(f"jax_sprnn: {_reasons[name]}; its kernels are not available", RuntimeWarning,
                      stacklevel=2)
    return None


def unavailable_reason(name: str) -> str:
    """Why ``jax_sprnn.<name>`` (``_sprnn_cpu`` or ``_sprnn_cuda``) is not loaded; '' if it is."""
    return _reasons.get(name, "")


_cpu = _load("_sprnn_cpu")
_cuda = _load("_sprnn_cuda")

if _cpu is not None:
    for _name, _capsule in _cpu.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
if _cuda is not None:
    # The test and benchmark targets (hooked recurrences, sync floor) have their own names and
    # signatures; they are registered too, so tests and benchmarks in any process can call them.
    for _name, _capsule in {**_cuda.registrations(), **_cuda.testing_registrations()}.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def has_cpu_kernels() -> bool:
    return _cpu is not None


def cpu_module():
    """The CPU extension module, or None when it is not loaded (see :func:`unavailable_reason`)."""
    return _cpu


def cuda_module():
    """The CUDA extension module, or None when it is not loaded (see :func:`unavailable_reason`)."""
    return _cuda


_CUDA_TARGETS = (frozenset(_cuda.registrations()) | frozenset(_cuda.testing_registrations())
                 if _cuda is not None else frozenset())


def cuda_targets() -> frozenset:
    """Every FFI target registered on CUDA, the test and benchmark ones included."""
    return _CUDA_TARGETS


@functools.cache
def initialize_cuda() -> None:
    """One-time host setup of the CUDA kernels (the pinned error word), done when the first call is
    lowered: by then JAX has set up the device, and no CUDA graph is being captured. Importing
    jax_sprnn touches no CUDA state."""
    if _cuda is not None:
        _cuda.initialize()


def _visible_gpu() -> int | None:
    """Index of the default CUDA device JAX uses, or None."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    return devices[0].id if devices else None


@functools.lru_cache(maxsize=None)
def device_spec(device_index: int) -> _planner.DeviceSpec:
    """The planner's DeviceSpec read from a real GPU through the CUDA module."""
    props = _cuda.device_properties(device_index)
    return _planner.DeviceSpec(
        name=str(props["name"]),
        sm_count=int(props["sm_count"]),
        smem_per_block=int(props["smem_per_block_optin"]),
        max_threads_per_block=int(props["max_threads_per_block"]),
    )


def current_device_spec() -> _planner.DeviceSpec:
    """The GPU layouts are planned for: JAX's default CUDA device, else an H200."""
    if _cuda is not None:
        index = _visible_gpu()
        if index is not None:
            return device_spec(index)
    return _planner.H200
