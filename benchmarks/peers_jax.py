"""The JAX peers: ours (the persistent kernel), dense lax.scan, jax.experimental.sparse BCSR and
BCOO inside lax.scan, and the synchronization floor of the persistent kernel; and for the gated
suite (GATED_PEERS): sparse_lstm / sparse_gru, Flax's nn.RNN of OptimizedLSTMCell / GRUCell,
jax.experimental.rnn.lstm and the input projection alone."""

from __future__ import annotations

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import sparse

import jax_sprnn as js
from jax_sprnn import _native, planner
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


def tile_weights(layer) -> js.SparseWeights:
    """The layer packed as a tile layout (``from_dense(matvec="tiles")``: tensor cores), cached on
    the layer; skipped where none exists (float32, H not a multiple of 16) or fits."""
    def pack():
        w = js.SparseWeights.from_dense(layer.kernel, layer.mask, dtype=layer.jnp_dtype, matvec="tiles")
        if not w.meta.fits:
            raise ValueError(w.meta.reason)
        return w
    return _alternative_weights(layer, "tiles", pack)


def _build_ours_tiles(layer: Layer, batch: int, T: int) -> Runner:
    w = tile_weights(layer)
    if jax.default_backend() == "gpu":
        ok, why = cuda_fit(w.meta, batch, layer.jnp_dtype)
        if not ok:
            raise Skip(why)
    runner = jax_runner(lambda x, h0, w: js.sparse_rnn(x, h0, w, time_major=True, method="native"),
                        layer, batch, T, w)
    runner.info.update(exchange=w.meta.exchange, ctas=w.meta.num_ctas, warps_per_cta=w.meta.warps_per_cta)
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
OURS_TILES = Peer("ours_tiles", "ours on the layer's tile layout (from_dense(matvec='tiles')): the "
                  "step's product on tensor cores (16-bit, H a multiple of 16)", ALL_DTYPES,
                  _build_ours_tiles, competitor=False)
DENSE = Peer("dense", "lax.scan of tanh(x_t + h @ K), dense K in the storage dtype (XLA/cuBLAS)",
             ALL_DTYPES, _build_dense)
BCSR = Peer("bcsr", "jax.experimental.sparse BCSR @ h inside lax.scan (cuSPARSE lowering requested)",
            ALL_DTYPES, _sparse_scan(_bcsr))
BCOO = Peer("bcoo", "jax.experimental.sparse BCOO @ h inside lax.scan (cuSPARSE lowering requested)",
            ALL_DTYPES, _sparse_scan(_bcoo))
FLOOR = Peer("floor", "synchronization floor: the kernel's exchange protocol, no compute",
             ALL_DTYPES, _build_floor, unavailable=_floor_unavailable, competitor=False)

PEERS = (OURS, OURS_TILES, DENSE, BCSR, BCOO, FLOOR)


# ---- gated cells (the gated suite) ---------------------------------------------------------------
# These peers run an LSTM or GRU layer of input size H: ``layer`` is a
# :class:`benchmarks.suites.gated.GatedLayer` (``cell``, ``gates``, ``hidden``, ``dtype``, the float32
# arrays ``kernel [H, G*H]``, ``w_in [H, G*H]``, ``bias [G*H]``, ``hn_bias [H]`` and the packed
# ``weights``). Every peer gets the harness's time-major ``x [T, B, H]`` and ``h0 [B, H]`` (the LSTM
# starts from ``c0 = h0``) and calls its library batch-first, as users do. The library peers include
# the input projection ``x @ w_in + bias``; ours takes it precomputed (outside the timed region, as
# sparse_lstm / sparse_gru take it), and the ``in_gemm`` peer times that projection alone.

def gated_projection(layer):
    """A jitted ``x [T, B, H] -> inputs [B, T, G*H]``: ``x @ w_in + bias`` with float32
    accumulation, stored in the layer's dtype (what sparse_lstm / sparse_gru take)."""
    dt = layer.jnp_dtype
    w_in, bias = jnp.asarray(layer.w_in, dt), jnp.asarray(layer.bias, jnp.float32)

    @jax.jit
    def project(x):
        y = jnp.einsum("tbh,hk->btk", x, w_in, preferred_element_type=jnp.float32)
        return (y + bias).astype(dt)
    return project


