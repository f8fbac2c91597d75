"""Inference timing: the recurrent layers and the whole model, sparse (packed, ``sparse_rnn``) against
dense (``nn.RNN`` of the same cells: a ``lax.scan`` of dense matmuls), at several batch sizes and
densities.

Timing: the functions of a table are jitted and compiled together first (in parallel threads),
then each is run once and called ``reps`` times on inputs that rotate among three arrays (so no
cache keeps a result warm), each call waited for with ``block_until_ready``; the figure is the
median wall time per call. On a GPU that is the device time plus one dispatch.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_sprnn import pruning

from . import model as model_lib
from .profiling import compile_all


def median_ms(fn, inputs: list, reps: int) -> float:
    """Median milliseconds per call of ``fn(*inputs[i % len(inputs)])`` after one warm-up call."""
    jax.block_until_ready(fn(*inputs[0]))
    times = []
    for i in range(reps):
        args = inputs[i % len(inputs)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _pruned(params, density: float, seed: int = 0):
    """``params`` (cell form) with every recurrent kernel magnitude-pruned to ``density``
    (row-balanced), and the boolean masks."""
    masks = model_lib.dense_masks(params)
    if density >= 1.0:
        return params, masks
    return pruning.update_sparsity(params, masks, 1.0 - density)


def _stack_input_features(config: model_lib.ModelConfig) -> int:
    """Width of the recurrent stack's input: the flattened output of the two convolutions."""
    freq = config.n_mels
    for _ in range(2):
        freq = -(-freq // 2)
    return freq * config.conv_channels


def recurrent_stack_variables(config: model_lib.ModelConfig, density: float, *, seed: int = 0,
                              params=None):
    """``(dense, sparse)``: callables ``f(x, lengths)`` of the recurrent stack (cell form with
    pruned weights as zeros, and the packed layer form), jitted. ``params``: a trained model's
    params (cell form); default random ones."""
    cell_cfg = dataclasses.replace(config, rnn_impl="cell")
    stack = model_lib.RecurrentStack(cell_cfg)
    if params is None:
        x = jnp.zeros((1, 8, _stack_input_features(config)), jnp.float32)
        params = stack.init(jax.random.key(seed), x, jnp.array([8]))["params"]
    params, masks = _pruned(params, density, seed)
    layer_cfg, packed = model_lib.export(cell_cfg, {"rnn": params}, {"rnn": masks},
                                         method=config.method)
    sparse_stack = model_lib.RecurrentStack(layer_cfg)
    sparse_vars = {"params": packed["params"]["rnn"],
                   pruning.COLLECTION: packed[pruning.COLLECTION]["rnn"]}
    dense = jax.jit(lambda x, n: stack.apply({"params": params}, x, n))
    sparse = jax.jit(lambda x, n: sparse_stack.apply(sparse_vars, x, n))
    return dense, sparse


def random_whole_model(config: model_lib.ModelConfig, density: float, *, seed: int = 0) -> tuple:
    """``(dense_config, dense_variables, sparse_config, sparse_variables)`` of an untrained model
    (random weights, recurrent kernels magnitude-pruned to ``density`` for the sparse one): what
    ``speed_table(whole_model=...)`` times when no trained model is at hand (timing does not
    depend on the values)."""
    cell_cfg = dataclasses.replace(config, rnn_impl="cell")
    params = model_lib.init_variables(cell_cfg, jax.random.key(seed))["params"]
    pruned, masks = _pruned(params, density, seed)
    sparse_cfg, sparse_vars = model_lib.export(cell_cfg, pruned, masks, method=config.method)
    return cell_cfg, {"params": params}, sparse_cfg, sparse_vars


def _inputs(batch: int, steps: int, width: int, dtype, count: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.standard_normal((batch, steps, width)), dtype),
             jnp.full((batch,), steps, jnp.int32)) for _ in range(count)]


