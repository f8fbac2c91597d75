"""``grad`` and ``value_and_grad`` for functions of :class:`~jax_sprnn.SparseWeights`.

A SparseWeights carries int32 leaves (the layout's indices) beside its float ``values``, and
``jax.grad`` refuses integer inputs. These wrappers differentiate every SparseWeights among the
differentiated arguments (bare, or anywhere inside a params tree) through its ``values`` alone, as
``jax.experimental.sparse.grad`` does for a BCOO's data. In the gradient a SparseWeights stays a
SparseWeights: ``values`` holds the gradient and the index leaves are float0 zeros (what
``jax.grad(..., allow_int=True)`` gives integer leaves), so the gradient has the arguments'
structure. Every other leaf is differentiated as ``jax.grad`` would (an integer leaf that is not
part of a SparseWeights is still an error).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import jax
import numpy as np

from .weights import SparseWeights


def _is_weights(x) -> bool:
    return isinstance(x, SparseWeights)


def _values_only(tree):
    """``tree`` with each SparseWeights replaced by its ``values``: what gets differentiated."""
    return jax.tree_util.tree_map(lambda x: x.values if _is_weights(x) else x, tree,
                                  is_leaf=_is_weights)


def _with_values(template, diffable):
    """``template`` with each SparseWeights' ``values`` (and every other leaf) from ``diffable``."""
    return jax.tree_util.tree_map(lambda t, d: t.replace(values=d) if _is_weights(t) else d,
                                  template, diffable, is_leaf=_is_weights)


def _gradient_form(template, grads):
    """The gradient in the structure of ``template``: a SparseWeights whose values are the gradient
    and whose index leaves are float0 zeros, where ``template`` holds a SparseWeights."""
    def one(t, g):
        if not _is_weights(t):
            return g
        zeros = {n: np.zeros(np.shape(getattr(t, n)), jax.dtypes.float0) for n in t.INDEX_LEAVES}
        return t.replace(values=g, **zeros)
    return jax.tree_util.tree_map(one, template, grads, is_leaf=_is_weights)


def _one_position(argnums) -> bool:
    """Whether ``argnums`` is one integer (Python or NumPy), not a sequence of them."""
    try:
        operator.index(argnums)
        return not isinstance(argnums, (bool, np.bool_))
    except TypeError:
        return False


def _positions(argnums: int | Sequence[int], count: int) -> tuple[int, ...]:
    try:
        nums = (argnums,) if _one_position(argnums) else tuple(argnums)
        ok = bool(nums) and all(not isinstance(i, (bool, np.bool_)) and -count <= operator.index(i) < count
                                for i in nums)
    except TypeError:  # not iterable, or an element that is not an integer
        ok = False
    if not ok:
        raise ValueError(f"argnums must name positional arguments of the call (there are {count}), "
                         f"got {argnums!r}")
    return tuple(operator.index(i) % count for i in nums)


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False
                   ) -> Callable:
    """``jax.value_and_grad`` that also differentiates arguments holding SparseWeights.

    Same arguments and return value as ``jax.value_and_grad``; see the module docstring for what
    the gradient of a SparseWeights is. ``fun`` takes its differentiated arguments positionally.
    """
    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        nums = _positions(argnums, len(args))
        templates = [args[i] for i in nums]

        def on_values(*diffable):
            full = list(args)
            for i, template, d in zip(nums, templates, diffable):
                full[i] = _with_values(template, d)
            return fun(*full, **kwargs)

        value, grads = jax.value_and_grad(on_values, argnums=tuple(range(len(nums))),
                                          has_aux=has_aux)(*map(_values_only, templates))
        grads = tuple(_gradient_form(t, g) for t, g in zip(templates, grads))
        return value, (grads[0] if _one_position(argnums) else grads)

    return wrapped


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False) -> Callable:
    """``jax.grad`` that also differentiates arguments holding SparseWeights (see
    :func:`value_and_grad`). Returns the gradient, or ``(gradient, aux)`` with ``has_aux``."""
    both = value_and_grad(fun, argnums, has_aux)

    @functools.wraps(fun)
    def wrapped(*args, **kwargs):
        value, grads = both(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapped
