"""gated: sparse LSTM and GRU layers (issue 17) against cuDNN, Flax and jax.experimental.rnn.

    python -m benchmarks.run --suite gated [--quick] [--dtype float16] [--hidden 1024,2048]
        [--batch 1,4,8,32] [--density 0.1]

Three parts, in this order:

* **capacity** (planning only, no timing): per cell and density (5, 10, 20%), the largest H (steps of
  256) whose row-balanced layout fits persistently (``fits``) on this GPU, or the planner's H200
  default without one; also the largest with a batch of 4, and with the backward (transposed) layout
  fitting too. Issue 17's targets: LSTM H >= 4096, GRU H >= 4608 at 10% fp16.
* **training**: GRU H=1024, 10%, B=4: ``jax.grad`` of ``sum(outputs)`` through ``sparse_gru`` with
  respect to its inputs, h0, ``weights.values`` and hn_bias, against ``jax.grad`` through Flax's
  ``nn.RNN(nn.GRUCell)`` with respect to x, h0 and every parameter. Target: >= 3x Flax.
* **forward**: per cell, H in {512, 1024, 2048}, B in {1, 4, 8, 32} at 10% (and 5% / 20% at
  H=2048, B=4; --quick: H in {1024, 2048}, B in {1, 8}), fp16 by default: ``sparse_lstm`` /
  ``sparse_gru`` with ``method="native"`` (not run, with jax_sprnn's reason, where it raises) and
  ``method="auto"`` (the compiled custom calls say which path ran), cuDNN through PyTorch, Flax's
  ``nn.RNN`` scan, ``jax.experimental.rnn.lstm`` (cuDNN, float32 only: it runs in float32 on every
  row, and competes), the input projection alone, and the sync floor.

Every peer runs a layer of input size H on the same inputs ``x [T, B, H]``, ``h0`` (the LSTM starts
from ``c0 = h0``), batch-first. The library peers compute the input projection ``x @ w_in + bias``
inside their call (one batched GEMM); ours takes it precomputed, as sparse_lstm / sparse_gru do, and
``in_gemm`` times it alone, so ``x layer`` = best / (ours + in_gemm) is the whole-layer ratio.
Per-step times are slopes between T1 and T2 (T2 = 256) of medians of N calls; ratios are of the
per-step times of one run: ``x_best_<method>`` is the best competitor's time (cuDNN, Flax,
jax.experimental.rnn, whichever ran fastest) over ours with that method, ``x_cudnn_<method>`` cuDNN's
LSTM or GRU over ours, ``x_layer_<method>`` as said; the table shows them as "xbest nat", "xbest
aut", "xlayr nat" and "xcuDNN nt". Each row records its target from issue 17 and whether it was met;
the JSON's ``targets`` lists them all. Each forward row checks its final h (the training row
dL/dh0) against a float32 reference. Without a GPU the smoke grid runs H=64 in well under a minute.
--peers does not apply (this suite's peers are its own); --cell lstm,gru picks the cells and --parts
capacity,training,forward the parts. ``ours_cluster`` and ``ours_grid`` time ``ours_native`` on the
layouts planned for one exchange mode (``SparseWeights.from_dense(exchange=...)``), where that is not
the planner's own pick.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jax_sprnn as js
from jax_sprnn import _native, dispatch, layout, planner

from .. import peers_jax, peers_torch, plots
from ..harness import Case, Peer, Skip, best_competitor, measure_all, ran
from ..peers_jax import (ALL_DTYPES, flax_gated, flax_gated_call, gated_params, gated_path,
                         gated_projection, jax_runner, native_refusal)
from ..problems import DTYPES, SHORT, pack_timed, row_balanced_kernel
from ..report import Column
from .common import Context, peer_header, print_skips, release_torch_memory

#: gate rows per hidden unit
CELLS = {"lstm": 4, "gru": 3}

GRID = dict(cell=("lstm", "gru"), hidden=(512, 1024, 2048), batch=(1, 4, 8, 32), density=(0.1,),
            dtype=("float16",))
#: the other densities, at one size
MORE = [(cell, 2048, d, 4) for cell in ("lstm", "gru") for d in (0.05, 0.2)]
QUICK = dict(GRID, hidden=(1024, 2048), batch=(1, 8))
SMOKE = dict(GRID, hidden=(64,), batch=(2,))
TRAINING = ("gru", 1024, 0.1, 4)
SMOKE_TRAINING = ("gru", 64, 0.1, 2)
#: the suite's parts, in the order they run (--parts picks some)
PARTS = ("capacity", "training", "forward")

CAPACITY_DENSITIES = (0.05, 0.1, 0.2)
CAPACITY_STEP, CAPACITY_TOP = 256, 16384
#: the scan stops this many sizes past the last one that fit
CAPACITY_PATIENCE = 8
#: issue 17: persistent on one H200 at 10% fp16
CAPACITY_TARGETS = {"lstm": 4096, "gru": 4608}


# ---- the layer -----------------------------------------------------------------------------------

def _stored(a, dtype: str) -> np.ndarray:
    """float32 holding ``a``'s values as stored in ``dtype``."""
    return np.asarray(jnp.asarray(a, DTYPES[dtype]).astype(jnp.float32))


