"""The JAX primitives of jax_sprnn: abstract evaluation, per-platform lowering and batching.

The simple cell's three primitives, each a native target (docs/format.md):

* ``sprnn_forward``: the forward recurrence, ``(x, h0, values, indices, lane_row, lengths) -> (y, h_final)``;
* ``sprnn_backward``: the backward recurrence on the transposed layout, ``-> (dx, dh0)``;
* ``sprnn_weight_grad``: the weight gradient on the pattern, ``-> dvalues [groups, S]``;

and the gated cells' (LSTM, GRU), two targets for four primitives: ``sprnn_lstm`` / ``sprnn_gru``
(the forward recurrences, target ``gated_forward``) and ``sprnn_lstm_backward`` /
``sprnn_gru_backward`` (the backward recurrences, target ``gated_backward``).

:mod:`jax_sprnn.stacked` builds on these: several problems (a bidirectional layer's directions,
the weight sets of a vmap) in one launch of the simple cell's targets.

Lowering: on ``cpu`` and ``cuda`` the rules ask :mod:`jax_sprnn.dispatch` what runs, and lower
either the native target (the C++ kernels; the persistent kernels and the sampled weight-gradient
kernel) or the pure-JAX code of :mod:`jax_sprnn.fallback`, which every other platform lowers too.
Differentiation sits on top, in :mod:`jax_sprnn.api` (a :class:`jax_sprnn.forward_mode.custom_vjp`);
the primitives' own JVP rules (forward-mode AD of the fallback) serve forward mode and derivatives
of a gradient.

Partitioning: under ``jax.jit`` with a batch-sharded input, every device runs a primitive on its
own batch shard (:mod:`jax_sprnn._partitioning`; the rules are the ``SplitRule`` strings below).

Batching: a vmapped axis of the sequence operands folds into the RNN batch (one kernel call for
all); vmapped weights run as one call where a rule of ``WEIGHT_SET_RULES`` can (the simple cell's
recurrences: :mod:`jax_sprnn.stacked`), and otherwise the kernel once per weight set with
``lax.map``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _constants, _native, dispatch, fallback
from ._partitioning import SplitRule, mesh_lowering
from .dispatch import BACKWARD, FORWARD, GATED_BACKWARD, GATED_FORWARD, WEIGHT_GRAD
from .planner import LayoutMeta, runs_tiles

ACTIVATION_CODES = {"tanh": 0, "relu": 1, "identity": 2}
_NOT_MAPPED = None  # how a batching rule sees an operand without a vmapped axis


# ---------------------------------------------------------------------------------------------
# Shared machinery
# ---------------------------------------------------------------------------------------------

def _lower_fallback(impl):
    """The lowering rule of a pure-JAX implementation (which returns a tuple). It takes the
    primitive's ``method`` and drops it: the fallback is what runs when no kernel does."""
    lowered = mlir.lower_fun(lambda *args, **params: list(impl(*args, **params)),
                             multiple_results=True)

    def rule(ctx, *args, method, full_lengths=False, **params):
        del method, full_lengths  # (the lengths are there: the fallback reads them)
        return lowered(ctx, *args, **params)
    return rule


_SPLITS: dict = {}  # each primitive's SplitRule


def _register_lowering(prim: Primitive, rule, platform: str | None = None) -> None:
    """Register ``rule`` for ``platform`` (every platform when None), made to split over a mesh."""
    mlir.register_lowering(prim, mesh_lowering(prim, _SPLITS[prim], rule), platform=platform)


def _make_primitive(name: str, abstract_eval, fallback_impl, split: SplitRule) -> Primitive:
    prim = Primitive(name)
    _SPLITS[prim] = split
    prim.multiple_results = True
    prim.def_abstract_eval(abstract_eval)

    @functools.lru_cache(maxsize=256)
    def jitted(params_items):
        return jax.jit(functools.partial(prim.bind, **dict(params_items)))

    def impl(*args, **params):
        # Eager calls compile the primitive alone, once per set of static parameters; also under
        # jax.disable_jit(), where the jitted bind would come straight back here (a recursion).
        with jax.disable_jit(False):
            return jitted(tuple(sorted(params.items())))(*args)

    prim.def_impl(impl)
    # Platforms without a native kernel lower the pure-JAX implementation.
    _register_lowering(prim, _lower_fallback(fallback_impl))
    ad.primitive_jvps[prim] = functools.partial(_jvp_by_fallback, prim, fallback_impl)
    return prim


def _jvp_by_fallback(prim: Primitive, impl, primals, tangents, **params):
    """A primitive's JVP: its outputs from the primitive itself (the kernel), their tangents by
    forward-mode AD of its pure-JAX implementation, which computes the same function.

    First-order gradients never come here (the public functions' backward passes are primitives
    too); forward mode (``jax.jvp``, through ``forward_mode``) and derivatives of a gradient do
    (``jax.grad`` of ``jax.grad``, Hessian-vector products), and for the latter JAX then
    linearizes and transposes the fallback's tangent computation (a ``lax.scan``): correct, at the
    speed of the dense XLA path."""
    out = prim.bind(*primals, **params)
    fallback_params = {k: v for k, v in params.items() if k not in ("method", "full_lengths")}
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, out_tangents = jax.jvp(lambda *args: tuple(impl(*args, **fallback_params)), tuple(primals),
                              tuple(tangents))
    return out, list(out_tangents)


_warned: set = set()


