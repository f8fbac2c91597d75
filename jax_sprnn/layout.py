"""Pack a sparse recurrent matrix into the on-chip layout of docs/format.md (NumPy, offline).

Everything here is vectorized: packing a 4608x4608 matrix at 10% density (2.1M nonzeros) is a
handful of sorts over arrays of that size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .planner import WARP, Plan, pack_rows_into_warps, lanes_per_row


@dataclasses.dataclass(frozen=True)
class LayoutMeta:
    """The static half of a packed layout (hashable: it is pytree aux data and primitive params)."""

    hidden: int
    slots_per_lane: int
    num_warps: int
    warps_per_cta: int
    reg_slots: int
    load_bytes: int
    fits: bool
    reason: str

    @classmethod
    def from_plan(cls, plan: Plan) -> "LayoutMeta":
        return cls(plan.hidden, plan.slots_per_lane, plan.num_warps, plan.warps_per_cta,
                   plan.reg_slots, plan.load_bytes, plan.fits, plan.reason)

    @property
    def num_slots(self) -> int:
        return self.num_warps * self.slots_per_lane * WARP

    @property
    def num_lanes(self) -> int:
        return self.num_warps * WARP

    @property
    def num_ctas(self) -> int:
        return self.num_warps // self.warps_per_cta

    @property
    def phase_lanes(self) -> int:
        """Lanes served together by shared memory for one load of ``load_bytes`` each."""
        return 128 // self.load_bytes

    def ffi_attrs(self) -> dict:
        """The attributes every native target of this layout takes."""
        return dict(slots_per_lane=np.int64(self.slots_per_lane),
                    warps_per_cta=np.int64(self.warps_per_cta),
                    reg_slots=np.int64(self.reg_slots),
                    load_bytes=np.int64(self.load_bytes))


@dataclasses.dataclass(frozen=True)
class PackedPattern:
    """A packed pattern: where each input nonzero went, plus the index and lane arrays."""

    meta: LayoutMeta
    indices: np.ndarray  # int32 [num_slots], ~j on padding
    lane_row: np.ndarray  # int32 [num_lanes], -1 on idle lanes
    slot_of_nonzero: np.ndarray  # int64 [nnz], flat slot of each input nonzero


def lane_of_slot(meta: LayoutMeta) -> np.ndarray:
    """For each flat slot ``(w*K + k)*32 + l``, its global lane ``w*32 + l``."""
    flat = np.arange(meta.num_slots, dtype=np.int64)
    return (flat // (WARP * meta.slots_per_lane)) * WARP + flat % WARP


def decode_columns(indices: np.ndarray) -> np.ndarray:
    """Columns read by each slot (padding slots store ``~j``)."""
    indices = np.asarray(indices)
    return np.where(indices < 0, ~indices, indices)


def _rank_within_runs(sorted_keys: np.ndarray) -> np.ndarray:
    """For a sorted key array, each element's position inside its run of equal keys."""
    n = sorted_keys.size
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.arange(n, dtype=np.int64) - run_start


