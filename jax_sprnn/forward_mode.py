"""Forward-mode derivatives (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) for the public
functions, with reverse mode still on the backward kernels.

JAX refuses forward mode on a ``jax.custom_vjp``. :class:`custom_vjp` here takes the same
``fwd``/``bwd`` pair but defines a ``jax.custom_jvp``: its JVP runs ``fwd`` and binds one primitive,
``sprnn_tangent``, linear in the input tangents, for the output tangents.

- Reverse mode never evaluates ``sprnn_tangent``: JAX transposes it, and its transpose rule is
  ``bwd``. ``jax.grad`` runs exactly the kernels it ran when the functions were ``custom_vjp``s.
- Forward mode evaluates it as forward-mode AD of ``fwd``'s outputs: the primitives' JVP rules,
  i.e. the tangents of their pure-JAX implementations (``primitives._jvp_by_fallback``). Correct,
  at the speed of the dense XLA path.

The primitive's operands are the differentiated arguments' leaves (what forward mode
differentiates), ``fwd``'s residuals (what ``bwd`` reads), and the tangents of the floating-point
leaves, in that order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

sprnn_tangent_p = Primitive("sprnn_tangent")
sprnn_tangent_p.multiple_results = True


def _differentiable(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _with_nondiff(args, nondiff) -> list:
    """``args`` with each ``(position, value)`` of ``nondiff`` put back at its position."""
    args = list(args)
    for position, value in nondiff:
        args.insert(position, value)
    return args


def _jvp_in(fn, operands, moving, tangents) -> list:
    """The output tangents of ``fn(*operands)`` for ``tangents`` of the operands at the indices
    ``moving``; the others (integers: indices, lengths) are held fixed, since a float0 tangent
    cannot take a symbolic shape."""
    def of_moving(*moved):
        ops = list(operands)
        for i, x in zip(moving, moved):
            ops[i] = x
        return tuple(fn(*ops))
    return list(jax.jvp(of_moving, tuple(operands[i] for i in moving), tuple(tangents))[1])


@dataclasses.dataclass(frozen=True, eq=False)
class _Linear:
    """One call's tangent map: ``tangents`` evaluates it, ``cotangents`` transposes it.

    ``n_primal``, ``n_residual``: how many operands are the differentiated arguments' leaves and
    ``fwd``'s residuals; the rest are the tangents of the floating-point argument leaves."""
    n_primal: int
    n_residual: int

    def split(self, ops: Sequence):
        ops = list(ops)
        p, r = self.n_primal, self.n_primal + self.n_residual
        return ops[:p], ops[p:r], ops[r:]

    def out_avals(self) -> list:
        raise NotImplementedError

    def tangents(self, *ops) -> list:
        raise NotImplementedError

    def cotangents(self, primals: list, residuals: list, cts: list) -> list:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class _CallTangent(_Linear):
    """The tangent map of one call of a :class:`custom_vjp` function."""
    fwd: Callable
    bwd: Callable
    nondiff: tuple          # (position, value) of each non-differentiated argument
    primal_trees: tuple     # the treedef of each differentiated argument
    float_leaves: tuple     # per primal leaf: whether it has a tangent operand
    residual_tree: object
    out_tree: object
    avals: tuple            # the outputs' (shape, dtype), in tree order

    def __repr__(self):  # what a printed jaxpr shows
        return f"{getattr(self.fwd, '__qualname__', 'fwd')}"

    def _arguments(self, leaves) -> list:
        """The full argument list from the differentiated arguments' leaves."""
        args, start = [], 0
        for tree in self.primal_trees:
            args.append(jax.tree_util.tree_unflatten(tree, leaves[start:start + tree.num_leaves]))
            start += tree.num_leaves
        return _with_nondiff(args, self.nondiff)

    def out_avals(self) -> list:
        return [jax.core.ShapedArray(shape, dtype) for shape, dtype in self.avals]

    def tangents(self, *ops) -> list:
        primals, _, tangents = self.split(ops)

        def outputs(*leaves):
            return jax.tree_util.tree_leaves(self.fwd(*self._arguments(leaves))[0])
        moving = [i for i, is_float in enumerate(self.float_leaves) if is_float]
        return _jvp_in(outputs, primals, moving, tangents)

    def cotangents(self, primals, residuals, cts) -> list:
        nondiff = [value for _, value in self.nondiff]
        grads = self.bwd(*nondiff, jax.tree_util.tree_unflatten(self.residual_tree, residuals),
                         jax.tree_util.tree_unflatten(self.out_tree, cts))
        leaves = []
        for tree, grad in zip(self.primal_trees, grads):
            # None: a zero cotangent for the whole argument, as custom_vjp's bwd may return
            leaves += [None] * tree.num_leaves if grad is None else tree.flatten_up_to(grad)
        out = []
        for x, g, is_float in zip(primals, leaves, self.float_leaves):
            if is_float:
                out.append(jnp.zeros(np.shape(x), jnp.result_type(x)) if g is None
                           else jnp.asarray(g).astype(jnp.result_type(x)))
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class _Batched(_Linear):
    """``inner`` under ``jax.vmap``: operand ``i`` is batched along ``axes[i]`` (or not mapped)."""
    inner: _Linear
    axes: tuple
    size: int

    def __repr__(self):
        return f"vmap({self.inner!r})"

    def out_avals(self) -> list:
        return [aval.update(shape=(self.size,) + aval.shape) for aval in self.inner.out_avals()]

    def tangents(self, *ops) -> list:
        return jax.vmap(lambda *o: self.inner.tangents(*o), in_axes=self.axes, axis_size=self.size
                        )(*ops)

    def cotangents(self, primals, residuals, cts) -> list:
        p_axes, r_axes, t_axes = self.split(self.axes)
        per_example = jax.vmap(self.inner.cotangents, in_axes=(p_axes, r_axes, 0),
                               axis_size=self.size)(primals, residuals, cts)
        # an operand shared by the batch gets the sum of the batch's cotangents
        return [g.sum(0) if axis is None else jnp.moveaxis(g, 0, axis)
                for g, axis in zip(per_example, t_axes)]