def _warn_once(message: str | None) -> None:
    if message is not None and message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _cpu_lowering(target: str, fallback_impl, ffi_attrs):
    """The CPU rule of a primitive: its C++ kernel, or the pure-JAX ``fallback_impl`` where the CPU
    module was not built. ``ffi_attrs`` maps the primitive's other parameters to the target's
    attributes."""
    def rule(ctx, *args, method, batch_major=False, full_lengths=False, **params):
        # CUDA lowering choices (see _persistent_cuda): the CPU takes [T, B, H] and its lengths
        del batch_major, full_lengths
        steps, batch = ctx.avals_in[0].shape[:2]  # every primitive's first operand is [T, B, H]
        decision = dispatch.on_cpu(method, params["meta"], batch, steps, forward=target == FORWARD)
        if decision.path == "fallback":
            _warn_once(decision.warning)
            return _lower_fallback(fallback_impl)(ctx, *args, method=method, **params)
        return jax.ffi.ffi_lowering(target)(ctx, *args, **ffi_attrs(**params))
    return rule


def _recurrence_attrs(*, activation: str, reverse: bool, meta: LayoutMeta) -> dict:
    """The attributes of the forward and backward targets."""
    return dict(activation=np.int64(ACTIVATION_CODES[activation]), reverse=np.int64(bool(reverse)),
                slots_per_lane=np.int64(meta.slots_per_lane),
                warps_per_cta=np.int64(meta.warps_per_cta), reg_slots=np.int64(meta.reg_slots),
                load_bytes=np.int64(meta.load_bytes))


def _tiles_attr(meta: LayoutMeta, dtype) -> dict:
    """The CUDA forward targets' ``tiles``: 1 where the kernel runs the layout on tensor cores."""
    return dict(tiles=np.int64(runs_tiles(meta, dtype)))


def _weight_grad_attrs(*, groups: int, reverse: bool, meta: LayoutMeta) -> dict:
    """The attributes of the weight-gradient target (the CUDA one also takes ``time_chunks``)."""
    return dict(groups=np.int64(groups), reverse=np.int64(bool(reverse)),
                slots_per_lane=np.int64(meta.slots_per_lane))


# ---------------------------------------------------------------------------------------------
# The recurrences: forward, and backward on the transposed layout
# ---------------------------------------------------------------------------------------------

def _recurrence_shapes(name: str, seq_name: str, seq, h0, meta: LayoutMeta):
    """``(seq-shaped, h0-shaped)`` outputs of a recurrence, after checking the two shapes."""
    if seq.ndim != 3 or h0.shape != (seq.shape[1], seq.shape[2]) or seq.shape[2] != meta.hidden:
        raise ValueError(f"{name}: {seq_name} must be [T, B, {meta.hidden}] and h0 [B, {meta.hidden}], "
                         f"got {seq.shape} and {h0.shape}")
    return (jax.core.ShapedArray(seq.shape, seq.dtype), jax.core.ShapedArray(h0.shape, seq.dtype))


# The keywords after ``method`` are test and benchmark hooks of the CUDA kernels: the spin bound, a
# CTA that never publishes (forces a timeout), a grid barrier per step (the ablation of the
# timestamps), and the exchange mode ("auto", or "grid" / "cluster" forced: docs/design.md). Other
# platforms reject them.

#: The CUDA kernels' exchange modes, as the hooked targets' ``exchange_mode`` codes.
EXCHANGE_MODES = {"auto": 0, "grid": 1, "cluster": 2}


def _forward_abstract(x, h0, values, indices, lane_row, lengths, *, activation, reverse, meta,
                      method, batch_major=False, full_lengths=False, spin_timeout_us=0,
                      debug_stall_cta=-1, grid_barrier=False, exchange_mode="auto"):
    return _recurrence_shapes("sprnn_forward", "x", x, h0, meta)


def _backward_abstract(y, h0, values_t, indices_t, lane_row_t, lengths, dy, dh_final, *,
                       activation, reverse, meta, method, spin_timeout_us=0, debug_stall_cta=-1,
                       grid_barrier=False, exchange_mode="auto"):
    return _recurrence_shapes("sprnn_backward", "y", y, h0, meta)


# The sharding rules: t steps, b batch, h hidden, s slots, l lanes (the layout's arrays are whole on
# every device; so are the steps and the hidden units).
sprnn_forward_p = _make_primitive("sprnn_forward", _forward_abstract, fallback.forward,
                                  SplitRule("t b h, b h, s, s, l, b -> t b h, b h"))
sprnn_backward_p = _make_primitive("sprnn_backward", _backward_abstract, fallback.backward,
                                   SplitRule("t b h, b h, s, s, l, b, t b h, b h -> t b h, b h"))


# The CUDA module registers the hooks' targets apart from the production ones (same kernels, the
# hooks as extra attributes); a call binds one only when it sets a hook.
_HOOKED_TARGETS = {FORWARD: _constants.ffi_target("forward_hooked"),
                   BACKWARD: _constants.ffi_target("backward_hooked"),
                   GATED_FORWARD: _constants.ffi_target("gated_forward_hooked"),
                   GATED_BACKWARD: _constants.ffi_target("gated_backward_hooked")}
_HOOK_DEFAULTS = dict(spin_timeout_us=0, debug_stall_cta=-1, grid_barrier=0, exchange_mode=0)


