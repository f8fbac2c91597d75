"""Load the native modules and register their XLA FFI targets (one name per target on every platform)."""

from __future__ import annotations

import functools
import importlib

import jax

from . import planner as _planner

TARGETS = ("jax_sprnn_forward", "jax_sprnn_backward", "jax_sprnn_weight_grad")


def _load(name: str):
    try:
        return importlib.import_module(f"jax_sprnn.{name}")
    except ImportError:
        return None


_cpu = _load("_sprnn_cpu")
_cuda = _load("_sprnn_cuda")

if _cpu is not None:
    for _name, _capsule in _cpu.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
if _cuda is not None:
    for _name, _capsule in _cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def has_cpu_kernels() -> bool:
    return _cpu is not None


def cuda_module():
    """The CUDA extension module, or None when it was not built."""
    return _cuda


_CUDA_TARGETS = frozenset(_cuda.registrations()) if _cuda is not None else frozenset()


def cuda_targets() -> frozenset:
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
