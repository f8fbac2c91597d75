"""The JAX primitives of jax_sprnn: abstract evaluation, per-platform lowering and batching.

Three primitives, each a native target (docs/format.md):

* ``sprnn_forward``: the forward recurrence, ``(x, h0, values, indices, lane_row, lengths) -> (y, h_final)``;
* ``sprnn_backward``: the backward recurrence on the transposed layout, ``-> (dx, dh0)``;
* ``sprnn_weight_grad``: the weight gradient on the pattern, ``-> dvalues [groups, S]``.

Lowering: ``cpu`` calls the C++ kernels; ``cuda`` the persistent kernels (forward, backward on the
transposed layout) and the sampled weight-gradient kernel where the layer fits; every other case
lowers the pure-JAX code of :mod:`jax_sprnn.fallback`. Differentiation sits on
top, in :mod:`jax_sprnn.api` (a ``custom_vjp``), so these primitives need no JVP rules.

Batching: a vmapped axis of the sequence operands folds into the RNN batch (one kernel call for
all); a vmapped weight operand runs the kernel once per weight set with ``lax.map``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import _native, cost, fallback, planner
from .layout import LayoutMeta

ACTIVATION_CODES = {"tanh": 0, "relu": 1, "identity": 2}
_NOT_MAPPED = None  # how a batching rule sees an operand without a vmapped axis


def cuda_workspace_bytes(batch: int, hidden: int) -> int:
    """Bytes of the CUDA forward handler's workspace; cuda/sprnn_common.h has the same formula."""
    return 256 + 2 * batch * hidden * 8


# ---------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------

def _make_primitive(name: str, abstract_eval, fallback_impl) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True
    prim.def_abstract_eval(abstract_eval)

    @functools.lru_cache(maxsize=256)
    def jitted(params_items):
        return jax.jit(functools.partial(prim.bind, **dict(params_items)))

    # Eager calls compile the primitive alone, once per set of static parameters.
    prim.def_impl(lambda *args, **params: jitted(tuple(sorted(params.items())))(*args))
    # Platforms without a native kernel lower the pure-JAX implementation.
    mlir.register_lowering(prim, mlir.lower_fun(_as_list(fallback_impl), multiple_results=True))
    return prim


def _as_list(fn):
    return lambda *args, **params: list(fn(*args, **params))


def _fallback_rule(fallback_impl):
    return mlir.lower_fun(_as_list(fallback_impl), multiple_results=True)


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _ffi_attrs(activation: str, reverse: bool, meta: LayoutMeta) -> dict:
    return dict(activation=np.int64(ACTIVATION_CODES[activation]), reverse=np.int64(bool(reverse)),
                **meta.ffi_attrs())


def _move(x, bdim, size, axis):
    """``x`` with its batch dimension at ``axis`` (broadcast when it has none)."""
    if bdim is _NOT_MAPPED:
        return jnp.broadcast_to(jnp.expand_dims(x, axis), x.shape[:axis] + (size,) + x.shape[axis:])
    return jnp.moveaxis(x, bdim, axis)


def _fold(x, bdim, size, batch_axis):
    """Fold the vmapped dimension of ``x`` into its RNN batch axis ``batch_axis`` (vmap-major)."""
    x = _move(x, bdim, size, batch_axis)
    shape = x.shape
    return x.reshape(shape[:batch_axis] + (shape[batch_axis] * shape[batch_axis + 1],) +
                     shape[batch_axis + 2:])


