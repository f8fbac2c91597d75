"""Primitives that run several independent recurrences of one layout in one launch (issue 16).

* ``sprnn_<kind>_stack``: P problems stacked on a leading axis, each with its own weights and
  direction, sharing the lengths (docs/format.md, "Stacked problems"); the kinds are the simple
  cell's ``forward`` and ``backward`` recurrences and the gated cells' forward (``lstm``,
  ``lstm_with_cells``, ``gru``) and backward (``lstm_backward``, ``gru_backward``: in step order,
  never reversed) recurrences;
* ``sprnn_<kind>_pair``: the two directions of a bidirectional layer, their operands side by side
  (what :mod:`jax_sprnn.bidirectional` binds).

On CUDA both are one launch of the kind's persistent target (``problems`` = P); elsewhere, and
where the dispatch falls back, each problem is a call of the one-problem primitive of
:mod:`jax_sprnn.primitives`, on which this module builds. It also registers how ``jax.vmap`` over
weight sets of those primitives runs: the sets as the problems of one stacked call
(``primitives.WEIGHT_SET_RULES``), up to ``MAX_PROBLEMS`` sets that share their lengths.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from . import _constants, _native, dispatch, fallback
from ._partitioning import SplitRule
from .dispatch import BACKWARD, FORWARD, GATED_BACKWARD, GATED_FORWARD
from .primitives import (_BACKWARD_GATES, _GATES, _HOOK_DEFAULTS, _HOOKED_TARGETS, _NOT_MAPPED,
                         _SPLITS, WEIGHT_SET_RULES, _backward_abstract, _drop_full_lengths,
                         _fold_batch, _forward_abstract, _gated_attrs, _gated_backward_attrs,
                         _gated_backward_call, _gated_target_call, _gru_abstract,
                         _gru_backward_abstract, _gru_backward_fallback, _gru_fallback, _hook_attrs,
                         _lstm_abstract, _lstm_backward_abstract, _lstm_backward_fallback,
                         _lstm_fallback, _lstm_with_cells_abstract, _lstm_with_cells_fallback,
                         _make_primitive, _move, _recurrence_attrs, _recurrence_call, _tiles_attr,
                         _register_lowering, sprnn_backward_p, sprnn_forward_p, sprnn_gru_backward_p,
                         sprnn_gru_p, sprnn_lstm_backward_p, sprnn_lstm_p, sprnn_lstm_with_cells_p)

# ``sprnn_forward_stack``: ``(x [P, T, B, H], h0 [P, B, H], values [P, S], indices [P, S],
# lane_row [P, L], lengths [B]) -> (y [P, T, B, H], h_final [P, B, H])``, problem ``q`` being
# ``sprnn_forward(x[q], h0[q], values[q], indices[q], lane_row[q], lengths)`` run from the end where
# ``reverse[q]``; every other kind likewise (each operand but the lengths gets the leading P axis,
# the GRU's hn_bias too). The problems share one layout ``meta`` (so one kernel instance runs them
# all) and the lengths. On CUDA the native path is one launch: cluster mode gives each problem its
# own clusters at once, grid mode runs them one after another. Its sequence operands are
# batch-major per problem ([P, B, T, .] in memory, the kernel's view of P * B examples); XLA
# transposes to that where a producer differs. Elsewhere, and where the dispatch falls back, each
# problem is a call of the one-problem primitive.


@dataclasses.dataclass(frozen=True)
class _Kind:
    """A one-problem primitive as this module stacks and pairs it."""

    prim: Primitive
    axes: tuple  # per operand: 0 (one per problem) or None (shared by the problems: the lengths)
    impl: Callable  # the one-problem pure-JAX implementation (its ``fallback_impl``)
    abstract: Callable  # the one-problem abstract evaluation
    seq_operands: tuple  # operands that are sequences ([T, B, .]: batch-major in a stacked call)
    lengths_at: int  # the lengths' operand (a forward call without seq_lengths drops them)
    batch_axes: tuple  # each operand's batch axis (None: the layout's arrays, hn_bias)
    result_batch_axes: tuple  # each result's
    directed: bool = True  # takes ``reverse`` (the gated backward recurrences run in step order)

    @property
    def name(self) -> str:
        return self.prim.name

    @property
    def forward(self) -> bool:
        return self.prim not in (sprnn_backward_p, sprnn_lstm_backward_p, sprnn_gru_backward_p)

    def reverse_kw(self, r) -> dict:
        """The one-problem primitive's ``reverse`` keyword for a problem's direction ``r``."""
        if self.directed:
            return {"reverse": bool(r)}
        if r:
            raise ValueError(f"{self.name} runs in step order: its problems cannot be reversed")
        return {}


_ONE = (0, 0, 0, 0, 0)  # x, h0, values, indices, lane_row: one per problem
_LAYOUT = (None, None, None)  # values, indices, lane_row: no batch axis
_KINDS = {
    "forward": _Kind(sprnn_forward_p, _ONE + (None,), fallback.forward, _forward_abstract, (0,), 5,
                     (1, 0) + _LAYOUT + (0,), (1, 0)),
    "backward": _Kind(sprnn_backward_p, _ONE + (None, 0, 0), fallback.backward, _backward_abstract,
                      (0, 6), 5, (1, 0) + _LAYOUT + (0, 1, 0), (1, 0)),
    "lstm": _Kind(sprnn_lstm_p, _ONE + (0, None), _lstm_fallback, _lstm_abstract, (0,), 6,
                  (1, 0, 0) + _LAYOUT + (0,), (1, 0, 0)),
    "lstm_with_cells": _Kind(sprnn_lstm_with_cells_p, _ONE + (0, None), _lstm_with_cells_fallback,
                             _lstm_with_cells_abstract, (0,), 6, (1, 0, 0) + _LAYOUT + (0,),
                             (1, 0, 0, 1)),
    "gru": _Kind(sprnn_gru_p, _ONE + (None, 0), _gru_fallback, _gru_abstract, (0,), 5,
                 (1, 0) + _LAYOUT + (0, None), (1, 0)),
    # (x, u, h_before, c_before, dy, dh_final, dc_final, values_t, indices_t, lane_row_t, lengths,
    # kernel) and the GRU's (x, u, h_before, dy, dh_final, hn_bias, ..., lengths, kernel)
    "lstm_backward": _Kind(sprnn_lstm_backward_p, (0,) * 10 + (None, 0), _lstm_backward_fallback,
                           _lstm_backward_abstract, (0, 1, 2, 3, 4), 10,
                           (1, 1, 1, 1, 1, 0, 0) + _LAYOUT + (0, None), (1, 1, 0, 0), directed=False),
    "gru_backward": _Kind(sprnn_gru_backward_p, (0,) * 9 + (None, 0), _gru_backward_fallback,
                          _gru_backward_abstract, (0, 1, 2, 3), 9,
                          (1, 1, 1, 1, 0, None) + _LAYOUT + (0, None), (1, 1, 0), directed=False),
}


def _problem(args, axes, q: int) -> tuple:
    """Problem ``q``'s operands of a stacked call."""
    return tuple(a if ax is None else a[q] for a, ax in zip(args, axes))


