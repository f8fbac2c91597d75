"""A bidirectional layer as one stacked launch against two calls, in one run (issue 16, item 2).

    python benchmarks/probes/bidirectional.py [--hidden 256] [--density 0.1] [--dtype float32]
        [--batches 1 4 16] [--steps 250] [--reps 30] [--out probe.json]

Per batch, on the same weights (two directions of one layout: ``testing.make_twin_problem``) and
inputs, each row a jitted function timed as ``benchmarks.timing.median_time`` does (milliseconds
per call of T steps, the host clock around a blocking call: at these call lengths its error is
small against the call):

* ``stacked``: ``sparse_rnn_bidirectional``, which runs both directions in one launch;
* ``two calls``: the same function's two-call path (``bidirectional._two_calls``), one launch per
  direction, one after the other;
* ``dense scan``: both directions as dense ``lax.scan``s (``reference_rnn``) in one program;
* ``grad stacked`` / ``grad two calls``: ``jax.grad`` of the outputs' sum with respect to the
  inputs, the initial states and the values: a training step's recurrent part.

A GPU for the native rows; elsewhere the stacked and two-call paths are the same calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.append(str(Path(__file__).resolve().parents[2]))  # (after the installed jax_sprnn)

import jax_sprnn as js  # noqa: E402
from benchmarks.probes import layer_probe  # noqa: E402
from benchmarks.timing import median_time  # noqa: E402
from jax_sprnn import bidirectional  # noqa: E402
from jax_sprnn.testing import make_twin_problem  # noqa: E402


def stacked(xs, hs, ws):
    return js.sparse_rnn_bidirectional(xs, hs, ws)


def two_calls(xs, hs, ws):
    y_f, y_b, h_f, h_b = bidirectional._two_calls(*xs, *hs, *ws, activation="tanh",
                                                  time_major=False, seq_lengths=None, method="auto")
    return jnp.concatenate([y_f, y_b], -1), (h_f, h_b)


def dense_scan(xs, hs, kernels):
    y_f, h_f = js.reference_rnn(xs[0], hs[0], kernels[0])
    y_b, h_b = js.reference_rnn(xs[1], hs[1], kernels[1], reverse=True)
    return jnp.concatenate([y_f, y_b], -1), (h_f, h_b)


def grad_of(run):
    def loss(ws, xs, hs):
        y, states = run(xs, hs, ws)
        return jnp.sum(y.astype(jnp.float32)) + sum(jnp.sum(s.astype(jnp.float32)) for s in states)
    return js.grad(loss, argnums=(0, 1, 2))


def measure(hidden: int, density: float, dtype: str, batch: int, steps: int, reps: int) -> dict:
    (k_f, w_f, x_f, h_f), (k_b, w_b, x_b, h_b) = make_twin_problem(
        hidden + batch, hidden, batch, steps, density, dtype)
    ws, kernels = (w_f, w_b), (jnp.asarray(k_f, x_f.dtype), jnp.asarray(k_b, x_f.dtype))
    # Rotated input sets (the L2 cache must not hold the previous call's inputs).
    sets = [((x_f * s, x_b * s), (h_f, h_b)) for s in (1.0, 0.9, 0.8, 0.7)]
    rows = {"stacked": (jax.jit(stacked), ws), "two calls": (jax.jit(two_calls), ws),
            "dense scan": (jax.jit(dense_scan), kernels),
            "grad stacked": (jax.jit(lambda xs, hs, ws: grad_of(stacked)(ws, xs, hs)), ws),
            "grad two calls": (jax.jit(lambda xs, hs, ws: grad_of(two_calls)(ws, xs, hs)), ws)}
    out = {}
    for name, (fn, weights) in rows.items():
        seconds = median_time(fn, [(xs, hs, weights) for xs, hs in sets], reps)
        out[name] = round(seconds * 1e3, 4)
    out["two calls / stacked"] = round(out["two calls"] / out["stacked"], 3)
    out["grad two calls / stacked"] = round(out["grad two calls"] / out["grad stacked"], 3)
    out["dense / stacked"] = round(out["dense scan"] / out["stacked"], 3)
    jaxpr = str(jax.make_jaxpr(stacked)((x_f, x_b), (h_f, h_b), ws))
    out["one launch"] = "sprnn_forward_pair" in jaxpr
    out["exchange"] = w_f.meta.exchange
    return out


def main(argv=None) -> None:
    ap = layer_probe.parser(__doc__.split("\n")[0], dtype="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args(argv)
    print(f"H={args.hidden} density={args.density} {args.dtype} T={args.steps}: ms per call")
    layer_probe.sweep(args, "B", args.batches, lambda batch: measure(
        args.hidden, args.density, args.dtype, batch, args.steps, args.reps))


if __name__ == "__main__":
    main()