def _unfold(x, size, batch_axis):
    shape = x.shape
    return x.reshape(shape[:batch_axis] + (size, shape[batch_axis] // size) + shape[batch_axis + 1:])


def _loop_over_weights(prim, args, dims, params):
    """vmap with batched weights: run the primitive once per weight set (lax.map)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    mapped = [jnp.moveaxis(a, d, 0) if d is not _NOT_MAPPED else None
              for a, d in zip(args, dims)]

    def one(sliced):
        it = iter(sliced)
        full = [next(it) if m is not None else a for a, m in zip(args, mapped)]
        return prim.bind(*full, **params)

    outs = lax.map(one, [m for m in mapped if m is not None])
    return outs, [0] * len(outs)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

def _forward_abstract(x, h0, values, indices, lane_row, lengths, *, meta, **_):
    if x.ndim != 3 or h0.shape != (x.shape[1], x.shape[2]) or x.shape[2] != meta.hidden:
        raise ValueError(f"sprnn_forward: x must be [T, B, {meta.hidden}] and h0 [B, {meta.hidden}], "
                         f"got {x.shape} and {h0.shape}")
    return (jax.core.ShapedArray(x.shape, x.dtype), jax.core.ShapedArray(h0.shape, x.dtype))


sprnn_forward_p = _make_primitive("sprnn_forward", _forward_abstract, fallback.forward)


def _forward_cpu(ctx, *args, activation, reverse, meta, method, **_):
    if not _native.has_cpu_kernels():
        if method == "native":
            raise RuntimeError("method='native': the CPU module jax_sprnn._sprnn_cpu was not built")
        _warn_once("cpu", "jax_sprnn: the CPU module was not built; using the pure-JAX fallback")
        return _fallback_rule(fallback.forward)(ctx, *args, activation=activation, reverse=reverse,
                                                meta=meta)
    return jax.ffi.ffi_lowering("jax_sprnn_forward")(ctx, *args, **_ffi_attrs(activation, reverse, meta))


def cuda_fit(meta: LayoutMeta, batch: int, dtype, target: str = "jax_sprnn_forward") -> tuple[bool, str]:
    """Whether the persistent CUDA kernel runs this layout at this batch here, and if not, why.

    Both directions share launch bounds and shared-memory needs, so one answer serves the forward
    kernel (``meta``) and the backward one (``meta_t``, with ``target="jax_sprnn_backward"``).
    """
    if target not in _native.cuda_targets():
        return False, f"the CUDA module of jax_sprnn was not built with {target}"
    if not meta.fits:
        return False, meta.reason
    device = _native.current_device_spec()
    if meta.num_ctas > device.sm_count or meta.warps_per_cta * 32 > device.max_threads_per_block:
        return False, (f"the layout was planned for more SMs or threads ({meta.num_ctas} CTAs of "
                       f"{meta.warps_per_cta * 32} threads) than {device.name} has; repack it with "
                       f"SparseWeights.from_dense on this machine")
    limits = dict(device.thread_limits(dtype))
    if meta.warps_per_cta * 32 > limits.get(meta.reg_slots, 0):
        return False, (f"no kernel instantiation runs {meta.reg_slots} register slots with "
                       f"{meta.warps_per_cta * 32} threads per CTA")
    plan = planner.Plan(meta.hidden, meta.slots_per_lane, meta.num_warps, meta.warps_per_cta,
                        meta.reg_slots, meta.load_bytes, True, "", 0)
    max_batch = planner.max_persistent_batch(plan, dtype, device)
    if batch > max_batch:
        return False, (f"batch {batch} exceeds the persistent kernel's limit of {max_batch} for "
                       f"H={meta.hidden} (shared memory holds h for at most that many examples)")
    return True, "fits"


def gpu_path(meta: LayoutMeta, batch: int, dtype, method: str = "auto",
             target: str = "jax_sprnn_forward") -> tuple[str, str]:
    """``("persistent", why)`` or ``("dense", why)``: what a GPU call of this layer runs.

    The dense XLA path runs where the kernel does not fit, and, for ``method="auto"`` in the
    forward direction, where :mod:`jax_sprnn.cost` expects the kernel to be clearly slower. (The
    backward keeps the kernel: its dense path must stay in float32, which is slower still.)
    """
    ok, why = cuda_fit(meta, batch, dtype, target)
    if not ok:
        return "dense", why
    if method == "auto" and target == "jax_sprnn_forward":
        slower, estimate = cost.auto_prefers_dense(meta, batch, dtype)
        if slower:
            return "dense", f"it is faster here ({estimate})"
    return "persistent", why


def _persistent_cuda(target, fallback_impl, ctx, *args, activation, reverse, meta, method,
                     spin_timeout_us=0, debug_stall_cta=-1, grid_barrier=False):
    """Lower a persistent recurrence (forward or backward) to its CUDA kernel, or to the fallback.

    The keywords after ``method`` are test and benchmark hooks: the spin bound, a CTA that never
    publishes (forces a timeout), and a grid barrier per step (the ablation of the timestamps).
    """
    T, B, H = ctx.avals_in[0].shape
    dtype = ctx.avals_in[0].dtype
    path, why = gpu_path(meta, B, dtype, method, target)
    if path == "dense":
        if method == "native":
            raise ValueError(f"method='native': the persistent CUDA kernel ({target}) cannot run "
                             f"this layer: {why}")
        _warn_once((target, meta, B), f"jax_sprnn: {target} uses the dense XLA path on the GPU: "
                                      f"{why}")
        return _fallback_rule(fallback_impl)(ctx, *args, activation=activation, reverse=reverse,
                                             meta=meta)
    _native.initialize_cuda()
    workspace = jax.core.ShapedArray((cuda_workspace_bytes(B, H),), np.uint8)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, workspace])
    outs = jax.ffi.ffi_lowering(target)(
        ctx, *args, **_ffi_attrs(activation, reverse, meta),
        spin_timeout_us=np.int64(spin_timeout_us), debug_stall_cta=np.int64(debug_stall_cta),
        grid_barrier=np.int64(bool(grid_barrier)))
    return outs[:2]


_forward_cuda = functools.partial(_persistent_cuda, "jax_sprnn_forward", fallback.forward)


mlir.register_lowering(sprnn_forward_p, _forward_cpu, platform="cpu")
mlir.register_lowering(sprnn_forward_p, _forward_cuda, platform="cuda")


def _forward_batch(args, dims, **params):
    x, h0, values, indices, lane_row, lengths = args
    xd, hd, vd, idd, lrd, ld = dims
    if any(d is not _NOT_MAPPED for d in (vd, idd, lrd)):
        return _loop_over_weights(sprnn_forward_p, args, dims, params)
    size = next(a.shape[d] for a, d in ((x, xd), (h0, hd), (lengths, ld))
                if d is not _NOT_MAPPED)
    y, h_final = sprnn_forward_p.bind(_fold(x, xd, size, 1), _fold(h0, hd, size, 0), values, indices,
                                      lane_row, _fold(lengths, ld, size, 0), **params)
    return (_unfold(y, size, 1), _unfold(h_final, size, 0)), (1, 0)


batching.primitive_batchers[sprnn_forward_p] = _forward_batch


# ---------------------------------------------------------------------------------------------
# Backward recurrence
# ---------------------------------------------------------------------------------------------

def _backward_abstract(y, h0, values_t, indices_t, lane_row_t, lengths, dy, dh_final, **_):
    return (jax.core.ShapedArray(y.shape, y.dtype), jax.core.ShapedArray(h0.shape, y.dtype))


sprnn_backward_p = _make_primitive("sprnn_backward", _backward_abstract, fallback.backward)


def _backward_cpu(ctx, *args, activation, reverse, meta, method, **_):
    if not _native.has_cpu_kernels():
        if method == "native":
            raise RuntimeError("method='native': the CPU module jax_sprnn._sprnn_cpu was not built")
        return _fallback_rule(fallback.backward)(ctx, *args, activation=activation, reverse=reverse,
                                                 meta=meta)
    return jax.ffi.ffi_lowering("jax_sprnn_backward")(ctx, *args, **_ffi_attrs(activation, reverse, meta))


_backward_cuda = functools.partial(_persistent_cuda, "jax_sprnn_backward", fallback.backward)


mlir.register_lowering(sprnn_backward_p, _backward_cpu, platform="cpu")
mlir.register_lowering(sprnn_backward_p, _backward_cuda, platform="cuda")


def _backward_batch(args, dims, **params):
    y, h0, values_t, indices_t, lane_row_t, lengths, dy, dh_final = args
    if any(d is not _NOT_MAPPED for d in dims[2:5]):
        return _loop_over_weights(sprnn_backward_p, args, dims, params)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    yd, hd, _, _, _, ld, dyd, dhd = dims
    dx, dh0 = sprnn_backward_p.bind(
        _fold(y, yd, size, 1), _fold(h0, hd, size, 0), values_t, indices_t, lane_row_t,
        _fold(lengths, ld, size, 0), _fold(dy, dyd, size, 1), _fold(dh_final, dhd, size, 0), **params)
    return (_unfold(dx, size, 1), _unfold(dh0, size, 0)), (1, 0)


batching.primitive_batchers[sprnn_backward_p] = _backward_batch


# ---------------------------------------------------------------------------------------------
# Weight gradient
# ---------------------------------------------------------------------------------------------

def _weight_grad_abstract(y, h0, dz, indices, lane_row, lengths, *, groups, **_):
    if y.shape[1] % groups:
        raise ValueError(f"sprnn_weight_grad: groups={groups} must divide the batch {y.shape[1]}")
    return (jax.core.ShapedArray((groups, indices.shape[0]), np.float32),)


sprnn_weight_grad_p = _make_primitive("sprnn_weight_grad", _weight_grad_abstract,
                                      lambda *a, **p: (fallback.weight_grad(*a, **p),))


def _weight_grad_cpu(ctx, *args, groups, reverse, meta, method, **_):
    if not _native.has_cpu_kernels():
        if method == "native":
            raise RuntimeError("method='native': the CPU module jax_sprnn._sprnn_cpu was not built")
        return _fallback_rule(lambda *a, **p: (fallback.weight_grad(*a, **p),))(
            ctx, *args, groups=groups, reverse=reverse, meta=meta)
    return jax.ffi.ffi_lowering("jax_sprnn_weight_grad")(
        ctx, *args, groups=np.int64(groups), reverse=np.int64(bool(reverse)),
        slots_per_lane=np.int64(meta.slots_per_lane))


# The CUDA weight-gradient kernel's work split (cuda/weight_grad.cu: kWgThreads, slots_per_thread):
# a thread takes up to 8 or 16 slots of one lane and a CTA 1024 threads, one CTA per SM at a time.
_WG_THREADS = 1024


def weight_grad_time_chunks(meta: LayoutMeta, groups: int, steps: int, sm_count: int) -> int:
    """How many time chunks the weight-gradient kernel splits ``steps`` into: the fewest that fill
    at least one wave of CTAs with whole waves (at least 90% busy), else the best filled."""
    per_thread = 8 if meta.slots_per_lane <= 8 else 16
    threads = meta.num_warps * 32 * -(-meta.slots_per_lane // per_thread)
    blocks = max(1, -(-threads // _WG_THREADS)) * groups
    limit = max(1, min(steps, 64, 65535 // groups))

    def filled(c):  # the share of SM time the chunks keep busy
        return blocks * c / (-(-blocks * c // sm_count) * sm_count)
    for c in range(1, limit + 1):
        if blocks * c >= sm_count and filled(c) >= 0.9:
            return c
    return max(range(1, limit + 1), key=lambda c: (filled(c), -c))


def _weight_grad_cuda(ctx, *args, groups, reverse, meta, method, **_):
    T, B, H = ctx.avals_in[0].shape
    device = _native.current_device_spec() if _native.cuda_targets() else None
    fits = (device is not None and "jax_sprnn_weight_grad" in _native.cuda_targets()
            and 2 * H * 4 + B * 4 <= device.smem_per_block)
    if not fits:
        why = ("the CUDA module of jax_sprnn was not built" if device is None else
               f"H={H} needs {2 * H * 4 + B * 4} bytes of shared memory per CTA")
        if method == "native":
            raise ValueError(f"method='native': the CUDA weight-gradient kernel cannot run: {why}")
        _warn_once(("weight_grad", meta, B), f"jax_sprnn: the weight gradient uses the dense XLA "
                                             f"fallback on the GPU: {why}")
    # "auto" also takes XLA's einsum where it is expected faster (jax_sprnn.cost): no warning then.
    if not fits or (method == "auto" and cost.weight_grad_prefers_dense(meta, B, groups)[0]):
        return _fallback_rule(lambda *a, **p: (fallback.weight_grad(*a, **p),))(
            ctx, *args, groups=groups, reverse=reverse, meta=meta)
    chunks = weight_grad_time_chunks(meta, groups, max(T, 1), device.sm_count)
    n_slots = ctx.avals_out[0].shape[1]
    workspace = jax.core.ShapedArray((chunks * groups * n_slots if chunks > 1 else 1,), np.float32)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, workspace])
    outs = jax.ffi.ffi_lowering("jax_sprnn_weight_grad")(
        ctx, *args, groups=np.int64(groups), reverse=np.int64(bool(reverse)),
        slots_per_lane=np.int64(meta.slots_per_lane), time_chunks=np.int64(chunks))
    return outs[:1]


mlir.register_lowering(sprnn_weight_grad_p, _weight_grad_cpu, platform="cpu")
mlir.register_lowering(sprnn_weight_grad_p, _weight_grad_cuda, platform="cuda")


def _weight_grad_batch(args, dims, *, groups, **params):
    y, h0, dz, indices, lane_row, lengths = args
    if any(d is not _NOT_MAPPED for d in dims[3:5]):
        return _loop_over_weights(sprnn_weight_grad_p, args, dims, dict(groups=groups, **params))
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    yd, hd, dzd, _, _, ld = dims
    # Each vmapped instance keeps its own weight gradient: its examples become their own groups.
    (dv,) = sprnn_weight_grad_p.bind(
        _fold(y, yd, size, 1), _fold(h0, hd, size, 0), _fold(dz, dzd, size, 1), indices, lane_row,
        _fold(lengths, ld, size, 0), groups=groups * size, **params)
    return (_unfold(dv, size, 0),), (0,)


batching.primitive_batchers[sprnn_weight_grad_p] = _weight_grad_batch
