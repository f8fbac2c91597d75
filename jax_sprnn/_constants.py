"""The facts the Python package and the C++/CUDA kernels share, in one place.

This file is the only source of these values. CMake runs it at configure time
(``python jax_sprnn/_constants.py --header OUT.h``) to write a C++ header with the same values and
formulas; the kernels read only that header. Both compiled modules export what they were built with
(``constants()``), and ``tests/test_constants.py`` compares that with this file.

It imports only the standard library: CMake runs it before the package (or jax) can be imported.
Each formula below is written twice, in Python and as the C++ text beside it, so that one edit
changes both; the test evaluates the two over a grid of inputs.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import NamedTuple

# ---- the persistent kernel's instantiation set --------------------------------------------------


class Tier(NamedTuple):
    """The compiled variants of one register-tier size (``reg_slots``) of the persistent kernel.

    A launch bound is a multiple of 128 threads; it fixes ptxas's register cap per thread, so each
    was chosen so that its kernels fit the register tier plus ~50-65 registers for staging, the
    gather pipeline and the epilogue (nvcc 13.0 ``-Xptxas -v``). Measured 2026-12-02 on the 48
    forward float16 instances: no spill on sm_100; 4 of the 16-byte-load instances spill 4-20 bytes
    on sm_90, 14 instances 8-68 bytes on sm_80 (docs/design.md) — small, but not zero.
    """

    #: launch bound of the narrow variant: at most 512 threads, with room for more staging vectors
    narrow_threads: int
    #: launch bound of the wide variant (more threads at a tighter register cap), or 0: none
    wide_threads: int
    #: 16-byte exchange vectors a thread of the narrow variant keeps in flight while staging
    narrow_unroll: int


#: Staging vectors in flight per thread in every wide variant (its register cap is tighter).
WIDE_STAGE_UNROLL = 4

#: 16-bit storage (float16, bfloat16): one register per slot.
PERSISTENT_TIERS_16: dict[int, Tier] = {
    0: Tier(512, 1024, 8),
    8: Tier(512, 768, 8),
    16: Tier(512, 768, 8),
    24: Tier(512, 640, 8),
    32: Tier(512, 640, 8),
    48: Tier(512, 0, 4),
    64: Tier(512, 0, 4),
    96: Tier(384, 0, 4),
    128: Tier(256, 0, 8),
    160: Tier(256, 0, 8),
    192: Tier(256, 0, 4),
}

#: float32 storage: two registers per slot, so the set stops where the budget (2 * reg_slots plus
#: the overhead) reaches the 255-register limit.
PERSISTENT_TIERS_32: dict[int, Tier] = {
    0: Tier(384, 768, 8),
    8: Tier(384, 512, 4),
    16: Tier(384, 512, 4),
    24: Tier(256, 0, 8),
    32: Tier(256, 0, 8),
    48: Tier(256, 0, 8),
    64: Tier(256, 0, 4),
    96: Tier(256, 0, 4),
}

#: The register-tier sizes instantiated per storage class.
REG_SLOTS_16: tuple[int, ...] = tuple(PERSISTENT_TIERS_16)
REG_SLOTS_32: tuple[int, ...] = tuple(PERSISTENT_TIERS_32)

#: The gated cells' forward kernels (LSTM, GRU): a smaller set, since a unit's lane holds G gate sums
#: and G input projections per batch column on top of the register tier (so each tier gets more
#: registers per thread than the simple cell's), and each set is compiled twice (both cells).
PERSISTENT_TIERS_GATED_16: dict[int, Tier] = {
    0: Tier(512, 640, 8),
    16: Tier(384, 0, 8),
    32: Tier(384, 0, 8),
    64: Tier(256, 0, 8),
}
PERSISTENT_TIERS_GATED_32: dict[int, Tier] = {
    0: Tier(384, 640, 8),
    16: Tier(256, 0, 8),
    32: Tier(256, 0, 4),
}
REG_SLOTS_GATED_16: tuple[int, ...] = tuple(PERSISTENT_TIERS_GATED_16)
REG_SLOTS_GATED_32: tuple[int, ...] = tuple(PERSISTENT_TIERS_GATED_32)

#: The register tiers of the tensor-core variants that run tile layouts (16-bit forward recurrences,
#: docs/format.md "Tile layouts"): whole strips of 16 slots, a subset of the slot variants' tiers
#: whose launch bounds they share (a strip's fragments take half the registers of its slots).
TILE_REG_SLOTS_16: tuple[int, ...] = (0, 32, 64, 128)
TILE_REG_SLOTS_GATED_16: tuple[int, ...] = (0, 32, 64)


def thread_limits(tiers: dict[int, Tier]) -> tuple[tuple[int, int], ...]:
    """``(reg_slots, the most threads per CTA any variant of that tier runs)`` for each tier."""
    return tuple((rs, max(t.narrow_threads, t.wide_threads)) for rs, t in tiers.items())


# ---- shared memory, workspace, spin bound -------------------------------------------------------

#: Shared-memory bytes of a persistent CTA that the planner keeps free besides staged h and the
#: weight tier: the kernel's static shared memory and the 16-byte alignment of its regions.
KERNEL_SMEM_RESERVE = 1024

#: The CUDA recurrences' workspace: a header (word 0: error flag, word 1: head count), then two
#: exchange buffers of B*H words of at most 8 bytes (double buffering across steps).
WORKSPACE_HEADER_BYTES = 256
EXCHANGE_BUFFERS = 2
EXCHANGE_WORD_BYTES = 8

#: How long a CTA waits for another's state before it gives up (a timeout error, NaN outputs).
#: The environment variable JAX_SPRNN_SPIN_TIMEOUT_US overrides it per call (read by the handlers).
DEFAULT_SPIN_TIMEOUT_US = 2_000_000

#: Cluster mode (sm_90 and newer): a layout of at most this many CTAs runs inside one thread-block
#: cluster, exchanging the state through distributed shared memory. 8 is the portable cluster size;
#: 16 needs the non-portable size, which the handler asks for and checks per device.
MAX_CLUSTER_CTAS = 16
PORTABLE_CLUSTER_CTAS = 8

#: The most independent problems one persistent launch runs (the directions of a bidirectional
#: layer, weight sets under ``vmap``): its ``reverse`` attribute holds one bit per problem.
MAX_PROBLEMS = 31


def cuda_workspace_bytes(batch: int, hidden: int) -> int:
    """Bytes of the workspace result of the CUDA forward and backward targets."""
    return WORKSPACE_HEADER_BYTES + EXCHANGE_BUFFERS * batch * hidden * EXCHANGE_WORD_BYTES


_CUDA_WORKSPACE_BYTES_CXX = """\
constexpr int64_t cuda_workspace_bytes(int64_t batch, int64_t hidden) {
  return kWorkspaceHeaderBytes + kExchangeBuffers * batch * hidden * kExchangeWordBytes;
}"""


def batch_tile(layout_tile: int, batch: int) -> int:
    """The batch tile a call runs with: the smallest power of two that holds ``batch`` examples,
    at most the layout's tile (``load_bytes / 4``). A batch of one or two takes a narrower tile
    than the layout's: a tile of 4 would gather, reduce, run the cell for and exchange padding
    entries every step (at B = 1, three of four), which the small layers' steps are made of. (In
    cluster mode the handler narrows it further where the cluster's replicas can give every
    plane one of its own: cuda/cuda_persistent.cu, docs/design.md "Narrow tiles on more replicas";
    the shared memory of a narrower tile is never more.)"""
    tile = 1
    while tile < min(batch, layout_tile):
        tile *= 2
    return tile


_BATCH_TILE_CXX = """\
constexpr int batch_tile(int64_t layout_tile, int64_t batch) {
  int tile = 1;
  while (tile < batch && tile < layout_tile) tile *= 2;
  return tile;
}"""


#: The persistent kernel's phase loop is compiled once per exchange mode (grid, cluster) in the
#: one-plane variants of at most this many register words of slots (``split_modes``): a forward
#: recurrence's at a batch tile of 1 or 2, and every other's.
SPLIT_MODES_WORDS_NARROW_FORWARD = 32
SPLIT_MODES_WORDS = 16
#: ... and at a tile of 4 only where the narrow variant has at most this many threads (the others
#: spilled).
SPLIT_MODES_TILE4_MAX_THREADS = 384


def split_modes(words: int, tile: int, backward: bool, narrow_threads: int, planes_per_pass: int = 1,
                wide: bool = False, tiles: bool = False) -> bool:
    """Whether a variant of the persistent kernel holds a copy of its phase loop per exchange mode
    (``PersistentConfig::kSplitModes``): without the other mode's branches and address arithmetic
    its cluster-mode step is 6-9% shorter (RESULTS.md, twenty-ninth and thirty-first sessions), and
    its static shared memory is twice the loop's set. ``words``: the register words of its slots
    (``reg_slots`` times the registers a slot takes); ``narrow_threads``: its tier's narrow launch
    bound."""
    limit = SPLIT_MODES_WORDS_NARROW_FORWARD if tile <= 2 and not backward else SPLIT_MODES_WORDS
    return (planes_per_pass == 1 and not wide and not tiles and words <= limit
            and (tile <= 2 or narrow_threads <= SPLIT_MODES_TILE4_MAX_THREADS))


_SPLIT_MODES_CXX = """\
constexpr bool split_modes(int64_t words, int64_t tile, bool backward, int64_t narrow_threads,
                           int64_t planes_per_pass, bool wide, bool tiles) {
  return planes_per_pass == 1 && !wide && !tiles &&
         words <= (tile <= 2 && !backward ? kSplitModesWordsNarrowForward : kSplitModesWords) &&
         (tile <= 2 || narrow_threads <= kSplitModesTile4MaxThreads);
}"""


def persistent_smem_bytes(hidden: int, batch: int, tile: int, weight_tier_bytes: int,
                          h_buffers: int = 1, cell_bytes: int = 0) -> int:
    """Dynamic shared memory of one persistent CTA: ``h_buffers`` staged copies of the state as
    float32 ``[ceil(B / tile)][H][tile]`` (each 16-byte aligned, as staging stores vectors), the
    weight tier (16-byte aligned), the LSTM's cell state (``cell_bytes``, see
    :func:`cell_state_smem_bytes`), then the clamped lengths (one int32 per example)."""
    planes = -(-batch // tile)
    return (h_buffers * _align16(planes * hidden * tile * 4) + _align16(weight_tier_bytes)
            + cell_bytes + batch * 4)


def cell_state_smem_bytes(batch: int, tile: int, warps_per_cta: int, gates: int,
                          transposed: bool = False) -> int:
    """Shared memory of a CTA's cell state, float32 ``[ceil(B / tile)][unit slot][tile]``, 16-byte
    aligned: the LSTM forward's c, where a warp has ``32 // 4`` unit slots (a unit's four gate rows
    take at least four of its lanes), and a gated backward's (``transposed``) carry beside dh, one
    row and so up to 32 units a warp. 0 for the other recurrences."""
    if gates > 1 and transposed:
        units_per_warp = 32
    elif gates == 4:
        units_per_warp = 32 // gates
    else:
        return 0
    return _align16(-(-batch // tile) * tile * warps_per_cta * units_per_warp * 4)


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


_PERSISTENT_SMEM_BYTES_CXX = """\
constexpr int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }
constexpr int64_t persistent_smem_bytes(int64_t hidden, int64_t batch, int64_t tile,
                                        int64_t weight_tier_bytes, int64_t h_buffers = 1,
                                        int64_t cell_bytes = 0) {
  return h_buffers * align16((batch + tile - 1) / tile * hidden * tile * 4) +
         align16(weight_tier_bytes) + cell_bytes + batch * 4;
}
constexpr int64_t cell_state_smem_bytes(int64_t batch, int64_t tile, int64_t warps_per_cta,
                                        int64_t gates, bool transposed = false) {
  const int64_t units_per_warp = gates > 1 && transposed ? 32 : gates == 4 ? 32 / gates : 0;
  return align16((batch + tile - 1) / tile * tile * warps_per_cta * units_per_warp * 4);
}"""


# ---- the FFI targets ----------------------------------------------------------------------------

#: The version of the native calling convention (operands, attributes, the packed format's meaning).
#: It is part of every target's name, so a program exported against another version fails loudly
#: ("No FFI handler registered for jax_sprnn_forward_v2") instead of miscomputing. Raise it with
#: any change of a production target's signature or of what its operands mean.
# 2: the CUDA forward's batch_major attribute (2026-12-03); 3: gated_backward returns no dbias (its
# callers sum du) and has a CUDA target (2026-12-03); 4: the CUDA gated forward's batch_major
# attribute (2026-12-03); 5: the CUDA forward's and backward's `problems` attribute (stacked
# problems, `reverse` a bit mask) and the CUDA backward's batch_major (2026-12-04); 6: the CUDA
# gated forward's `problems` attribute (its hn_bias [problems, H]), the CUDA gated backward's
# `batch_major` and `problems` (2026-12-04).
FFI_ABI_VERSION = 7

#: The targets' kinds: production ones first, then the test and benchmark ones.
PRODUCTION_TARGET_KINDS = ("forward", "backward", "weight_grad", "gated_forward", "gated_backward")
#: Production targets that only the CPU module registers.
CPU_ONLY_TARGET_KINDS: tuple[str, ...] = ()
TESTING_TARGET_KINDS = ("forward_hooked", "backward_hooked", "gated_forward_hooked",
                        "gated_backward_hooked", "sync_floor")


def ffi_target(kind: str) -> str:
    """The registered name of a target kind, e.g. ``jax_sprnn_forward_v2``."""
    if kind not in PRODUCTION_TARGET_KINDS + TESTING_TARGET_KINDS:
        raise ValueError(f"unknown FFI target kind {kind!r}")
    return f"jax_sprnn_{kind}_v{FFI_ABI_VERSION}"


# ---- the weight-gradient kernel -----------------------------------------------------------------

#: Threads per CTA of the weight-gradient kernel (one CTA per SM at a time).
WEIGHT_GRAD_THREADS = 1024
#: A thread owns up to this many slots of one lane: the smaller count when a lane has no more
#: slots than that, else the larger one (the kernel is compiled for both).
WEIGHT_GRAD_SLOTS_PER_THREAD_SMALL = 8
WEIGHT_GRAD_SLOTS_PER_THREAD_LARGE = 16


def weight_grad_slots_per_thread(slots_per_lane: int) -> int:
    """The slots one thread of the weight-gradient kernel owns, for lanes of ``slots_per_lane``."""
    if slots_per_lane <= WEIGHT_GRAD_SLOTS_PER_THREAD_SMALL:
        return WEIGHT_GRAD_SLOTS_PER_THREAD_SMALL
    return WEIGHT_GRAD_SLOTS_PER_THREAD_LARGE


_WEIGHT_GRAD_SLOTS_PER_THREAD_CXX = """\
constexpr int weight_grad_slots_per_thread(int64_t slots_per_lane) {
  return slots_per_lane <= kWeightGradSlotsPerThreadSmall ? kWeightGradSlotsPerThreadSmall
                                                          : kWeightGradSlotsPerThreadLarge;
}"""


def weight_grad_smem_bytes(hidden: int, batch: int, pairs: int = 1) -> int:
    """Shared memory of a weight-gradient CTA that stages ``pairs`` (position, example) pairs as
    float32 rows (``h_before`` and ``dz``), plus the clamped lengths. One pair is the least."""
    return pairs * 2 * hidden * 4 + batch * 4


_WEIGHT_GRAD_SMEM_BYTES_CXX = """\
constexpr int64_t weight_grad_smem_bytes(int64_t hidden, int64_t batch, int64_t pairs = 1) {
  return pairs * 2 * hidden * 4 + batch * 4;
}"""


# ---- what the compiled modules export, and the C++ header ---------------------------------------

#: The names (of this module) that the compiled modules' ``constants()`` exports.
EXPORTED = ("FFI_ABI_VERSION", "PERSISTENT_TIERS_16", "PERSISTENT_TIERS_32", "REG_SLOTS_16", "REG_SLOTS_32",
            "PERSISTENT_TIERS_GATED_16", "PERSISTENT_TIERS_GATED_32", "REG_SLOTS_GATED_16",
            "REG_SLOTS_GATED_32", "TILE_REG_SLOTS_16", "TILE_REG_SLOTS_GATED_16",
            "cell_state_smem_bytes", "batch_tile", "split_modes", "SPLIT_MODES_WORDS_NARROW_FORWARD",
            "SPLIT_MODES_WORDS", "SPLIT_MODES_TILE4_MAX_THREADS",
            "WIDE_STAGE_UNROLL", "KERNEL_SMEM_RESERVE", "WORKSPACE_HEADER_BYTES", "EXCHANGE_BUFFERS",
            "EXCHANGE_WORD_BYTES", "DEFAULT_SPIN_TIMEOUT_US", "MAX_CLUSTER_CTAS",
            "PORTABLE_CLUSTER_CTAS", "MAX_PROBLEMS", "WEIGHT_GRAD_THREADS",
            "WEIGHT_GRAD_SLOTS_PER_THREAD_SMALL", "WEIGHT_GRAD_SLOTS_PER_THREAD_LARGE",
            "cuda_workspace_bytes", "persistent_smem_bytes", "weight_grad_slots_per_thread",
            "weight_grad_smem_bytes")


def _check_tiers(tiers: dict[int, Tier], name: str) -> None:
    rs = list(tiers)
    if rs != sorted(set(rs)) or rs[0] != 0:
        raise ValueError(f"{name}: register-tier sizes must be ascending, distinct, from 0: {rs}")
    for r, t in tiers.items():
        bounds = [t.narrow_threads] + ([t.wide_threads] if t.wide_threads else [])
        if any(b % 128 or not 128 <= b <= 1024 for b in bounds):
            raise ValueError(f"{name}[{r}]: launch bounds must be multiples of 128 in [128, 1024]")
        if t.wide_threads and t.wide_threads <= t.narrow_threads:
            raise ValueError(f"{name}[{r}]: a wide variant must raise the launch bound")
        if t.narrow_unroll not in (1, 2, 4, 8):
            raise ValueError(f"{name}[{r}]: the staging unroll must be 1, 2, 4 or 8")


def _tier_switch(tiers: dict[int, Tier], narrow, wide) -> str:
    cases = "\n".join(f"      case {rs}: return wide ? {wide(t)} : {narrow(t)};"
                      for rs, t in tiers.items())
    return f"    switch (reg_slots) {{\n{cases}\n    }}"


def _target_names_cxx() -> str:
    kinds = PRODUCTION_TARGET_KINDS + TESTING_TARGET_KINDS
    lines = [f'inline constexpr char k{"".join(w.title() for w in k.split("_"))}Target[] = '
             f'"{ffi_target(k)}";' for k in kinds]
    return "// The registered FFI target names (ffi_target).\n" + "\n".join(lines)


def cxx_header() -> str:
    """The C++ rendering of this file (namespace ``jax_sprnn::constants``)."""
    _check_tiers(PERSISTENT_TIERS_16, "PERSISTENT_TIERS_16")
    _check_tiers(PERSISTENT_TIERS_32, "PERSISTENT_TIERS_32")
    _check_tiers(PERSISTENT_TIERS_GATED_16, "PERSISTENT_TIERS_GATED_16")
    _check_tiers(PERSISTENT_TIERS_GATED_32, "PERSISTENT_TIERS_GATED_32")
    for name, tiles, tiers in (("TILE_REG_SLOTS_16", TILE_REG_SLOTS_16, PERSISTENT_TIERS_16),
                               ("TILE_REG_SLOTS_GATED_16", TILE_REG_SLOTS_GATED_16,
                                PERSISTENT_TIERS_GATED_16)):
        if any(rs % 16 or rs not in tiers for rs in tiles):
            raise ValueError(f"{name}: tile tiers must be whole 16-slot strips of instantiated tiers")

    def seq(values):
        return ", ".join(str(v) for v in values)

    def tier_function(name, narrow, wide, doc, tiers16=PERSISTENT_TIERS_16,
                      tiers32=PERSISTENT_TIERS_32):
        return (f"// {doc}\n"
                f"constexpr int {name}(bool packed16, int reg_slots, bool wide) {{\n"
                f"  if (packed16) {{\n{_tier_switch(tiers16, narrow, wide)}\n"
                f"  }} else {{\n{_tier_switch(tiers32, narrow, wide)}\n  }}\n"
                f"  return 0;\n}}")

    def gated(name, narrow, wide, doc):
        return tier_function(name, narrow, wide, doc, PERSISTENT_TIERS_GATED_16,
                             PERSISTENT_TIERS_GATED_32)

    return f"""\