def _hook_attrs(spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode) -> dict:
    """The hooked targets' attribute values of a call's hook keywords."""
    if exchange_mode not in EXCHANGE_MODES:
        raise ValueError(f"exchange_mode must be one of {sorted(EXCHANGE_MODES)}, got {exchange_mode!r}")
    return dict(spin_timeout_us=int(spin_timeout_us), debug_stall_cta=int(debug_stall_cta),
                grid_barrier=int(bool(grid_barrier)), exchange_mode=EXCHANGE_MODES[exchange_mode])


# The [T, B, H] operand's layout (minor to major) when it is [B, T, H] in memory.
_BATCH_MAJOR_LAYOUT = (2, 0, 1)


def _drop_full_lengths(ctx, args, at: int):
    """The operands of a forward call whose ``lengths`` (operand ``at``) are all T, as the CUDA
    targets take them: an empty lengths array (every sequence runs all T steps). XLA then builds no
    ``[B]`` array of T, which in a short call is a kernel launch of its own (issue 18, item 6)."""
    args = list(args)
    avals_in = list(ctx.avals_in)
    args[at] = mlir.ir_constant(np.zeros((0,), np.int32))
    avals_in[at] = jax.core.ShapedArray((0,), np.int32)
    return ctx.replace(avals_in=avals_in), args


def _persistent_cuda(target, fallback_impl, ctx, *args, activation, reverse, meta, method,
                     batch_major=False, full_lengths=False, spin_timeout_us=0, debug_stall_cta=-1,
                     grid_barrier=False, exchange_mode="auto"):
    """Lower a persistent recurrence (forward or backward) to its CUDA kernel, or to the fallback.

    ``batch_major`` (the forward only: a caller whose x and y are ``[B, T, H]``): x and y keep
    their logical ``[T, B, H]`` shape, but the custom call asks XLA for the layout that puts B
    outermost, so the caller's ``swapaxes`` become bitcasts instead of two transpose kernels.
    ``full_lengths`` (the forward only: a call without ``seq_lengths``): the lengths operand is
    all T, and the target gets none."""
    T, B, H = ctx.avals_in[0].shape
    decision = dispatch.on_cuda_recurrence(target, meta, B, ctx.avals_in[0].dtype, method)
    if decision.path == "fallback":
        _warn_once(decision.warning)
        return _lower_fallback(fallback_impl)(ctx, *args, activation=activation, reverse=reverse,
                                              meta=meta, method=method)
    _native.initialize_cuda()
    if full_lengths:
        ctx, args = _drop_full_lengths(ctx, args, 5)
    workspace = jax.core.ShapedArray((_constants.cuda_workspace_bytes(B, H),), np.uint8)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, workspace])
    attrs = _recurrence_attrs(activation=activation, reverse=reverse, meta=meta)
    hooks = _hook_attrs(spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode)
    layouts = {}
    if target == FORWARD and batch_major:  # x (operand 0) and y (result 0); None: row-major
        layouts = dict(operand_layouts=[_BATCH_MAJOR_LAYOUT] + [None] * (len(args) - 1),
                       result_layouts=[_BATCH_MAJOR_LAYOUT] + [None] * (len(ctx.avals_out) - 1))
    attrs.update(batch_major=np.int64(bool(batch_major)), problems=np.int64(1))
    if target == FORWARD:
        attrs.update(_tiles_attr(meta, ctx.avals_in[0].dtype))
    return _recurrence_call(ctx, target, args, attrs, hooks, layouts)


def _recurrence_call(ctx, target: str, args, attrs: dict, hooks: dict, layouts: dict):
    """The custom call of a persistent recurrence (forward or backward, one problem or several):
    the hooked target where a hook is set. Returns the two results (the workspace is dropped)."""
    if hooks != _HOOK_DEFAULTS:
        target = _HOOKED_TARGETS[target]
        attrs = dict(attrs, **{name: np.int64(value) for name, value in hooks.items()})
    outs = jax.ffi.ffi_lowering(target, **layouts)(ctx, *args, **attrs)
    return outs[:2]


_register_lowering(sprnn_forward_p, _cpu_lowering(FORWARD, fallback.forward, _recurrence_attrs),
                   "cpu")
_register_lowering(sprnn_forward_p, functools.partial(_persistent_cuda, FORWARD, fallback.forward),
                   "cuda")
_register_lowering(sprnn_backward_p,
                   _cpu_lowering(BACKWARD, fallback.backward, _recurrence_attrs), "cpu")
_register_lowering(sprnn_backward_p,
                   functools.partial(_persistent_cuda, BACKWARD, fallback.backward), "cuda")


# ---------------------------------------------------------------------------------------------
# The gated cells' forward recurrences (LSTM, GRU): one native target for both
# ---------------------------------------------------------------------------------------------
#
# ``sprnn_lstm``: ``(x [T, B, 4H], h0, c0, values, indices, lane_row, lengths) -> (y, h_final, c_final)``;
# ``sprnn_lstm_with_cells``: the same ``-> (y, h_final, c_final, cells)``, ``cells [T, B, H]`` the
# cell state after each position (zero past a sequence's end, like y): what the backward pass
# reads, so the forward of a differentiated LSTM binds it;
# ``sprnn_gru``:  ``(x [T, B, 3H], h0, values, indices, lane_row, lengths, hn_bias) -> (y, h_final)``.
# All lower to the target ``gated_forward``, whose signature carries both cells' operands: the
# lowering passes an empty array for those the call lacks (the GRU's c0, c_final and cells, the
# LSTM's hn_bias, and cells where they are not asked for). Differentiation is in
# :mod:`jax_sprnn.gated`.

