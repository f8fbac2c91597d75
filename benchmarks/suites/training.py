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
from jax_sprnn import fallback
from jax_sprnn.primitives import sprnn_backward_p, sprnn_weight_grad_p

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


def _build_ours(method: str):
    def build(layer: Layer, batch: int, T: int):
        if jax.default_backend() == "gpu" and method == "native":
            ok, why = persistent_fit(layer, batch)
            if not ok:
                raise Skip(why)

        def grads(x, h0, w):  # gradient on the nonzeros: with respect to w.values only
            loss = _sum_loss(lambda x, h0, v: js.sparse_rnn(x, h0, w.replace(values=v),
                                                            time_major=True, method=method))
            return jax.grad(loss, argnums=(0, 1, 2))(x, h0, w.values)
        return jax_runner(grads, layer, batch, T, layer.weights, check=lambda g: g[0])
    return build


def _build_dense(layer: Layer, batch: int, T: int):
    grads = jax.grad(_sum_loss(lambda x, h0, k: dense_scan(x, h0, k, time_major=True)),
                     argnums=(0, 1, 2))
    return jax_runner(grads, layer, batch, T, layer.dense_kernel, check=lambda g: g[0])


def _build_forward(layer: Layer, batch: int, T: int):
    runner = peers_jax.OURS.build(layer, batch, T)
    runner.check = None  # this suite's reference is a gradient
    return runner


OURS = Peer("ours", "grad through sparse_rnn(method='native')", ALL_DTYPES, _build_ours("native"),
            competitor=False)
OURS_AUTO = Peer("ours_auto", "grad through sparse_rnn(method='auto'): the paths jax_sprnn.cost picks",
                 ALL_DTYPES, _build_ours("auto"), competitor=False)
def _primitive_runner(layer: Layer, batch: int, T: int, body):
    """A runner for one primitive of the backward pass alone, fed with stand-in inputs derived
    from x (its cost does not depend on the values)."""
    if jax.default_backend() == "gpu":
        ok, why = persistent_fit(layer, batch)
        if not ok:
            raise Skip(why)
    runner = jax_runner(body, layer, batch, T, layer.weights)
    runner.check = None
    return runner


def _build_backward(layer: Layer, batch: int, T: int):
    def body(x, h0, w):
        lengths = jnp.full((x.shape[1],), x.shape[0], jnp.int32)
        return sprnn_backward_p.bind(jnp.tanh(x), h0, w.transposed_values(), w.indices_t,
                                     w.lane_row_t, lengths, x, h0, activation="tanh",
                                     reverse=False, meta=w.meta_t, method="native")
    return _primitive_runner(layer, batch, T, body)


def _build_weight_grad(dense: bool):
    def build(layer: Layer, batch: int, T: int):
        def body(x, h0, w):
            lengths = jnp.full((x.shape[1],), x.shape[0], jnp.int32)
            args = (jnp.tanh(x), h0, x, w.indices, w.lane_row, lengths)
            if dense:  # XLA: a dense einsum over time and batch (a GEMM), then a gather
                return fallback.weight_grad(*args, groups=1, reverse=False, meta=w.meta)
            return sprnn_weight_grad_p.bind(*args, groups=1, reverse=False, meta=w.meta,
                                            method="native")[0]
        return _primitive_runner(layer, batch, T, body)
    return build


# The forward pass alone and the pieces of the backward pass, in the same run: backward per step
# = ours - fwd (the 2x bound), and where that time goes.
FORWARD = Peer("fwd", "forward only: sparse_rnn(method='native')", ALL_DTYPES, _build_forward,
               competitor=False)
BACKWARD = Peer("bwd", "the backward recurrence alone (sprnn_backward, persistent kernel)",
                ALL_DTYPES, _build_backward, competitor=False)
WGRAD = Peer("wgrad", "the weight gradient alone (sprnn_weight_grad kernel, on the pattern)",
             ALL_DTYPES, _build_weight_grad(dense=False), competitor=False)
WGRAD_DENSE = Peer("wgrad_xla", "the weight gradient as XLA's dense einsum + gather",
                   ALL_DTYPES, _build_weight_grad(dense=True), competitor=False)
BREAKDOWN = (OURS_AUTO, FORWARD, BACKWARD, WGRAD, WGRAD_DENSE)
DENSE = Peer("dense", "grad through lax.scan of a dense step (storage dtype)", ALL_DTYPES,
             _build_dense)


def grad_reference(layer: Layer, x, h0):
    """dL/dx of the reference in float32 on the stored weight values."""
    loss = lambda x: jnp.sum(js.reference_rnn(x, h0.astype(jnp.float32), layer.kernel,
                                              time_major=True)[0])
    return jax.grad(loss)(x.astype(jnp.float32))


def _selected(peers):
    names = {p.name for p in peers}
    return [p for p in (OURS, DENSE) if p.name in names] + (list(BREAKDOWN) if "ours" in names else [])


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