@dataclasses.dataclass
class GatedLayer:
    """One LSTM or GRU layer of input size H at one dtype, shared by every peer. Every float32
    array holds the values as stored in ``dtype``; the recurrent kernel has ``density * H`` inputs
    in every gate row (every column of ``kernel``)."""

    cell: str
    hidden: int
    density: float
    dtype: str
    kernel: np.ndarray  # [H, G*H], zero off the mask; gates side by side as Flax fuses them
    mask: np.ndarray  # [H, G*H] bool
    w_in: np.ndarray  # [H, G*H], the input kernel (dense)
    bias: np.ndarray  # [G*H], the input projection's bias
    hn_bias: np.ndarray | None  # [H], the GRU's recurrent n bias (None for the LSTM)

    @classmethod
    def make(cls, cell: str, hidden: int, density: float, dtype: str) -> "GatedLayer":
        gates = CELLS[cell]
        seed = [hidden, int(round(density * 1000)), gates]
        parts = [row_balanced_kernel(hidden, density, seed=seed + [g]) for g in range(gates)]
        kernel = np.concatenate([k for k, _ in parts], axis=1)
        mask = np.concatenate([m for _, m in parts], axis=1)
        rng = np.random.default_rng(seed)
        w_in = rng.standard_normal((hidden, gates * hidden)) / np.sqrt(hidden)
        bias = 0.1 * rng.standard_normal(gates * hidden)
        hn_bias = _stored(0.1 * rng.standard_normal(hidden), dtype) if cell == "gru" else None
        return cls(cell, hidden, density, dtype, _stored(kernel, dtype), mask, _stored(w_in, dtype),
                   _stored(bias, dtype), hn_bias)

    @property
    def gates(self) -> int:
        return CELLS[self.cell]

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @functools.cached_property
    def weights(self) -> js.SparseWeights:
        return pack_timed(self)

    def describe(self) -> dict:
        """The configuration and the packed layout: what decides the path that runs."""
        meta, meta_t = self.weights.meta, self.weights.meta_t
        device = _native.current_device_spec()
        return dict(cell=self.cell, hidden=self.hidden, density=self.density, dtype=self.dtype,
                    nnz=int(self.mask.sum()), fits=meta.fits, exchange=meta.exchange,
                    ctas=meta.num_ctas, warps_per_cta=meta.warps_per_cta, K=meta.slots_per_lane,
                    reg_slots=meta.reg_slots, backward_fits=meta_t.fits,
                    max_persistent_batch=planner.max_persistent_batch(meta, self.jnp_dtype, device),
                    planned_for=device.name, pack_s=round(self.pack_s, 2),
                    **({} if meta.fits else {"reason": meta.reason}))


def label(kind: str, cell: str, hidden: int, density: float, batch: int, dtype: str) -> str:
    return f"{cell.upper()} {kind} H={hidden} {density:.0%} B={batch} {SHORT[dtype]}"


# ---- the float32 reference -----------------------------------------------------------------------

def _dot(a, b):
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def reference_scan(layer: GatedLayer, x, h0):
    """Outputs ``[T, B, H]`` and h_T of the layer in float32 (Flax's math, docs/gated.md) on
    time-major ``x [T, B, H]`` from ``h0`` (and ``c0 = h0``)."""
    x, h0 = x.astype(jnp.float32), h0.astype(jnp.float32)
    proj = _dot(x, jnp.asarray(layer.w_in)) + jnp.asarray(layer.bias)
    kernel = jnp.asarray(layer.kernel)
    if layer.cell == "lstm":
        def step(carry, p):
            c, h = carry
            i, f, g, o = jnp.split(p + _dot(h, kernel), 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), h
        (_, h), ys = lax.scan(step, (h0, h0), proj)
        return ys, h
    hn_bias = jnp.asarray(layer.hn_bias)

    def step(h, p):
        x_r, x_z, x_n = jnp.split(p, 3, axis=-1)
        u_r, u_z, u_n = jnp.split(_dot(h, kernel), 3, axis=-1)
        r, z = jax.nn.sigmoid(x_r + u_r), jax.nn.sigmoid(x_z + u_z)
        h = (1 - z) * jnp.tanh(x_n + r * (u_n + hn_bias)) + z * h
        return h, h
    h, ys = lax.scan(step, h0, proj)
    return ys, h