def _abstract_eval(*ops, linear: _Linear):
    del ops
    return linear.out_avals()


def _impl(*ops, linear: _Linear):
    return linear.tangents(*ops)


def _transpose(cts, *ops, linear: _Linear):
    primals, residuals, tangents = linear.split(ops)
    if any(ad.is_undefined_primal(x) for x in primals + residuals):
        raise NotImplementedError("sprnn_tangent is linear in its tangent operands only")
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    grads = linear.cotangents(primals, residuals, cts)
    return ([None] * (linear.n_primal + linear.n_residual)
            + [g if ad.is_undefined_primal(t) else None for g, t in zip(grads, tangents)])


def _jvp(primals, tangents, *, linear: _Linear):
    """Derivatives of the tangent map itself (``jax.jacfwd`` of ``jax.jacfwd``, or reverse mode
    over forward mode): by forward-mode AD of its evaluation."""
    out = sprnn_tangent_p.bind(*primals, linear=linear)
    moving = [i for i, x in enumerate(primals) if _differentiable(x)]
    return out, _jvp_in(linear.tangents, primals, moving,
                        [ad.instantiate_zeros(tangents[i]) for i in moving])


def _batch(ops, dims, *, linear: _Linear):
    axes = tuple(dims)  # None where an operand is not mapped
    size = next(x.shape[d] for x, d in zip(ops, axes) if d is not None)
    out = sprnn_tangent_p.bind(*ops, linear=_Batched(linear.n_primal, linear.n_residual, linear,
                                                     axes, size))
    return out, [0] * len(out)


sprnn_tangent_p.def_abstract_eval(_abstract_eval)
sprnn_tangent_p.def_impl(_impl)
mlir.register_lowering(sprnn_tangent_p, mlir.lower_fun(_impl, multiple_results=True))
ad.primitive_transposes[sprnn_tangent_p] = _transpose
ad.primitive_jvps[sprnn_tangent_p] = _jvp
batching.primitive_batchers[sprnn_tangent_p] = _batch


class custom_vjp:
    """``jax.custom_vjp`` that also takes forward-mode derivatives.

    Used like ``jax.custom_vjp`` (``@functools.partial(custom_vjp, nondiff_argnums=...)``, then
    ``f.defvjp(fwd, bwd)``, with the same ``fwd`` and ``bwd``). Reverse mode runs ``bwd``;
    forward mode differentiates ``fwd``'s outputs (see the module docstring).
    """

    def __init__(self, fun: Callable, nondiff_argnums: tuple[int, ...] = ()):
        self.fun = fun
        self.nondiff_argnums = tuple(sorted(nondiff_argnums))
        self.fwd = self.bwd = None
        self._call = jax.custom_jvp(fun, nondiff_argnums=self.nondiff_argnums)
        self._call.defjvp(self._jvp)

    def defvjp(self, fwd: Callable, bwd: Callable) -> None:
        self.fwd, self.bwd = fwd, bwd

    def __call__(self, *args):
        if self.fwd is None:
            raise TypeError(f"{self.fun.__qualname__}: defvjp was never called")
        return self._call(*args)

    def _jvp(self, *args):
        *nondiff_values, primals, tangents = args
        nondiff = tuple(zip(self.nondiff_argnums, nondiff_values))
        outs, residuals = self.fwd(*_with_nondiff(primals, nondiff))
        primal_leaves, primal_trees = [], []
        for arg in primals:
            leaves, tree = jax.tree_util.tree_flatten(arg)
            primal_leaves += leaves
            primal_trees.append(tree)
        float_leaves = tuple(_differentiable(x) for x in primal_leaves)
        tangent_leaves = [t for t, is_float in zip(jax.tree_util.tree_leaves(tangents), float_leaves)
                          if is_float]
        residual_leaves, residual_tree = jax.tree_util.tree_flatten(residuals)
        out_leaves, out_tree = jax.tree_util.tree_flatten(outs)
        linear = _CallTangent(len(primal_leaves), len(residual_leaves), self.fwd, self.bwd, nondiff,
                              tuple(primal_trees), float_leaves, residual_tree, out_tree,
                              tuple((np.shape(y), jnp.result_type(y)) for y in out_leaves))
        out_tangents = sprnn_tangent_p.bind(*primal_leaves, *residual_leaves, *tangent_leaves,
                                            linear=linear)
        return outs, jax.tree_util.tree_unflatten(out_tree, out_tangents)


__all__ = ["custom_vjp", "sprnn_tangent_p"]
