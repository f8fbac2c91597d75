"""Several weight sets of one layer (an ensemble under ``jax.vmap``) as one launch, against one
launch per set, in one run.

    python benchmarks/probes/weight_sets.py [--hidden 256] [--density 0.1] [--dtype float16]
        [--sets 2 4 8] [--batch 4] [--steps 250] [--reps 30] [--out probe.json]

Per number of sets P, on P value sets of one pattern and the same inputs (milliseconds per call
of T steps, ``benchmarks.timing.median_time``: the host clock around groups of back-to-back calls):

* ``one launch``: ``jax.vmap`` of ``sparse_rnn`` over the weights, which binds the stacked
  primitive (P problems, each on its own clusters);
* ``a launch per set``: the same P calls unrolled in one jitted program, one after another;
* ``dense scan``: ``jax.vmap`` of the dense ``lax.scan`` (``reference_rnn``) over the kernels.
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
from jax_sprnn.testing import make_problem  # noqa: E402


def measure(hidden, density, dtype, sets, batch, steps, reps) -> dict:
    dense, w, x, h0 = make_problem(hidden + sets, hidden, batch, steps, density, dtype)
    scales = jnp.linspace(1.0, -1.0, sets).astype(w.values.dtype)
    ws = jax.tree_util.tree_map(lambda a: jnp.stack([a] * sets), w)
    ws = ws.replace(values=ws.values * scales[:, None])
    kernels = jnp.asarray(dense, x.dtype)[None] * scales[:, None, None]

    def one(w, x):
        return js.sparse_rnn(x, h0, w)[0]

    def per_set(ws, x):
        return jnp.stack([one(jax.tree_util.tree_map(lambda a, i=i: a[i], ws), x)
                          for i in range(sets)])

    def dense_scan(ks, x):
        return jax.vmap(lambda k: js.reference_rnn(x, h0, k)[0])(ks)

    rows = {"one launch": (jax.jit(jax.vmap(one, in_axes=(0, None))), ws),
            "a launch per set": (jax.jit(per_set), ws), "dense scan": (jax.jit(dense_scan), kernels)}
    inputs = [x * s for s in (1.0, 0.9, 0.8, 0.7)]
    out = {name: round(median_time(fn, [(arg, xi) for xi in inputs], reps) * 1e3, 4)
           for name, (fn, arg) in rows.items()}
    out["per set / one"] = round(out["a launch per set"] / out["one launch"], 3)
    out["dense / one"] = round(out["dense scan"] / out["one launch"], 3)
    out["stacked"] = "sprnn_forward_stack" in str(jax.make_jaxpr(jax.vmap(one, in_axes=(0, None)))(ws, x))
    out["exchange"] = w.meta.exchange
    return out


def main(argv=None) -> None:
    ap = layer_probe.parser(__doc__.split("\n")[0], dtype="float16")
    ap.add_argument("--sets", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    print(f"H={args.hidden} density={args.density} {args.dtype} B={args.batch} T={args.steps}: "
          f"ms per call")
    layer_probe.sweep(args, "P", args.sets, lambda sets: measure(
        args.hidden, args.density, args.dtype, sets, args.batch, args.steps, args.reps))


if __name__ == "__main__":
    main()
