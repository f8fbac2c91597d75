"""How the primitives split over a device mesh: XLA's SPMD partitioner, told through
``jax.experimental.custom_partitioning``.

A native target is a custom call, and the partitioner cannot look inside one: left alone it
gathers every operand onto every device and runs the call replicated. But the examples of a batch
are independent, so each primitive says so:

* ``sprnn_forward`` and ``sprnn_backward`` run on each device's batch shard with replicated
  weights, and their results keep the batch sharding: no collective;
* ``sprnn_weight_grad`` sums over the batch: each device sums its own shard, and one ``psum`` over
  the batch's mesh axes (one all-reduce) adds the shards' sums.

The sequence and hidden axes, and the weights, must be whole on every device: a sharding of them
is undone (the partitioner gathers them) rather than refused.

:func:`mesh_lowering` wraps a primitive's lowering rule. Where the program is lowered for several
devices of a named mesh, the rule lowers a ``custom_partitioning`` call of the primitive; the
partitioner later calls back with the operands' shardings, and the per-device program it gets
lowers the primitive again, this time in a per-device (manual) context where the wrapped rule runs
as it is. Single-device programs, ``shard_map`` bodies and exports lower the rule directly (an
exported program must not hold the process-local callback; its partitioner gathers instead).
"""

from __future__ import annotations

import math

from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P
# Private, and the only way in jax 0.10 and 0.11: custom_partitioning's lowering needs the devices
# (the primitives that lower to it must be registered as needing them), and the lowering context
# says whether the program is being lowered for a mesh.
from jax._src import dispatch as _jax_dispatch
from jax._src import sharding_impls as _sharding_impls

_BATCH = "b"    # the factor of the RNN batch in the sharding rules
_GROUPS = "g"   # the weight gradient's groups (contiguous runs of the batch)


class SplitRule:
    """How a primitive splits: its Shardy sharding rule in einsum-like notation, one factor name
    per dimension. ``b`` is the batch; ``g``, the weight gradient's groups, may split; every other
    factor must stay whole. A primitive whose results lack ``b`` sums over the batch."""

    def __init__(self, rule: str):
        operands, results = rule.split("->")
        self.rule = rule
        self.operands = tuple(o.split() for o in operands.split(","))
        self.results = tuple(r.split() for r in results.split(","))
        self.sums_batch = all(_BATCH not in dims for dims in self.results)

    def sharding_rule(self, batch: int, groups: int) -> dict:
        """``def_partition``'s ``sharding_rule`` and factor kinds. With several ``groups`` the
        batch of a summing primitive is ``(g r)``: its groups, then the examples summed in each
        (Shardy takes no factor of size 1 in a compound, hence ``b`` or ``g`` alone at the ends)."""
        rule, sizes, reduced = self.rule, {}, (_BATCH,) if self.sums_batch else ()
        if self.sums_batch and groups > 1:
            operands, results = rule.split("->")
            per_group = batch // groups
            batch_factors = _GROUPS if per_group == 1 else f"({_GROUPS} r)"
            rule = operands.replace(_BATCH, batch_factors) + "->" + results
            reduced, sizes = ((), {}) if per_group == 1 else (("r",), {"r": per_group})
        # In order of first appearance: Shardy wants the factor kinds' indices sorted.
        factors = dict.fromkeys(f for dims in (*self.operands, *self.results) for f in dims)
        return dict(sharding_rule=rule,
                    need_replication_factors=tuple(f for f in factors if f not in (_BATCH, _GROUPS)),
                    reduction_factors=reduced, **sizes)


def _spec(dims: list[str], batch_entry) -> P:
    return P(*(batch_entry if f == _BATCH else None for f in dims))


def _partition_spec(sharding, mesh, ndim: int):
    """``sharding`` as a PartitionSpec over ``mesh``, or None where it is not one: Shardy may split
    a mesh axis into sub-axes (for a batch that a whole axis does not divide), which no
    PartitionSpec of ``mesh`` names. (Hence ``decode_shardings=False``: jax's own decoding raises
    there, before any callback of ours could choose to gather instead.)"""
    try:
        spec = _sharding_impls.parse_flatten_op_sharding(sharding._to_xla_hlo_sharding(ndim), mesh)[0]
    except (ValueError, NotImplementedError):
        return None
    return tuple(spec) + (None,) * (ndim - len(spec))


