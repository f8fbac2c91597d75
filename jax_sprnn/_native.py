"""Load the native modules and register their XLA FFI targets (one name per target on every platform).

A module that was not built is no error: the package lowers its pure-JAX fallback instead. A
module that was built but does not load is one: importing warns with the loader's message, and
:func:`unavailable_reason` gives it to whoever reports the missing kernels.
"""

from __future__ import annotations

import dataclasses
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


_CPU_TARGETS = frozenset(_cpu.registrations()) if _cpu is not None else frozenset()


def cpu_targets() -> frozenset:
    """Every FFI target registered on the CPU."""
    return _CPU_TARGETS


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
    """The planner's DeviceSpec read from a real GPU through the CUDA module, at run time."""
    props = _cuda.device_properties(device_index)
    major, minor = props["compute_capability"]
    return _planner.DeviceSpec(
        name=str(props["name"]),
        sm_count=int(props["sm_count"]),
        smem_per_block=int(props["smem_per_block_optin"]),
        max_threads_per_block=int(props["max_threads_per_block"]),
        compute_capability=(int(major), int(minor)),
        regs_per_sm=int(props["regs_per_sm"]),
        cooperative_launch=bool(props["cooperative_launch"]),
        cluster_launch=bool(props["cluster_launch"]),
    )


@dataclasses.dataclass(frozen=True)
class CudaArchitectures:
    """What the CUDA module was compiled for (CMAKE_CUDA_ARCHITECTURES at build time).

    ``sass``: the ``sm_N`` with machine code, ``ptx``: the ``compute_N`` with PTX, as CMake spells
    them (``"90"``, ``"90a"``); ``cmake``: the list as given, which may be a special value (``all``,
    ``native``) that leaves both lists empty.
    """

    cmake: tuple[str, ...]
    sass: tuple[str, ...]
    ptx: tuple[str, ...]

    def kernel_image(self, compute_capability: tuple[int, int]) -> str | None:
        """The image a GPU of this compute capability loads (``"sm_86"`` SASS, ``"compute_100"``
        PTX that the driver JIT-compiles), or None when the module has none for it.

        SASS for ``sm_XY`` runs on compute capability ``X.Z`` with ``Z >= Y`` (an arch-specific
        ``sm_XYa`` only on ``X.Y``); PTX for ``compute_XY`` on any ``>= X.Y``.
        """
        major, minor = compute_capability
        for arch in sorted(self.sass, key=_arch_version, reverse=True):
            a_major, a_minor = divmod(_arch_version(arch), 10)
            exact_only = arch.endswith("a")
            if a_major == major and (a_minor == minor if exact_only else a_minor <= minor):
                return f"sm_{arch}"
        for arch in sorted(self.ptx, key=_arch_version, reverse=True):
            if not arch.endswith("a") and divmod(_arch_version(arch), 10) <= (major, minor):
                return f"compute_{arch}"
        return None

    @property
    def known(self) -> bool:
        """False when the build used a special value (``all``, ``native``) and the lists are empty."""
        return bool(self.sass or self.ptx)


def _arch_version(arch: str) -> int:
    """``"90a"`` -> 90."""
    return int(arch.rstrip("af"))


def _split(text: str) -> tuple[str, ...]:
    return tuple(a for a in text.split(",") if a)


def cuda_architectures() -> CudaArchitectures | None:
    """The architectures the loaded CUDA module was compiled for, or None without one."""
    if _cuda is None:
        return None
    archs = _cuda.cuda_architectures()
    return CudaArchitectures(_split(archs["cmake"]), _split(archs["sass"]), _split(archs["ptx"]))


def current_device_spec() -> _planner.DeviceSpec:
    """The GPU layouts are planned for: JAX's default CUDA device, read at run time; without a GPU
    (or without the CUDA module), :data:`jax_sprnn.planner.H200`, the planning default."""
    if _cuda is not None:
        index = _visible_gpu()
        if index is not None:
            return device_spec(index)
    return _planner.H200
