// `constants()` of both compiled modules: the values and formulas of jax_sprnn/_constants.py as
// this build compiled them (through the generated jax_sprnn_constants.h), under the Python names,
// so that tests/test_constants.py can compare the two.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <utility>

#include "jax_sprnn_constants.h"

namespace jax_sprnn {

namespace detail {

template <int... RS>
nanobind::tuple reg_slots(std::integer_sequence<int, RS...>) {
  return nanobind::make_tuple(RS...);
}

// {reg_slots: (narrow_threads, wide_threads, narrow_unroll)}, read through the kernels' lookups.
template <int... RS>
nanobind::dict tiers(bool packed16, std::integer_sequence<int, RS...>) {
  namespace c = constants;
  nanobind::dict d;
  ((d[nanobind::cast(RS)] = nanobind::make_tuple(c::persistent_max_threads(packed16, RS, false),
                                                 c::persistent_max_threads(packed16, RS, true),
                                                 c::persistent_stage_unroll(packed16, RS, false))),
   ...);
  return d;
}

// The same for the gated cells' kernels.
template <int... RS>
nanobind::dict gated_tiers(bool packed16, std::integer_sequence<int, RS...>) {
  namespace c = constants;
  nanobind::dict d;
  ((d[nanobind::cast(RS)] = nanobind::make_tuple(c::gated_max_threads(packed16, RS, false),
                                                 c::gated_max_threads(packed16, RS, true),
                                                 c::gated_stage_unroll(packed16, RS, false))),
   ...);
  return d;
}

}  // namespace detail

inline nanobind::dict exported_constants() {
  namespace nb = nanobind;
  namespace c = constants;
  nb::dict d;
  d["PERSISTENT_TIERS_16"] = detail::tiers(true, c::RegSlots16{});
  d["PERSISTENT_TIERS_32"] = detail::tiers(false, c::RegSlots32{});
  d["REG_SLOTS_16"] = detail::reg_slots(c::RegSlots16{});
  d["REG_SLOTS_32"] = detail::reg_slots(c::RegSlots32{});
  d["PERSISTENT_TIERS_GATED_16"] = detail::gated_tiers(true, c::RegSlotsGated16{});
  d["PERSISTENT_TIERS_GATED_32"] = detail::gated_tiers(false, c::RegSlotsGated32{});
  d["REG_SLOTS_GATED_16"] = detail::reg_slots(c::RegSlotsGated16{});
  d["REG_SLOTS_GATED_32"] = detail::reg_slots(c::RegSlotsGated32{});
  d["TILE_REG_SLOTS_16"] = detail::reg_slots(c::TileRegSlots16{});
  d["TILE_REG_SLOTS_GATED_16"] = detail::reg_slots(c::TileRegSlotsGated16{});
  d["FFI_ABI_VERSION"] = c::kFfiAbiVersion;
  d["WIDE_STAGE_UNROLL"] = c::kWideStageUnroll;
  d["KERNEL_SMEM_RESERVE"] = c::kKernelSmemReserve;
  d["WORKSPACE_HEADER_BYTES"] = c::kWorkspaceHeaderBytes;
  d["EXCHANGE_BUFFERS"] = c::kExchangeBuffers;
  d["EXCHANGE_WORD_BYTES"] = c::kExchangeWordBytes;
  d["DEFAULT_SPIN_TIMEOUT_US"] = c::kDefaultSpinTimeoutUs;
  d["MAX_CLUSTER_CTAS"] = c::kMaxClusterCtas;
  d["PORTABLE_CLUSTER_CTAS"] = c::kPortableClusterCtas;
  d["MAX_PROBLEMS"] = c::kMaxProblems;
  d["SPLIT_MODES_WORDS_NARROW_FORWARD"] = c::kSplitModesWordsNarrowForward;
  d["SPLIT_MODES_WORDS"] = c::kSplitModesWords;
  d["SPLIT_MODES_TILE4_MAX_THREADS"] = c::kSplitModesTile4MaxThreads;
  d["WEIGHT_GRAD_THREADS"] = c::kWeightGradThreads;
  d["WEIGHT_GRAD_SLOTS_PER_THREAD_SMALL"] = c::kWeightGradSlotsPerThreadSmall;
  d["WEIGHT_GRAD_SLOTS_PER_THREAD_LARGE"] = c::kWeightGradSlotsPerThreadLarge;
  d["cuda_workspace_bytes"] = nb::cpp_function(
      [](int64_t batch, int64_t hidden) { return c::cuda_workspace_bytes(batch, hidden); },
      nb::arg("batch"), nb::arg("hidden"));
  d["persistent_smem_bytes"] = nb::cpp_function(
      [](int64_t hidden, int64_t batch, int64_t tile, int64_t weight_tier_bytes, int64_t h_buffers,
         int64_t cell_bytes) {
        return c::persistent_smem_bytes(hidden, batch, tile, weight_tier_bytes, h_buffers, cell_bytes);
      },
      nb::arg("hidden"), nb::arg("batch"), nb::arg("tile"), nb::arg("weight_tier_bytes"),
      nb::arg("h_buffers") = 1, nb::arg("cell_bytes") = 0);
  d["cell_state_smem_bytes"] = nb::cpp_function(
      [](int64_t batch, int64_t tile, int64_t warps_per_cta, int64_t gates, bool transposed) {
        return c::cell_state_smem_bytes(batch, tile, warps_per_cta, gates, transposed);
      },
      nb::arg("batch"), nb::arg("tile"), nb::arg("warps_per_cta"), nb::arg("gates"),
      nb::arg("transposed") = false);
  d["batch_tile"] = nb::cpp_function(
      [](int64_t layout_tile, int64_t batch) { return c::batch_tile(layout_tile, batch); },
      nb::arg("layout_tile"), nb::arg("batch"));
  d["split_modes"] = nb::cpp_function(
      [](int64_t words, int64_t tile, bool backward, int64_t narrow_threads, int64_t planes_per_pass,
         bool wide, bool tiles) {
        return c::split_modes(words, tile, backward, narrow_threads, planes_per_pass, wide, tiles);
      },
      nb::arg("words"), nb::arg("tile"), nb::arg("backward"), nb::arg("narrow_threads"),
      nb::arg("planes_per_pass") = 1, nb::arg("wide") = false, nb::arg("tiles") = false);
  d["weight_grad_slots_per_thread"] = nb::cpp_function(
      [](int64_t slots_per_lane) { return c::weight_grad_slots_per_thread(slots_per_lane); },
      nb::arg("slots_per_lane"));
  d["weight_grad_smem_bytes"] = nb::cpp_function(
      [](int64_t hidden, int64_t batch, int64_t pairs) {
        return c::weight_grad_smem_bytes(hidden, batch, pairs);
      },
      nb::arg("hidden"), nb::arg("batch"), nb::arg("pairs") = 1);
  return d;
}

}  // namespace jax_sprnn
