"""Small persistent-kernel runs, forward and jax.grad, for compute-sanitizer (tools/gpu_check.sh
sanitize): memcheck, racecheck, synccheck, initcheck.

  python tools/sanitizer_case.py [--cases small,wide] [--dtype all|float32|bfloat16|float16]
                                 [--skip N] [--count] [--u-through-fusion]

Cases:
  small  H=64, B=2, T=4 on the layout planned for this GPU (many one-warp CTAs), and H=128, B=3,
         T=4 planned for 4 SMs (4 CTAs of 4 warps, a register tier): the second is the one where
         racecheck sees several warps of one CTA share the state in shared memory.
  wide   the earlier memcheck trio, T=20: H=300 B=3 float16, H=97 B=1 float32, H=200 B=5 bfloat16.
  gated  the LSTM's and the GRU's forward kernels, then jax.grad through them (the LSTM's forward
         with its cell states, and both backward kernels): H=48 B=3 T=4 on this GPU's layout,
         H=96 B=5 T=6 planned for 4 SMs (cluster mode where the GPU has clusters).
  paired both directions of a bidirectional layer in one launch (sparse_rnn_bidirectional,
         sparse_lstm_bidirectional and sparse_gru_bidirectional on two weights of one layout),
         forward and jax.grad: H=64 B=3 T=4 and H=200 B=5 T=6 on this GPU's layout.
  grid   the grid's exchange through L2 on a GPU with clusters too (from_dense(exchange="grid"):
         every other case's layout is small enough for one cluster): the simple cell at H=128 B=3
         T=4 and H=300 B=5 T=6 (two planes a pass), the LSTM and the GRU at H=48 B=3 T=4 and
         H=96 B=5 T=6, forward and jax.grad.
  tiles  tile layouts on tensor cores (from_dense(matvec="tiles"), 16-bit dtypes only): the simple
         cell, the LSTM and the GRU, H=64 B=3 T=4 on this GPU's layout and H=128 B=9 T=5 planned
         for 4 SMs (cluster mode where the GPU has clusters; two planes a pass).
--u-through-fusion has an XLA loop fusion, not the product itself, write the gated backward's
recurrent products u (what the LSTM's backward kernel reads where initcheck reports uninitialized
loads, 2026-12-05/06): if the tool does not see the product's stores (TMA), the reports move from
the kernel to that fusion's loads; if they stay at the kernel, its loads are the fault.
Each case runs with traced lengths (an empty example when B > 2) and reverse when B is odd, checks
against the reference, and then polls the deferred kernel error. Exit status 1 on a wrong result.
Each run is named ("run i: ...") before it starts and draws its data from its own seed, so that
``--skip i`` resumes the list after a run that crashed the tool, on the same data.
"""

import argparse
import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_sprnn as js
from jax_sprnn.testing import (DTYPES, GRAD_TOLERANCE, TOLERANCE, make_gated_problem,
                               make_gated_twin_problem, make_twin_problem, rel_err, run_gated)
# (hidden, batch, steps, dtype or None for every selected one, SMs to plan for or None, cells)
SIMPLE, GATED, ALL = ("simple",), ("lstm", "gru"), ("simple", "lstm", "gru")
CASES = {
    "small": [(64, 2, 4, None, None, SIMPLE), (128, 3, 4, None, 4, SIMPLE)],
    "wide": [(300, 3, 20, "float16", None, SIMPLE), (97, 1, 20, "float32", None, SIMPLE),
             (200, 5, 20, "bfloat16", None, SIMPLE)],
    "gated": [(48, 3, 4, None, None, GATED), (96, 5, 6, None, 4, GATED)],
    "paired": [(64, 3, 4, None, None, ALL), (200, 5, 6, None, None, ALL)],
    "tiles": [(64, 3, 4, None, None, ALL), (128, 9, 5, None, 4, ALL)],
    "grid": [(128, 3, 4, None, None, SIMPLE), (300, 5, 6, None, None, SIMPLE),
             (48, 3, 4, None, None, GATED), (96, 5, 6, None, None, GATED)],
}