def gated_path(custom_calls) -> str:
    """What a compiled gated call ran: a jax_sprnn kernel, or XLA's dense path."""
    ours = [c for c in custom_calls if c.startswith("jax_sprnn")]
    return f"native ({', '.join(ours)})" if ours else "XLA dense path"


def gated_call(layer, method: str):
    """``fn(inputs [B, T, G*H], h0, (weights, hn_bias)) -> (outputs, h_T)`` for the layer's cell."""
    if layer.cell == "lstm":
        def fn(inputs, h0, params):
            y, (_, h) = js.sparse_lstm(inputs, (h0, h0), params[0], method=method)
            return y, h
    else:
        def fn(inputs, h0, params):
            return js.sparse_gru(inputs, h0, params[0], hn_bias=params[1], method=method)
    return fn


def gated_params(layer) -> tuple:
    """``(weights, hn_bias)`` as the gated calls take them (hn_bias None for the LSTM)."""
    hn = None if layer.hn_bias is None else jnp.asarray(layer.hn_bias, jnp.float32)
    return layer.weights, hn


def native_refusal(method: str, error: Exception) -> str | None:
    """The reason when ``method="native"`` refused to run (jax_sprnn's errors say
    ``method='native': ...``), else None (any other error is a failure to report)."""
    text = str(error)
    if method == "native" and "method='native'" in text:
        return f"not run: {type(error).__name__}: {text[:400]}"
    return None


def _alternative_weights(layer, key, pack) -> js.SparseWeights:
    """``pack()``, cached on the layer under ``key``; skipped where no such layout fits, or where it
    is the planner's own (``ours_native`` times that one)."""
    cache = layer.__dict__.setdefault("_forced_weights", {})
    if key not in cache:
        try:
            cache[key] = pack()
        except ValueError as e:
            cache[key] = Skip(str(e)[:300])
    w = cache[key]
    if isinstance(w, Skip):
        raise w
    if w.meta == layer.weights.meta:
        raise Skip(f"the planner's own layout ({w.meta.exchange} mode, {w.meta.num_ctas} CTAs): "
                   f"see ours_native")
    return w


def forced_exchange_weights(layer, exchange: str) -> js.SparseWeights:
    """The layer packed for one exchange mode (``SparseWeights.from_dense(exchange=...)``)."""
    return _alternative_weights(layer, exchange, lambda: js.SparseWeights.from_dense(
        layer.kernel, layer.mask, dtype=layer.jnp_dtype, exchange=exchange))


def pack_without_clusters(layer, sm_count: int | None = None) -> js.SparseWeights:
    """The layer packed for this GPU without thread-block clusters (a grid-mode layout), or for one
    of ``sm_count`` SMs: a layout of at most that many CTAs, which runs in cluster mode here (the
    cluster-size sweep). Raises ValueError where it does not fit."""
    device = dataclasses.replace(_native.current_device_spec(), cluster_launch=False)
    if sm_count is not None:
        device = dataclasses.replace(device, sm_count=sm_count)
    w = js.SparseWeights.from_dense(layer.kernel, layer.mask, dtype=layer.jnp_dtype, device=device)
    if not w.meta.fits:
        raise ValueError(w.meta.reason)
    return w


def weights_on_ctas(layer, num_ctas: int) -> js.SparseWeights:
    """:func:`pack_without_clusters` on ``num_ctas`` SMs, skipped where it is the planner's pick."""
    return _alternative_weights(layer, f"n{num_ctas}", lambda: pack_without_clusters(layer, num_ctas))


def _forced(exchange: str):
    """The layer's layout for one exchange mode, as a ``weights`` of :func:`_build_ours_gated`."""
    return lambda layer: forced_exchange_weights(layer, exchange)


def _build_ours_gated(method: str, weights=None):
    """``weights(layer)``: another layout than the planner's, or None."""
    def build(layer, batch: int, T: int) -> Runner:
        project = gated_projection(layer)
        params = gated_params(layer)
        if weights is not None:
            params = (weights(layer), params[1])
        try:
            runner = jax_runner(gated_call(layer, method), layer, batch, T, params,
                                prepare=lambda x, h0: (project(x), h0))
        except Exception as e:
            reason = native_refusal(method, e)
            if reason is None:
                raise
            raise Skip(reason) from e
        meta = params[0].meta
        runner.info.update(path=gated_path(runner.info["custom_calls"]),
                           pack_s=round(getattr(layer, "pack_s", 0.0), 2), exchange=meta.exchange,
                           ctas=meta.num_ctas, warps_per_cta=meta.warps_per_cta,
                           K=meta.slots_per_lane)
        return runner
    return build