def _stack_abstract(kind: _Kind):
    def abstract(*args, reverse, **params):
        P = len(reverse)
        for i, (a, ax) in enumerate(zip(args, kind.axes)):
            if ax is not None and (a.ndim < 1 or a.shape[0] != P):
                raise ValueError(f"{kind.name}_stack: operand {i} must have a leading axis of the "
                                 f"{P} problems (P = len(reverse)), got shape {a.shape}")
        one = [a if ax is None else jax.core.ShapedArray(a.shape[1:], a.dtype)
               for a, ax in zip(args, kind.axes)]
        outs = kind.abstract(*one, **kind.reverse_kw(reverse[0]), **params)
        return tuple(jax.core.ShapedArray((P,) + o.shape, o.dtype) for o in outs)
    return abstract


def _per_problem(kind: _Kind, *args, reverse, **params):
    """A stacked call as one call of the one-problem primitive per problem (stacked results)."""
    outs = [kind.prim.bind(*_problem(args, kind.axes, q), **kind.reverse_kw(r), **params)
            for q, r in enumerate(reverse)]
    return tuple(jnp.stack(o) for o in zip(*outs))


def _impl_params(kind: _Kind, params: dict) -> dict:
    """The keywords a kind's pure-JAX implementation takes: the simple cell's activation, the
    layout; not the dispatch's method nor the CUDA hooks."""
    keep = ("meta", "activation") if kind.prim in (sprnn_forward_p, sprnn_backward_p) else ("meta",)
    return {k: v for k, v in params.items() if k in keep}


