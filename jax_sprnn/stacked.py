"""Primitives that run several independent recurrences of one layout in one launch (issue 16).

* ``sprnn_forward_stack`` / ``sprnn_backward_stack``: P problems stacked on a leading axis, each
  with its own weights and direction, sharing the lengths (docs/format.md, "Stacked problems");
* ``sprnn_forward_pair`` / ``sprnn_backward_pair``: the two directions of a bidirectional layer,
  their operands side by side (what :mod:`jax_sprnn.bidirectional` binds).

On CUDA both are one launch of the simple cell's persistent targets (``problems`` = P); elsewhere,
and where the dispatch falls back, each problem is a call of the one-problem primitive of
:mod:`jax_sprnn.primitives`, on which this module builds. It also registers how ``jax.vmap`` over
weight sets of those primitives runs: the sets as the problems of one stacked call
(``primitives.WEIGHT_SET_RULES``), up to ``MAX_PROBLEMS`` sets that share their lengths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching, mlir

from . import _constants, _native, dispatch, fallback
from ._partitioning import SplitRule
from .dispatch import BACKWARD, FORWARD
from .planner import LayoutMeta
from .primitives import (_NOT_MAPPED, WEIGHT_SET_RULES, _backward_abstract, _drop_full_lengths,
                         _fold_batch, _forward_abstract, _hook_attrs, _make_primitive, _move,
                         _recurrence_attrs, _recurrence_call, _register_lowering, sprnn_backward_p,
                         sprnn_forward_p)

# ``sprnn_forward_stack``: ``(x [P, T, B, H], h0 [P, B, H], values [P, S], indices [P, S],
# lane_row [P, L], lengths [B]) -> (y [P, T, B, H], h_final [P, B, H])``, problem ``q`` being
# ``sprnn_forward(x[q], h0[q], values[q], indices[q], lane_row[q], lengths)`` run from the end where
# ``reverse[q]``; ``sprnn_backward_stack`` likewise. The problems share one layout ``meta`` (so one
# kernel instance runs them all) and the lengths. On CUDA the native path is one launch: cluster
# mode gives each problem its own clusters at once, grid mode runs them one after another. Its
# sequence operands are batch-major per problem ([P, B, T, H] in memory, the kernel's view of
# P * B examples); XLA transposes to that where a producer differs. Elsewhere, and where the
# dispatch falls back, each problem is a call of the one-problem primitive.

def _stack_shapes(name: str, seq_name: str, seq, h0, values, lane_row, reverse, meta: LayoutMeta):
    P = len(reverse)
    if (seq.ndim != 4 or seq.shape[0] != P or seq.shape[3] != meta.hidden
            or h0.shape != (P, seq.shape[2], meta.hidden)
            or values.ndim != 2 or values.shape[0] != P or lane_row.ndim != 2 or lane_row.shape[0] != P):
        raise ValueError(f"{name}: {seq_name} must be [{P}, T, B, {meta.hidden}], h0 "
                         f"[{P}, B, {meta.hidden}] and the layout's arrays [{P}, n] (one row per "
                         f"problem, {P} = len(reverse)), got {seq.shape}, {h0.shape}, "
                         f"{values.shape} and {lane_row.shape}")
    return (jax.core.ShapedArray(seq.shape, seq.dtype), jax.core.ShapedArray(h0.shape, seq.dtype))


def _forward_stack_abstract(x, h0, values, indices, lane_row, lengths, *, activation, reverse, meta,
                            method, full_lengths=False, **hooks):
    return _stack_shapes("sprnn_forward_stack", "x", x, h0, values, lane_row, reverse, meta)


def _backward_stack_abstract(y, h0, values_t, indices_t, lane_row_t, lengths, dy, dh_final, *,
                             activation, reverse, meta, method, **hooks):
    return _stack_shapes("sprnn_backward_stack", "y", y, h0, values_t, lane_row_t, reverse, meta)


# The operands' problem axes (None: shared by the problems) and the one-problem primitive.
_STACKED = {"forward": ((0, 0, 0, 0, 0, None), sprnn_forward_p),
            "backward": ((0, 0, 0, 0, 0, None, 0, 0), sprnn_backward_p)}


def _per_problem(kind: str, *args, reverse, full_lengths=False, **params):
    """A stacked call as one call of the one-problem primitive per problem (stacked results)."""
    axes, prim = _STACKED[kind]
    if kind == "forward":
        params["full_lengths"] = full_lengths
    outs = [prim.bind(*(a if ax is None else a[q] for a, ax in zip(args, axes)), reverse=bool(r),
                      **params)
            for q, r in enumerate(reverse)]
    return tuple(jnp.stack(o) for o in zip(*outs))


def _stack_fallback(kind: str):
    """The pure-JAX implementation: the one-problem fallback per problem."""
    impl = fallback.forward if kind == "forward" else fallback.backward
    axes, _ = _STACKED[kind]

    def run(*args, reverse, meta, activation, **hooks):
        outs = [impl(*(a if ax is None else a[q] for a, ax in zip(args, axes)),
                     activation=activation, reverse=bool(r), meta=meta)
                for q, r in enumerate(reverse)]
        return tuple(jnp.stack(o) for o in zip(*outs))
    return run


sprnn_forward_stack_p = _make_primitive(
    "sprnn_forward_stack", _forward_stack_abstract, _stack_fallback("forward"),
    SplitRule("p t b h, p b h, p s, p s, p l, b -> p t b h, p b h"))
sprnn_backward_stack_p = _make_primitive(
    "sprnn_backward_stack", _backward_stack_abstract, _stack_fallback("backward"),
    SplitRule("p t b h, p b h, p s, p s, p l, b, p t b h, p b h -> p t b h, p b h"))

# [P, T, B, H] laid out as [P, B, T, H] in memory (minor to major).
_STACK_BATCH_MAJOR_LAYOUT = (3, 1, 2, 0)


def _per_problem_lowering(kind: str):
    return mlir.lower_fun(functools.partial(_per_problem, kind), multiple_results=True)


def _stack_cuda(kind: str, ctx, *args, activation, reverse, meta, method, full_lengths=False,
                spin_timeout_us=0, debug_stall_cta=-1, grid_barrier=False, exchange_mode="auto"):
    """One launch for every problem where the dispatch takes the kernel for one of them, else a
    call per problem (each then falls back as it would alone)."""
    hooks = _hook_attrs(spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode)
    P, T, B, H = ctx.avals_in[0].shape
    target = FORWARD if kind == "forward" else BACKWARD
    decision = dispatch.on_cuda_recurrence(target, meta, B, ctx.avals_in[0].dtype, method)
    if decision.path == "fallback":
        params = dict(activation=activation, reverse=reverse, meta=meta, method=method, **hooks)
        if kind == "forward":
            params["full_lengths"] = full_lengths
        return _per_problem_lowering(kind)(ctx, *args, **params)
    _native.initialize_cuda()
    if full_lengths:
        ctx, args = _drop_full_lengths(ctx, args, 5)
    workspace = jax.core.ShapedArray((_constants.cuda_workspace_bytes(P * B, H),), np.uint8)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, workspace])
    attrs = _recurrence_attrs(activation=activation, reverse=False, meta=meta)
    attrs.update(reverse=np.int64(sum(1 << q for q, r in enumerate(reverse) if r)),
                 batch_major=np.int64(1), problems=np.int64(P))
    seq = _STACK_BATCH_MAJOR_LAYOUT
    # Sequence operands: x (forward); y, dy (backward). Results: y / dx.
    seq_operands = (0,) if kind == "forward" else (0, 6)
    layouts = dict(operand_layouts=[seq if i in seq_operands else None for i in range(len(args))],
                   result_layouts=[seq] + [None] * (len(ctx.avals_out) - 1))
    return _recurrence_call(ctx, target, args, attrs, hooks, layouts)


for _kind, _prim in (("forward", sprnn_forward_stack_p), ("backward", sprnn_backward_stack_p)):
    # (the CPU: one call of the one-problem primitive per problem, each dispatched as it would be)
    _register_lowering(_prim, _per_problem_lowering(_kind), "cpu")
    _register_lowering(_prim, functools.partial(_stack_cuda, _kind), "cuda")


# ``sprnn_forward_pair``: ``(x_f, x_b, h0_f, h0_b, values_f, values_b, indices_f, indices_b,
# lane_row_f, lane_row_b, lengths) -> (y_f, y_b, h_final_f, h_final_b)``: each operand of
# ``sprnn_forward`` once per problem, side by side, the shared lengths once; ``sprnn_backward_pair``
# likewise. What bidirectional.py binds: on CUDA its lowering stacks the operands and binds the
# stacked primitive (one launch; XLA fuses each stack into one copy), elsewhere it binds the
# one-problem primitive twice on the operands as they are (no copies).

def _pair_split(kind: str, args) -> list[tuple]:
    """A pair call's operands as each problem's operands of the one-problem primitive."""
    axes, _ = _STACKED[kind]
    it, per = iter(args), []
    for ax in axes:
        per.append((next(it), next(it)) if ax is not None else (next(it),) * 2)
    return [tuple(o[q] for o in per) for q in range(2)]


def _pair_join(outs) -> tuple:
    """Two problems' results ``(a, b)`` as the pair's ``(a_f, a_b, b_f, b_b)``."""
    return tuple(x for pair in zip(*outs) for x in pair)


def _pair_abstract(kind: str):
    one = _forward_abstract if kind == "forward" else _backward_abstract

    def abstract(*args, reverse, **params):
        return _pair_join(one(*a, reverse=r, **params) for a, r in zip(_pair_split(kind, args), reverse))
    return abstract


def _pair_fallback(kind: str):
    impl = fallback.forward if kind == "forward" else fallback.backward

    def run(*args, reverse, meta, activation, **hooks):
        return _pair_join(impl(*a, activation=activation, reverse=bool(r), meta=meta)
                          for a, r in zip(_pair_split(kind, args), reverse))
    return run


def _pair_calls(kind: str, *args, reverse, **params):
    """A pair as two calls of the one-problem primitive (``batch_major`` left to each)."""
    _, prim = _STACKED[kind]
    return _pair_join(prim.bind(*a, reverse=bool(r), **params)
                      for a, r in zip(_pair_split(kind, args), reverse))


def _pair_stacked(kind: str, *args, **params):
    """A pair as one call of the stacked primitive."""
    axes, _ = _STACKED[kind]
    problems = _pair_split(kind, args)
    stacked = [problems[0][i] if ax is None else jnp.stack([p[i] for p in problems])
               for i, ax in enumerate(axes)]
    prim = sprnn_forward_stack_p if kind == "forward" else sprnn_backward_stack_p
    outs = prim.bind(*stacked, **params)
    return _pair_join(tuple(zip(*(tuple(o) for o in outs))))


sprnn_forward_pair_p = _make_primitive(
    "sprnn_forward_pair", _pair_abstract("forward"), _pair_fallback("forward"),
    SplitRule("t b h, t b h, b h, b h, s, s, s, s, l, l, b -> t b h, t b h, b h, b h"))
sprnn_backward_pair_p = _make_primitive(
    "sprnn_backward_pair", _pair_abstract("backward"), _pair_fallback("backward"),
    SplitRule("t b h, t b h, b h, b h, s, s, s, s, l, l, b, t b h, t b h, b h, b h"
              " -> t b h, t b h, b h, b h"))
for _kind, _prim in (("forward", sprnn_forward_pair_p), ("backward", sprnn_backward_pair_p)):
    _register_lowering(_prim, mlir.lower_fun(functools.partial(_pair_calls, _kind),
                                             multiple_results=True), "cpu")
    _register_lowering(_prim, mlir.lower_fun(functools.partial(_pair_stacked, _kind),
                                             multiple_results=True), "cuda")


# ---------------------------------------------------------------------------------------------
# Batching: a vmapped axis of the sequences folds into each problem's batch; vmapped weight sets
# of the one-problem primitives, or of a pair, are the problems of one stacked call
# ---------------------------------------------------------------------------------------------

for _prim, _axes, _results in (
        (sprnn_forward_stack_p, (2, 1, None, None, None, 0), (2, 1)),
        (sprnn_backward_stack_p, (2, 1, None, None, None, 0, 2, 1), (2, 1))):
    batching.primitive_batchers[_prim] = functools.partial(_fold_batch, _prim, _axes, _results)


def _stacked_over_weights(kind: str, args, dims, params):
    """vmap with batched weights as one launch: the weight sets are the stacked primitive's
    problems (one layout, as vmapped weights have). None where that cannot be: more weight sets
    than one launch takes, or lengths that differ per set (the problems share theirs)."""
    axes, _ = _STACKED[kind]
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    if size > _constants.MAX_PROBLEMS or dims[axes.index(None)] is not _NOT_MAPPED:
        return None
    stacked = [a if ax is None else _move(a, d, size, 0) for a, d, ax in zip(args, dims, axes)]
    params = {k: v for k, v in params.items() if k != "batch_major"}  # (the stack's own layout)
    params["reverse"] = (bool(params["reverse"]),) * size
    prim = sprnn_forward_stack_p if kind == "forward" else sprnn_backward_stack_p
    outs = prim.bind(*stacked, **params)
    return outs, [0] * len(outs)


# A pair's batch axes (operands, results), as _fold_batch takes them.
_PAIR_AXES = {"forward": (sprnn_forward_pair_p, (1, 1, 0, 0) + (None,) * 6 + (0,), (1, 1, 0, 0)),
              "backward": (sprnn_backward_pair_p, (1, 1, 0, 0) + (None,) * 6 + (0, 1, 1, 0, 0),
                           (1, 1, 0, 0))}


def _pair_over_weights(kind: str, args, dims, params):
    """vmapped weights of a pair (an ensemble of bidirectional layers) as the 2P problems of one
    stacked call, the forward directions' sets first; None where they do not fit one call (more
    than MAX_PROBLEMS problems, or lengths that differ per set)."""
    axes, _ = _STACKED[kind]
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    problems, problem_dims = _pair_split(kind, args), _pair_split(kind, dims)
    if 2 * size > _constants.MAX_PROBLEMS or problem_dims[0][axes.index(None)] is not _NOT_MAPPED:
        return None
    stacked = [problems[0][i] if ax is None else
               jnp.concatenate([_move(p[i], d[i], size, 0) for p, d in zip(problems, problem_dims)])
               for i, ax in enumerate(axes)]
    reverse = tuple(bool(r) for r in params["reverse"] for _ in range(size))
    prim = sprnn_forward_stack_p if kind == "forward" else sprnn_backward_stack_p
    outs = prim.bind(*stacked, **dict(params, reverse=reverse))
    return tuple(part for o in outs for part in (o[:size], o[size:])), [0] * (2 * len(outs))


def _pair_batch(kind: str, args, dims, **params):
    """vmap of a pair: vmapped weights as one stacked call where they fit, else as _fold_batch
    does (a vmapped axis of the sequences folds into the batch; other vmapped weights loop)."""
    prim, batch_axes, result_axes = _PAIR_AXES[kind]
    if any(d is not _NOT_MAPPED for d, ax in zip(dims, batch_axes) if ax is None):
        done = _pair_over_weights(kind, args, dims, params)
        if done is not None:
            return done
    return _fold_batch(prim, batch_axes, result_axes, args, dims, **params)


for _kind, (_prim, _, _) in _PAIR_AXES.items():
    batching.primitive_batchers[_prim] = functools.partial(_pair_batch, _kind)


WEIGHT_SET_RULES[sprnn_forward_p] = functools.partial(_stacked_over_weights, "forward")
WEIGHT_SET_RULES[sprnn_backward_p] = functools.partial(_stacked_over_weights, "backward")

__all__ = ["sprnn_forward_stack_p", "sprnn_backward_stack_p", "sprnn_forward_pair_p",
           "sprnn_backward_pair_p"]