def _batch_axes(mesh, x, dims: list[str]) -> tuple[str, ...]:
    """The mesh axes that split the batch of operand ``x`` (its ``dims`` factors): the ones it
    arrives with, unless they are not whole mesh axes or the batch does not divide evenly."""
    spec = _partition_spec(x.sharding, mesh, len(dims))
    if spec is None:
        return ()
    entry = spec[dims.index(_BATCH)]
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    devices = math.prod(mesh.shape[a] for a in axes)
    if devices == 1 or x.shape[dims.index(_BATCH)] % devices:
        return ()
    return axes


def _plan(split: SplitRule, params: dict, mesh, arg_shapes):
    """``(psum axes, operand shardings, result shardings, per-device params)`` of one call."""
    axes = _batch_axes(mesh, arg_shapes[0], split.operands[0])
    entry = None if not axes else (axes[0] if len(axes) == 1 else axes)
    in_shardings = tuple(NamedSharding(mesh, _spec(dims, entry)) for dims in split.operands)
    local = dict(params)
    if not split.sums_batch:
        out = tuple(NamedSharding(mesh, _spec(dims, entry)) for dims in split.results)
        return (), in_shardings, out, local
    # The weight gradient: [groups, S], each group a contiguous run of the batch (vmap makes more
    # than one). One group: every device sums its shard and a psum adds them. Several: a device
    # that holds whole groups computes them, and the result stays split over the groups.
    devices = math.prod(mesh.shape[a] for a in axes)
    groups = params["groups"]
    if groups == 1 or not axes:
        return axes, in_shardings, (NamedSharding(mesh, P()),), local
    if groups % devices:
        replicated = tuple(NamedSharding(mesh, P()) for _ in split.operands)
        return (), replicated, (NamedSharding(mesh, P()),), local
    local["groups"] = groups // devices
    (dims,) = split.results
    out = NamedSharding(mesh, P(*(entry if f == _GROUPS else None for f in dims)))
    return (), in_shardings, (out,), local


def _partitioned_call(prim, split: SplitRule, params: dict, batch: int):
    """The primitive as a ``custom_partitioning`` function, with its rule and callbacks
    (``batch``: the global batch size)."""
    def bind(*args):
        return prim.bind(*args, **params)

    def partition(mesh, arg_shapes, result_shape):
        axes, in_shardings, out_shardings, local = _plan(split, params, mesh, arg_shapes)

        def per_device(*args):
            outs = prim.bind(*args, **local)
            return [lax.psum(o, axes) for o in outs] if axes else outs
        return mesh, per_device, list(out_shardings), in_shardings

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):  # GSPMD's propagation
        return list(_plan(split, params, mesh, arg_shapes)[2])

    call = custom_partitioning(bind)
    call.def_partition(partition=partition, infer_sharding_from_operands=infer_sharding_from_operands,
                       decode_shardings=False, **split.sharding_rule(batch, params.get("groups", 1)))
    return call


def _for_a_mesh(ctx) -> bool:
    """Whether this lowering is for several devices of a named mesh, which XLA's SPMD partitioner
    will split (where custom_partitioning applies)."""
    if ctx.module_context.lowering_parameters.for_export:
        return False
    axis_context = ctx.module_context.axis_context
    return (isinstance(axis_context, _sharding_impls.ShardingContext)
            and axis_context.device_assignment is not None
            and len(axis_context.device_assignment) > 1
            and axis_context.abstract_mesh is not None
            and not axis_context.abstract_mesh.empty)


def mesh_lowering(prim, split: SplitRule, rule):
    """``rule`` (a lowering rule of ``prim``), made to split over a mesh as ``split`` says."""
    _jax_dispatch.prim_requires_devices_during_lowering.add(prim)

    def lowering(ctx, *args, **params):
        if not _for_a_mesh(ctx):
            return rule(ctx, *args, **params)
        batch = ctx.avals_in[0].shape[split.operands[0].index(_BATCH)]
        return mlir.lower_fun(_partitioned_call(prim, split, params, batch),
                              multiple_results=True)(ctx, *args)
    return lowering


__all__ = ["SplitRule", "mesh_lowering"]