def forward_reference(layer: GatedLayer, x, h0):
    return reference_scan(layer, x, h0)[1]


def grad_reference(layer: GatedLayer, x, h0):
    """dL/dh0 of ``L = sum(outputs)`` in float32."""
    return jax.grad(lambda h0: jnp.sum(reference_scan(layer, x, h0)[0]))(h0.astype(jnp.float32))


# ---- the training peers --------------------------------------------------------------------------

def _sum(y):
    return jnp.sum(y.astype(jnp.float32))


def _build_ours_grad(method: str):
    def build(layer: GatedLayer, batch: int, T: int):
        call = peers_jax.gated_call(layer, method)
        project = gated_projection(layer)

        def grads(inputs, h0, params):  # the gradient on the nonzeros: w.values
            w, hn = params
            loss = lambda inputs, h0, v, hn: _sum(call(inputs, h0, (w.replace(values=v), hn))[0])
            return jax.grad(loss, argnums=(0, 1, 2, 3))(inputs, h0, w.values, hn)
        try:
            runner = jax_runner(grads, layer, batch, T, gated_params(layer),
                                prepare=lambda x, h0: (project(x), h0), check=lambda g: g[1])
        except Exception as e:
            reason = native_refusal(method, e)
            if reason is None:
                raise
            raise Skip(reason) from e
        runner.info.update(path=gated_path(runner.info["custom_calls"]))
        return runner
    return build


def _build_flax_grad(layer: GatedLayer, batch: int, T: int):
    call = flax_gated_call(layer)
    grads = jax.grad(lambda xb, h0, p: _sum(call(xb, h0, p)[0]), argnums=(0, 1, 2))
    return jax_runner(grads, layer, batch, T, flax_gated(layer)[1],
                      prepare=lambda x, h0: (jnp.swapaxes(x, 0, 1), h0), check=lambda g: g[1])


def _build_gemm_grad(layer: GatedLayer, batch: int, T: int):
    """The input projection's forward and its gradients (x, w_in, bias) for a given cotangent."""
    dt = layer.jnp_dtype
    params = (jnp.asarray(layer.w_in, dt), jnp.asarray(layer.bias, dt))

    def fn(xb, cotangent, params):
        _, vjp = jax.vjp(lambda xb, w, b: xb @ w + b, xb, *params)
        return vjp(cotangent)

    def prepare(x, h0):  # a cotangent of the projection's shape, made outside the timed region
        xb = jnp.swapaxes(x, 0, 1)
        return xb, jnp.tile(xb, (1, 1, layer.gates))
    return jax_runner(fn, layer, batch, T, params, prepare=prepare, check=None)


TRAINING_PEERS = (
    Peer("ours_native", "grad of sum(outputs) through sparse_gru / sparse_lstm(method='native') "
         "wrt inputs, h0, weights.values, hn_bias", ALL_DTYPES, _build_ours_grad("native"),
         competitor=False),
    Peer("ours_auto", "the same through method='auto'", ALL_DTYPES, _build_ours_grad("auto"),
         competitor=False),
    Peer("flax", "grad of sum(outputs) through Flax nn.RNN(nn.GRUCell / nn.OptimizedLSTMCell) wrt "
         "x, h0 and all parameters (the input projection's included)", ALL_DTYPES,
         _build_flax_grad, unavailable=peers_jax.FLAX_GATED.unavailable),
    Peer("in_gemm", "the input projection's forward and gradients alone (what ours leaves out)",
         ALL_DTYPES, _build_gemm_grad, competitor=False),
)


#: the forward rows' peers, in table order
FORWARD_ORDER = ("ours_native", "ours_auto", "ours_cluster", "ours_grid", "ours_n8", "ours_tiles",
                 "cudnn", "flax", "jax_rnn", "in_gemm", "floor")