def _stack_fallback(kind: _Kind):
    """The pure-JAX implementation: the one-problem fallback per problem."""
    def run(*args, reverse, **params):
        outs = [kind.impl(*_problem(args, kind.axes, q), **kind.reverse_kw(r), **_impl_params(kind, params))
                for q, r in enumerate(reverse)]
        return tuple(jnp.stack(o) for o in zip(*outs))
    return run


def _stacked_rule(kind: _Kind) -> SplitRule:
    """The one-problem sharding rule with a whole problem axis ``p`` on every stacked array."""
    one = _SPLITS[kind.prim]
    operands = [" ".join((["p"] if ax is not None else []) + dims)
                for dims, ax in zip(one.operands, kind.axes)]
    return SplitRule(", ".join(operands) + " -> " + ", ".join("p " + " ".join(d) for d in one.results))


_STACK_PRIMS = {name: _make_primitive(f"{kind.name}_stack", _stack_abstract(kind),
                                      _stack_fallback(kind), _stacked_rule(kind))
                for name, kind in _KINDS.items()}
sprnn_forward_stack_p = _STACK_PRIMS["forward"]
sprnn_backward_stack_p = _STACK_PRIMS["backward"]
sprnn_lstm_stack_p = _STACK_PRIMS["lstm"]
sprnn_lstm_with_cells_stack_p = _STACK_PRIMS["lstm_with_cells"]
sprnn_gru_stack_p = _STACK_PRIMS["gru"]
sprnn_lstm_backward_stack_p = _STACK_PRIMS["lstm_backward"]
sprnn_gru_backward_stack_p = _STACK_PRIMS["gru_backward"]

# [P, T, B, .] laid out as [P, B, T, .] in memory (minor to major).
_STACK_BATCH_MAJOR_LAYOUT = (3, 1, 2, 0)


def _per_problem_lowering(kind: _Kind):
    return mlir.lower_fun(functools.partial(_per_problem, kind), multiple_results=True)


def _reverse_mask(reverse) -> np.int64:
    return np.int64(sum(1 << q for q, r in enumerate(reverse) if r))


def _target_of(kind: _Kind) -> str:
    if kind.prim in _GATES:
        return GATED_FORWARD
    if kind.prim in _BACKWARD_GATES:
        return GATED_BACKWARD
    return FORWARD if kind.forward else BACKWARD


