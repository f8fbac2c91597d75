"""One persistent-kernel configuration, run a few times, for Nsight Compute (tools/gpu_check.sh profile).

    python3 tools/profile_case.py CELL HIDDEN DENSITY BATCH DTYPE STEPS [ctas=N] [k=K] [plan=B]

CELL is simple, tiles (the simple cell on its tile layout: tensor cores), bidir (both directions
of a bidirectional layer of one layout: one paired launch where the layout runs in cluster mode,
one launch per direction in grid mode), lstm, gru, or bilstm / bigru (a gated bidirectional layer,
paired likewise), or simple_bwd, lstm_bwd, gru_bwd (the cell's backward recurrence alone, one
launch of the backward kernel on the layer's transposed layout, from stand-in residuals).
``ctas=N`` (simple, tiles, lstm, gru and their backward cases) packs the layer for a GPU of N SMs
without clusters, a layout of at most N CTAs that runs in cluster mode on this one (the cluster
suite's nN columns); by default the planner packs it for this GPU. ``k=K`` (with or without
``ctas``) holds the planner to K slots a lane (so that a layout sweep can time layouts the cost
model would not pick). ``plan=B`` (likewise) packs the layout planned for a batch of
B (``SparseWeights.from_dense(batch=B)``). The call runs four times (ncu skips
the first two launches, which include compilation and warm-up).
"""
import contextlib
import dataclasses
import functools
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import jax_sprnn as js
from jax_sprnn import layout, planner, testing
from jax_sprnn.primitives import sprnn_backward_p

GATES = {"lstm": 4, "gru": 3}
#: The CELL names a case takes.
CELLS = ("simple", "tiles", "bidir", "lstm", "gru", "bilstm", "bigru", "simple_bwd", "lstm_bwd", "gru_bwd")


def device_of(ctas: int | None):
    """The device to pack for: this GPU (None), or one of ``ctas`` SMs without clusters."""
    if ctas is None:
        return None
    return dataclasses.replace(js._native.current_device_spec(), sm_count=ctas, cluster_launch=False)


def simple_call(hidden, density, batch, dtype, steps, matvec="auto", ctas=None, plan=None):
    rng = np.random.default_rng(0)
    kernel = (rng.standard_normal((hidden, hidden)) / np.sqrt(density * hidden)).astype(np.float32)
    w = js.SparseWeights.from_dense(kernel, density=density, dtype=jnp.dtype(dtype), matvec=matvec,
                                    device=device_of(ctas), batch=plan)
    if not w.meta.fits:
        raise SystemExit(f"ctas={ctas}: the layer does not fit ({w.meta.reason})")
    x = jnp.asarray(rng.standard_normal((batch, steps, hidden)), dtype)
    h0 = jnp.zeros((batch, hidden), dtype)
    return w, jax.jit(lambda: js.sparse_rnn(x, h0, w, method="native"))


def gated_call(gates, hidden, density, batch, dtype, steps, ctas=None, plan=None):
    w, x, c0, h0, hn_bias = testing.make_gated_problem(0, gates, hidden, batch, steps, density, dtype,
                                                       device=device_of(ctas), plan_batch=plan)
    if not w.meta.fits:
        raise SystemExit(f"ctas={ctas}: the layer does not fit ({w.meta.reason})")
    return w, jax.jit(lambda: testing.run_gated(gates, x, c0, h0, w, hn_bias, method="native"))


def simple_backward_args(w, batch, dtype, steps) -> tuple:
    """``sprnn_backward``'s operands for layer ``w``: tanh of random values stands in for the
    forward outputs (the kernel's work does not depend on them), every sequence full length."""
    rng = np.random.default_rng(1)
    hidden = w.meta.num_cols
    y = jnp.tanh(jnp.asarray(rng.standard_normal((steps, batch, hidden)), dtype))
    dy = jnp.asarray(rng.standard_normal((steps, batch, hidden)) * 0.3, dtype)
    h0 = jnp.zeros((batch, hidden), dtype)
    lengths = jnp.full((batch,), steps, jnp.int32)
    return y, h0, w.transposed_values(), w.indices_t, w.lane_row_t, lengths, dy, jnp.zeros_like(h0)


def simple_backward_call(hidden, density, batch, dtype, steps, ctas=None, plan=None):
    """The simple cell's backward recurrence alone, on :func:`simple_backward_args`."""
    w, _ = simple_call(hidden, density, batch, dtype, steps, "auto", ctas, plan)
    args = simple_backward_args(w, batch, dtype, steps)
    return w, jax.jit(lambda: sprnn_backward_p.bind(*args, activation="tanh", reverse=False,
                                                    meta=w.meta_t, method="native"))