def _batch_first(x, h0):
    return jnp.swapaxes(x, 0, 1), h0


def _build_input_gemm(layer, batch: int, T: int) -> Runner:
    dt = layer.jnp_dtype
    params = (jnp.asarray(layer.w_in, dt), jnp.asarray(layer.bias, dt))

    def fn(xb, h0, params):  # what a user writes in the storage dtype
        return xb @ params[0] + params[1]
    return jax_runner(fn, layer, batch, T, params, prepare=_batch_first, check=None)


def _flax_unavailable() -> str | None:
    try:
        import flax.linen  # noqa: F401
    except ImportError as e:
        return f"Flax is not installed ({e})"
    return None


def flax_gated(layer):
    """``(nn.RNN(cell), params)``: ``nn.OptimizedLSTMCell(H)`` or ``nn.GRUCell(H)`` in the layer's
    dtype, with the layer's weights (the kernels split per gate, as Flax names them; the LSTM's
    projection bias sits on Flax's recurrent side, which computes the same sums)."""
    import flax.linen as nn
    # Parameters are float32 (Flax's default param_dtype; its orthogonal initializer, which flax
    # 0.12.10 calls even when applying given params, has no float16 QR), computed in the layer's dtype.
    dt, H = layer.jnp_dtype, layer.hidden
    pdt = jnp.float32
    split = lambda a: [jnp.asarray(jnp.asarray(p, dt), pdt) for p in np.split(a, layer.gates, axis=-1)]
    w_in, kernel, bias = split(layer.w_in), split(layer.kernel), split(layer.bias)
    if layer.cell == "lstm":
        cell = nn.OptimizedLSTMCell(H, dtype=dt, param_dtype=pdt)
        params = {f"i{g}": {"kernel": w_in[n]} for n, g in enumerate("ifgo")}
        params.update({f"h{g}": {"kernel": kernel[n], "bias": bias[n]} for n, g in enumerate("ifgo")})
    else:
        cell = nn.GRUCell(H, dtype=dt, param_dtype=pdt)
        params = {f"i{g}": {"kernel": w_in[n], "bias": bias[n]} for n, g in enumerate("rzn")}
        params.update({"hr": {"kernel": kernel[0]}, "hz": {"kernel": kernel[1]},
                       "hn": {"kernel": kernel[2], "bias": jnp.asarray(layer.hn_bias, pdt)}})
    return nn.RNN(cell), {"cell": params}


def flax_gated_call(layer):
    """``fn(xb [B, T, H], h0, params) -> (outputs, h_T)`` through Flax's ``nn.RNN`` scan."""
    model, _ = flax_gated(layer)
    lstm = layer.cell == "lstm"

    def fn(xb, h0, params):
        carry, y = model.apply({"params": params}, xb, initial_carry=(h0, h0) if lstm else h0,
                               return_carry=True)
        return y, carry[1] if lstm else carry
    return fn


def _build_flax_gated(layer, batch: int, T: int) -> Runner:
    return jax_runner(flax_gated_call(layer), layer, batch, T, flax_gated(layer)[1],
                      prepare=_batch_first)


def _jax_rnn_unavailable() -> str | None:
    if jax.default_backend() != "gpu":
        return f"jax.experimental.rnn.lstm runs through cuDNN only (no GPU: {jax.default_backend()})"
    return None


def _build_jax_rnn(layer, batch: int, T: int) -> Runner:
    from jax.experimental import rnn
    if layer.cell != "lstm":
        raise Skip("jax.experimental.rnn has an LSTM only")
    H = layer.hidden
    # cuDNN's flat layout: W_ih [4H, I], W_hh [4H, H], b_ih, b_hh; gates i, f, g, o as Flax's.
    flat = np.concatenate([layer.w_in.T.ravel(), layer.kernel.T.ravel(), layer.bias,
                           np.zeros_like(layer.bias)]).astype(np.float32)
    assert flat.size == rnn.get_num_params_in_lstm(H, H, 1, False)

    def fn(xb, h0, w):
        lengths = jnp.full((xb.shape[0],), xb.shape[1], jnp.int32)
        y, h_n, _ = rnn.lstm(xb, h0[None], h0[None], w, lengths, input_size=H, hidden_size=H,
                             num_layers=1, dropout=0.0, bidirectional=False)
        return y, h_n[0]

    def prepare(x, h0):  # float32 only: cast outside the timed region
        return jnp.swapaxes(x, 0, 1).astype(jnp.float32), h0.astype(jnp.float32)
    runner = jax_runner(fn, layer, batch, T, jnp.asarray(flat), prepare=prepare)
    runner.info.update(ran_in="float32")
    return runner