def _gated_shapes(name: str, gates: int, x, h0, meta: LayoutMeta, n_states: int):
    H = meta.hidden
    if x.ndim != 3 or x.shape[2] != gates * H or h0.shape != (x.shape[1], H):
        raise ValueError(f"{name}: x must be [T, B, {gates}*{H}] and h0 [B, {H}], got {x.shape} and "
                         f"{h0.shape}")
    state = jax.core.ShapedArray(h0.shape, x.dtype)
    return (jax.core.ShapedArray((x.shape[0], x.shape[1], H), x.dtype),) + (state,) * n_states


def _lstm_abstract(x, h0, c0, values, indices, lane_row, lengths, *, reverse, meta, method,
                   full_lengths=False, batch_major=False, spin_timeout_us=0, debug_stall_cta=-1,
                   grid_barrier=False, exchange_mode="auto"):
    return _gated_shapes("sprnn_lstm", 4, x, h0, meta, 2)


def _lstm_with_cells_abstract(x, h0, c0, values, indices, lane_row, lengths, **params):
    y, h, c = _lstm_abstract(x, h0, c0, values, indices, lane_row, lengths, **params)
    return y, h, c, y


def _gru_abstract(x, h0, values, indices, lane_row, lengths, hn_bias, *, reverse, meta, method,
                  full_lengths=False, batch_major=False, spin_timeout_us=0, debug_stall_cta=-1,
                  grid_barrier=False, exchange_mode="auto"):
    return _gated_shapes("sprnn_gru", 3, x, h0, meta, 1)


def _lstm_fallback(x, h0, c0, values, indices, lane_row, lengths, *, reverse, meta, **hooks):
    return fallback.lstm_forward(x, h0, c0, values, indices, lane_row, lengths, reverse=reverse,
                                 meta=meta)[:3]


def _lstm_with_cells_fallback(x, h0, c0, values, indices, lane_row, lengths, *, reverse, meta,
                              **hooks):
    return fallback.lstm_forward(x, h0, c0, values, indices, lane_row, lengths, reverse=reverse,
                                 meta=meta)


def _gru_fallback(x, h0, values, indices, lane_row, lengths, hn_bias, *, reverse, meta, **hooks):
    return fallback.gru_forward(x, h0, values, indices, lane_row, lengths, hn_bias,
                                reverse=reverse, meta=meta)


# (g: the gate columns of x, whole on every device)
sprnn_lstm_p = _make_primitive("sprnn_lstm", _lstm_abstract, _lstm_fallback,
                               SplitRule("t b g, b h, b h, s, s, l, b -> t b h, b h, b h"))
sprnn_lstm_with_cells_p = _make_primitive(
    "sprnn_lstm_with_cells", _lstm_with_cells_abstract, _lstm_with_cells_fallback,
    SplitRule("t b g, b h, b h, s, s, l, b -> t b h, b h, b h, t b h"))
sprnn_gru_p = _make_primitive("sprnn_gru", _gru_abstract, _gru_fallback,
                              SplitRule("t b g, b h, s, s, l, b, h -> t b h, b h"))
_GATES = {sprnn_lstm_p: 4, sprnn_lstm_with_cells_p: 4, sprnn_gru_p: 3}
#: results of the gated forward target a primitive lacks, given as empties: the GRU's c_final and
#: cells, the plain LSTM's cells
_EMPTY_FORWARD_RESULTS = {sprnn_lstm_p: 1, sprnn_lstm_with_cells_p: 0, sprnn_gru_p: 2}


def _gated_attrs(gates: int, reverse: bool, meta: LayoutMeta) -> dict:
    return dict(gates=np.int64(gates), reverse=np.int64(bool(reverse)),
                slots_per_lane=np.int64(meta.slots_per_lane),
                warps_per_cta=np.int64(meta.warps_per_cta), reg_slots=np.int64(meta.reg_slots),
                load_bytes=np.int64(meta.load_bytes))


def _call_with_empties(ctx, target: str, args, attrs: dict, *, empty_operands: dict,
                       empty_results: int, extra_out=(), drop_last: int = 0,
                       batch_major_operands=(), batch_major_results=(),
                       batch_major_layout=_BATCH_MAJOR_LAYOUT):
    """Lower a gated target, whose signature carries both cells' operands, for one cell: with an
    empty array of dtype ``empty_operands[i]`` at each operand position ``i`` the cell lacks (in
    increasing order), ``empty_results`` empty results of x's dtype after the cell's own (e.g. the
    GRU's c), and ``extra_out`` after those (e.g. a workspace); the last ``drop_last`` operands of
    the primitive are not the target's. The operands and results at the ``batch_major_*``
    positions (of the target's lists) get ``batch_major_layout``, the layout that puts B outermost
    (see :func:`_persistent_cuda`; stacked problems: jax_sprnn.stacked). Returns the cell's own
    results."""
    args = list(args[:len(args) - drop_last])
    avals_in = list(ctx.avals_in[:len(ctx.avals_in) - drop_last])
    for at, dtype in sorted(empty_operands.items()):
        args.insert(at, mlir.ir_constant(np.zeros((0,), dtype)))
        avals_in.insert(at, jax.core.ShapedArray((0,), dtype))
    empty = [jax.core.ShapedArray((0,), ctx.avals_in[0].dtype)] * empty_results
    avals_out = [*ctx.avals_out, *empty, *extra_out]
    layouts = {}
    if batch_major_operands or batch_major_results:  # None: row-major
        layouts = dict(
            operand_layouts=[batch_major_layout if i in batch_major_operands else None
                             for i in range(len(args))],
            result_layouts=[batch_major_layout if i in batch_major_results else None
                            for i in range(len(avals_out))])
    outs = jax.ffi.ffi_lowering(target, **layouts)(ctx.replace(avals_in=avals_in, avals_out=avals_out),
                                                   *args, **attrs)
    return outs[:len(ctx.avals_out)]