def forward_peers(cell: str) -> list[Peer]:
    """The forward peers of ``cell`` (jax.experimental.rnn has an LSTM only)."""
    by_name = {p.name: p for p in (*peers_jax.GATED_PEERS, *peers_torch.GATED_PEERS)}
    return [by_name[n] for n in FORWARD_ORDER if cell == "lstm" or n != "jax_rnn"]


# ---- ratios and targets --------------------------------------------------------------------------

def ratio(numerator, denominator) -> float | None:
    """``numerator / denominator`` of two per-step times, None unless both are positive."""
    ok = lambda v: v is not None and math.isfinite(v) and v > 0
    return numerator / denominator if ok(numerator) and ok(denominator) else None


def per_step(results: dict, name: str) -> float | None:
    result = results.get(name)
    return result["us_per_step"] if ran(result) else None


def target_for(kind: str, cell: str, hidden: int, density: float, batch: int,
               dtype: str) -> dict | None:
    """Issue 17's target for this row (fp16, 10%), or None."""
    if dtype != "float16" or density != 0.1:
        return None
    if kind == "training":
        if (cell, hidden, batch) == ("gru", 1024, 4):
            return dict(goal=3.0, versus="best", text="training step, GRU H=1024 10% B=4: >= 3x "
                                                      "Flax nn.RNN(GRUCell)")
        return None
    if hidden in (1024, 2048) and (cell == "gru" and batch <= 32 or cell == "lstm" and batch <= 4):
        return dict(goal=5.0, versus="best", text=f"{cell.upper()} H=1024/2048 10% B<="
                                                  f"{32 if cell == 'gru' else 4}: >= 5x the best peer")
    if cell == "lstm" and hidden <= 1024 and batch in (8, 32):
        return dict(goal=1.0, versus="cudnn", text="LSTM H<=1024 10% B=8/32: faster than cuDNN's "
                                                   "persistent LSTM")
    return None


def add_ratios(row: dict, peers) -> None:
    """The row's best competitor and our same-run ratios against it, against cuDNN, and as a whole
    layer (ours plus the input projection), for both methods; and its target's verdict."""
    results = row["peers"]
    best, best_us = best_competitor(peers, results)
    row.update(best_peer=best, best_us=best_us)
    gemm = per_step(results, "in_gemm")
    for method in ("native", "auto"):
        ours = per_step(results, f"ours_{method}")
        row[f"x_best_{method}"] = ratio(best_us, ours)
        row[f"x_layer_{method}"] = ratio(best_us, None if ours is None or gemm is None else ours + gemm)
        row[f"x_cudnn_{method}"] = ratio(per_step(results, "cudnn"), ours)
    target = row.get("target")
    if target is not None:
        key = "x_best" if target["versus"] == "best" else f"x_{target['versus']}"
        target["ratio"] = {m: row[f"{key}_{m}"] for m in ("native", "auto")}
        target["met"] = {m: None if r is None else r >= target["goal"]
                         for m, r in target["ratio"].items()}


def auto_info(layer: GatedLayer, batch: int, results: dict) -> dict:
    """What method='auto' ran (from its compiled program) and jax_sprnn's verdict on this GPU."""
    info = dict(pick=results.get("ours_auto", {}).get("path"))
    if jax.default_backend() == "gpu":
        ok, why = dispatch.cuda_fit(layer.weights.meta, batch, layer.jnp_dtype,
                                    dispatch.GATED_FORWARD)
        info.update(cuda_fit=ok, reason=why)
    else:
        info["reason"] = f"{jax.default_backend()} backend"
    return info


def case_row(ctx: Context, kind: str, layer: GatedLayer, batch: int, peers, reference) -> dict:
    results = measure_all(peers, Case(layer, batch, ctx.timing, reference))
    release_torch_memory()
    row = dict(kind=kind, label=label(kind, layer.cell, layer.hidden, layer.density, batch,
                                      layer.dtype),
               **layer.describe(), batch=batch, auto=auto_info(layer, batch, results), peers=results,
               target=target_for(kind, layer.cell, layer.hidden, layer.density, batch, layer.dtype))
    add_ratios(row, peers)
    return row


# ---- capacity ------------------------------------------------------------------------------------

def _plans(cell: str, hidden: int, density: float, dtype, device):
    """Forward and backward plans of a row-balanced layer, spread evenly over the input units."""
    gates, nnz = CELLS[cell], max(1, int(round(density * hidden)))
    return layout.plan_layouts(np.full(gates * hidden, nnz), np.full(hidden, gates * nnz), dtype,
                               device, gates=gates)


