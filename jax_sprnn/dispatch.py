"""What runs: the choice between a native kernel and the pure-JAX fallback for each primitive call.

The choice depends on what was built (:mod:`jax_sprnn._native`), the layer's layout
(:class:`jax_sprnn.planner.LayoutMeta`), the device (``_native.current_device_spec()``), the call's
shapes and the cost model (:mod:`jax_sprnn.cost`). :mod:`jax_sprnn.primitives` asks here while it
lowers, and lowers what the :class:`Decision` says.

``method`` (``sparse_rnn``'s): ``"auto"`` takes the kernel where it runs and is expected to be
faster; ``"native"`` takes the kernel or raises an error that says why it cannot run.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import _constants, _native, cost, planner
from .planner import LayoutMeta

FORWARD, BACKWARD, WEIGHT_GRAD, GATED_FORWARD, GATED_BACKWARD = (
    _constants.ffi_target(k) for k in _constants.PRODUCTION_TARGET_KINDS)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What one primitive call lowers to.

    ``path``: ``"kernel"`` (the native target) or ``"fallback"`` (the pure-JAX code of
    :mod:`jax_sprnn.fallback`: XLA's dense path on a GPU). ``why``: the reason, in words.
    ``warning``: what to tell the user once, for a fallback they may not expect (None when the
    fallback is the faster path). ``time_chunks``: how many time chunks the CUDA weight-gradient
    kernel splits the sequence into (1 elsewhere).
    """

    path: str
    why: str
    warning: str | None = None
    time_chunks: int = 1


def _cpu_missing() -> str:
    """Why there are no CPU kernels: the loader's reason where it refused a built module."""
    return "the CPU module " + (_native.unavailable_reason("_sprnn_cpu")
                                or "jax_sprnn._sprnn_cpu was not built")


def _symbolic(*dims) -> bool:
    """Whether a dimension is symbolic (``jax.export`` shape polymorphism): known only when the
    exported program runs, so no cost rule can weigh it."""
    return not all(isinstance(d, (int, np.integer)) for d in dims)


#: why a symbolic batch or length takes the C++ kernel (it runs every size)
_SYMBOLIC_CPU = "a symbolic batch or sequence length (jax.export): the C++ kernel runs every size"
def _symbolic_on_gpu(kernel: str) -> str:
    """Why a symbolic batch takes XLA's dense path on a GPU instead of ``kernel``."""
    return (f"the batch is symbolic (jax.export shape polymorphism), and the {kernel} kernel's "
            f"launch is planned for a known batch")


def on_cpu(method: str, meta: LayoutMeta, batch: int, steps: int, *, forward: bool) -> Decision:
    """The CPU kernels where the CPU module was built, else the pure-JAX fallback; for
    ``method="auto"`` also XLA's dense path where :func:`jax_sprnn.cost.cpu_prefers_dense` expects
    the C++ kernel to be slower (``forward``: the forward recurrence, else a backward primitive)."""
    if not _native.has_cpu_kernels():
        if method == "native":
            raise RuntimeError(f"method='native': {_cpu_missing()}")
        return Decision("fallback", _cpu_missing(),
                        "jax_sprnn: the CPU module was not built; using the pure-JAX fallback")
    return _cpu_kernel_unless_slower(method, meta, batch, steps, forward=forward)


def on_cpu_gated(method: str, meta: LayoutMeta, batch: int, steps: int) -> Decision:
    """The C++ gated kernel (LSTM, GRU) where the CPU module has it, else XLA's dense path; for
    ``method="auto"`` also the dense path where :func:`jax_sprnn.cost.cpu_prefers_dense` expects
    the kernel to be slower (its estimate of the simple cell's forward pass, for the G*H rows)."""
    if GATED_FORWARD not in _native.cpu_targets():
        why = (_cpu_missing() if not _native.has_cpu_kernels()
               else f"the CPU module of jax_sprnn was not built with {GATED_FORWARD}")
        if method == "native":
            raise RuntimeError(f"method='native': {why}")
        return Decision("fallback", why)  # XLA's dense path is a good CPU path: no warning
    return _cpu_kernel_unless_slower(method, meta, batch, steps, forward=True)


