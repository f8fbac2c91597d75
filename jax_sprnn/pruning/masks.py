"""Magnitude masks, the balanced starting patterns, and layout budgets: NumPy, on the host.

Masks are boolean arrays in Flax orientation (``[H_in, H_out]``, like the kernel they mask; a gated
kernel's ``[H, G*H]`` holds its G gates side by side, column ``g*H + i`` being gate ``g`` of unit
``i``, so each of its columns is one gate row). A *rule* says how the kept weights are counted:

* ``"layer"``: one threshold over the whole kernel (rows end up with different counts);
* ``"global"``: one threshold across all the kernels pruned together (layers end up with
  different densities); for a single kernel it is ``"layer"``;
* ``"per_row"``: an equal count in every row of the kernel as Flax stores it (the weights leaving
  one input unit);
* ``"row_balanced"``: an equal count in every row of ``U = kernel.T`` (every output unit; for a
  gated kernel, every gate row of every unit), the balance the persistent kernel's layout wants.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ..weights import check_finite, kernel_gates, top_k_mask

#: The rules of :func:`magnitude_mask` and :func:`magnitude_masks` (see the module docstring).
RULES = ("layer", "global", "per_row", "row_balanced")


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, (str, bytes)):  # float("0.5") would pass a config value unparsed
        raise TypeError(f"sparsity must be a number in [0, 1], got the string {sparsity!r}")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return sparsity


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule


def check_kernel_mask(mask, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``mask`` as a NumPy boolean ``[H, H]`` or gated ``[H, G*H]`` array (of ``shape``, the
    layer's, when given), or a clear error."""
    mask = np.asarray(mask)
    kernel_gates(mask.shape, "mask")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"mask must be {list(shape)} (the layer's shape), got {mask.shape}")
    if mask.dtype != bool:
        raise TypeError(f"mask must be a boolean array, got {mask.dtype}")
    return mask


def real_weights(kernel, what: str = "kernel") -> np.ndarray:
    """``kernel`` as float64 NumPy, for ranking: in its own precision or better (a float64
    kernel's small or close magnitudes would tie, or overflow, in float32). A complex, integer or
    boolean array is an error naming ``what``."""
    kernel = np.asarray(kernel)
    if not (np.issubdtype(kernel.dtype, np.floating) or kernel.dtype == jnp.bfloat16):
        raise TypeError(f"{what} must hold real floating-point weights, got {kernel.dtype}")
    return kernel.astype(np.float64, copy=False)  # (no copy when it already is float64)


def ranked(magnitudes: np.ndarray, current) -> np.ndarray:
    """Scores in which every weight outside ``current`` ranks below every live one, and the pruned
    weights among themselves by magnitude (``-1 / (1 + |w|)`` lies in ``[-1, 0)``).

    So a new mask is nested in the current one unless it needs more weights than the current mask
    holds (a ``row_balanced`` row, or a target below the current density); then it takes back the
    largest pruned weights, not the first ones by position."""
    if current is None:
        return magnitudes
    return np.where(current, magnitudes, -1.0 / (1.0 + magnitudes))


def _scores(kernel, current, what: str = "kernel") -> np.ndarray:
    """:func:`ranked` magnitudes of one kernel, with ``current`` checked. A NaN or infinite
    weight is an error naming ``what`` (a NaN has no rank: it would vanish)."""
    kernel = real_weights(kernel, what)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be a 2-D [H_in, H_out] matrix, got shape {kernel.shape}")
    check_finite(kernel, what)
    if current is not None:
        current = np.asarray(current)
        if current.shape != kernel.shape:
            raise ValueError(f"current must have the kernel's shape {kernel.shape}, got {current.shape}")
        if current.dtype != bool:
            raise TypeError(f"current must be a boolean mask, got {current.dtype}")
    return ranked(np.abs(kernel), current)


