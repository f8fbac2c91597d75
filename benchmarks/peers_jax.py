"""The JAX peers: ours (the persistent kernel), dense lax.scan, jax.experimental.sparse BCSR and
BCOO inside lax.scan, and the synchronization floor of the persistent kernel."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import sparse

import jax_sprnn as js
from jax_sprnn import _native
from jax_sprnn.dispatch import cuda_fit, gpu_path, on_cpu
from jax_sprnn._constants import cuda_workspace_bytes, ffi_target
from jax_sprnn.primitives import sprnn_forward_p

from .harness import Peer, Runner, Skip
from .problems import Layer

SYNC_FLOOR = ffi_target("sync_floor")

ALL_DTYPES = ("float16", "bfloat16", "float32")


def dense_scan(x, h0, kernel, *, time_major: bool = False):
    """What a JAX user writes: lax.scan of a dense matmul in the storage dtype."""
    def step(h, x_t):
        h = jnp.tanh(x_t + h @ kernel)
        return h, h
    h, ys = lax.scan(step, h0, x if time_major else jnp.swapaxes(x, 0, 1))
    return (ys if time_major else jnp.swapaxes(ys, 0, 1)), h


def sync_floor_fn(meta, batch: int, steps: int):
    """The persistent kernel's exchange protocol alone (no compute) on the layer's grid."""
    ws = jax.ShapeDtypeStruct((cuda_workspace_bytes(batch, meta.hidden),), jnp.uint8)
    out = jax.ShapeDtypeStruct((1,), jnp.float32)
    call = jax.ffi.ffi_call(SYNC_FLOOR, (ws, out))

    @jax.jit
    def run(x):
        return call(x, steps=np.int64(steps), num_ctas=np.int64(meta.num_ctas),
                    threads=np.int64(meta.warps_per_cta * 32), batch=np.int64(batch),
                    hidden=np.int64(meta.hidden))[1]
    return run


def compile_jax(fn, *args, config: dict | None = None):
    """AOT-compile ``fn`` for ``args``; returns the executable and what lowering said about it (the
    warnings, e.g. jax.experimental.sparse falling back from cuSPARSE, and the custom calls)."""
    saved = {name: getattr(jax.config, name) for name in (config or {})}
    try:
        for name, value in (config or {}).items():
            jax.config.update(name, value)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = jax.jit(fn).lower(*args).compile()
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
    text = compiled.as_text() or ""
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    notes = sorted({str(w.message)[:200] for w in caught})
    return compiled, dict(custom_calls=calls, **({"lowering_warnings": notes} if notes else {}))


def jax_runner(fn, layer: Layer, batch: int, T: int, params, *, prepare=None, config=None,
               check=lambda out: out[1]) -> Runner:
    """A Runner for ``fn(x, h0, params)`` compiled for time-major ``[T, B, H]`` inputs."""
    dt = layer.jnp_dtype
    x_spec = jax.ShapeDtypeStruct((T, batch, layer.hidden), dt)
    h_spec = jax.ShapeDtypeStruct((batch, layer.hidden), dt)
    prepare = prepare or (lambda x, h0: (x, h0))
    example = jax.eval_shape(prepare, x_spec, h_spec)
    compiled, info = compile_jax(fn, *example, params, config=config)
    return Runner(run=compiled, prepare=lambda x, h0: (*prepare(x, h0), params), check=check,
                  info=info)


def forward_primitive_runner(layer: Layer, batch: int, T: int, w, **gpu_hooks) -> Runner:
    """A Runner for the forward primitive on packed weights ``w``, full-length sequences, with the
    CUDA kernel's test hooks (``grid_barrier``, ``exchange_mode``) on a GPU (the CPU kernel has
    none); skipped where the persistent kernel does not take the batch."""
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:
        ok, why = cuda_fit(w.meta, batch, layer.jnp_dtype)
        if not ok:
            raise Skip(why)
    params = dict(activation="tanh", reverse=False, meta=w.meta, method="native",
                  **(gpu_hooks if on_gpu else {}))

    def fn(x, h0, w):
        lengths = jnp.full((x.shape[1],), x.shape[0], jnp.int32)
        return sprnn_forward_p.bind(x, h0, w.values, w.indices, w.lane_row, lengths, **params)
    return jax_runner(fn, layer, batch, T, w)


def persistent_fit(layer: Layer, batch: int) -> tuple[bool, str]:
    """Whether the persistent CUDA kernel runs this layer here (jax_sprnn's own check)."""
    return cuda_fit(layer.plan_meta, batch, layer.jnp_dtype)


def auto_choice(layer: Layer, batch: int, steps: int = 256) -> dict:
    """What ``sparse_rnn(..., method="auto")`` runs forward for this layer on this backend."""
    backend = jax.default_backend()
    if backend == "gpu":
        path, why = gpu_path(layer.plan_meta, batch, layer.jnp_dtype)
        return dict(pick="persistent kernel" if path == "persistent" else "dense XLA path",
                    reason=why)
    if backend == "cpu" and _native.has_cpu_kernels():
        decision = on_cpu("auto", layer.weights.meta, batch, steps, forward=True)
        return dict(pick="C++ CPU kernel" if decision.path == "kernel" else "dense XLA path",
                    reason=decision.why)
    return dict(pick="pure-JAX fallback", reason=f"{backend} backend")


def _build_ours(layer: Layer, batch: int, T: int) -> Runner:
    if jax.default_backend() == "gpu":
        ok, why = persistent_fit(layer, batch)
        if not ok:
            raise Skip(why)
    w = layer.weights
    runner = jax_runner(lambda x, h0, w: js.sparse_rnn(x, h0, w, time_major=True, method="native"),
                        layer, batch, T, w)
    runner.info.update(pack_s=round(layer.pack_s, 2))
    return runner


def _build_dense(layer: Layer, batch: int, T: int) -> Runner:
    return jax_runner(lambda x, h0, k: dense_scan(x, h0, k, time_major=True), layer, batch, T,
                      layer.dense_kernel)


def _bcsr(layer: Layer):
    values, _, cols, indptr = layer.csr
    return sparse.BCSR((jnp.asarray(values), jnp.asarray(cols), jnp.asarray(indptr)),
                       shape=(layer.hidden, layer.hidden), indices_sorted=True, unique_indices=True)


def _bcoo(layer: Layer):
    values, rows, cols, _ = layer.csr
    return sparse.BCOO((jnp.asarray(values), jnp.asarray(np.stack([rows, cols], axis=1))),
                       shape=(layer.hidden, layer.hidden), indices_sorted=True, unique_indices=True)


def _sparse_scan(make):
    """lax.scan of ``h^T <- tanh(x_t^T + U @ h^T)`` with U = kernel^T in a jax.experimental.sparse
    format (built on the host from the layer's CSR); the state stays ``[H, B]`` so each step is one
    sparse @ dense product."""
    def build(layer: Layer, batch: int, T: int) -> Runner:
        u = make(layer)

        def fn(xt, h0, u):
            def step(ht, xt_t):
                ht = jnp.tanh(xt_t + u @ ht)
                return ht, ht
            ht, ys = lax.scan(step, h0.T, xt)
            return ys, ht.T
        prepare = lambda x, h0: (jnp.transpose(x, (0, 2, 1)), h0)
        try:  # ask for the cuSPARSE lowering (off by default in JAX)
            runner = jax_runner(fn, layer, batch, T, u, prepare=prepare,
                                config={"jax_bcoo_cusparse_lowering": True})
        except Exception as e:  # e.g. a jaxlib without cuSPARSE: JAX's gather/scatter lowering
            runner = jax_runner(fn, layer, batch, T, u, prepare=prepare)
            runner.info["cusparse_lowering_failed"] = f"{type(e).__name__}: {str(e)[:200]}"
        # the recorded warnings say when JAX fell back anyway (e.g. for 16-bit types)
        runner.info["cusparse_used"] = any("sparse" in c.lower() for c in runner.info["custom_calls"])
        return runner
    return build


def _floor_unavailable() -> str | None:
    if SYNC_FLOOR not in _native.cuda_targets():
        return f"needs the CUDA module's {SYNC_FLOOR} target"
    if jax.default_backend() != "gpu":
        return "needs a GPU"
    return None


def _build_floor(layer: Layer, batch: int, T: int) -> Runner:
    ok, why = persistent_fit(layer, batch)
    if not ok:
        raise Skip(why)
    dummy = jnp.zeros((1,), jnp.float32)
    return Runner(run=sync_floor_fn(layer.plan_meta, batch, T), prepare=lambda x, h0: (dummy,),
                  check=None)


OURS = Peer("ours", "jax_sprnn.sparse_rnn(method='native'): the persistent kernel", ALL_DTYPES,
            _build_ours, competitor=False)
DENSE = Peer("dense", "lax.scan of tanh(x_t + h @ K), dense K in the storage dtype (XLA/cuBLAS)",
             ALL_DTYPES, _build_dense)
BCSR = Peer("bcsr", "jax.experimental.sparse BCSR @ h inside lax.scan (cuSPARSE lowering requested)",
            ALL_DTYPES, _sparse_scan(_bcsr))
BCOO = Peer("bcoo", "jax.experimental.sparse BCOO @ h inside lax.scan (cuSPARSE lowering requested)",
            ALL_DTYPES, _sparse_scan(_bcoo))
FLOOR = Peer("floor", "synchronization floor: the kernel's exchange protocol, no compute",
             ALL_DTYPES, _build_floor, unavailable=_floor_unavailable, competitor=False)

PEERS = (OURS, DENSE, BCSR, BCOO, FLOOR)
