"""Where a gated layer's training step goes: per-step slopes (µs, T1 -> T2) of its parts.

    python benchmarks/probes/gated_backward_step.py [--cell gru] [--hidden 1024] [--batch 4]
        [--density 0.1] [--dtype float16] [--out probe.json]

Rows (each a jitted function of the layer's operands, timed as benchmarks.timing does):

* ``forward``: ``sparse_lstm`` / ``sparse_gru`` with ``method="native"``;
* ``grad``: ``jax.grad`` of ``sum(outputs)`` through it (inputs, carry, values, hn_bias): the
  training step of the gated suite;
* ``backward kernel`` / ``backward xla scan``: the backward primitive alone on its step-ordered
  operands (``jax_sprnn.testing.gated_backward_problem``), native and the XLA scan it replaces.

``grad - forward - backward kernel`` is what XLA adds around the kernels (the recurrent products,
the LSTM's cell states, the weight gradient's einsum and gather). Needs a GPU for the native rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.append(str(Path(__file__).resolve().parents[2]))  # (after the installed jax_sprnn)

import jax_sprnn as js  # noqa: E402
from benchmarks.timing import median_time, per_step  # noqa: E402
from jax_sprnn.testing import gated_backward_problem, make_gated_problem, run_gated_backward  # noqa: E402


def layer_fns(gates: int):
    def forward(x, c0, h0, w, b):
        if gates == 4:
            return js.sparse_lstm(x, (c0, h0), w, method="native")[0]
        return js.sparse_gru(x, h0, w, hn_bias=b, method="native")[0]

    def loss(x, c0, h0, w, b):
        return jnp.sum(forward(x, c0, h0, w, b).astype(jnp.float32))
    return jax.jit(forward), jax.jit(js.grad(loss, argnums=(0, 1, 2, 3, 4)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cell", choices=("lstm", "gru"), default="gru")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--t1", type=int, default=64)
    p.add_argument("--t2", type=int, default=256)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    gates = 4 if a.cell == "lstm" else 3
    forward, grad = layer_fns(gates)

    def layer_args(T):
        w, x, c0, h0, b = make_gated_problem(1, gates, a.hidden, a.batch, T, a.density, a.dtype)
        return (x, c0, h0, w, b)

    def backward_args(T, xla):
        # (small cotangents: the random layer's gradients grow along the sequence, and a 16-bit
        # overflow would time the kernel's non-finite path)
        w, kernel, ops, lengths = gated_backward_problem(1, gates, a.hidden, a.batch, T, a.density,
                                                         a.dtype, cotangent_scale=1e-3)
        lengths = jnp.full_like(lengths, T)  # every example runs every step
        fn = jax.jit(lambda *o: run_gated_backward(gates, w, kernel, o, lengths, xla=xla,
                                                   method="native"))
        return fn, ops

    rows = {}
    for name, make in (("forward", lambda T: (forward, layer_args(T))),
                       ("grad", lambda T: (grad, layer_args(T))),
                       ("backward kernel", lambda T: backward_args(T, False)),
                       ("backward xla scan", lambda T: backward_args(T, True))):
        cache = {T: make(T) for T in (a.t1, a.t2)}
        rows[name] = per_step(lambda T, c=cache: median_time(c[T][0], [c[T][1]], a.reps), a.t1, a.t2)
        print(f"{name:18s} {rows[name]['us_per_step']:8.2f} us/step  fixed {rows[name]['fixed_us']:8.1f} us",
              flush=True)
    step = {name: row["us_per_step"] for name, row in rows.items()}
    rest = step["grad"] - step["forward"] - step["backward kernel"]
    print(f"{'around the kernels':18s} {rest:8.2f} us/step")
    if a.out:
        a.out.write_text(json.dumps(dict(args=vars(a) | {"out": str(a.out)}, rows=rows,
                                         device=str(jax.devices()[0]), jax=jax.__version__), indent=1))


if __name__ == "__main__":
    main()
