"""A bidirectional layer as one stacked launch against two calls, in one run (issue 16, item 2).

    python benchmarks/probes/bidirectional.py [--cell simple] [--hidden 256] [--density 0.1]
        [--dtype float32] [--batches 1 4 16] [--steps 250] [--reps 30] [--out probe.json]

Per batch, on the same weights (two directions of one layout: ``testing.make_twin_problem``, or
``make_gated_twin_problem`` for ``--cell lstm`` / ``gru``) and inputs, each row a jitted function
timed as ``benchmarks.timing.median_time`` does (milliseconds per call of T steps, the host clock
around groups of back-to-back calls: at these call lengths its error is small against the call):

* ``stacked``: ``sparse_rnn_bidirectional`` (``sparse_lstm_bidirectional``,
  ``sparse_gru_bidirectional``), which runs both directions in one launch;
* ``two calls``: one ``sparse_rnn`` (``sparse_lstm``, ``sparse_gru``) call per direction, one launch
  each, one after the other;
* ``dense scan`` (the simple cell): both directions as dense ``lax.scan``s (``reference_rnn``) in
  one program;
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
from jax_sprnn.testing import make_gated_twin_problem, make_twin_problem  # noqa: E402


def _simple_stacked(xs, hs, ws, _):
    return js.sparse_rnn_bidirectional(xs, hs, ws)


def _simple_two_calls(xs, hs, ws, _):
    y_f, y_b, h_f, h_b = bidirectional._two_calls(*xs, *hs, *ws, activation="tanh",
                                                  time_major=False, seq_lengths=None, method="auto")
    return jnp.concatenate([y_f, y_b], -1), (h_f, h_b)


def _lstm_stacked(xs, carries, ws, _):
    return js.sparse_lstm_bidirectional(xs, carries, ws)


def _lstm_two_calls(xs, carries, ws, _):
    (y_f, s_f), (y_b, s_b) = (js.sparse_lstm(x, c, w, reverse=r)
                              for x, c, w, r in zip(xs, carries, ws, (False, True)))
    return jnp.concatenate([y_f, y_b], -1), (s_f, s_b)


def _gru_stacked(xs, hs, ws, biases):
    return js.sparse_gru_bidirectional(xs, hs, ws, hn_bias=biases)


def _gru_two_calls(xs, hs, ws, biases):
    (y_f, s_f), (y_b, s_b) = (js.sparse_gru(x, h, w, hn_bias=b, reverse=r)
                              for x, h, w, b, r in zip(xs, hs, ws, biases, (False, True)))
    return jnp.concatenate([y_f, y_b], -1), (s_f, s_b)


#: cell: (the one-launch call, the two-call path, the paired primitive's name)
CALLS = {"simple": (_simple_stacked, _simple_two_calls, "sprnn_forward_pair"),
         "lstm": (_lstm_stacked, _lstm_two_calls, "sprnn_lstm_pair"),
         "gru": (_gru_stacked, _gru_two_calls, "sprnn_gru_pair")}


def dense_scan(xs, hs, kernels, _):
    y_f, h_f = js.reference_rnn(xs[0], hs[0], kernels[0])
    y_b, h_b = js.reference_rnn(xs[1], hs[1], kernels[1], reverse=True)
    return jnp.concatenate([y_f, y_b], -1), (h_f, h_b)


def grad_of(run):
    def loss(ws, xs, carries, extra):
        y, states = run(xs, carries, ws, extra)
        return jnp.sum(y.astype(jnp.float32)) + sum(jnp.sum(s.astype(jnp.float32))
                                                     for s in jax.tree_util.tree_leaves(states))
    return js.grad(loss, argnums=(0, 1, 2))


def problem(cell: str, hidden: int, density: float, dtype: str, batch: int, steps: int):
    """``(xs, carries, ws, extra, kernels)``: both directions' inputs, carries and weights, the
    GRU's hn_bias pair (else None) and the simple cell's dense kernels (else None)."""
    if cell == "simple":
        (k_f, w_f, x_f, h_f), (k_b, w_b, x_b, h_b) = make_twin_problem(
            hidden + batch, hidden, batch, steps, density, dtype)
        kernels = (jnp.asarray(k_f, x_f.dtype), jnp.asarray(k_b, x_f.dtype))
        return (x_f, x_b), (h_f, h_b), (w_f, w_b), None, kernels
    gates = 4 if cell == "lstm" else 3
    fwd, bwd = make_gated_twin_problem(hidden + batch, gates, hidden, batch, steps, density, dtype)
    carries = tuple((c0, h0) if cell == "lstm" else h0 for _, _, c0, h0, _ in (fwd, bwd))
    extra = None if cell == "lstm" else (fwd[4], bwd[4])
    return (fwd[1], bwd[1]), carries, (fwd[0], bwd[0]), extra, None


def measure(cell: str, hidden: int, density: float, dtype: str, batch: int, steps: int,
            reps: int) -> dict:
    xs, carries, ws, extra, kernels = problem(cell, hidden, density, dtype, batch, steps)
    stacked, two_calls, pair_name = CALLS[cell]
    # Rotated input sets (the L2 cache must not hold the previous call's inputs).
    sets = [tuple(x * s for x in xs) for s in (1.0, 0.9, 0.8, 0.7)]
    rows = {"stacked": (jax.jit(stacked), ws), "two calls": (jax.jit(two_calls), ws),
            "grad stacked": (jax.jit(lambda xs, cs, ws, e: grad_of(stacked)(ws, xs, cs, e)), ws),
            "grad two calls": (jax.jit(lambda xs, cs, ws, e: grad_of(two_calls)(ws, xs, cs, e)), ws)}
    if kernels is not None:
        rows["dense scan"] = (jax.jit(dense_scan), kernels)
    out = {}
    for name, (fn, weights) in rows.items():
        seconds = median_time(fn, [(x, carries, weights, extra) for x in sets], reps)
        out[name] = round(seconds * 1e3, 4)
    out["two calls / stacked"] = round(out["two calls"] / out["stacked"], 3)
    out["grad two calls / stacked"] = round(out["grad two calls"] / out["grad stacked"], 3)
    if kernels is not None:
        out["dense / stacked"] = round(out["dense scan"] / out["stacked"], 3)
    out["one launch"] = pair_name in str(jax.make_jaxpr(stacked)(xs, carries, ws, extra))
    out["exchange"] = ws[0].meta.exchange
    return out


def main(argv=None) -> None:
    ap = layer_probe.parser(__doc__.split("\n")[0], dtype="float32")
    ap.add_argument("--cell", default="simple", choices=sorted(CALLS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args(argv)
    print(f"{args.cell} H={args.hidden} density={args.density} {args.dtype} T={args.steps}: "
          f"ms per call")
    layer_probe.sweep(args, "B", args.batches, lambda batch: measure(
        args.cell, args.hidden, args.density, args.dtype, batch, args.steps, args.reps))


if __name__ == "__main__":
    main()