def capacity_row(cell: str, density: float, dtype: str, device) -> dict:
    """The largest H (steps of CAPACITY_STEP) that the planner admits persistently: at all, with a
    batch of 4, and with the backward layout too; the layout there and why the next size fails."""
    jdt = DTYPES[dtype]
    found = dict(largest_hidden=0, largest_hidden_b4=0, largest_hidden_training=0)
    at, misses, refusal = None, 0, None
    for hidden in range(CAPACITY_STEP, CAPACITY_TOP + 1, CAPACITY_STEP):
        fwd, bwd = _plans(cell, hidden, density, jdt, device)
        if not fwd.fits:
            refusal = refusal or fwd.reason
            misses += 1
            if found["largest_hidden"] and misses >= CAPACITY_PATIENCE:
                break
            continue
        found["largest_hidden"], at, misses, refusal = hidden, fwd, 0, None
        if planner.max_persistent_batch(fwd, jdt, device) >= 4:
            found["largest_hidden_b4"] = hidden
        if bwd.fits:
            found["largest_hidden_training"] = hidden
    row = dict(cell=cell, density=density, dtype=dtype, planned_for=device.name, **found,
               scan=f"H = {CAPACITY_STEP}..{CAPACITY_TOP} step {CAPACITY_STEP}")
    if at is not None:
        row.update(nonzeros=CELLS[cell] * int(round(density * at.hidden)) * at.hidden,
                   ctas=at.num_ctas, warps_per_cta=at.warps_per_cta, K=at.slots_per_lane,
                   exchange=at.exchange, max_batch=planner.max_persistent_batch(at, jdt, device),
                   next_refused=refusal)
    if density == 0.1 and dtype == "float16":
        goal = CAPACITY_TARGETS[cell]
        row["target"] = dict(text=f"{cell.upper()} H >= {goal} persistent at 10% fp16", goal=goal,
                             met=row["largest_hidden"] >= goal)
    return row


def capacity(ctx: Context, dtypes) -> list[dict]:
    device = _native.current_device_spec()
    rows = [capacity_row(cell, d, dtype, device) for dtype in dtypes for cell in CELLS
            for d in CAPACITY_DENSITIES]
    print(f"capacity (planner, {device.name}, {device.sm_count} SMs): largest persistent H", flush=True)
    print("  cell density dtype  largest   B=4  +bwd  CTAs x warps    K exchange  target", flush=True)
    for r in rows:
        target = r.get("target")
        verdict = "-" if target is None else f">={target['goal']} {'met' if target['met'] else 'NOT met'}"
        print(f"  {r['cell']:>4} {r['density']:>7.0%} {SHORT[r['dtype']]:>5} {r['largest_hidden']:>8}"
              f" {r['largest_hidden_b4']:>5} {r['largest_hidden_training']:>5} "
              f"{r.get('ctas', '-'):>5} x {r.get('warps_per_cta', '-'):<5} {r.get('K', '-'):>4} "
              f"{r.get('exchange', '-'):>8}  {verdict}", flush=True)
    return rows


# ---- the suite -----------------------------------------------------------------------------------

def grid(ctx: Context) -> list[tuple]:
    """``(cell, H, density, B, dtype)`` of the forward rows; --hidden/--batch/--density/--dtype
    replace the grid's values (and drop its extra densities)."""
    base = SMOKE if ctx.smoke else QUICK if ctx.quick else GRID
    values = {k: getattr(ctx, k, None) or v for k, v in base.items()}
    unknown = set(values["cell"]) - set(CELLS)
    if unknown:
        raise SystemExit(f"--cell: unknown {sorted(unknown)}; the cells are {sorted(CELLS)}")
    cases = [(c, h, d, b, t) for t in values["dtype"] for c in values["cell"]
             for h in values["hidden"] for d in values["density"] for b in values["batch"]]
    if not (ctx.smoke or ctx.quick or ctx.hidden or ctx.batch or ctx.density or ctx.cell):
        cases += [(c, h, d, b, t) for t in values["dtype"] for c, h, d, b in MORE]
    return cases


def _versions() -> dict:
    try:
        import flax
        out = dict(flax=flax.__version__)
    except ImportError:
        out = dict(flax=None)
    if peers_torch.unavailable() is None:
        torch = peers_torch._torch()
        out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return out