def _stack_cuda(kind: _Kind, ctx, *args, reverse, meta, method, full_lengths=False,
                batch_major=True, spin_timeout_us=0, debug_stall_cta=-1, grid_barrier=False,
                exchange_mode="auto", **params):
    """One launch for every problem where the dispatch takes the kernel for one of them, else a
    call per problem (each then falls back as it would alone). (``batch_major``: a stacked call's
    sequences are batch-major whatever its problems' callers asked.)"""
    del batch_major
    hooks = _hook_attrs(spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode)
    P, T, B = ctx.avals_in[0].shape[:3]
    target = _target_of(kind)
    decision = dispatch.on_cuda_recurrence(target, meta, B, ctx.avals_in[0].dtype, method)
    if decision.path == "fallback":
        own = dict(params, reverse=reverse, meta=meta, method=method, **_hooks_kw(
            spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode))
        if kind.forward:
            own["full_lengths"] = full_lengths
        return _per_problem_lowering(kind)(ctx, *args, **own)
    _native.initialize_cuda()
    if full_lengths:
        ctx, args = _drop_full_lengths(ctx, args, kind.lengths_at)
    attrs = dict(batch_major=np.int64(1), problems=np.int64(P))
    if target in (GATED_FORWARD, GATED_BACKWARD):
        gated_backward = target == GATED_BACKWARD
        if gated_backward:
            gates = _BACKWARD_GATES[kind.prim]
            attrs = _gated_backward_attrs(gates, meta, "cuda") | attrs
        else:
            gates = _GATES[kind.prim]
            attrs = (_gated_attrs(gates, False, meta) | attrs | dict(reverse=_reverse_mask(reverse))
                     | _tiles_attr(meta, ctx.avals_in[0].dtype))
        if hooks != _HOOK_DEFAULTS:
            target = _HOOKED_TARGETS[target]
            attrs.update({name: np.int64(value) for name, value in hooks.items()})
        width = (gates if gated_backward else 1) * meta.hidden  # (the exchanged state's)
        workspace = jax.core.ShapedArray((_constants.cuda_workspace_bytes(P * B, width),), np.uint8)
        if gated_backward:
            return _gated_backward_call(ctx, target, gates, args, attrs, extra_out=(workspace,),
                                        batch_major_layout=_STACK_BATCH_MAJOR_LAYOUT)
        return _gated_target_call(ctx, kind.prim, target, args, attrs, extra_out=(workspace,),
                                  batch_major=True, batch_major_layout=_STACK_BATCH_MAJOR_LAYOUT)
    workspace = jax.core.ShapedArray((_constants.cuda_workspace_bytes(P * B, meta.hidden),), np.uint8)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, workspace])
    attrs = _recurrence_attrs(activation=params["activation"], reverse=False, meta=meta) | attrs
    attrs["reverse"] = _reverse_mask(reverse)
    if target == FORWARD:
        attrs.update(_tiles_attr(meta, ctx.avals_in[0].dtype))
    seq = _STACK_BATCH_MAJOR_LAYOUT
    # Sequence operands: x (forward); y, dy (backward). Results: y / dx.
    layouts = dict(operand_layouts=[seq if i in kind.seq_operands else None for i in range(len(args))],
                   result_layouts=[seq] + [None] * (len(ctx.avals_out) - 1))
    return _recurrence_call(ctx, target, args, attrs, hooks, layouts)


def _hooks_kw(spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode) -> dict:
    """The hook keywords of a call, as the one-problem primitives take them."""
    return dict(spin_timeout_us=spin_timeout_us, debug_stall_cta=debug_stall_cta,
                grid_barrier=grid_barrier, exchange_mode=exchange_mode)


for _name, _kind in _KINDS.items():
    # (the CPU: one call of the one-problem primitive per problem, each dispatched as it would be)
    _register_lowering(_STACK_PRIMS[_name], _per_problem_lowering(_kind), "cpu")
    _register_lowering(_STACK_PRIMS[_name], functools.partial(_stack_cuda, _kind), "cuda")


# ``sprnn_forward_pair``: ``(x_f, x_b, h0_f, h0_b, values_f, values_b, indices_f, indices_b,
# lane_row_f, lane_row_b, lengths) -> (y_f, y_b, h_final_f, h_final_b)``: each operand of
# ``sprnn_forward`` once per problem, side by side, the shared lengths once; the other kinds'
# pairs likewise. What bidirectional.py binds: on CUDA its lowering stacks the operands and binds
# the stacked primitive (one launch; XLA fuses each stack into one copy), elsewhere it binds the
# one-problem primitive twice on the operands as they are (no copies).

def _pair_split(kind: _Kind, args) -> list[tuple]:
    """A pair call's operands as each problem's operands of the one-problem primitive."""
    it, per = iter(args), []
    for ax in kind.axes:
        per.append((next(it), next(it)) if ax is not None else (next(it),) * 2)
    return [tuple(o[q] for o in per) for q in range(2)]