def _cpu_kernel_unless_slower(method: str, meta: LayoutMeta, batch: int, steps: int, *,
                              forward: bool) -> Decision:
    """The built C++ kernel, unless ``method="auto"`` and the cost model expects XLA's dense path
    to be faster at this size (a symbolic size keeps the kernel: it cannot be estimated)."""
    if _symbolic(batch, steps):
        return Decision("kernel", _SYMBOLIC_CPU)
    if method == "auto":
        dense, why = cost.cpu_prefers_dense(meta, batch, steps, forward=forward)
        if dense:
            return Decision("fallback", f"it is faster here ({why})")
    return Decision("kernel", "the CPU module is built")


def cuda_image_missing(device: planner.DeviceSpec) -> str | None:
    """Why the CUDA module has no code for this GPU (neither SASS for its compute capability nor
    PTX the driver can JIT-compile for it), or None when it has."""
    archs = _native.cuda_architectures()
    if archs is None or not archs.known:  # built for CMake's 'all'/'native': trust the build
        return None
    if archs.kernel_image(device.compute_capability) is not None:
        return None
    major, minor = device.compute_capability
    return (f"the CUDA module of jax_sprnn has no code for {device.name} (compute capability "
            f"{major}.{minor}): it was built for SASS {', '.join('sm_' + a for a in archs.sass) or 'none'}"
            f" and PTX {', '.join('compute_' + a for a in archs.ptx) or 'none'}; rebuild with "
            f"-DCMAKE_CUDA_ARCHITECTURES including {major}{minor}")


def _recurrence_device_refusal(device: planner.DeviceSpec) -> str | None:
    """Why no persistent kernel runs on this GPU whatever the layer, or None."""
    missing = cuda_image_missing(device)
    if missing is not None:
        return missing
    if not device.cooperative_launch:
        return (f"{device.name} does not support cooperative launches, which the persistent "
                f"kernels need")
    return None


def _device_warning(why: str) -> str:
    """The one warning of every primitive on a GPU the kernels do not run on (the same text for
    each target, so the user sees it once)."""
    return f"jax_sprnn: the CUDA kernels do not run on this GPU; using the dense XLA path: {why}"


def cuda_fit(meta: LayoutMeta, batch: int, dtype, target: str = FORWARD) -> tuple[bool, str]:
    """Whether the persistent CUDA kernel runs this layout at this batch here, and if not, why.

    Both directions share launch bounds and shared-memory needs, so one answer serves the forward
    kernel (``meta``) and the backward one (``meta_t``, with ``target=BACKWARD``). The device is
    the one JAX uses, read at run time (:func:`jax_sprnn._native.current_device_spec`).
    """
    if target not in _native.cuda_targets():
        return False, f"the CUDA module of jax_sprnn was not built with {target}"
    device = _native.current_device_spec()
    unusable = _recurrence_device_refusal(device)
    if unusable is not None:
        return False, unusable
    if not meta.fits:
        return False, meta.reason
    if meta.num_ctas > device.sm_count or meta.threads_per_cta > device.max_threads_per_block:
        return False, (f"the layout was planned for more SMs or threads ({meta.num_ctas} CTAs of "
                       f"{meta.threads_per_cta} threads) than {device.name} has; repack it with "
                       f"SparseWeights.from_dense on this machine")
    limits = dict(device.thread_limits(dtype, meta.gates))
    if meta.threads_per_cta > limits.get(meta.reg_slots, 0):
        return False, (f"no kernel instantiation runs {meta.reg_slots} register slots with "
                       f"{meta.threads_per_cta} threads per CTA")
    max_batch = planner.max_persistent_batch(meta, dtype, device)
    if batch > max_batch:
        where = (" on the replicas of its cluster that the device holds at once"
                 if device.cluster_launch and meta.exchange == "cluster" else "")
        return False, (f"batch {batch} exceeds the persistent kernel's limit of {max_batch} for "
                       f"H={meta.hidden} (shared memory holds the staged state, {meta.num_cols} values an "
                       f"example, for at most that many{where})")
    return True, "fits"


def gpu_path(meta: LayoutMeta, batch: int, dtype, method: str = "auto",
             target: str = FORWARD) -> tuple[str, str]:
    """``("persistent", why)`` or ``("dense", why)``: what a GPU call of this layer runs.

    The dense XLA path runs where the kernel does not fit, and, for ``method="auto"`` in the
    forward direction (the simple cell's and the gated cells'), where :mod:`jax_sprnn.cost` expects
    the kernel to be clearly slower. (The backward keeps the kernel: its dense path must stay in
    float32, which is slower still.)
    """
    ok, why = cuda_fit(meta, batch, dtype, target)
    if not ok:
        return "dense", why
    if method == "auto" and target in (FORWARD, GATED_FORWARD):
        rule = cost.auto_prefers_dense if target == FORWARD else cost.gated_prefers_dense
        slower, estimate = rule(meta, batch, dtype)
        if slower:
            return "dense", f"it is faster here ({estimate})"
    return "persistent", why


