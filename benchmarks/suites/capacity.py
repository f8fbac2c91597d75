"""capacity: the largest layer that runs persistently, per density and dtype, against the dense
persistent limit and the register file's physical limit.

Sizes come from the planner on this GPU's properties (an H200 model without a GPU): a layer is
admitted when its row-balanced pattern (``density * H`` nonzeros in every row) fits the register and
shared-memory tiers with one CTA per SM. That part needs no GPU, so the whole grid is computed in
every mode, and ``python -m benchmarks.run --suite capacity`` on a CPU prints the H200 model's table.
The two references both come from the register file ``R = SMs * registers per SM * 4 bytes``:

* the register file's physical limit for sparse weights: all of R holding (value, index) pairs and
  nothing else, ``H = sqrt(R / (pair bytes * density))``;
* the dense persistent limit: all of R holding dense fp16 weights, ``H = sqrt(R / 2)``. cuDNN's
  persistent algorithm reaches far less in practice: PyTorch only asks for it up to H=1024.

--verify runs the largest admitted layer once through the kernel and checks it against the
reference. cuDNN's persistent algorithm is probed by running torch.nn.RNN where PyTorch asks for it
(H=1024) and just past it (H=1152), and recording the kernels that ran.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

import jax_sprnn as js
from jax_sprnn import _native, planner

from .. import plots
from ..harness import Case, as_numpy, measure
from ..peers_jax import persistent_fit
from ..peers_torch import CUDNN
from ..problems import DTYPES as JNP_DTYPES
from ..problems import Layer, make_inputs, rel_err
from ..report import Column
from ..timing import Timing
from .common import Context, forward_reference

DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.3)
DTYPES = ("float16", "float32")  # bfloat16 plans exactly as float16
SMOKE_VERIFY_DENSITIES = (0.1, 0.3)
VERIFY_BATCH, VERIFY_STEPS = 4, 16

#: the largest hidden size PyTorch asks cuDNN's persistent RNN algorithm for (RNN.cpp heuristics)
CUDNN_PERSISTENT_MAX_H = 1024
#: registers of one SM on every NVIDIA GPU since Kepler (used when no GPU can be asked)
REGS_PER_SM = 65536


def largest_hidden(density, dtype, device, step=128, top=32768, batch=None) -> int:
    """The largest multiple of ``step`` the planner admits (and, given ``batch``, whose shared
    memory also holds h for that many examples)."""
    best = 0
    for hidden in range(step, top + 1, step):
        nnz = max(1, int(round(density * hidden)))
        plan = planner.plan_layout(np.full(hidden, nnz), dtype, device)
        if plan.fits and (batch is None or planner.max_persistent_batch(plan, dtype, device) >= batch):
            best = hidden
    return best


def register_file(device) -> tuple[int, str]:
    """Bytes of all registers of the GPU, and where the count came from."""
    regs, source = REGS_PER_SM, f"assumed {REGS_PER_SM} registers per SM"
    cuda = _native.cuda_module()
    if cuda is not None and jax.default_backend() == "gpu":
        regs, source = int(cuda.device_properties(0)["regs_per_sm"]), "cudaGetDeviceProperties"
    return device.sm_count * regs * 4, source


def sparse_register_limit(regfile_bytes, density, dtype) -> int:
    """H whose nonzeros, as (value, index) pairs, fill the whole register file."""
    return int(math.sqrt(regfile_bytes / planner.bytes_per_slot(dtype) / density))


def dense_register_limit(regfile_bytes, weight_bytes=2) -> int:
    """H whose dense weights (fp16 by default) fill the whole register file."""
    return int(math.sqrt(regfile_bytes / weight_bytes))


def verify(hidden: int, density: float, dtype: str) -> dict:
    """Run the layer once through method='native' and compare with the reference."""
    layer = Layer.make(hidden, density, dtype)
    if jax.default_backend() == "gpu":
        ok, why = persistent_fit(layer, VERIFY_BATCH)
        if not ok:
            return dict(hidden=hidden, skipped=why)
    x, h0 = make_inputs(VERIFY_STEPS, VERIFY_BATCH, hidden, dtype, seed=0)
    w = layer.weights
    start = time.perf_counter()
    try:
        _, h = jax.jit(lambda x, h0, w: js.sparse_rnn(x, h0, w, time_major=True,
                                                      method="native"))(x, h0, w)
        err = rel_err(as_numpy(h), as_numpy(forward_reference(layer, x, h0)))
    except Exception as e:
        return dict(hidden=hidden, error=f"{type(e).__name__}: {str(e)[:300]}")
    return dict(hidden=hidden, ran=True, rel_err=err, seconds=round(time.perf_counter() - start, 2),
                pack_s=round(layer.pack_s, 2), batch=VERIFY_BATCH, steps=VERIFY_STEPS)


def cudnn_probe(ctx: Context) -> list[dict]:
    """Which cuDNN algorithm ran at the edge of PyTorch's persistent heuristic (fp16, B=8)."""
    sizes = (64, 128) if ctx.smoke else (1024, 1152)
    timing = Timing(t1=8, t2=32, reps=3, rotate=1) if ctx.smoke else Timing(32, 128, reps=5, rotate=1)
    out = []
    for hidden in sizes:
        layer = Layer.make(hidden, 1.0, "float16")
        result = measure(CUDNN, Case(layer, 8, timing, forward_reference))
        out.append(dict(hidden=hidden, batch=8, dtype="float16", **result))
    return out