def _not_run(kind, cell, hidden, density, batch, dtype) -> dict:
    return dict(kind=kind, cell=cell, hidden=hidden, density=density, batch=batch, dtype=dtype,
                label=label(kind, cell, hidden, density, batch, dtype), not_run="time budget")


def run(ctx: Context) -> None:
    dtypes = ctx.dtype or GRID["dtype"]
    ctx.recorder.set(peers=dict(forward=peer_header(forward_peers("lstm")),
                                training=peer_header(TRAINING_PEERS)),
                     versions=_versions(), layout="batch-first inputs; LSTM c0 = h0",
                     results_name=f"gated{'_quick' if ctx.quick else ''}_{time.strftime('%Y-%m-%d')}")
    parts = ctx.parts or PARTS
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; the gated suite's parts are {PARTS}")
    ctx.recorder.set(capacity=capacity(ctx, dtypes) if "capacity" in parts else [])
    seen: set = set()
    cell, hidden, density, batch = SMOKE_TRAINING if ctx.smoke else TRAINING
    for dtype in dtypes if "training" in parts else ():
        layer = GatedLayer.make(cell, hidden, density, dtype)
        row = case_row(ctx, "training", layer, batch, TRAINING_PEERS, grad_reference)
        ctx.recorder.add(row)
        print_skips(row, seen)
    for cell, hidden, density, batch, dtype in grid(ctx) if "forward" in parts else ():
        if ctx.over_budget():
            ctx.recorder.add(_not_run("forward", cell, hidden, density, batch, dtype))
            continue
        layer = GatedLayer.make(cell, hidden, density, dtype)
        row = case_row(ctx, "forward", layer, batch, forward_peers(cell), forward_reference)
        ctx.recorder.add(row)
        print_skips(row, seen)
    skipped = sum("not_run" in r for r in ctx.recorder.rows)
    if skipped:
        print(f"{skipped} cases not run (time budget): measure them in another run with --hidden, "
              f"--batch or --density", flush=True)
    ctx.recorder.set(targets=summarize_targets(ctx.recorder.rows, ctx.recorder.payload["capacity"]))
    ctx.recorder.set(plots=[str(plots.per_step_bars(
        ctx.recorder.rows, ctx.out_dir / "gated.png", "µs per step: sparse LSTM / GRU and peers"))])


def summarize_targets(rows, capacity_rows) -> list[dict]:
    """Every target of issue 17 this run measured, one line each, printed and returned."""
    out = [dict(case=r["label"], text=r["target"]["text"], goal=r["target"]["goal"],
                ratio=r["target"].get("ratio"), met=r["target"].get("met"))
           for r in rows if r.get("target")]
    out += [dict(case=f"capacity {r['cell'].upper()} 10% {SHORT[r['dtype']]}", text=r["target"]["text"],
                 goal=r["target"]["goal"], value=r["largest_hidden"], met=r["target"]["met"])
            for r in capacity_rows if r.get("target")]
    print("targets (issue 17):", flush=True)
    for t in out:
        if "value" in t:
            print(f"  {t['case']}: H={t['value']} ({t['text']}): {'met' if t['met'] else 'NOT met'}")
            continue
        parts = [f"{m} {'-' if t['ratio'][m] is None else format(t['ratio'][m], '.3g')}x "
                 f"({'not measured' if t['met'][m] is None else 'met' if t['met'][m] else 'NOT met'})"
                 for m in ("native", "auto")]
        print(f"  {t['case']}: {t['text']}: {'; '.join(parts)}", flush=True)
    return out


def _us(name: str):
    return lambda row: row["peers"][name].get("us_per_step")


def columns(peers):
    return [Column("kind", lambda r: r["kind"][:5], 5), Column("cell", lambda r: r["cell"], 4),
            Column("H", lambda r: r["hidden"], 5), Column("dens", lambda r: r["density"], 5),
            Column("B", lambda r: r["batch"], 3), Column("dtype", lambda r: SHORT[r["dtype"]], 5),
            *[Column(name[:9], _us(name), 9) for name in FORWARD_ORDER],
            Column("best", lambda r: r["best_peer"], 7),
            *[Column(header, lambda r, key=key: r.get(key), 9) for header, key in (
                ("xbest nat", "x_best_native"), ("xbest aut", "x_best_auto"),
                ("xlayr nat", "x_layer_native"), ("xcuDNN nt", "x_cudnn_native"))],
            Column("relerr", lambda r: r["peers"]["ours_auto"].get("rel_err"), 8),
            Column("auto ran", lambda r: r["auto"]["pick"], 15)]