def _fallback(method: str, refused: str, why: str, warning: str | None) -> Decision:
    """XLA's dense path for ``method="auto"``; for ``"native"`` the error ``refused: why``."""
    if method == "native":
        raise ValueError(f"method='native': {refused}: {why}")
    return Decision("fallback", why, warning)


def on_cuda_recurrence(target: str, meta: LayoutMeta, batch: int, dtype, method: str) -> Decision:
    """The persistent kernel of ``target`` (forward or backward) or XLA's dense path."""
    kernel = f"the persistent CUDA kernel ({target}) cannot run"
    if target in _native.cuda_targets():
        refusal = _recurrence_device_refusal(_native.current_device_spec())
        if refusal is not None:  # the GPU, not this layer: one warning for every target
            return _fallback(method, kernel, refusal, _device_warning(refusal))
    if _symbolic(batch):
        why = _symbolic_on_gpu("persistent")
        return _fallback(method, kernel, why, f"jax_sprnn: {target} uses the dense XLA path on the "
                                              f"GPU: {why}")
    path, why = gpu_path(meta, batch, dtype, method, target)
    if path == "persistent":
        return Decision("kernel", why)
    return _fallback(method, f"{kernel} this layer", why,
                     f"jax_sprnn: {target} uses the dense XLA path on the GPU: {why}")


def weight_grad_time_chunks(meta: LayoutMeta, groups: int, steps: int, sm_count: int) -> int:
    """How many time chunks the weight-gradient kernel splits ``steps`` into: the fewest that fill
    at least one wave of CTAs with whole waves (at least 90% busy), else the best filled."""
    # The kernel's work split (jax_sprnn/_constants.py): a thread takes up to 8 or 16 slots of one
    # lane, a CTA 1024 threads, one CTA per SM at a time.
    per_thread = _constants.weight_grad_slots_per_thread(meta.slots_per_lane)
    threads = meta.num_warps * 32 * -(-meta.slots_per_lane // per_thread)
    blocks = max(1, -(-threads // _constants.WEIGHT_GRAD_THREADS)) * groups
    limit = max(1, min(steps, 64, 65535 // groups))

    def filled(c):  # the share of SM time the chunks keep busy
        return blocks * c / (-(-blocks * c // sm_count) * sm_count)
    for c in range(1, limit + 1):
        if blocks * c >= sm_count and filled(c) >= 0.9:
            return c
    return max(range(1, limit + 1), key=lambda c: (filled(c), -c))


def on_cuda_weight_grad(meta: LayoutMeta, steps: int, batch: int, hidden: int, groups: int,
                        method: str) -> Decision:
    """The pattern kernel (with its time split) or XLA's dense einsum and gather.

    ``"auto"`` takes the einsum without a warning where :mod:`jax_sprnn.cost` expects it faster.
    """
    kernel = "the CUDA weight-gradient kernel cannot run"
    if WEIGHT_GRAD not in _native.cuda_targets():
        why = ("the CUDA module of jax_sprnn was not built" if not _native.cuda_targets() else
               f"the CUDA module of jax_sprnn was not built with {WEIGHT_GRAD}")
        return _fallback(method, kernel, why, f"jax_sprnn: the weight gradient uses the dense XLA "
                                              f"fallback on the GPU: {why}")
    device = _native.current_device_spec()
    missing = cuda_image_missing(device)
    if missing is not None:
        return _fallback(method, kernel, missing, _device_warning(missing))
    if _symbolic(batch, steps):
        return _fallback(method, kernel, _symbolic_on_gpu("weight-gradient"), None)
    smem = _constants.weight_grad_smem_bytes(hidden, batch)  # one staged step, the least
    if smem > device.smem_per_block:
        why = f"H={hidden} needs {smem} bytes of shared memory per CTA"
        return _fallback(method, kernel, why, f"jax_sprnn: the weight gradient uses the dense XLA "
                                              f"fallback on the GPU: {why}")
    if method == "auto":
        prefers_dense, estimate = cost.weight_grad_prefers_dense(meta, batch, groups)
        if prefers_dense:
            return Decision("fallback", f"it is faster here ({estimate})")
    chunks = weight_grad_time_chunks(meta, groups, max(steps, 1), device.sm_count)
    return Decision("kernel", "fits", time_chunks=chunks)