def _pair_join(outs) -> tuple:
    """Two problems' results ``(a, b)`` as the pair's ``(a_f, a_b, b_f, b_b)``."""
    return tuple(x for pair in zip(*outs) for x in pair)


def _pair_abstract(kind: _Kind):
    def abstract(*args, reverse, **params):
        return _pair_join(kind.abstract(*a, **kind.reverse_kw(r), **params)
                          for a, r in zip(_pair_split(kind, args), reverse))
    return abstract


def _pair_fallback(kind: _Kind):
    def run(*args, reverse, **params):
        return _pair_join(kind.impl(*a, **kind.reverse_kw(r), **_impl_params(kind, params))
                          for a, r in zip(_pair_split(kind, args), reverse))
    return run


def _pair_calls(kind: _Kind, *args, reverse, **params):
    """A pair as two calls of the one-problem primitive (``batch_major`` left to each)."""
    return _pair_join(kind.prim.bind(*a, **kind.reverse_kw(r), **params)
                      for a, r in zip(_pair_split(kind, args), reverse))


def _pair_stacked(name: str, *args, **params):
    """A pair as one call of the stacked primitive."""
    kind = _KINDS[name]
    problems = _pair_split(kind, args)
    stacked = [problems[0][i] if ax is None else jnp.stack([p[i] for p in problems])
               for i, ax in enumerate(kind.axes)]
    params.pop("batch_major", None)  # (the stack's own layout)
    outs = _STACK_PRIMS[name].bind(*stacked, **params)
    return _pair_join(tuple(zip(*(tuple(o) for o in outs))))


def _pair_rule(kind: _Kind) -> SplitRule:
    """The one-problem sharding rule with each per-problem array twice, the lengths once."""
    one = _SPLITS[kind.prim]
    operands = [d for dims, ax in zip(one.operands, kind.axes)
                for d in ((" ".join(dims),) * (2 if ax is not None else 1))]
    results = [" ".join(dims) for dims in one.results for _ in range(2)]
    return SplitRule(", ".join(operands) + " -> " + ", ".join(results))


_PAIR_PRIMS = {name: _make_primitive(f"{kind.name}_pair", _pair_abstract(kind),
                                     _pair_fallback(kind), _pair_rule(kind))
               for name, kind in _KINDS.items()}
sprnn_forward_pair_p = _PAIR_PRIMS["forward"]
sprnn_backward_pair_p = _PAIR_PRIMS["backward"]
sprnn_lstm_pair_p = _PAIR_PRIMS["lstm"]
sprnn_lstm_with_cells_pair_p = _PAIR_PRIMS["lstm_with_cells"]
sprnn_gru_pair_p = _PAIR_PRIMS["gru"]
sprnn_lstm_backward_pair_p = _PAIR_PRIMS["lstm_backward"]
sprnn_gru_backward_pair_p = _PAIR_PRIMS["gru_backward"]
for _name, _kind in _KINDS.items():
    _register_lowering(_PAIR_PRIMS[_name], mlir.lower_fun(functools.partial(_pair_calls, _kind),
                                                          multiple_results=True), "cpu")
    _register_lowering(_PAIR_PRIMS[_name], mlir.lower_fun(functools.partial(_pair_stacked, _name),
                                                          multiple_results=True), "cuda")


# ---------------------------------------------------------------------------------------------
# Batching: a vmapped axis of the sequences folds into each problem's batch; vmapped weight sets
# of the one-problem primitives, or of a pair, are the problems of one stacked call
# ---------------------------------------------------------------------------------------------

def _shift(axis):
    return None if axis is None else axis + 1


for _name, _kind in _KINDS.items():
    # (the lengths, shared, keep their axis; every other operand has the problem axis first)
    batching.primitive_batchers[_STACK_PRIMS[_name]] = functools.partial(
        _fold_batch, _STACK_PRIMS[_name],
        tuple(b if ax is None else _shift(b) for b, ax in zip(_kind.batch_axes, _kind.axes)),
        tuple(_shift(b) for b in _kind.result_batch_axes))