def recurrent_latency(config: model_lib.ModelConfig, densities, batch: int, steps: int, *,
                      reps: int = 10, params=None) -> dict:
    """Milliseconds per call of the recurrent stack: ``{"dense_scan": ms, "sparse": {density: ms}}``
    (``None`` where the sparse layer cannot run, e.g. ``method="native"`` and it does not fit)."""
    inputs = _inputs(batch, steps, _stack_input_features(config), jnp.float32)
    stacks = [recurrent_stack_variables(config, d, params=params) for d in densities]
    jobs = [(stacks[0][0], inputs[0])] + [(sparse, inputs[0]) for _, sparse in stacks]
    dense, *sparse = compile_all(jobs, return_errors=True)
    out = {"sparse": {}, "dense_scan": median_ms(_raise(dense), inputs, reps)}
    for d, fn in zip(densities, sparse):
        out["sparse"][f"{d:g}"] = _try_ms(fn, inputs, reps, f"density {d:g}: ")
    return out


def speed_table(config: model_lib.ModelConfig, density: float, batches, steps: int, *,
                reps: int = 20, whole_model: tuple | None = None) -> list[dict]:
    """Rows ``{batch, part, dense_ms, sparse_ms, speedup}`` for the recurrent layers (random
    weights pruned to ``density``) and, with ``whole_model=(config, dense_variables,
    sparse_config, sparse_variables)``, the whole model from log-mel features to logits."""
    parts = [("recurrent layers", *recurrent_stack_variables(config, density),
              _stack_input_features(config), steps)]
    if whole_model is not None:
        dense_cfg, dense_vars, sparse_cfg, sparse_vars = whole_model
        parts.append(("whole model",
                      jax.jit(lambda x, n: model_lib.SpeechModel(dense_cfg).apply(dense_vars, x, n)),
                      jax.jit(lambda x, n: model_lib.SpeechModel(sparse_cfg).apply(sparse_vars, x,
                                                                                     n)),
                      config.n_mels, steps * config.time_stride))
    cases = [(part, b, dense, sparse, _inputs(b, length, width, jnp.float32))
             for part, dense, sparse, width, length in parts for b in batches]
    jobs = [job for _, _, dense, sparse, inputs in cases
            for job in ((dense, inputs[0]), (sparse, inputs[0]))]
    compiled = compile_all(jobs, return_errors=True)
    return [_row(b, part, median_ms(_raise(compiled[2 * i]), inputs, reps),
                 _try_ms(compiled[2 * i + 1], inputs, reps))
            for i, (part, b, _, _, inputs) in enumerate(cases)]


def _raise(fn):
    if isinstance(fn, Exception):
        raise fn
    return fn


def _try_ms(fn, inputs, reps, what: str = ""):
    """Milliseconds per call, or None (reported) where the sparse layer did not compile or run,
    e.g. ``method="native"`` for a layer that does not fit."""
    try:
        return median_ms(_raise(fn), inputs, reps)
    except Exception as e:
        print(f"  {what}sparse layer did not run ({type(e).__name__}: {e})")
        return None


def _row(batch, part, dense_ms, sparse_ms) -> dict:
    return {"batch": batch, "part": part, "dense_scan_ms": round(dense_ms, 4),
            "sparse_ms": None if sparse_ms is None else round(sparse_ms, 4),
            "speedup": None if not sparse_ms else round(dense_ms / sparse_ms, 3)}


def format_table(rows: list[dict], title: str) -> str:
    """A Markdown table of :func:`speed_table` rows."""
    lines = [title, "", "| part | batch | dense lax.scan (ms) | sparse (ms) | speed-up |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        sparse = "n/a" if r["sparse_ms"] is None else f"{r['sparse_ms']:.3f}"
        speedup = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['part']} | {r['batch']} | {r['dense_scan_ms']:.3f} | {sparse} | "
                     f"{speedup} |")
    return "\n".join(lines)


def device_description() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
            "jax": jax.__version__}