def _build_gated_floor(layer, batch: int, T: int) -> Runner:
    meta = layer.weights.meta
    if not meta.fits:
        raise Skip(meta.reason)
    most = planner.max_persistent_batch(meta, layer.jnp_dtype, _native.current_device_spec())
    if batch > most:
        raise Skip(f"batch {batch} exceeds the layout's persistent limit of {most}")
    dummy = jnp.zeros((1,), jnp.float32)
    return Runner(run=sync_floor_fn(meta, batch, T), prepare=lambda x, h0: (dummy,), check=None)


GATED_OURS_NATIVE = Peer("ours_native", "sparse_lstm / sparse_gru(method='native') on the "
                         "precomputed input projection", ALL_DTYPES, _build_ours_gated("native"),
                         competitor=False)
GATED_OURS_AUTO = Peer("ours_auto", "sparse_lstm / sparse_gru(method='auto') on the precomputed "
                       "input projection", ALL_DTYPES, _build_ours_gated("auto"), competitor=False)
GATED_OURS_CLUSTER = Peer("ours_cluster", "ours_native on the layout planned for cluster mode "
                          "(from_dense(exchange='cluster'); skipped where it is the planner's pick)",
                          ALL_DTYPES, _build_ours_gated("native", _forced("cluster")),
                          competitor=False)
GATED_OURS_GRID = Peer("ours_grid", "ours_native on the layout planned for grid mode "
                       "(from_dense(exchange='grid'); skipped where it is the planner's pick)",
                       ALL_DTYPES, _build_ours_gated("native", _forced("grid")),
                       competitor=False)
GATED_OURS_N8 = Peer("ours_n8", "ours_native on a layout of at most 8 CTAs (one portable cluster; "
                     "skipped where it is the planner's pick)",
                     ALL_DTYPES, _build_ours_gated("native", lambda layer: weights_on_ctas(layer, 8)),
                     competitor=False)
GATED_OURS_TILES = Peer("ours_tiles", "ours_native on the layer's tile layout (from_dense(matvec="
                        "'tiles')): the step's product on tensor cores", ALL_DTYPES,
                        _build_ours_gated("native", tile_weights), competitor=False)
INPUT_GEMM = Peer("in_gemm", "the input projection x @ w_in + bias alone (XLA, storage dtype), "
                  "which ours takes precomputed", ALL_DTYPES, _build_input_gemm, competitor=False)
FLAX_GATED = Peer("flax", "Flax nn.RNN(nn.OptimizedLSTMCell(H)) / nn.RNN(nn.GRUCell(H)) under "
                  "jax.jit (lax.scan, dense weights, storage dtype, input projection included)",
                  ALL_DTYPES, _build_flax_gated, unavailable=_flax_unavailable)
JAX_RNN = Peer("jax_rnn", "jax.experimental.rnn.lstm (cuDNN), float32 whatever the row's dtype "
               "(its only dtype), input projection included", ALL_DTYPES, _build_jax_rnn,
               unavailable=_jax_rnn_unavailable)
GATED_FLOOR = Peer("floor", "synchronization floor: the kernel's exchange protocol on the gated "
                   "layout's grid, no compute", ALL_DTYPES, _build_gated_floor,
                   unavailable=_floor_unavailable, competitor=False)

#: Not in PEERS: the other suites run the simple cell and never take these.
GATED_PEERS = (GATED_OURS_NATIVE, GATED_OURS_AUTO, GATED_OURS_CLUSTER, GATED_OURS_GRID, GATED_OURS_N8,
               GATED_OURS_TILES,
               FLAX_GATED, JAX_RNN, INPUT_GEMM, GATED_FLOOR)
