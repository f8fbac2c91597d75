// The XLA FFI signatures the CPU and CUDA handlers share (docs/format.md): each function appends
// one group of arguments, results or attributes to a binding, so every handler lists them once.
#pragma once

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace jax_sprnn::bindings {

namespace ffi = xla::ffi;

// x, h0, values, indices, lane_row, lengths -> y, h_final
template <typename Binding>
auto forward_operands(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()          // x
      .template Arg<ffi::AnyBuffer>()          // h0
      .template Arg<ffi::AnyBuffer>()          // values
      .template Arg<ffi::Buffer<ffi::S32>>()   // indices
      .template Arg<ffi::Buffer<ffi::S32>>()   // lane_row
      .template Arg<ffi::Buffer<ffi::S32>>()   // lengths
      .template Ret<ffi::AnyBuffer>()          // y
      .template Ret<ffi::AnyBuffer>();         // h_final
}

// y, h0, values_t, indices_t, lane_row_t, lengths, dy, dh_final -> dx, dh0
template <typename Binding>
auto backward_operands(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()          // y
      .template Arg<ffi::AnyBuffer>()          // h0
      .template Arg<ffi::AnyBuffer>()          // values_t
      .template Arg<ffi::Buffer<ffi::S32>>()   // indices_t
      .template Arg<ffi::Buffer<ffi::S32>>()   // lane_row_t
      .template Arg<ffi::Buffer<ffi::S32>>()   // lengths
      .template Arg<ffi::AnyBuffer>()          // dy
      .template Arg<ffi::AnyBuffer>()          // dh_final
      .template Ret<ffi::AnyBuffer>()          // dx
      .template Ret<ffi::AnyBuffer>();         // dh0
}

// y, h0, dz, indices, lane_row, lengths -> dvalues [groups, S]
template <typename Binding>
auto weight_grad_operands(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()          // y
      .template Arg<ffi::AnyBuffer>()          // h0
      .template Arg<ffi::AnyBuffer>()          // dz
      .template Arg<ffi::Buffer<ffi::S32>>()   // indices
      .template Arg<ffi::Buffer<ffi::S32>>()   // lane_row
      .template Arg<ffi::Buffer<ffi::S32>>()   // lengths
      .template Ret<ffi::Buffer<ffi::F32>>();  // dvalues
}

// x [T, B, G*H], h0 [B, H], c0, values, indices, lane_row, lengths, hn_bias -> y [T, B, H], h_final,
// c_final, cells. The gated cells' forward recurrence (docs/format.md, "Gated kernels"). LSTM (G = 4):
// c0 and c_final are [B, H], hn_bias has no element, and cells is the cell state after each position
// [T, B, H] (what the backward pass reads) or has no element (not written); GRU (G = 3): c0, c_final
// and cells have no element and hn_bias is float32 [H].
template <typename Binding>
auto gated_forward_operands(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()          // x
      .template Arg<ffi::AnyBuffer>()          // h0
      .template Arg<ffi::AnyBuffer>()          // c0
      .template Arg<ffi::AnyBuffer>()          // values
      .template Arg<ffi::Buffer<ffi::S32>>()   // indices
      .template Arg<ffi::Buffer<ffi::S32>>()   // lane_row
      .template Arg<ffi::Buffer<ffi::S32>>()   // lengths
      .template Arg<ffi::Buffer<ffi::F32>>()   // hn_bias
      .template Ret<ffi::AnyBuffer>()          // y
      .template Ret<ffi::AnyBuffer>()          // h_final
      .template Ret<ffi::AnyBuffer>()          // c_final
      .template Ret<ffi::AnyBuffer>();         // cells
}

// The gated cells' layout attributes: the gate count (3: GRU, 4: LSTM) names the cell.
template <typename Binding>
auto gated_attrs(Binding b) {
  return std::move(b)
      .template Attr<int64_t>("gates")
      .template Attr<int64_t>("reverse")
      .template Attr<int64_t>("slots_per_lane")
      .template Attr<int64_t>("warps_per_cta")
      .template Attr<int64_t>("reg_slots")
      .template Attr<int64_t>("load_bytes");
}

// The packed layout and the cell: what both recurrences take, on every platform.
template <typename Binding>
auto layout_attrs(Binding b) {
  return std::move(b)
      .template Attr<int64_t>("activation")
      .template Attr<int64_t>("reverse")
      .template Attr<int64_t>("slots_per_lane")
      .template Attr<int64_t>("warps_per_cta")
      .template Attr<int64_t>("reg_slots")
      .template Attr<int64_t>("load_bytes");
}

// x [T, B, G*H], u (float32, same), h_before [T, B, H], c_before, dy [T, B, H], dh_final [B, H],
// dc_final, hn_bias, values_t, indices_t, lane_row_t, lengths -> dx [T, B, G*H], du (float32, same),
// dh0 [B, H], dc0. The gated cells' backward recurrence on the transposed layout, operands in step
// order (docs/format.md). LSTM: c_before [T, B, H], dc_final and dc0 [B, H], hn_bias without
// elements; GRU: the reverse, hn_bias float32 [H].
template <typename Binding>
auto gated_backward_operands(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()          // x
      .template Arg<ffi::Buffer<ffi::F32>>()   // u
      .template Arg<ffi::AnyBuffer>()          // h_before
      .template Arg<ffi::AnyBuffer>()          // c_before
      .template Arg<ffi::AnyBuffer>()          // dy
      .template Arg<ffi::AnyBuffer>()          // dh_final
      .template Arg<ffi::AnyBuffer>()          // dc_final
      .template Arg<ffi::Buffer<ffi::F32>>()   // hn_bias
      .template Arg<ffi::AnyBuffer>()          // values_t
      .template Arg<ffi::Buffer<ffi::S32>>()   // indices_t
      .template Arg<ffi::Buffer<ffi::S32>>()   // lane_row_t
      .template Arg<ffi::Buffer<ffi::S32>>()   // lengths
      .template Ret<ffi::AnyBuffer>()          // dx
      .template Ret<ffi::Buffer<ffi::F32>>()   // du
      .template Ret<ffi::AnyBuffer>()          // dh0
      .template Ret<ffi::AnyBuffer>();         // dc0
}

// The CUDA recurrences' test and benchmark hooks, after layout_attrs.
template <typename Binding>
auto cuda_hook_attrs(Binding b) {
  return std::move(b)
      .template Attr<int64_t>("spin_timeout_us")
      .template Attr<int64_t>("debug_stall_cta")
      .template Attr<int64_t>("grid_barrier")
      .template Attr<int64_t>("exchange_mode");
}

}  // namespace jax_sprnn::bindings