def _gated_target_call(ctx, prim, target: str, args, attrs: dict, extra_out=(), batch_major=False,
                       batch_major_layout=_BATCH_MAJOR_LAYOUT):
    """The gated forward target: the LSTM's operands (x, h0, c0, values, indices, lane_row,
    lengths) with an empty hn_bias; the GRU's (x, h0, values, ..., hn_bias) with an empty c0; the
    results the primitive lacks as empties (the GRU's c_final and cells, the plain LSTM's cells).
    ``batch_major``: x (operand 0), y (result 0) and the LSTM's cells (result 3) have
    ``batch_major_layout`` (``[B, T, .]`` in memory). ``prim`` is the one-problem primitive, also
    for a stacked call (jax_sprnn.stacked), whose operands have one more leading axis."""
    dtype = ctx.avals_in[0].dtype
    empties = {7: np.float32} if _GATES[prim] == 4 else {2: dtype}
    with_cells = prim is sprnn_lstm_with_cells_p
    return _call_with_empties(ctx, target, args, attrs, empty_operands=empties,
                              empty_results=_EMPTY_FORWARD_RESULTS[prim], extra_out=extra_out,
                              batch_major_operands=(0,) if batch_major else (),
                              batch_major_results=((0, 3) if with_cells else (0,)) if batch_major else (),
                              batch_major_layout=batch_major_layout)


def _gated_cpu(prim, fallback_impl, ctx, *args, reverse, meta, method, **hooks):
    """The C++ gated kernel where the CPU module has it and ``method`` asks for it (``"native"``;
    ``"auto"`` where :mod:`jax_sprnn.cost` expects it faster than XLA's dense path), else that path."""
    steps, batch = ctx.avals_in[0].shape[:2]
    decision = dispatch.on_cpu_gated(method, meta, batch, steps)
    if decision.path == "fallback":
        _warn_once(decision.warning)
        return _lower_fallback(fallback_impl)(ctx, *args, reverse=reverse, meta=meta, method=method)
    return _gated_target_call(ctx, prim, GATED_FORWARD, args, _gated_attrs(_GATES[prim], reverse, meta))


def _gated_cuda(prim, fallback_impl, ctx, *args, reverse, meta, method, full_lengths=False,
                batch_major=False, spin_timeout_us=0, debug_stall_cta=-1, grid_barrier=False,
                exchange_mode="auto"):
    """Lower a gated cell's forward recurrence to its persistent CUDA kernel, or to the fallback
    (``full_lengths``, ``batch_major``: as :func:`_persistent_cuda`)."""
    T, B, _ = ctx.avals_in[0].shape
    decision = dispatch.on_cuda_recurrence(GATED_FORWARD, meta, B, ctx.avals_in[0].dtype, method)
    if decision.path == "fallback":
        _warn_once(decision.warning)
        return _lower_fallback(fallback_impl)(ctx, *args, reverse=reverse, meta=meta, method=method)
    _native.initialize_cuda()
    gates = _GATES[prim]
    if full_lengths:  # (the LSTM's lengths follow its c0)
        ctx, args = _drop_full_lengths(ctx, args, 6 if gates == 4 else 5)
    attrs = _gated_attrs(gates, reverse, meta) | dict(batch_major=np.int64(bool(batch_major)),
                                                      problems=np.int64(1))
    attrs.update(_tiles_attr(meta, ctx.avals_in[0].dtype))
    target = GATED_FORWARD
    hooks = _hook_attrs(spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode)
    if hooks != _HOOK_DEFAULTS:
        target = _HOOKED_TARGETS[target]
        attrs.update({name: np.int64(value) for name, value in hooks.items()})
    workspace = jax.core.ShapedArray((_constants.cuda_workspace_bytes(B, meta.hidden),), np.uint8)
    return _gated_target_call(ctx, prim, target, args, attrs, extra_out=(workspace,),
                              batch_major=batch_major)


for _prim, _impl in ((sprnn_lstm_p, _lstm_fallback), (sprnn_lstm_with_cells_p, _lstm_with_cells_fallback),
                     (sprnn_gru_p, _gru_fallback)):
    _register_lowering(_prim, functools.partial(_gated_cpu, _prim, _impl), "cpu")
    _register_lowering(_prim, functools.partial(_gated_cuda, _prim, _impl), "cuda")