def run(ctx: Context) -> None:
    device = _native.current_device_spec()
    regfile, source = register_file(device)
    dense_limit = dense_register_limit(regfile)
    ctx.recorder.set(limits=dict(
        device=device.name, sm_count=device.sm_count, register_file_bytes=regfile,
        register_file_source=source,
        dense_register_limit_hidden=dense_limit,
        dense_register_limit_formula="H = floor(sqrt(R / 2)): all registers hold dense fp16 weights",
        sparse_register_limit_formula="H = floor(sqrt(R / (pair bytes * density))): all registers "
                                      "hold (value, index) pairs (4 bytes 16-bit, 8 bytes fp32)",
        cudnn_persistent_max_hidden=CUDNN_PERSISTENT_MAX_H,
        cudnn_persistent_note="PyTorch asks cuDNN for PERSIST_STATIC only for fp16, H <= 1024, "
                              "H % 128 == 0, B % 8 == 0 (aten/src/ATen/native/cudnn/RNN.cpp)"))
    for density in DENSITIES:  # the planner's grid takes seconds on a CPU: always all of it
        for dtype in DTYPES:
            jnp_dtype = JNP_DTYPES[dtype]
            hidden = largest_hidden(density, jnp_dtype, device)
            row = dict(density=density, dtype=dtype, largest_hidden=hidden,
                       largest_hidden_b4=largest_hidden(density, jnp_dtype, device, batch=4),
                       nonzeros=int(round(density * hidden)) * hidden,
                       register_limit_hidden=sparse_register_limit(regfile, density, jnp_dtype),
                       x_dense_register_limit=hidden / dense_limit,
                       x_cudnn_persistent=hidden / CUDNN_PERSISTENT_MAX_H)
            if ctx.smoke:  # exercise the path on a layer a CPU runs in a moment
                if ctx.verify and density in SMOKE_VERIFY_DENSITIES:
                    row["verified"] = verify(128, density, dtype)
            elif ctx.verify and (not ctx.quick or (density == 0.1 and dtype == "float16")):
                row["verified"] = verify(row["largest_hidden_b4"], density, dtype)
            ctx.recorder.add(row)
    ctx.recorder.set(cudnn_probe=cudnn_probe(ctx))
    for p in ctx.recorder.payload["cudnn_probe"]:
        print(f"cuDNN H={p['hidden']} B=8 fp16: " + (
            f"{p['us_per_step']:.3g} µs/step, persistent kernel seen: "
            f"{p.get('persistent_kernel_seen')}, PyTorch asks for {p.get('torch_algo_prediction')}"
            if "us_per_step" in p else p.get("skipped") or p.get("error")), flush=True)
    ctx.recorder.set(plots=[str(plots.capacity(ctx.recorder.rows, ctx.recorder.payload["limits"],
                                               ctx.out_dir / "capacity.png"))])


def columns(peers):
    def ver(r):
        v = r.get("verified")
        if v is None:
            return "-"
        return f"ok {v['rel_err']:.1e}" if v.get("ran") else "skip" if "skipped" in v else "ERROR"

    return [Column("density", lambda r: r["density"], 7), Column("dtype", lambda r: r["dtype"], 8),
            Column("largest H", lambda r: r["largest_hidden"], 9),
            Column("H (B=4)", lambda r: r["largest_hidden_b4"], 8),
            Column("nonzeros", lambda r: r["nonzeros"], 9),
            Column("regfile H", lambda r: r["register_limit_hidden"], 9),
            Column("x dense-reg", lambda r: r["x_dense_register_limit"], 11),
            Column("x cuDNN", lambda r: r["x_cudnn_persistent"], 7),
            Column("verified", ver, 12)]
