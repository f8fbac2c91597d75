"""The pure-JAX truth: the recurrence as a ``lax.scan`` over a dense kernel."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ._checks import ACTIVATIONS, check_rnn_args
from .weights import SparseWeights


def scan_recurrence(x_tm, h0, matvec, lengths, *, activation: str, reverse: bool):
    """Run ``h = act(x[p] + matvec(h))`` with the semantics of docs/format.md, all in JAX.

    ``x_tm`` is ``[T, B, H]``, ``lengths`` ``[B]`` int32. Accumulates in float32 and rounds the state
    to the input dtype after each step, as the native kernels do. Returns ``(y_tm, h_final)``.
    """
    act = ACTIVATIONS[activation]
    dtype = x_tm.dtype

    def cell(carry, x_s):
        (h,) = carry
        h_new = act(x_s.astype(jnp.float32) + matvec(h.astype(jnp.float32))).astype(dtype)
        return (h_new,), h_new

    y, (h_final,) = scan_cell(x_tm, (h0,), cell, lengths, reverse=reverse)
    return y, h_final


def in_step_order(a, lengths, reverse: bool):
    """``a[p(s, b), b]`` for every step s and example b of a ``[T, B, ...]`` array: position
    ``L_b-1-s`` under reverse, ``s`` otherwise. The map is its own inverse on the active steps, so
    it also puts outputs back in place."""
    if not reverse:
        return a
    T = a.shape[0]
    pos = jnp.arange(T)[:, None]
    src = jnp.clip(lengths[None, :] - 1 - pos, 0, max(T - 1, 0))
    return jnp.take_along_axis(a, src.reshape(src.shape + (1,) * (a.ndim - 2)), axis=0)



def scan_cell(x_tm, carry: tuple, cell, lengths, *, reverse: bool):
    """Run a recurrent ``cell`` over a sequence with the semantics of docs/format.md, in JAX.

    ``x_tm``: ``[T, B, ...]``; ``carry``: a tuple of ``[B, H]`` states, cast to ``x_tm``'s dtype;
    ``cell(carry, x_s) -> (new_carry, y_s)`` is one step of every example (it rounds the new states
    to the storage dtype); ``lengths``: ``[B]`` int32. Example ``b`` runs ``lengths[b]`` steps, on
    positions ``0, 1, ...`` or, with ``reverse``, ``L-1, L-2, ...``; past its length its carry is
    held and its outputs are zero. Returns ``(y_tm, final_carry)``, outputs at their positions.
    The inputs are put in step order once, before the scan (a gather only when ``reverse``), so a
    step is the cell and one fused select.
    """
    T = x_tm.shape[0]
    dtype = x_tm.dtype

    def step(carry, xs):
        x_s, s = xs
        active = (s < lengths)[:, None]
        new, y = cell(carry, x_s)
        carry = tuple(jnp.where(active, n, c) for n, c in zip(new, carry))
        return carry, jnp.where(active, y, jnp.zeros((), y.dtype))

    carry = tuple(c.astype(dtype) for c in carry)
    # Inputs of steps past an example's length reach no output; zeroed (one select, before the
    # scan), a NaN or Inf there reaches no gradient either, as in the native kernels (autodiff would
    # multiply the held step's zero cotangent by its local derivative: 0 * NaN).
    steps = jnp.arange(T)
    x_steps = in_step_order(x_tm, lengths, reverse)
    running = (steps[:, None] < lengths[None, :])[(...,) + (None,) * (x_tm.ndim - 2)]
    x_steps = jnp.where(running, x_steps, jnp.zeros((), x_steps.dtype))
    final, y_steps = lax.scan(step, carry, (x_steps, steps))
    if not reverse:
        return y_steps, final
    y = in_step_order(y_steps, lengths, reverse)
    pos = jnp.arange(T)[:, None]
    return jnp.where((pos < lengths[None, :])[:, :, None], y, jnp.zeros((), y.dtype)), final


def dense_matvec(kernel):
    kernel32 = jnp.asarray(kernel).astype(jnp.float32)
    return lambda h: jnp.dot(h, kernel32, precision=lax.Precision.HIGHEST)


def reference_rnn(inputs, h0, kernel, *, activation: str = "tanh", time_major: bool = False,
                  reverse: bool = False, seq_lengths=None, method: str = "reference"):
    """The pure-JAX reference with the signature of :func:`jax_sprnn.sparse_rnn`, as a dense scan.

    ``inputs``: ``[B, T, H]`` (``[T, B, H]`` if ``time_major``), the input projection with bias.
    ``h0``: ``[B, H]``. ``kernel``: a dense ``[H, H]`` array, Flax orientation
    (``h_t = act(x_t + h_{t-1} @ kernel)``), or a :class:`~jax_sprnn.SparseWeights` (run as its
    ``to_dense()``). Accumulates in float32 at HIGHEST precision and rounds
    the state to ``inputs.dtype`` each step. Returns ``(outputs, final_state)``, outputs laid out like
    ``inputs``. ``method`` is accepted for signature compatibility and must be ``"reference"``.
    """
    if method != "reference":
        raise ValueError(f"reference_rnn: method must be 'reference', got {method!r}")
    if isinstance(kernel, SparseWeights):
        kernel = kernel.to_dense()
    try:
        kernel = jnp.asarray(kernel)
    except (TypeError, ValueError):  # not array-like (a dict, None, a string)
        raise TypeError(f"kernel must be a dense [H, H] array or a jax_sprnn.SparseWeights, got "
                        f"{type(kernel).__name__}") from None
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be a square [H, H] matrix, got shape {kernel.shape}")
    x_tm, h0, lengths = check_rnn_args(inputs, h0, kernel.shape[0], inputs_dtype=None,
                                       activation=activation, time_major=time_major,
                                       seq_lengths=seq_lengths)
    y, h_final = scan_recurrence(x_tm, h0, dense_matvec(kernel), lengths, activation=activation,
                                 reverse=reverse)
    return (y if time_major else jnp.swapaxes(y, 0, 1)), h_final