# ---------------------------------------------------------------------------------------------
# The gated cells' backward recurrences: one native target for both (``gated_backward``)
# ---------------------------------------------------------------------------------------------
#
# ``sprnn_lstm_backward``: ``(x, u, h_before, c_before, dy, dh_final, dc_final, values_t,
# indices_t, lane_row_t, lengths, kernel) -> (dx, du, dh0, dc0)``;
# ``sprnn_gru_backward``: ``(x, u, h_before, dy, dh_final, hn_bias, values_t, indices_t, lane_row_t,
# lengths, kernel) -> (dx, du, dh0)``.
# Operands in step order (:mod:`jax_sprnn.gated_backward`): x and u ``[T, B, G*H]`` (u float32,
# ``h_before @ kernel``), the states and dy ``[T, B, H]``; ``meta`` is the transposed layout's. The
# target takes both cells' operands (the lowering passes empties for the other cell's). ``kernel``
# (dense float32 ``[H, G*H]``) is the XLA fallback's: the native targets read the packed layout.

def _gated_backward_shapes(name: str, gates: int, x, u, h_before, dy, dh_final, meta: LayoutMeta,
                           **cell_operands):
    """The results' avals, after checking every operand's shape (``cell_operands``: the LSTM's
    c_before and dc_final, or the GRU's hn_bias)."""
    H = meta.hidden
    T, B = x.shape[:2] if x.ndim == 3 else (None, None)
    want = {"x": (x, (T, B, gates * H)), "u": (u, (T, B, gates * H)), "h_before": (h_before, (T, B, H)),
            "dy": (dy, (T, B, H)), "dh_final": (dh_final, (B, H))}
    cell_shapes = {"c_before": (T, B, H), "dc_final": (B, H), "hn_bias": (H,)}
    want.update({what: (a, cell_shapes[what]) for what, a in cell_operands.items()})
    for what, (a, shape) in want.items():
        if a.shape != shape:
            raise ValueError(f"{name}: {what} must be {list(shape)} (T, B, G={gates}, H={H}), got "
                             f"{list(a.shape)}")
    return (jax.core.ShapedArray(x.shape, x.dtype), jax.core.ShapedArray(x.shape, np.float32),
            jax.core.ShapedArray(dh_final.shape, x.dtype))


def _lstm_backward_abstract(x, u, h_before, c_before, dy, dh_final, dc_final, values_t, indices_t,
                            lane_row_t, lengths, kernel, *, meta, method, **hooks):
    dx, du, dh0 = _gated_backward_shapes("sprnn_lstm_backward", 4, x, u, h_before, dy, dh_final, meta,
                                         c_before=c_before, dc_final=dc_final)
    return dx, du, dh0, dh0


def _gru_backward_abstract(x, u, h_before, dy, dh_final, hn_bias, values_t, indices_t, lane_row_t,
                           lengths, kernel, *, meta, method, **hooks):
    return _gated_backward_shapes("sprnn_gru_backward", 3, x, u, h_before, dy, dh_final, meta,
                                  hn_bias=hn_bias)


def _lstm_backward_fallback(x, u, h_before, c_before, dy, dh_final, dc_final, values_t, indices_t,
                            lane_row_t, lengths, kernel, *, meta, **hooks):
    return fallback.gated_backward(x, u, h_before, c_before, dy, dh_final, dc_final, None, lengths,
                                   kernel, gates=4)


def _gru_backward_fallback(x, u, h_before, dy, dh_final, hn_bias, values_t, indices_t, lane_row_t,
                           lengths, kernel, *, meta, **hooks):
    return fallback.gated_backward(x, u, h_before, None, dy, dh_final, None, hn_bias, lengths, kernel,
                                   gates=3)[:3]


# (g: the gate columns, whole on every device; k m: the dense kernel)
sprnn_lstm_backward_p = _make_primitive(
    "sprnn_lstm_backward", _lstm_backward_abstract, _lstm_backward_fallback,
    SplitRule("t b g, t b g, t b h, t b h, t b h, b h, b h, s, s, l, b, k m -> t b g, t b g, b h, b h"))
sprnn_gru_backward_p = _make_primitive(
    "sprnn_gru_backward", _gru_backward_abstract, _gru_backward_fallback,
    SplitRule("t b g, t b g, t b h, t b h, b h, h, s, s, l, b, k m -> t b g, t b g, b h"))
_BACKWARD_GATES = {sprnn_lstm_backward_p: 4, sprnn_gru_backward_p: 3}


def _gated_backward_call(ctx, target: str, gates: int, args, attrs: dict, extra_out=(),
                         batch_major_layout=None):
    """The gated backward target: the LSTM's operands with an empty hn_bias; the GRU's with an
    empty c_before, dc_final and dc0; the dense kernel left out. ``batch_major_layout`` (stacked
    problems, jax_sprnn.stacked): the layout of the sequences x, u, h_before, c_before, dy, dx
    and du."""
    dtype = ctx.avals_in[0].dtype
    empties = {7: np.float32} if gates == 4 else {3: dtype, 6: dtype}
    layouts = {}
    if batch_major_layout is not None:  # (the GRU's c_before is an empty stand-in)
        layouts = dict(batch_major_operands=(0, 1, 2, 3, 4) if gates == 4 else (0, 1, 2, 4),
                       batch_major_results=(0, 1), batch_major_layout=batch_major_layout)
    return _call_with_empties(ctx, target, args, attrs, empty_operands=empties,
                              empty_results=1 if gates == 3 else 0, extra_out=extra_out, drop_last=1,
                              **layouts)


def _gated_backward_attrs(gates: int, meta: LayoutMeta, platform: str) -> dict:
    attrs = dict(gates=np.int64(gates), slots_per_lane=np.int64(meta.slots_per_lane))
    if platform == "cuda":
        attrs.update(warps_per_cta=np.int64(meta.warps_per_cta), reg_slots=np.int64(meta.reg_slots),
                     load_bytes=np.int64(meta.load_bytes))
    return attrs


