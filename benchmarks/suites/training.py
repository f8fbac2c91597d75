"""training: forward + backward of ``sum(outputs)`` with respect to the inputs, h0 and the weights,
through sparse_rnn (gradient on the nonzeros) and through a dense lax.scan (dense gradient).

Each peer's dL/dx is checked against jax.grad of the float32 reference. The compiled program's
jax_sprnn custom calls are recorded, showing which of forward / backward / weight gradient ran
natively on this backend (the others lower to jax_sprnn's pure-JAX fallback).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_sprnn as js

from .. import plots
from ..harness import Peer, Skip
from .. import peers_jax
from ..peers_jax import ALL_DTYPES, dense_scan, jax_runner, persistent_fit
from ..problems import Layer
from ..report import Column
from .common import Context, case_columns, case_row, peer_header, print_skips

# (H, density, B, dtype)
CONFIGS = [(2304, 0.1, 4, "float16")]
MORE = [(1152, 0.1, 4, "float16"), (4608, 0.1, 4, "float16"), (2304, 0.3, 4, "float16"),
        (2304, 0.1, 16, "float16"), (2304, 0.1, 4, "float32")]
SMOKE = [(64, 0.1, 2, "float16"), (64, 0.3, 2, "float32")]


def _sum_loss(rnn):
    return lambda x, h0, w: jnp.sum(rnn(x, h0, w)[0].astype(jnp.float32))


def _build_ours(layer: Layer, batch: int, T: int):
    if jax.default_backend() == "gpu":
        ok, why = persistent_fit(layer, batch)
        if not ok:
            raise Skip(why)

    def grads(x, h0, w):  # gradient on the nonzeros: with respect to w.values only
        loss = _sum_loss(lambda x, h0, v: js.sparse_rnn(x, h0, w.replace(values=v),
                                                        time_major=True, method="native"))
        return jax.grad(loss, argnums=(0, 1, 2))(x, h0, w.values)
    return jax_runner(grads, layer, batch, T, layer.weights, check=lambda g: g[0])


def _build_dense(layer: Layer, batch: int, T: int):
    grads = jax.grad(_sum_loss(lambda x, h0, k: dense_scan(x, h0, k, time_major=True)),
                     argnums=(0, 1, 2))
    return jax_runner(grads, layer, batch, T, layer.dense_kernel, check=lambda g: g[0])


def _build_forward(layer: Layer, batch: int, T: int):
    runner = peers_jax.OURS.build(layer, batch, T)
    runner.check = None  # this suite's reference is a gradient
    return runner


OURS = Peer("ours", "grad through sparse_rnn(method='native')", ALL_DTYPES, _build_ours,
            competitor=False)
# The forward pass alone, in the same run: backward per step = ours - fwd (the 2x bound).
FORWARD = Peer("fwd", "forward only: sparse_rnn(method='native')", ALL_DTYPES, _build_forward,
               competitor=False)
DENSE = Peer("dense", "grad through lax.scan of a dense step (storage dtype)", ALL_DTYPES,
             _build_dense)


def grad_reference(layer: Layer, x, h0):
    """dL/dx of the reference in float32 on the stored weight values."""
    loss = lambda x: jnp.sum(js.reference_rnn(x, h0.astype(jnp.float32), layer.kernel,
                                              time_major=True)[0])
    return jax.grad(loss)(x.astype(jnp.float32))


def _selected(peers):
    names = {p.name for p in peers}
    return [p for p in (OURS, DENSE) if p.name in names] + ([FORWARD] if "ours" in names else [])


def backward_over_forward(row: dict):
    """(training - forward) / forward per step: the backward pass's cost relative to the forward."""
    peers = row.get("peers", {})
    if not all("us_per_step" in peers.get(n, {}) for n in ("ours", "fwd")):
        return None
    fwd = peers["fwd"]["us_per_step"]
    return (peers["ours"]["us_per_step"] - fwd) / fwd


def run(ctx: Context) -> None:
    peers = _selected(ctx.peers)
    ctx.recorder.set(peers=peer_header(peers))
    seen: set = set()
    configs = SMOKE if ctx.smoke else CONFIGS + ([] if ctx.quick else MORE)
    for hidden, density, batch, dtype in configs:
        if ctx.over_budget():
            ctx.recorder.add(dict(hidden=hidden, density=density, batch=batch, dtype=dtype,
                                  not_run="time budget"))
            continue
        row = case_row(ctx, Layer.make(hidden, density, dtype), batch, peers=peers,
                       reference=grad_reference)
        row["backward_over_forward"] = backward_over_forward(row)
        ctx.recorder.add(row)
        print_skips(row, seen)
    ctx.recorder.set(plots=[str(plots.per_step_bars(
        ctx.recorder.rows, ctx.out_dir / "training.png", "µs per step, forward + backward"))])


def columns(peers):
    return [*case_columns(_selected(peers)),
            Column("bwd/fwd", backward_over_forward, 7)]
