"""Pack a sparse recurrent matrix into the on-chip layout of docs/format.md (NumPy, offline).

Everything here is vectorized: packing a 4608x4608 matrix at 10% density (2.1M nonzeros) is a
handful of sorts over arrays of that size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .planner import (MAX_CLUSTER_CTAS, WARP, LayoutMeta, Plan, pack_rows_into_warps, lanes_per_row,
                      plan_layout)


@dataclasses.dataclass(frozen=True)
class PackedPattern:
    """A packed pattern: where each input nonzero went, plus the index and lane arrays."""

    meta: LayoutMeta
    indices: np.ndarray  # int32 [num_slots], ~j on padding
    lane_row: np.ndarray  # int32 [num_lanes], -1 on idle lanes
    slot_of_nonzero: np.ndarray  # int32 [nnz], flat slot of each input nonzero


#: The staged-state load widths tried, widest first, when the caller names none.
LOAD_BYTES_CHOICES = (16, 8, 4)


def widest_fitting(plan_at) -> Plan:
    """``plan_at(load_bytes)`` at the widest of :data:`LOAD_BYTES_CHOICES` whose plan fits, else at
    the widest (a plan that says why it does not fit)."""
    fitting = (plan for plan in map(plan_at, LOAD_BYTES_CHOICES) if plan.fits)
    return next(fitting, None) or plan_at(LOAD_BYTES_CHOICES[0])


def plan_layouts(row_nnz, col_nnz, dtype, device, *, gates: int = 1, load_bytes: int | None = None,
                 exchange: str = "auto", batch: int | None = None) -> tuple[Plan, Plan]:
    """The plans of a layer's forward layout (``row_nnz``: nonzeros of each of its ``G*H`` rows,
    the output units or gate rows) and of its transposed layout (``col_nnz``: nonzeros of each of
    the ``H`` input units, which are its rows; over ``G*H`` columns).

    ``load_bytes=None`` takes the widest staged-state load (16, 8, 4 bytes: a batch tile of 4, 2, 1
    examples) whose forward layout fits on chip: a narrower tile stages less state per CTA, which
    leaves room for the weights of larger layers. ``exchange`` and ``batch`` are ``plan_layout``'s,
    for both layouts (the backward recurrence runs the forward's batch).
    (:func:`jax_sprnn.tile_layout.plan_layer` also plans tile layouts.)"""
    if load_bytes is None:
        load_bytes = widest_fitting(lambda lb: plan_layout(row_nnz, dtype, device, load_bytes=lb,
                                                           gates=gates)).load_bytes
    fwd = plan_layout(row_nnz, dtype, device, load_bytes=load_bytes, gates=gates, exchange=exchange,
                      batch=batch)
    bwd = plan_layout(col_nnz, dtype, device, load_bytes=load_bytes, gates=gates,
                      transposed=gates > 1, exchange=exchange, batch=batch)
    return fwd, bwd


def lane_of_slot(meta: LayoutMeta) -> np.ndarray:
    """For each flat slot ``(w*K + k)*32 + l``, its global lane ``w*32 + l``."""
    flat = np.arange(meta.num_slots, dtype=np.int64)
    return (flat // (WARP * meta.slots_per_lane)) * WARP + flat % WARP


def unit_spans(lane_row: np.ndarray, hidden: int, gates: int = 1) -> np.ndarray:
    """``[hidden]``: how many lanes each unit's rows hold together: from the start of its first
    gate's run (row ``i``) to the end of its last gate's run (row ``(gates - 1) * hidden + i``),
    which follow in one warp (docs/format.md, invariants 1 and 5). The persistent kernel runs a
    unit's cell on the first ``min(span, tile)`` of these lanes, one batch entry each, and takes
    ``ceil(tile / span)`` rounds where a span is narrower than the batch tile."""
    lane_row = np.asarray(lane_row).reshape(-1, WARP)
    lanes = np.arange(WARP)
    starts = np.ones(lane_row.shape, bool)
    starts[:, 1:] = lane_row[:, 1:] != lane_row[:, :-1]
    spans = np.zeros(hidden, np.int64)
    for warp, start in zip(lane_row, starts):
        heads = lanes[start]
        ends = np.append(heads[1:], WARP)  # one past each run's last lane
        for k, lane in enumerate(heads):
            unit = warp[lane]
            if 0 <= unit < hidden:
                spans[unit] = ends[min(k + gates - 1, len(heads) - 1)] - lane
    return spans


def decode_columns(indices: np.ndarray) -> np.ndarray:
    """Columns read by each slot (padding slots store ``~j``)."""
    indices = np.asarray(indices)
    return np.where(indices < 0, ~indices, indices)


def _rank_within_runs(sorted_keys: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """For a sorted array of non-negative integer keys, each element's position inside its run of
    equal keys. ``counts`` is ``np.bincount(sorted_keys)`` when the caller has it already."""
    if counts is None:
        counts = np.bincount(sorted_keys)
    starts = np.cumsum(counts) - counts
    return np.arange(sorted_keys.size) - starts[sorted_keys]


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for integer keys in ``[0, bound)``.

    NumPy sorts 16-bit keys by radix, several times faster than a comparison sort of these arrays,
    so wider keys are sorted as two 16-bit digits (least significant first; both passes stable).
    """
    if bound <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if bound > 1 << 32:
        return np.argsort(keys, kind="stable")
    low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    return low[np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")]


def _assign_lanes(row_nnz: np.ndarray, plan: LayoutMeta) -> tuple[np.ndarray, np.ndarray]:
    """Give each row its contiguous lanes inside one warp, and deal warps to CTAs evenly.

    In the forward layout of a gated kernel the G rows ``g*H + i`` of unit ``i`` take adjacent runs
    of one warp, in gate order, so that a kernel can update the unit's cell inside the warp.
    Returns ``(first_global_lane, lanes)`` per row.
    """
    lanes = lanes_per_row(row_nnz, plan.slots_per_lane)
    by_gate = lanes.reshape(1 if plan.transposed else plan.gates, -1)
    per_unit = by_gate.sum(axis=0)
    warp_of_unit, first_lane, used_warps = pack_rows_into_warps(per_unit)
    if used_warps < plan.num_ctas <= MAX_CLUSTER_CTAS:
        # In cluster mode every CTA must hold units: nothing waits for one without, so its peers
        # could push a later phase into its staged copy before it has read the earlier one.
        raise ValueError(
            f"layout: the plan has {plan.num_ctas} CTAs but this pattern's rows fill only "
            f"{used_warps} warps, and a layout of at most {MAX_CLUSTER_CTAS} CTAs runs in cluster "
            f"mode, where every CTA must hold rows: plan the layout for this pattern "
            f"(planner.plan_layout) or for fewer CTAs")
    # Deal the packed warps to CTAs fullest first in a snake order, so every CTA carries about the
    # same number of busy lanes (a step waits for the slowest CTA).
    fill = np.bincount(warp_of_unit, weights=per_unit, minlength=used_warps)
    order = np.argsort(-fill, kind="stable")
    ctas, wpc = plan.num_ctas, plan.warps_per_cta
    rank = np.arange(used_warps)
    rnd, pos = rank // ctas, rank % ctas
    cta = np.where(rnd % 2 == 0, pos, ctas - 1 - pos)
    final_warp = np.empty(used_warps, np.int64)
    final_warp[order] = cta * wpc + rnd
    if used_warps and final_warp.max() >= plan.num_warps:
        raise AssertionError("layout: the plan has fewer warps than the packing needs")
    unit_start = final_warp[warp_of_unit] * WARP + first_lane
    offset_in_unit = np.cumsum(by_gate, axis=0) - by_gate
    return (unit_start[None, :] + offset_in_unit).reshape(-1), lanes


def pack_pattern(rows: np.ndarray, cols: np.ndarray, plan: LayoutMeta, *, bank_aware: bool = True
                 ) -> PackedPattern:
    """Place nonzeros ``(rows[n], cols[n])`` of a ``num_rows x num_cols`` pattern (``plan``'s;
    ``hidden x hidden`` for the simple cell, ``G*H x H`` for a gated kernel's forward layout) into
    slots.

    Bank-aware order (docs/design.md): lane ``l`` in slot ``k`` should read a column of
    bank group ``(l + k) mod P`` (``P`` lanes share one shared-memory phase and there are ``P``
    groups), which is conflict-free for every phase. Inside each row the nonzeros of group ``g`` are
    matched to the row's positions whose target group is ``g``; what cannot be matched fills the
    row's remaining positions, earliest slots first; the rest is padding that reads a column some
    other lane of the same phase reads (a broadcast). With ``bank_aware=False`` the nonzeros simply
    fill positions in column order (the unordered baseline the tests compare against).
    """
    meta = LayoutMeta.from_plan(plan)
    num_rows, K = meta.num_rows, meta.slots_per_lane
    # The arrays with an entry per nonzero or per slot are int32 (a layout has far fewer than 2**31
    # slots): half the memory traffic, and half the fresh pages a first call faults in, of int64.
    rows = np.asarray(rows, np.int32)
    cols = np.asarray(cols, np.int32)
    nnz = rows.size
    row_nnz = np.bincount(rows, minlength=num_rows)
    first_lane, lanes = (a.astype(np.int32) for a in _assign_lanes(row_nnz, plan))

    # Every position (lane, slot) of every row, generated in (row, slot, lane) order: the order in
    # which leftovers fill a row, earliest slots first.
    lane_row = np.full(meta.num_lanes, -1, np.int32)
    lane_ids = np.repeat(first_lane, lanes) + (np.arange(lanes.sum(), dtype=np.int32) -
                                                np.repeat(np.cumsum(lanes, dtype=np.int32) - lanes, lanes))
    lane_row[lane_ids] = np.repeat(np.arange(num_rows, dtype=np.int32), lanes)
    per_row = lanes * K
    pos_row = np.repeat(np.arange(num_rows, dtype=np.int32), per_row)
    local = (np.arange(per_row.sum(), dtype=np.int32) -
             np.repeat(np.cumsum(per_row, dtype=np.int32) - per_row, per_row))
    row_lanes = lanes[pos_row]
    pos_k = local // row_lanes
    pos_lane = first_lane[pos_row] + local % row_lanes
    pos_flat = ((pos_lane // WARP) * K + pos_k) * WARP + pos_lane % WARP

    # Elements in (row, column) order.
    row_major = rows.astype(np.int64) * meta.num_cols + cols
    if np.all(row_major[1:] >= row_major[:-1]):  # callers usually pass row-sorted nonzeros
        order_e = None
        er, ec = rows, cols
    else:
        order_e = _stable_order(row_major, num_rows * meta.num_cols)
        er, ec = rows[order_e], cols[order_e]
    plain = _place(er, pos_row, pos_flat, num_rows, np.zeros(nnz, bool),
                   np.zeros(pos_flat.size, bool), np.empty(nnz, np.int32))
    indices = _indices_with_padding(plain, ec, meta)
    if bank_aware:
        aware = _place_bank_aware(er, ec, pos_row, pos_k, pos_lane, pos_flat, meta)
        aware_indices = _indices_with_padding(aware, ec, meta)
        # Keep, warp by warp, whichever order has fewer conflicts: rows never straddle warps, so
        # mixing is consistent, and the result is never worse than the unordered layout.
        better = (_conflicts_per_warp(aware_indices, meta) <= _conflicts_per_warp(indices, meta))
        indices = np.where(np.repeat(better, K * WARP), aware_indices, indices)  # a warp's slots
        plain = np.where(better[plain // (K * WARP)], aware, plain)
    if order_e is None:
        slot_of_nonzero = plain
    else:
        slot_of_nonzero = np.empty(nnz, np.int32)
        slot_of_nonzero[order_e] = plain
    return PackedPattern(meta, indices, lane_row, slot_of_nonzero)


def _place(er, pos_row, pos_flat, hidden, matched_e, taken, slot_sorted):
    """The i-th unmatched element of a row takes the row's i-th free position (slot-major)."""
    left_e = np.flatnonzero(~matched_e)
    free_p = np.flatnonzero(~taken)  # positions are generated in (row, slot, lane) order
    free_row = pos_row[free_p]
    free_rank = _rank_within_runs(free_row, np.bincount(free_row, minlength=hidden))
    left_per_row = np.bincount(er[left_e], minlength=hidden)
    use_p = free_p[free_rank < left_per_row[free_row]]
    slot_sorted[left_e] = pos_flat[use_p]  # both in row order
    return slot_sorted


def _place_bank_aware(er, ec, pos_row, pos_k, pos_lane, pos_flat, meta):
    """Match each row's nonzeros of bank group g to its positions whose target group is g."""
    hidden, P = meta.num_rows, meta.phase_lanes
    nnz = er.size
    slot_sorted = np.empty(nnz, np.int32)
    tg = (pos_lane % WARP + pos_k) % P
    key_p = pos_row * P + tg
    order_p = _stable_order(key_p, hidden * P)  # keeps (slot, lane) order inside a group
    kp = key_p[order_p]
    key_e = er * P + ec % P
    order_g = _stable_order(key_e, hidden * P)
    ke = key_e[order_g]
    count_p, count_e = np.bincount(kp, minlength=hidden * P), np.bincount(ke, minlength=hidden * P)
    m = np.minimum(count_p, count_e)
    sel_p = order_p[_rank_within_runs(kp, count_p) < m[kp]]
    sel_e = order_g[_rank_within_runs(ke, count_e) < m[ke]]
    slot_sorted[sel_e] = pos_flat[sel_p]  # both lists run in (row, group, rank) order
    matched_e = np.zeros(nnz, bool)
    matched_e[sel_e] = True
    taken = np.zeros(pos_flat.size, bool)
    taken[sel_p] = True
    return _place(er, pos_row, pos_flat, hidden, matched_e, taken, slot_sorted)


def _indices_with_padding(slot_of_element, ec, meta: LayoutMeta) -> np.ndarray:
    """The index array: real columns, and ``~j`` on padding with ``j`` read elsewhere in the phase
    (one address: a broadcast, not a conflict)."""
    P = meta.phase_lanes
    indices = np.zeros(meta.num_slots, np.int32)
    real = np.zeros(meta.num_slots, bool)
    indices[slot_of_element] = ec
    real[slot_of_element] = True
    by_phase, real_by_phase = indices.reshape(-1, P), real.reshape(-1, P)
    phase_col = np.take_along_axis(by_phase, real_by_phase.argmax(axis=1)[:, None], axis=1)
    return np.where(real_by_phase, by_phase, ~phase_col).reshape(-1)


def _wavefronts(indices: np.ndarray, load_bytes: int) -> np.ndarray:
    """Wavefronts of each phase (row of ``P`` lanes) under the bank model of bank_conflicts."""
    P = 128 // load_bytes
    cols = np.sort(decode_columns(indices).astype(np.int32).reshape(-1, P), axis=1)
    distinct = np.ones(cols.shape, bool)
    distinct[:, 1:] = cols[:, 1:] != cols[:, :-1]
    phase = np.repeat(np.arange(cols.shape[0], dtype=np.int32), P).reshape(cols.shape)
    per_group = np.bincount((phase * P + cols % P)[distinct], minlength=cols.size)
    return per_group.reshape(-1, P).max(axis=1)


def _conflicts_per_warp(indices: np.ndarray, meta: LayoutMeta) -> np.ndarray:
    extra = np.maximum(_wavefronts(indices, meta.load_bytes) - 1, 0)
    return extra.reshape(meta.num_warps, -1).sum(axis=1)


def bank_conflicts(indices: np.ndarray, load_bytes: int) -> int:
    """Extra shared-memory wavefronts of a layout's h loads under a model of the banks.

    A phase of ``P = 128 / load_bytes`` lanes is one wavefront when its columns fall in distinct bank
    groups (``j mod P``) or repeat one address; each further distinct column in a group costs one
    more. Returns the sum over all (warp, slot, phase) of ``wavefronts - 1``.
    """
    return int(np.maximum(_wavefronts(np.asarray(indices), load_bytes) - 1, 0).sum())