def run_case(rng, hidden, batch, steps, dtype, sms, matvec="auto", exchange="auto"):
    dt = DTYPES[dtype]
    device = js._native.current_device_spec()
    if sms:
        device = dataclasses.replace(device, sm_count=sms)
    kernel = rng.standard_normal((hidden, hidden)).astype(np.float32) / np.sqrt(0.2 * hidden)
    w = js.SparseWeights.from_dense(kernel, density=0.2, dtype=dt, device=device, matvec=matvec,
                                    exchange=exchange)
    x = jnp.asarray(rng.standard_normal((batch, steps, hidden)), dt)
    h0 = jnp.asarray(rng.standard_normal((batch, hidden)) * 0.5, dt)
    lengths = rng.integers(0, steps + 1, size=batch).astype(np.int32)
    lengths[0] = steps
    if batch > 2:
        lengths[-1] = 0
    lengths = jnp.asarray(lengths)
    kw = dict(activation="tanh", reverse=bool(batch % 2))

    def loss(x, h0, values, lengths, w, method):
        y, h = js.sparse_rnn(x, h0, w.replace(values=values), seq_lengths=lengths, method=method,
                             **kw)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h.astype(jnp.float32))

    y, h = jax.jit(lambda x, h0, n: js.sparse_rnn(x, h0, w, seq_lengths=n, method="native", **kw))(
        x, h0, lengths)
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=5)(
        x, h0, w.values, lengths, w, "native")
    # The references run on the CPU, so that the tools instrument our kernels rather than cuBLAS
    # and cuDNN (synccheck and initcheck crashed in a run whose references used them).
    cpu = jax.devices("cpu")[0]
    xc, hc, nc, wc = jax.device_put((x, h0, lengths, w), cpu)
    with jax.default_device(cpu):
        y_ref, h_ref = js.reference_rnn(xc, hc, wc.to_dense(), seq_lengths=nc, **kw)
        g_ref = jax.grad(loss, argnums=(0, 1, 2))(xc, hc, wc.values, nc, wc, "reference")
    finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in (y, h, *g))
    if finite:  # rel_err refuses non-finite outputs
        errs = [rel_err(y, y_ref), rel_err(h, h_ref)] + [rel_err(a, b) for a, b in zip(g, g_ref)]
    else:
        errs = [float("nan")] * (2 + len(g))
    ok = finite and max(errs[:2]) < TOLERANCE[dtype] and max(errs[2:]) < GRAD_TOLERANCE[dtype]
    print(f"{'tiles ' if w.meta.tiles else ''}H={hidden} B={batch} T={steps} {dtype} ctas={w.meta.num_ctas} "
          f"warps/cta={w.meta.warps_per_cta} reg_slots={w.meta.reg_slots} exchange={w.meta.exchange}: "
          f"forward rel_err "
          f"{max(errs[:2]):.3g}, grad rel_err {max(errs[2:]):.3g}{'' if finite else ', NON-FINITE'}"
          f" -> {'ok' if ok else 'WRONG'}", flush=True)
    return ok


def run_gated_case(rng, gates, hidden, batch, steps, dtype, sms, matvec="auto", exchange="auto"):
    """The forward kernel of the LSTM (gates=4) or the GRU (3), and the gradients through the
    forward and backward kernels, against the reference on the CPU."""
    device = js._native.current_device_spec()
    if sms:
        device = dataclasses.replace(device, sm_count=sms)
    w, x, c0, h0, b_hn = make_gated_problem(int(rng.integers(1 << 30)), gates, hidden, batch, steps,
                                            0.2, dtype, device=device, matvec=matvec,
                                            exchange=exchange)
    lengths = rng.integers(0, steps + 1, size=batch).astype(np.int32)
    lengths[0] = steps
    if batch > 2:
        lengths[-1] = 0
    reverse = bool(batch % 2)

    def run(x, c0, h0, w, b_hn, n, method):
        return run_gated(gates, x, c0, h0, w, b_hn, seq_lengths=n, reverse=reverse, method=method)

    got = jax.jit(lambda *a: run(*a, "native"))(x, c0, h0, w, b_hn, jnp.asarray(lengths))
    cpu = jax.devices("cpu")[0]
    args = jax.device_put((x, c0, h0, w, b_hn, jnp.asarray(lengths)), cpu)
    with jax.default_device(cpu):
        want = run(*args, "reference")
    finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in got)
    err = max(rel_err(a, b) for a, b in zip(got, want)) if finite else float("nan")

    def loss(x, c0, h0, w, b_hn, n, method):
        return sum(jnp.sum(a.astype(jnp.float32) ** 2) for a in run(x, c0, h0, w, b_hn, n, method))
    grad = js.grad(loss, argnums=(0, 1, 2, 3, 4))
    g_got = jax.jit(lambda *a: grad(*a, "native"))(x, c0, h0, w, b_hn, jnp.asarray(lengths))
    with jax.default_device(cpu):
        g_want = grad(*args, "reference")
    g_err = max(rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_got),
                                               jax.tree_util.tree_leaves(g_want))
                if a.dtype != jax.dtypes.float0)
    ok = finite and err < TOLERANCE[dtype] and g_err < GRAD_TOLERANCE[dtype]
    print(f"{'tiles ' if w.meta.tiles else ''}{'LSTM' if gates == 4 else 'GRU'} H={hidden} B={batch} "
          f"T={steps} {dtype} "
          f"ctas={w.meta.num_ctas}/{w.meta_t.num_ctas} exchange={w.meta.exchange}/{w.meta_t.exchange}: "
          f"forward rel_err {err:.3g}{'' if finite else ', NON-FINITE'}, grad rel_err {g_err:.3g} "
          f"-> {'ok' if ok else 'WRONG'}", flush=True)
    return ok