def _mask_from_scores(scores: np.ndarray, sparsity: float, rule: str) -> np.ndarray:
    density = 1.0 - sparsity
    if rule in ("layer", "global"):
        group, axis = scores.size, None
    elif rule == "per_row":  # rows of the stored kernel: the weights leaving one input unit
        group, axis = scores.shape[1], 1
    else:  # row_balanced: rows of U = kernel.T, i.e. the columns of the stored kernel
        group, axis = scores.shape[0], 0
    keep = int(round(density * group))
    if keep == 0 and density > 0:
        warnings.warn(f"magnitude mask ({rule}): density {density:.4g} of {group} weights rounds to "
                      f"none, so the mask removes every weight of a {scores.shape} kernel",
                      RuntimeWarning, stacklevel=3)
    return top_k_mask(scores, keep, axis)


def magnitude_mask(kernel, sparsity: float, *, rule: str = "row_balanced", current=None
                   ) -> np.ndarray:
    """The boolean mask that keeps the largest-magnitude weights of one kernel.

    Args:
      kernel: ``[H_in, H_out]`` weights (Flax orientation).
      sparsity: the fraction of weights to remove, in ``[0, 1]``.
      rule: ``"layer"`` or ``"global"`` (one threshold over the whole kernel; rows end up with
        different counts), ``"per_row"`` (every row ``kernel[j, :]`` keeps
        ``round((1 - sparsity) * H_out)`` weights), or ``"row_balanced"`` (every output unit,
        ``kernel[:, i]``, a row of ``U = kernel.T``, keeps ``round((1 - sparsity) * H_in)``).
      current: optional boolean mask of the weights still alive. Pruned weights rank below every
        live one, so masks computed along a schedule are nested.

    Returns:
      A NumPy boolean array of the kernel's shape. Ties are broken by position. A NaN or infinite
      weight raises ValueError (ranking by magnitude has no place for it).
    """
    sparsity = check_sparsity(sparsity)
    return _mask_from_scores(_scores(kernel, current), sparsity, check_rule(rule))


def magnitude_masks(kernels, sparsity: float, *, rule: str = "row_balanced", current=None):
    """:func:`magnitude_mask` over a pytree of kernels (each ``[H_in, H_out]``, or stacked
    ``[..., H_in, H_out]`` as ``nn.scan`` over layers stores them).

    With ``rule="global"`` one threshold is shared by all the kernels (the layers end up with
    different densities); every other rule treats each kernel (and each stacked layer) alone.
    ``current``: an optional pytree of boolean masks with the structure of ``kernels``.
    """
    sparsity = check_sparsity(sparsity)
    check_rule(rule)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(kernels)
    try:
        cur = [None] * len(paths_and_leaves) if current is None else treedef.flatten_up_to(current)
    except (ValueError, TypeError) as e:
        raise ValueError(f"current must be a pytree of masks with the structure of kernels "
                         f"({treedef})") from e
    layers = []  # the shape of each leaf, in order
    scores = []
    for (path, k), c in zip(paths_and_leaves, cur):
        k = real_weights(k, f"kernels{jax.tree_util.keystr(path)}")
        if k.ndim < 2:
            raise ValueError(f"kernels must be [..., H_in, H_out] arrays, got shape {k.shape}")
        flat_k = k.reshape((-1,) + k.shape[-2:])
        if c is not None and np.shape(c) != k.shape:
            raise ValueError(f"current{jax.tree_util.keystr(path)} must have its kernel's shape "
                             f"{k.shape}, got {np.shape(c)}")
        flat_c = None if c is None else np.asarray(c).reshape(flat_k.shape)
        for i in range(flat_k.shape[0]):
            what = f"kernels{jax.tree_util.keystr(path)}" + (f" (layer {i})" if k.ndim > 2 else "")
            scores.append(_scores(flat_k[i], None if flat_c is None else flat_c[i], what))
        layers.append(k.shape)
    if rule == "global" and scores:
        every = np.concatenate([s.ravel() for s in scores])
        keep = _mask_from_scores(every, sparsity, "global")  # one threshold over every layer
        ends = np.cumsum([s.size for s in scores])[:-1]
        masks = [m.reshape(s.shape) for m, s in zip(np.split(keep, ends), scores)]
    else:
        masks = [_mask_from_scores(s, sparsity, rule) for s in scores]
    out, pos = [], 0
    for shape in layers:
        count = int(np.prod(shape[:-2], dtype=np.int64))
        out.append(np.stack(masks[pos:pos + count]).reshape(shape))
        pos += count
    return jax.tree_util.tree_unflatten(treedef, out)