def gated_backward_call(gates, hidden, density, batch, dtype, steps, ctas=None, plan=None):
    """A gated cell's backward recurrence alone, on the residuals of a real forward pass."""
    w, kernel, operands, lengths = testing.gated_backward_problem(
        0, gates, hidden, batch, steps, density, dtype, device=device_of(ctas), plan_batch=plan)
    if not w.meta.fits:
        raise SystemExit(f"ctas={ctas}: the layer does not fit ({w.meta.reason})")
    return w, jax.jit(lambda: testing.run_gated_backward(gates, w, kernel, operands, lengths,
                                                         method="native"))


def bidir_call(hidden, density, batch, dtype, steps):
    (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = testing.make_twin_problem(0, hidden, batch, steps,
                                                                       density, dtype)
    return w_f, jax.jit(lambda: js.sparse_rnn_bidirectional((x_f, x_b), (h_f, h_b), (w_f, w_b),
                                                            method="native"))


def gated_bidir_call(gates, hidden, density, batch, dtype, steps):
    fwd, bwd = testing.make_gated_twin_problem(0, gates, hidden, batch, steps, density, dtype)
    (w_f, x_f, c_f, h_f, b_f), (w_b, x_b, c_b, h_b, b_b) = fwd, bwd
    if gates == 4:
        return w_f, jax.jit(lambda: js.sparse_lstm_bidirectional(
            (x_f, x_b), ((c_f, h_f), (c_b, h_b)), (w_f, w_b), method="native"))
    return w_f, jax.jit(lambda: js.sparse_gru_bidirectional(
        (x_f, x_b), (h_f, h_b), (w_f, w_b), hn_bias=(b_f, b_b), method="native"))


def case_call(cell, hidden, density, batch, dtype, steps, ctas=None, plan=None):
    """``(weights, f)``: the case's weights and a jitted call of it, one persistent launch."""
    if cell == "simple_bwd":
        return simple_backward_call(hidden, density, batch, dtype, steps, ctas, plan)
    if cell.endswith("_bwd") and cell[:-4] in GATES:
        return gated_backward_call(GATES[cell[:-4]], hidden, density, batch, dtype, steps, ctas, plan)
    if cell in ("simple", "tiles"):
        return simple_call(hidden, density, batch, dtype, steps, "tiles" if cell == "tiles" else "auto",
                           ctas, plan)
    if (ctas is not None or plan is not None) and cell not in GATES:
        raise SystemExit(f"ctas= and plan= apply to simple, tiles, lstm and gru, not {cell!r}")
    if cell == "bidir":
        return bidir_call(hidden, density, batch, dtype, steps)
    if cell.startswith("bi") and cell[2:] in GATES:
        return gated_bidir_call(GATES[cell[2:]], hidden, density, batch, dtype, steps)
    if cell not in GATES:
        raise SystemExit(f"CELL must be one of {', '.join(CELLS)}, got {cell!r}")
    return gated_call(GATES[cell], hidden, density, batch, dtype, steps, ctas, plan)


def parse_options(options: list[str]) -> dict[str, int]:
    """A case's trailing options, ``ctas=N``, ``k=K`` and ``plan=B``, as ``{"ctas": N, "k": K,
    "plan": B}``."""
    found = {}
    for opt in options:
        key, _, value = opt.partition("=")
        if key not in ("ctas", "k", "plan") or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"unknown case option {opt!r} (expected ctas=N, k=K or plan=B, each >= 1)")
        found[key] = int(value)
    if "k" in found and found["k"] not in planner.SLOT_SIZES:
        raise SystemExit(f"k={found['k']}: the kernels take K in {planner.SLOT_SIZES}")
    return found


def slots_per_lane(k: int | None):
    """A context in which the planner considers only ``k`` slots a lane (every K when None).
    (The probe's own lever: ``SparseWeights.from_dense`` has no such option for users.)"""
    if k is None:
        return contextlib.nullcontext()
    return mock.patch.object(layout, "plan_layout", functools.partial(planner.plan_layout, slot_sizes=(k,)))


def option_call(cell, hidden, density, batch, dtype, steps, options: list[str]):
    """:func:`case_call` with a case's trailing options applied."""
    opts = parse_options(options)
    with slots_per_lane(opts.get("k")):
        return case_call(cell, hidden, density, batch, dtype, steps, opts.get("ctas"), opts.get("plan"))


def main(argv):
    cell, hidden, density, batch, dtype, steps = (argv[0], int(argv[1]), float(argv[2]), int(argv[3]),
                                                  argv[4], int(argv[5]))
    w, f = option_call(cell, hidden, density, batch, dtype, steps, argv[6:])
    print(cell, w, flush=True)
    for _ in range(4):
        jax.block_until_ready(f())


if __name__ == "__main__":
    main(sys.argv[1:])