def _paired_problem(rng, cell: str, hidden, batch, steps, dtype):
    """``(call, directions)``: both directions' weights and operands (one layout), and
    ``call(directions, lengths, method)``, the cell's bidirectional function on them."""
    seed = int(rng.integers(1 << 30))
    if cell == "simple":
        (_, w_f, x_f, h_f), (_, w_b, x_b, h_b) = make_twin_problem(seed, hidden, batch, steps, 0.2, dtype)

        def call(d, n, method):
            (w_f, x_f, h_f), (w_b, x_b, h_b) = d
            return js.sparse_rnn_bidirectional((x_f, x_b), (h_f, h_b), (w_f, w_b), seq_lengths=n,
                                               method=method)
        return call, ((w_f, x_f, h_f), (w_b, x_b, h_b))
    fwd, bwd = make_gated_twin_problem(seed, 4 if cell == "lstm" else 3, hidden, batch, steps, 0.2,
                                       dtype)

    def call(d, n, method):
        (w_f, x_f, c_f, h_f, b_f), (w_b, x_b, c_b, h_b, b_b) = d
        if cell == "lstm":
            return js.sparse_lstm_bidirectional((x_f, x_b), ((c_f, h_f), (c_b, h_b)), (w_f, w_b),
                                                seq_lengths=n, method=method)
        return js.sparse_gru_bidirectional((x_f, x_b), (h_f, h_b), (w_f, w_b), hn_bias=(b_f, b_b),
                                           seq_lengths=n, method=method)
    return call, (fwd, bwd)


def run_paired_case(rng, cell, hidden, batch, steps, dtype):
    """A bidirectional layer's forward and gradients (one paired launch forward; the simple cell's
    backward recurrence paired too) against the reference on the CPU."""
    call, directions = _paired_problem(rng, cell, hidden, batch, steps, dtype)
    lengths = rng.integers(0, steps + 1, size=batch).astype(np.int32)
    lengths[0] = steps
    lengths[-1] = 0
    lengths = jnp.asarray(lengths)

    def loss(d, n, method):
        y, states = call(d, n, method)
        return jnp.sum(y.astype(jnp.float32) ** 2) + sum(jnp.sum(a.astype(jnp.float32))
                                                          for a in jax.tree_util.tree_leaves(states))

    got = jax.tree_util.tree_leaves(jax.jit(lambda d, n: call(d, n, "native"))(directions, lengths))
    grad = js.grad(loss)
    g_got = [g for g in jax.tree_util.tree_leaves(jax.jit(lambda d, n: grad(d, n, "native"))(
        directions, lengths)) if g.dtype != jax.dtypes.float0]
    cpu = jax.devices("cpu")[0]
    cargs = jax.device_put((directions, lengths), cpu)
    with jax.default_device(cpu):
        want = jax.tree_util.tree_leaves(call(*cargs, "reference"))
        g_want = [g for g in jax.tree_util.tree_leaves(grad(*cargs, "reference"))
                  if g.dtype != jax.dtypes.float0]
    finite = all(bool(np.all(np.isfinite(np.asarray(a, np.float32)))) for a in got + g_got)
    err = max(rel_err(a, b) for a, b in zip(got, want)) if finite else float("nan")
    g_err = max(rel_err(a, b) for a, b in zip(g_got, g_want)) if finite else float("nan")
    ok = finite and err < TOLERANCE[dtype] and g_err < GRAD_TOLERANCE[dtype]
    meta = directions[0][0].meta
    print(f"paired {cell} H={hidden} B={batch} T={steps} {dtype} ctas={meta.num_ctas} "
          f"exchange={meta.exchange}: forward rel_err {err:.3g}, grad rel_err {g_err:.3g}"
          f"{'' if finite else ', NON-FINITE'} -> {'ok' if ok else 'WRONG'}", flush=True)
    return ok


def planned_runs(cases: str, dtypes: list[str]) -> list[tuple[str, callable]]:
    """``(label, run(rng) -> ok)`` for every run of the selected cases, in order."""
    runs = []
    for name in cases.split(","):
        if name not in CASES:
            raise SystemExit(f"--cases: unknown case {name!r}; expected some of {', '.join(CASES)}")
        for hidden, batch, steps, dtype, sms, cells in CASES[name]:
            for dt in ([dtype] if dtype else dtypes):
                if dt not in dtypes or (name == "tiles" and dt == "float32"):  # (tiles are 16-bit)
                    continue
                shape = f"H={hidden} B={batch} T={steps} {dt}"
                size = dict(hidden=hidden, batch=batch, steps=steps, dtype=dt)
                options = dict(sms=sms, matvec="tiles" if name == "tiles" else "auto",
                               exchange="grid" if name == "grid" else "auto")
                for cell in cells:
                    if name == "paired":
                        run = functools.partial(run_paired_case, cell=cell, **size)
                    elif cell == "simple":
                        run = functools.partial(run_case, **size, **options)
                    else:
                        run = functools.partial(run_gated_case, gates=4 if cell == "lstm" else 3,
                                                **size, **options)
                    runs.append((f"{name} {cell} {shape}", run))
    return runs


def route_u_through_a_fusion() -> None:
    """u = the product, then an elementwise op that XLA cannot fold into it (nor, with Triton's
    GEMMs off, fuse with it): the backward kernel then reads a buffer that a plain loop fusion wrote.
    The values are the same (u is finite in every case here)."""
    from jax_sprnn import fallback

    product = fallback.storage_matvec

    def storage_matvec(kernel, dtype):
        matvec = product(kernel, dtype)

        def routed(h):
            u = matvec(h)
            return jnp.where(jnp.isnan(u), jnp.zeros_like(u), u)

        return routed

    fallback.storage_matvec = storage_matvec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="small,wide",
                   help="comma-separated: small, wide, gated, paired, tiles, grid")
    p.add_argument("--dtype", default="all", choices=("all", *DTYPES))
    p.add_argument("--skip", type=int, default=0,
                   help="skip the first N runs (tools/gpu_check.sh resumes after a tool's crash)")
    p.add_argument("--count", action="store_true", help="print the number of runs and exit")
    p.add_argument("--u-through-fusion", action="store_true",
                   help="the gated backward's u written by an elementwise fusion after the product")
    a = p.parse_args(argv)
    if a.u_through_fusion:
        route_u_through_a_fusion()
    runs = planned_runs(a.cases, list(DTYPES) if a.dtype == "all" else [a.dtype])
    if a.count:
        print(len(runs))
        return 0
    ok = True
    for i, (label, run) in enumerate(runs):
        if i < a.skip:
            continue
        # Named before it starts, so that a crash of the tool is attributed to its run.
        print(f"run {i}: {label}", flush=True)
        ok &= run(np.random.default_rng(i))
    cuda = js._native.cuda_module()
    if cuda is not None and jax.default_backend() == "gpu":
        error = cuda.pending_error()
        print("pending kernel error:", repr(error))
        if error:  # a timeout here under a slow tool is the tool's slowdown, not a wrong result
            ok = False
    print("sanitizer case", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
