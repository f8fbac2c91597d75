"""Deployment with ``jax.export``: serialize a program that calls jax_sprnn, and run it elsewhere.

    import jax_sprnn as js
    exported = js.export.export(jax.jit(model))(*args)   # jax.export.export, our targets allowed
    blob = js.export.serialize(exported)                 # needs pip install 'jax_sprnn[export]'
    # elsewhere: import jax_sprnn, then
    outputs = js.export.deserialize(blob).call(*args)

``jax.export.export`` refuses a custom call whose target has no compatibility guarantee unless the
caller disables that check for the target; :func:`export` disables it for jax_sprnn's own targets
(:data:`jax_sprnn._native.TARGETS`) and no others. Those targets are stable within a jax_sprnn
release. The process that runs the program must ``import jax_sprnn`` first: that registers the
targets (without it XLA says "No FFI handler registered for jax_sprnn_forward_v7") and the
serialization of :class:`~jax_sprnn.SparseWeights` and ``PackedMask`` arguments. docs/export.md
walks through it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import jax
from jax import export as _export

from ._native import TARGETS
from .planner import LayoutMeta
from .pruning.packed import PackedMask
from .weights import SparseWeights

_EXTRA_HINT = "pip install 'jax_sprnn[export]'"


def disabled_checks() -> list:
    """The ``disabled_checks`` that let ``jax.export.export`` serialize calls to our targets."""
    return [_export.DisabledSafetyCheck.custom_call(name) for name in TARGETS]


_our_checks = disabled_checks  # export() takes a parameter of that name, as jax.export.export does


def export(fun: Callable, *, platforms: Sequence[str] | None = None,
           disabled_checks: Sequence[_export.DisabledSafetyCheck] = ()) -> Callable[..., _export.Exported]:
    """``jax.export.export`` for a function that calls jax_sprnn.

    ``fun`` is a ``jax.jit``-wrapped function (a plain one is jitted here). ``platforms`` as in
    ``jax.export.export`` (default: the current backend). ``disabled_checks``: further checks to
    disable, beside the custom-call checks of jax_sprnn's targets, which are always disabled.
    Returns a function that takes ``fun``'s arguments (or ``jax.ShapeDtypeStruct`` specs) and
    returns a ``jax.export.Exported``.
    """
    if not callable(fun):
        raise TypeError(f"fun must be a function, got {type(fun).__name__}")
    if not hasattr(fun, "trace"):  # what jax.export.export needs: a jax.jit-wrapped function
        fun = jax.jit(fun)
    return _export.export(fun, platforms=platforms,
                          disabled_checks=[*disabled_checks, *_our_checks()])


def _check_flatbuffers(what: str) -> None:
    try:
        import flatbuffers  # noqa: F401 (jax's serialization format needs it)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"{what} a jax.export program needs flatbuffers: {_EXTRA_HINT}",
                                  name="flatbuffers") from None


def serialize(exported: _export.Exported, *, vjp_order: int = 0) -> bytearray:
    """``exported.serialize(vjp_order=vjp_order)``, with the install hint when flatbuffers is
    missing. ``vjp_order=1`` also serializes the first-order VJP, so that the deserialized program
    can be differentiated (``jax.grad`` of ``exported.call``)."""
    if not isinstance(exported, _export.Exported):
        raise TypeError(f"exported must be a jax.export.Exported, got {type(exported).__name__}")
    if isinstance(vjp_order, bool) or not isinstance(vjp_order, int) or vjp_order < 0:
        raise ValueError(f"vjp_order must be a non-negative integer, got {vjp_order!r}")
    _check_flatbuffers("serializing")
    return exported.serialize(vjp_order=vjp_order)


def deserialize(blob: bytes | bytearray) -> _export.Exported:
    """``jax.export.deserialize(blob)``. Calling it means jax_sprnn is imported, so the program's
    jax_sprnn targets are registered."""
    _check_flatbuffers("deserializing")
    return _export.deserialize(bytearray(blob))


# ---- SparseWeights and PackedMask as arguments of an exported function --------------------------
# jax.export serializes the argument tree of a program; a custom node needs a name and its static
# (aux) data as bytes. Registered on `import jax_sprnn` (which imports this module), so that a
# deserializing process knows them too.

def _metas_to_bytes(metas: Sequence[LayoutMeta]) -> bytes:
    return json.dumps([dataclasses.asdict(m) for m in metas]).encode()


def _metas_from_bytes(data: bytes) -> tuple[LayoutMeta, ...]:
    return tuple(LayoutMeta(**fields) for fields in json.loads(data))


def _packed_mask_aux_to_bytes(aux) -> bytes:
    meta, meta_t, dtype, row_budget, col_budget = aux
    return json.dumps({"metas": json.loads(_metas_to_bytes((meta, meta_t))), "dtype": dtype,
                       "row_budget": row_budget, "col_budget": col_budget}).encode()


def _packed_mask_aux_from_bytes(data: bytes) -> tuple:
    fields = json.loads(data)
    meta, meta_t = (LayoutMeta(**m) for m in fields["metas"])
    return meta, meta_t, fields["dtype"], fields["row_budget"], fields["col_budget"]


def _register(nodetype: type, name: str, to_bytes, from_bytes) -> None:
    try:
        _export.register_pytree_node_serialization(nodetype, serialized_name=name,
                                                   serialize_auxdata=to_bytes,
                                                   deserialize_auxdata=from_bytes)
    except ValueError:  # registered already: this module is imported again (importlib.reload)
        pass


_register(SparseWeights, "jax_sprnn.SparseWeights", _metas_to_bytes, _metas_from_bytes)
_register(PackedMask, "jax_sprnn.pruning.PackedMask", _packed_mask_aux_to_bytes,
          _packed_mask_aux_from_bytes)