def _stacked_over_weights(kind: _Kind, args, dims, params):
    """vmap with batched weights as one launch: the weight sets are the stacked primitive's
    problems (one layout, as vmapped weights have). None where that cannot be: more weight sets
    than one launch takes, or lengths that differ per set (the problems share theirs)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    if size > _constants.MAX_PROBLEMS or dims[kind.axes.index(None)] is not _NOT_MAPPED:
        return None
    stacked = [a if ax is None else _move(a, d, size, 0) for a, d, ax in zip(args, dims, kind.axes)]
    params = {k: v for k, v in params.items() if k != "batch_major"}  # (the stack's own layout)
    params["reverse"] = (bool(params.get("reverse", False)),) * size
    outs = _STACK_PRIMS[_name_of(kind)].bind(*stacked, **params)
    return outs, [0] * len(outs)


def _name_of(kind: _Kind) -> str:
    return next(name for name, k in _KINDS.items() if k is kind)


def _pair_axes(kind: _Kind) -> tuple[tuple, tuple]:
    """A pair's batch axes (operands, results), as _fold_batch takes them."""
    operands = tuple(b for b, ax in zip(kind.batch_axes, kind.axes)
                     for _ in range(2 if ax is not None else 1))
    return operands, tuple(b for b in kind.result_batch_axes for _ in range(2))


def _pair_over_weights(kind: _Kind, args, dims, params):
    """vmapped weights of a pair (an ensemble of bidirectional layers) as the 2P problems of one
    stacked call, the forward directions' sets first; None where they do not fit one call (more
    than MAX_PROBLEMS problems, or lengths that differ per set)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    problems, problem_dims = _pair_split(kind, args), _pair_split(kind, dims)
    if 2 * size > _constants.MAX_PROBLEMS or problem_dims[0][kind.axes.index(None)] is not _NOT_MAPPED:
        return None
    stacked = [problems[0][i] if ax is None else
               jnp.concatenate([_move(p[i], d[i], size, 0) for p, d in zip(problems, problem_dims)])
               for i, ax in enumerate(kind.axes)]
    reverse = tuple(bool(r) for r in params["reverse"] for _ in range(size))
    params = {k: v for k, v in params.items() if k != "batch_major"}
    outs = _STACK_PRIMS[_name_of(kind)].bind(*stacked, **dict(params, reverse=reverse))
    return tuple(part for o in outs for part in (o[:size], o[size:])), [0] * (2 * len(outs))


def _pair_batch(kind: _Kind, args, dims, **params):
    """vmap of a pair: vmapped weights as one stacked call where they fit, else as _fold_batch
    does (a vmapped axis of the sequences folds into the batch; other vmapped weights loop)."""
    batch_axes, result_axes = _pair_axes(kind)
    if any(d is not _NOT_MAPPED for d, ax in zip(dims, batch_axes) if ax is None):
        done = _pair_over_weights(kind, args, dims, params)
        if done is not None:
            return done
    return _fold_batch(_PAIR_PRIMS[_name_of(kind)], batch_axes, result_axes, args, dims, **params)


for _name, _kind in _KINDS.items():
    batching.primitive_batchers[_PAIR_PRIMS[_name]] = functools.partial(_pair_batch, _kind)
    WEIGHT_SET_RULES[_kind.prim] = functools.partial(_stacked_over_weights, _kind)

__all__ = ["sprnn_forward_stack_p", "sprnn_backward_stack_p", "sprnn_lstm_stack_p",
           "sprnn_lstm_with_cells_stack_p", "sprnn_gru_stack_p", "sprnn_forward_pair_p",
           "sprnn_backward_pair_p", "sprnn_lstm_pair_p", "sprnn_lstm_with_cells_pair_p",
           "sprnn_gru_pair_p", "sprnn_lstm_backward_stack_p", "sprnn_gru_backward_stack_p",
           "sprnn_lstm_backward_pair_p", "sprnn_gru_backward_pair_p"]