// Generated from jax_sprnn/_constants.py at configure time; do not edit (edit that file).
#pragma once

#include <cstdint>
#include <utility>

namespace jax_sprnn::constants {{

// Register-tier sizes instantiated for 16-bit and float32 storage.
using RegSlots16 = std::integer_sequence<int, {seq(REG_SLOTS_16)}>;
using RegSlots32 = std::integer_sequence<int, {seq(REG_SLOTS_32)}>;
// ... and for the gated cells' forward kernels.
using RegSlotsGated16 = std::integer_sequence<int, {seq(REG_SLOTS_GATED_16)}>;
using RegSlotsGated32 = std::integer_sequence<int, {seq(REG_SLOTS_GATED_32)}>;
// ... and for the tensor-core variants of tile layouts (16-bit forward recurrences).
using TileRegSlots16 = std::integer_sequence<int, {seq(TILE_REG_SLOTS_16)}>;
using TileRegSlotsGated16 = std::integer_sequence<int, {seq(TILE_REG_SLOTS_GATED_16)}>;
inline constexpr int kWideStageUnroll = {WIDE_STAGE_UNROLL};

{tier_function("persistent_max_threads", lambda t: t.narrow_threads, lambda t: t.wide_threads,
               "Launch bound of a variant; 0 where the tier has no such variant.")}

{tier_function("persistent_stage_unroll", lambda t: t.narrow_unroll,
               lambda t: "kWideStageUnroll" if t.wide_threads else 0,
               "Staging unroll of a variant; 0 where the tier has no such variant.")}

{gated("gated_max_threads", lambda t: t.narrow_threads, lambda t: t.wide_threads,
       "The same for the gated cells' kernels.")}

{gated("gated_stage_unroll", lambda t: t.narrow_unroll,
       lambda t: "kWideStageUnroll" if t.wide_threads else 0,
       "The same for the gated cells' kernels.")}

inline constexpr int64_t kFfiAbiVersion = {FFI_ABI_VERSION};
{_target_names_cxx()}

inline constexpr int64_t kKernelSmemReserve = {KERNEL_SMEM_RESERVE};
inline constexpr int64_t kWorkspaceHeaderBytes = {WORKSPACE_HEADER_BYTES};
inline constexpr int64_t kExchangeBuffers = {EXCHANGE_BUFFERS};
inline constexpr int64_t kExchangeWordBytes = {EXCHANGE_WORD_BYTES};
inline constexpr int64_t kDefaultSpinTimeoutUs = {DEFAULT_SPIN_TIMEOUT_US};
inline constexpr int64_t kMaxClusterCtas = {MAX_CLUSTER_CTAS};
inline constexpr int64_t kPortableClusterCtas = {PORTABLE_CLUSTER_CTAS};
inline constexpr int64_t kMaxProblems = {MAX_PROBLEMS};

{_CUDA_WORKSPACE_BYTES_CXX}

{_BATCH_TILE_CXX}

inline constexpr int64_t kSplitModesWordsNarrowForward = {SPLIT_MODES_WORDS_NARROW_FORWARD};
inline constexpr int64_t kSplitModesWords = {SPLIT_MODES_WORDS};
inline constexpr int64_t kSplitModesTile4MaxThreads = {SPLIT_MODES_TILE4_MAX_THREADS};
{_SPLIT_MODES_CXX}

{_PERSISTENT_SMEM_BYTES_CXX}

inline constexpr int kWeightGradThreads = {WEIGHT_GRAD_THREADS};
inline constexpr int kWeightGradSlotsPerThreadSmall = {WEIGHT_GRAD_SLOTS_PER_THREAD_SMALL};
inline constexpr int kWeightGradSlotsPerThreadLarge = {WEIGHT_GRAD_SLOTS_PER_THREAD_LARGE};

{_WEIGHT_GRAD_SLOTS_PER_THREAD_CXX}

{_WEIGHT_GRAD_SMEM_BYTES_CXX}

}}  // namespace jax_sprnn::constants
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--header", type=pathlib.Path, required=True, help="the C++ header to write")
    out = parser.parse_args(argv).header
    text = cxx_header()
    # Rewrite only on change, so that a re-configure does not rebuild every kernel.
    if not out.exists() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    main()