def fit_to_budgets(mask, scores, row_budget: int, col_budget: int) -> tuple[np.ndarray, int]:
    """Drop the lowest-scoring entries of rows and columns over their budgets.

    Returns ``(mask, dropped)``. Output units (``mask[:, i]``) are trimmed to ``row_budget`` first,
    then input units (``mask[j, :]``) to ``col_budget``; the second step cannot refill a row.
    """
    mask = np.array(check_kernel_mask(mask))
    if min(row_budget, col_budget) < 0:
        raise ValueError(f"budgets must be non-negative, got row_budget={row_budget}, "
                         f"col_budget={col_budget}")
    if np.shape(scores) != mask.shape:
        raise ValueError(f"scores must have the mask's shape {mask.shape}, got {np.shape(scores)}")
    scores = np.where(mask, np.asarray(scores, np.float64), -np.inf)
    before = int(mask.sum())
    if mask.sum(axis=0).max() > row_budget:
        mask &= top_k_mask(scores, row_budget, 0)
        scores = np.where(mask, scores, -np.inf)
    if mask.sum(axis=1).max() > col_budget:
        mask &= top_k_mask(scores, col_budget, 1)
    return mask, before - int(mask.sum())


# ---------------------------------------------------------------------------------------------
# Starting patterns and budgets (no weights needed: init may run under jit or nn.scan)
# ---------------------------------------------------------------------------------------------

def balanced_pattern(hidden: int, per_row: int, seed: int = 0) -> np.ndarray:
    """A ``[hidden, hidden]`` boolean pattern with exactly ``per_row`` entries in every row and
    every column, chosen pseudo-randomly from ``seed`` (NumPy, independent of any weights).

    It is the union of ``per_row`` shifted diagonals with a random column permutation, so it also
    balances the transposed layout. The modules start from it when ``max_density < 1``: it has to
    be computable without the weights, because ``init`` may run under ``jit`` or ``nn.scan``.
    """
    if not 0 <= per_row <= hidden:
        raise ValueError(f"per_row must be in [0, {hidden}], got {per_row}")
    rng = np.random.default_rng(seed)
    offsets = rng.choice(hidden, size=per_row, replace=False)
    perm = rng.permutation(hidden)
    pattern = np.zeros((hidden, hidden), bool)
    rows = np.arange(hidden)
    for offset in offsets:
        pattern[rows, perm[(rows + offset) % hidden]] = True
    return pattern


def budgets_for_density(hidden: int, max_density: float, gates: int = 1) -> tuple[int, int]:
    """``(row_budget, col_budget)`` of a layer whose masks keep at most ``max_density``.

    The row budget (nonzeros per output unit, or per gate row of a gated kernel) is
    ``ceil(max_density * hidden)``. Row-balanced masks leave the column counts uneven, so the
    transposed layout (the backward pass; its rows are the input units, each over ``gates * hidden``
    columns) gets headroom: ``max(2 * G * row_budget, G * row_budget + 32)``, at most ``G * hidden``.
    """
    max_density = float(max_density)
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be in (0, 1], got {max_density}")
    rows = min(hidden, max(1, math.ceil(round(max_density * hidden, 6))))
    width, mean = gates * hidden, gates * rows
    cols = width if rows == hidden else min(width, max(2 * mean, mean + 32))
    return rows, cols


def initial_mask(hidden: int, max_density: float = 1.0, seed: int = 0, gates: int = 1) -> np.ndarray:
    """The mask a layer starts from, ``[hidden, gates * hidden]``: dense when
    ``max_density == 1``, otherwise :func:`balanced_pattern` with the row budget of
    :func:`budgets_for_density` for each gate (gate ``g`` drawn from ``seed + g``)."""
    rows, _ = budgets_for_density(hidden, max_density, gates)
    if rows == hidden:
        return np.ones((hidden, gates * hidden), bool)
    return np.concatenate([balanced_pattern(hidden, rows, seed + g) for g in range(gates)], axis=1)