def _gated_backward_cpu(prim, fallback_impl, ctx, *args, meta, method, **hooks):
    """The C++ recurrence where the CPU module has it, else the XLA scan."""
    if GATED_BACKWARD not in _native.cpu_targets():
        return _lower_fallback(fallback_impl)(ctx, *args, meta=meta, method=method)
    gates = _BACKWARD_GATES[prim]
    return _gated_backward_call(ctx, GATED_BACKWARD, gates, args, _gated_backward_attrs(gates, meta, "cpu"))


def _gated_backward_cuda(prim, fallback_impl, ctx, *args, meta, method, spin_timeout_us=0,
                         debug_stall_cta=-1, grid_barrier=False, exchange_mode="auto"):
    """The persistent CUDA recurrence where the transposed layout fits, else the XLA scan."""
    T, B, _ = ctx.avals_in[0].shape
    decision = dispatch.on_cuda_recurrence(GATED_BACKWARD, meta, B, ctx.avals_in[0].dtype, method)
    if decision.path == "fallback":
        _warn_once(decision.warning)
        return _lower_fallback(fallback_impl)(ctx, *args, meta=meta, method=method)
    _native.initialize_cuda()
    gates = _BACKWARD_GATES[prim]
    attrs = _gated_backward_attrs(gates, meta, "cuda") | dict(batch_major=np.int64(0),
                                                             problems=np.int64(1))
    target = GATED_BACKWARD
    hooks = _hook_attrs(spin_timeout_us, debug_stall_cta, grid_barrier, exchange_mode)
    if hooks != _HOOK_DEFAULTS:
        target = _HOOKED_TARGETS[target]
        attrs.update({name: np.int64(value) for name, value in hooks.items()})
    workspace = jax.core.ShapedArray((_constants.cuda_workspace_bytes(B, gates * meta.hidden),),
                                     np.uint8)
    return _gated_backward_call(ctx, target, gates, args, attrs, extra_out=(workspace,))


for _prim, _impl in ((sprnn_lstm_backward_p, _lstm_backward_fallback),
                     (sprnn_gru_backward_p, _gru_backward_fallback)):
    _register_lowering(_prim, functools.partial(_gated_backward_cpu, _prim, _impl), "cpu")
    _register_lowering(_prim, functools.partial(_gated_backward_cuda, _prim, _impl), "cuda")


# ---------------------------------------------------------------------------------------------
# Weight gradient
# ---------------------------------------------------------------------------------------------

def _weight_grad_abstract(y, h0, dz, indices, lane_row, lengths, *, groups, reverse, meta, method):
    if y.shape[1] % groups:
        raise ValueError(f"sprnn_weight_grad: groups={groups} must divide the batch {y.shape[1]}")
    return (jax.core.ShapedArray((groups, indices.shape[0]), np.float32),)


def _weight_grad_fallback(y, h0, dz, indices, lane_row, lengths, *, groups, reverse, meta):
    return (fallback.weight_grad(y, h0, dz, indices, lane_row, lengths, groups=groups,
                                 reverse=reverse, meta=meta),)


# The result sums over the batch, in ``g`` groups (one all-reduce over the batch's mesh axes).
sprnn_weight_grad_p = _make_primitive("sprnn_weight_grad", _weight_grad_abstract,
                                      _weight_grad_fallback,
                                      SplitRule("t b h, b h, t b h, s, l, b -> g s"))


def _weight_grad_cuda(ctx, *args, groups, reverse, meta, method):
    T, B, H = ctx.avals_in[0].shape
    decision = dispatch.on_cuda_weight_grad(meta, T, B, H, groups, method)
    if decision.path == "fallback":
        _warn_once(decision.warning)
        return _lower_fallback(_weight_grad_fallback)(ctx, *args, groups=groups, reverse=reverse,
                                                      meta=meta, method=method)
    chunks = decision.time_chunks
    n_slots = ctx.avals_out[0].shape[1]
    workspace = jax.core.ShapedArray((chunks * groups * n_slots if chunks > 1 else 1,), np.float32)
    ctx = ctx.replace(avals_out=[*ctx.avals_out, workspace])
    outs = jax.ffi.ffi_lowering(WEIGHT_GRAD)(
        ctx, *args, **_weight_grad_attrs(groups=groups, reverse=reverse, meta=meta),
        time_chunks=np.int64(chunks))
    return outs[:1]


_register_lowering(sprnn_weight_grad_p,
                   _cpu_lowering(WEIGHT_GRAD, _weight_grad_fallback, _weight_grad_attrs), "cpu")
_register_lowering(sprnn_weight_grad_p, _weight_grad_cuda, "cuda")


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

def _move(x, bdim, size, axis):
    """``x`` with its batch dimension at ``axis`` (broadcast when it has none)."""
    if bdim is _NOT_MAPPED:
        return jnp.broadcast_to(jnp.expand_dims(x, axis), x.shape[:axis] + (size,) + x.shape[axis:])
    return jnp.moveaxis(x, bdim, axis)


def _fold(x, bdim, size, batch_axis):
    """Fold the vmapped dimension of ``x`` into its RNN batch axis ``batch_axis`` (vmap-major)."""
    x = _move(x, bdim, size, batch_axis)
    shape = x.shape
    return x.reshape(shape[:batch_axis] + (shape[batch_axis] * shape[batch_axis + 1],) +
                     shape[batch_axis + 2:])