def _assign_lanes(row_nnz: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Give each row its contiguous lanes inside one warp, and deal warps to CTAs evenly.

    Returns ``(first_global_lane, lanes)`` per row.
    """
    lanes = lanes_per_row(row_nnz, plan.slots_per_lane)
    warp_of_row, first_lane, used_warps = pack_rows_into_warps(lanes)
    # Deal the packed warps to CTAs fullest first in a snake order, so every CTA carries about the
    # same number of busy lanes (a step waits for the slowest CTA).
    fill = np.bincount(warp_of_row, weights=lanes, minlength=used_warps)
    order = np.argsort(-fill, kind="stable")
    ctas, wpc = plan.num_ctas, plan.warps_per_cta
    rank = np.arange(used_warps)
    rnd, pos = rank // ctas, rank % ctas
    cta = np.where(rnd % 2 == 0, pos, ctas - 1 - pos)
    final_warp = np.empty(used_warps, np.int64)
    final_warp[order] = cta * wpc + rnd
    if used_warps and final_warp.max() >= plan.num_warps:
        raise AssertionError("layout: the plan has fewer warps than the packing needs")
    return final_warp[warp_of_row] * WARP + first_lane, lanes


def pack_pattern(rows: np.ndarray, cols: np.ndarray, plan: Plan, *, bank_aware: bool = True
                 ) -> PackedPattern:
    """Place nonzeros ``(rows[n], cols[n])`` of a ``hidden x hidden`` pattern into slots.

    Bank-aware order (DESIGN.md, optimization 2): lane ``l`` in slot ``k`` should read a column of
    bank group ``(l + k) mod P`` (``P`` lanes share one shared-memory phase and there are ``P``
    groups), which is conflict-free for every phase. Inside each row the nonzeros of group ``g`` are
    matched to the row's positions whose target group is ``g``; what cannot be matched fills the
    row's remaining positions, earliest slots first; the rest is padding that reads a column some
    other lane of the same phase reads (a broadcast). With ``bank_aware=False`` the nonzeros simply
    fill positions in column order (the unordered baseline the tests compare against).
    """
    meta = LayoutMeta.from_plan(plan)
    hidden, K, P = meta.hidden, meta.slots_per_lane, meta.phase_lanes
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    nnz = rows.size
    row_nnz = np.bincount(rows, minlength=hidden)
    first_lane, lanes = _assign_lanes(row_nnz, plan)

    # Every position (lane, slot) of every row, generated lane-major.
    lane_row = np.full(meta.num_lanes, -1, np.int64)
    lane_ids = np.repeat(first_lane, lanes) + (np.arange(lanes.sum()) -
                                                np.repeat(np.cumsum(lanes) - lanes, lanes))
    lane_row[lane_ids] = np.repeat(np.arange(hidden), lanes)
    pos_lane = np.repeat(lane_ids, K)
    pos_k = np.tile(np.arange(K, dtype=np.int64), lane_ids.size)
    pos_row = lane_row[pos_lane]
    pos_flat = ((pos_lane // WARP) * K + pos_k) * WARP + pos_lane % WARP

    # Elements in (row, column) order.
    order_e = np.lexsort((cols, rows))
    er, ec = rows[order_e], cols[order_e]
    slot_sorted = np.empty(nnz, np.int64)  # slot of the element at sorted position
    matched_e = np.zeros(nnz, bool)
    taken = np.zeros(pos_flat.size, bool)

    # Positions of one row ordered by (slot, lane), so leftovers go to the earliest slots.
    pos_order_key = pos_row * (K * WARP) + pos_k * WARP + pos_lane % WARP
    if bank_aware:
        groups = hidden * P
        tg = (pos_lane % WARP + pos_k) % P
        key_p = pos_row * P + tg
        order_p = np.lexsort((pos_order_key, key_p))
        kp = key_p[order_p]
        rank_p = _rank_within_runs(kp)
        key_e = er * P + ec % P
        order_g = np.argsort(key_e, kind="stable")
        ke = key_e[order_g]
        rank_e = _rank_within_runs(ke)
        m = np.minimum(np.bincount(kp, minlength=groups), np.bincount(ke, minlength=groups))
        sel_p = order_p[rank_p < m[kp]]
        sel_e = order_g[rank_e < m[ke]]
        slot_sorted[sel_e] = pos_flat[sel_p]  # both lists run in (row, group, rank) order
        matched_e[sel_e] = True
        taken[sel_p] = True

    # Leftovers: the i-th unmatched element of a row takes the row's i-th free position.
    left_e = np.flatnonzero(~matched_e)
    free_p = np.flatnonzero(~taken)
    free_p = free_p[np.argsort(pos_order_key[free_p], kind="stable")]
    free_rank = _rank_within_runs(pos_row[free_p])
    left_per_row = np.bincount(er[left_e], minlength=hidden)
    use_p = free_p[free_rank < left_per_row[pos_row[free_p]]]
    slot_sorted[left_e] = pos_flat[use_p]  # both in row order

    indices = np.zeros(meta.num_slots, np.int64)
    real = np.zeros(meta.num_slots, bool)
    indices[slot_sorted] = ec
    real[slot_sorted] = True
    # Padding reads a column that a real slot of the same phase reads (one address: a broadcast).
    phase = np.arange(meta.num_slots) // P
    phase_col = np.zeros(meta.num_slots // P, np.int64)
    phase_col[phase[real]] = indices[real]
    indices = np.where(real, indices, ~phase_col[phase])

    slot_of_nonzero = np.empty(nnz, np.int64)
    slot_of_nonzero[order_e] = slot_sorted
    return PackedPattern(meta, indices.astype(np.int32), lane_row.astype(np.int32), slot_of_nonzero)


def bank_conflicts(indices: np.ndarray, load_bytes: int, hidden: int | None = None) -> int:
    """Extra shared-memory wavefronts of a layout's h loads under a model of the banks.

    A phase of ``P = 128 / load_bytes`` lanes is one wavefront when its columns fall in distinct bank
    groups (``j mod P``) or repeat one address; each further distinct column in a group costs one
    more. Returns the sum over all (warp, slot, phase) of ``wavefronts - 1``.
    """
    P = 128 // load_bytes
    cols = decode_columns(indices).astype(np.int64)
    if hidden is None:
        hidden = int(cols.max()) + 1 if cols.size else 1
    phase = np.arange(cols.size) // P
    distinct = np.unique(phase * hidden + cols)  # one entry per distinct address in a phase
    ph, col = distinct // hidden, distinct % hidden
    per_group = np.bincount(ph * P + col % P, minlength=(cols.size // P) * P)
    waves = per_group.reshape(-1, P).max(axis=1)
    return int(np.maximum(waves - 1, 0).sum())