def _unfold(x, size, batch_axis):
    shape = x.shape
    return x.reshape(shape[:batch_axis] + (size, shape[batch_axis] // size) + shape[batch_axis + 1:])


def _loop_over_weights(prim, args, dims, params):
    """vmap with batched weights: run the primitive once per weight set (lax.map)."""
    mapped = [jnp.moveaxis(a, d, 0) if d is not _NOT_MAPPED else None
              for a, d in zip(args, dims)]

    def one(sliced):
        it = iter(sliced)
        full = [next(it) if m is not None else a for a, m in zip(args, mapped)]
        return prim.bind(*full, **params)

    outs = lax.map(one, [m for m in mapped if m is not None])
    return outs, [0] * len(outs)


#: How vmapped weight sets of a one-problem primitive run as one call: ``prim -> rule(args, dims,
#: params)``, which returns the batched results or None where it cannot. jax_sprnn.stacked, which
#: builds on this module, registers the simple cell's (the sets as the problems of one launch).
WEIGHT_SET_RULES: dict = {}


def _over_weights(prim, args, dims, params):
    """vmap with batched weights: as one call where a registered rule can, else one call per set."""
    rule = WEIGHT_SET_RULES.get(prim)
    done = rule(args, dims, params) if rule is not None else None
    return done if done is not None else _loop_over_weights(prim, args, dims, params)


def _forward_batch(args, dims, **params):
    x, h0, values, indices, lane_row, lengths = args
    xd, hd, vd, idd, lrd, ld = dims
    if any(d is not _NOT_MAPPED for d in (vd, idd, lrd)):
        return _over_weights(sprnn_forward_p, args, dims, params)
    size = next(a.shape[d] for a, d in ((x, xd), (h0, hd), (lengths, ld))
                if d is not _NOT_MAPPED)
    y, h_final = sprnn_forward_p.bind(_fold(x, xd, size, 1), _fold(h0, hd, size, 0), values, indices,
                                      lane_row, _fold(lengths, ld, size, 0), **params)
    return (_unfold(y, size, 1), _unfold(h_final, size, 0)), (1, 0)


batching.primitive_batchers[sprnn_forward_p] = _forward_batch


def _backward_batch(args, dims, **params):
    y, h0, values_t, indices_t, lane_row_t, lengths, dy, dh_final = args
    if any(d is not _NOT_MAPPED for d in dims[2:5]):
        return _over_weights(sprnn_backward_p, args, dims, params)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    yd, hd, _, _, _, ld, dyd, dhd = dims
    dx, dh0 = sprnn_backward_p.bind(
        _fold(y, yd, size, 1), _fold(h0, hd, size, 0), values_t, indices_t, lane_row_t,
        _fold(lengths, ld, size, 0), _fold(dy, dyd, size, 1), _fold(dh_final, dhd, size, 0), **params)
    return (_unfold(dx, size, 1), _unfold(dh0, size, 0)), (1, 0)


batching.primitive_batchers[sprnn_backward_p] = _backward_batch


def _weight_grad_batch(args, dims, *, groups, **params):
    y, h0, dz, indices, lane_row, lengths = args
    if any(d is not _NOT_MAPPED for d in dims[3:5]):
        return _loop_over_weights(sprnn_weight_grad_p, args, dims, dict(groups=groups, **params))
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    yd, hd, dzd, _, _, ld = dims
    # Each vmapped instance keeps its own weight gradient: its examples become their own groups.
    (dv,) = sprnn_weight_grad_p.bind(
        _fold(y, yd, size, 1), _fold(h0, hd, size, 0), _fold(dz, dzd, size, 1), indices, lane_row,
        _fold(lengths, ld, size, 0), groups=groups * size, **params)
    return (_unfold(dv, size, 0),), (0,)


batching.primitive_batchers[sprnn_weight_grad_p] = _weight_grad_batch


def _fold_batch(prim, batch_axes, result_axes, args, dims, **params):
    """Fold a vmapped axis into the RNN batch of every operand with one (``batch_axes``: each
    operand's batch axis, None for the weights' arrays, hn_bias and the dense kernel; the results'
    are ``result_axes``); vmapped weights as :func:`_over_weights` runs them."""
    if any(d is not _NOT_MAPPED for d, ax in zip(dims, batch_axes) if ax is None):
        return _over_weights(prim, args, dims, params)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not _NOT_MAPPED)
    folded = [a if ax is None else _fold(a, d, size, ax) for a, d, ax in zip(args, dims, batch_axes)]
    outs = prim.bind(*folded, **params)
    return tuple(_unfold(o, size, ax) for o, ax in zip(outs, result_axes)), result_axes


for _prim, _axes, _results in (
        (sprnn_lstm_p, (1, 0, 0, None, None, None, 0), (1, 0, 0)),
        (sprnn_lstm_with_cells_p, (1, 0, 0, None, None, None, 0), (1, 0, 0, 1)),
        (sprnn_gru_p, (1, 0, None, None, None, 0, None), (1, 0)),
        (sprnn_lstm_backward_p, (1, 1, 1, 1, 1, 0, 0, None, None, None, 0, None), (1, 1, 0, 0)),
        (sprnn_gru_backward_p, (1, 1, 1, 1, 0, None, None, None, None, 0, None), (1, 1, 0))):
    batching.primitive_batchers[_prim] = functools.partial(_fold_batch, _prim, _axes, _results)


