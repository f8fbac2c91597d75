// CPU kernels of jax_sprnn as XLA FFI handlers. They read the same packed arrays as the CUDA kernel
// (docs/format.md), so CI exercises the packer, the handlers and the primitive plumbing for real.
// The numerics mirror the GPU: float32 accumulation, the state rounded to the storage dtype each step.
#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ffi_bindings.h"
#include "sprnn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_sprnn {
namespace {

// ---- storage types: float32 as is; bfloat16 and float16 as raw bits with round-to-nearest-even ----

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

struct F32 {
  using Raw = float;
  static float load(Raw v) { return v; }
  static Raw store(float f) { return f; }
};

struct BF16 {
  using Raw = uint16_t;
  static float load(Raw v) { return float_of(uint32_t(v) << 16); }
  static Raw store(float f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return Raw((u >> 16) | 0x40u);  // quiet NaN
    return Raw((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

struct F16 {
  using Raw = uint16_t;
  static float load(Raw h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    if (exp == 0) return std::copysign(float(mant) * (1.0f / 16777216.0f), sign ? -1.0f : 1.0f);
    if (exp == 31) return float_of(sign | 0x7f800000u | (mant << 13));
    return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
  }
  static Raw store(float f) {
    uint32_t u = bits_of(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x47800000u) {  // overflow, Inf or NaN
      return Raw(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
    }
    if (a < 0x38800000u) {  // result is a float16 subnormal or zero: let the FPU round it
      float r = float_of(a) + 0.5f;
      return Raw(sign | (bits_of(r) - 0x3f000000u));
    }
    a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias the exponent, round to nearest even
    return Raw(sign | (a >> 13));
  }
};

inline int64_t column_of(int32_t idx) { return idx < 0 ? ~idx : idx; }

// Position of kernel step s for an example of length len.
inline int64_t position(int64_t s, int64_t len, bool reverse) { return reverse ? len - 1 - s : s; }

// The checks every handler shares; the Python layer validates first, so these guard direct calls.
struct Layout {
  int64_t num_lanes = 0, slots = 0, hidden = 0;
};

ffi::Error check_layout(const char* who, int64_t hidden, int64_t num_slots, int64_t num_lanes,
                        int64_t slots_per_lane, int64_t activation, Layout* out) {
  std::string w(who);
  if (!valid_activation(activation))
    return ffi::Error::InvalidArgument(w + ": activation must be 0 (tanh), 1 (relu) or 2 (identity)");
  if (slots_per_lane <= 0 || num_lanes % kWarpSize != 0 || num_slots != num_lanes * slots_per_lane)
    return ffi::Error::InvalidArgument(
        w + ": indices must have num_lanes * slots_per_lane elements and lane_row a multiple of 32 (got " +
        std::to_string(num_slots) + " slots, " + std::to_string(num_lanes) + " lanes, slots_per_lane " +
        std::to_string(slots_per_lane) + ")");
  out->num_lanes = num_lanes;
  out->slots = slots_per_lane;
  out->hidden = hidden;
  return ffi::Error::Success();
}

ffi::Error check_indices(const char* who, const int32_t* indices, const int32_t* lane_row,
                         const Layout& lay) {
  for (int64_t g = 0; g < lay.num_lanes; ++g) {
    if (lane_row[g] < -1 || lane_row[g] >= lay.hidden)
      return ffi::Error::InvalidArgument(std::string(who) + ": lane_row[" + std::to_string(g) +
                                         "] is out of range [-1, hidden)");
  }
  const int64_t n = lay.num_lanes * lay.slots;
  for (int64_t e = 0; e < n; ++e) {
    int64_t j = column_of(indices[e]);
    if (j >= lay.hidden)
      return ffi::Error::InvalidArgument(std::string(who) + ": indices[" + std::to_string(e) +
                                         "] names column " + std::to_string(j) + " >= hidden " +
                                         std::to_string(lay.hidden));
  }
  return ffi::Error::Success();
}

// Slot e of the flat layout belongs to lane (e / (32*K)) * 32 + e % 32.
inline int64_t lane_of_slot(int64_t e, int64_t slots) {
  return (e / (kWarpSize * slots)) * kWarpSize + e % kWarpSize;
}

// acc[b, row(lane)] += sum_k w[slot] * vec[b, col(slot)] for the active examples; the shared sparse
// product of the forward (U h) and the backward (U^T dz) recurrences.
void sparse_matvec(const std::vector<float>& w, const int32_t* indices, const int32_t* lane_row,
                   const Layout& lay, const std::vector<float>& vec, const std::vector<int64_t>& active,
                   std::vector<float>& acc) {
  const int64_t H = lay.hidden, K = lay.slots;
  for (int64_t g = 0; g < lay.num_lanes; ++g) {
    const int64_t row = lane_row[g];
    if (row < 0) continue;
    const int64_t base = (g / kWarpSize) * kWarpSize * K + g % kWarpSize;
    for (int64_t b : active) {
      const float* v = &vec[b * H];
      float partial = 0.0f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = base + k * kWarpSize;
        partial += w[e] * v[column_of(indices[e])];
      }
      acc[b * H + row] += partial;
    }
  }
}

template <typename S>
std::vector<float> to_float(const void* data, int64_t n) {
  const auto* raw = static_cast<const typename S::Raw*>(data);
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = S::load(raw[i]);
  return out;
}

ffi::Error check_lengths(const char* who, const int32_t* lengths, int64_t B, int64_t T) {
  for (int64_t b = 0; b < B; ++b)
    if (lengths[b] < 0 || lengths[b] > T)
      return ffi::Error::InvalidArgument(std::string(who) + ": lengths[" + std::to_string(b) + "] = " +
                                         std::to_string(lengths[b]) + " is outside [0, T=" +
                                         std::to_string(T) + "]");
  return ffi::Error::Success();
}

// ------------------------------------------------ forward ----------------------------------------

template <typename S>
void forward(const void* x_, const void* h0_, const void* values_, const int32_t* indices,
             const int32_t* lane_row, const int32_t* lengths, void* y_, void* hT_, int64_t T,
             int64_t B, const Layout& lay, int64_t act, bool reverse) {
  using Raw = typename S::Raw;
  const int64_t H = lay.hidden;
  const auto* x = static_cast<const Raw*>(x_);
  auto* y = static_cast<Raw*>(y_);
  auto* hT = static_cast<Raw*>(hT_);
  const std::vector<float> w = to_float<S>(values_, lay.num_lanes * lay.slots);
  std::vector<float> h = to_float<S>(h0_, B * H), acc(B * H);
  std::vector<int64_t> active;
  for (int64_t s = 0; s < T; ++s) {
    active.clear();
    for (int64_t b = 0; b < B; ++b) {
      if (s < lengths[b]) {
        active.push_back(b);
      } else {
        std::fill(y + (s * B + b) * H, y + (s * B + b + 1) * H, S::store(0.0f));
      }
    }
    for (int64_t b : active) std::fill(&acc[b * H], &acc[(b + 1) * H], 0.0f);
    sparse_matvec(w, indices, lane_row, lay, h, active, acc);
    for (int64_t b : active) {
      const int64_t p = position(s, lengths[b], reverse);
      const Raw* xp = x + (p * B + b) * H;
      Raw* yp = y + (p * B + b) * H;
      for (int64_t i = 0; i < H; ++i) {
        const Raw r = S::store(activate(act, S::load(xp[i]) + acc[b * H + i]));
        yp[i] = r;
        h[b * H + i] = S::load(r);
      }
    }
  }
  for (int64_t e = 0; e < B * H; ++e) hT[e] = S::store(h[e]);
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer values,
                       ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> lane_row,
                       ffi::Buffer<ffi::S32> lengths, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> h_final, int64_t activation, int64_t reverse,
                       int64_t slots_per_lane, int64_t warps_per_cta, int64_t reg_slots,
                       int64_t load_bytes) {
  auto dims = x.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jax_sprnn_forward: x must be [T, B, H]");
  const int64_t T = dims[0], B = dims[1], H = dims[2];
  const auto dt = x.element_type();
  if (h0.element_type() != dt || values.element_type() != dt || y->element_type() != dt ||
      h_final->element_type() != dt)
    return ffi::Error::InvalidArgument("jax_sprnn_forward: x, h0, values and outputs must share a dtype");
  if (h0.element_count() != size_t(B * H) || lengths.element_count() != size_t(B))
    return ffi::Error::InvalidArgument("jax_sprnn_forward: h0 must be [B, H] and lengths [B]");
  Layout lay;
  if (auto e = check_layout("jax_sprnn_forward", H, indices.element_count(), lane_row.element_count(),
                            slots_per_lane, activation, &lay);
      e.failure())
    return e;
  if (values.element_count() != indices.element_count())
    return ffi::Error::InvalidArgument("jax_sprnn_forward: values and indices must have the same size");
  if (auto e = check_indices("jax_sprnn_forward", indices.typed_data(), lane_row.typed_data(), lay);
      e.failure())
    return e;
  if (auto e = check_lengths("jax_sprnn_forward", lengths.typed_data(), B, T); e.failure()) return e;
  const bool rev = reverse != 0;
  switch (dt) {
    case ffi::F32:
      forward<F32>(x.untyped_data(), h0.untyped_data(), values.untyped_data(), indices.typed_data(),
                   lane_row.typed_data(), lengths.typed_data(), y->untyped_data(),
                   h_final->untyped_data(), T, B, lay, activation, rev);
      break;
    case ffi::BF16:
      forward<BF16>(x.untyped_data(), h0.untyped_data(), values.untyped_data(), indices.typed_data(),
                    lane_row.typed_data(), lengths.typed_data(), y->untyped_data(),
                    h_final->untyped_data(), T, B, lay, activation, rev);
      break;
    case ffi::F16:
      forward<F16>(x.untyped_data(), h0.untyped_data(), values.untyped_data(), indices.typed_data(),
                   lane_row.typed_data(), lengths.typed_data(), y->untyped_data(),
                   h_final->untyped_data(), T, B, lay, activation, rev);
      break;
    default:
      return ffi::Error::InvalidArgument("jax_sprnn_forward: dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

// ------------------------------------------------ backward ---------------------------------------

// The state that step s of example b started from: h0, or the output of the previous active step.
template <typename S>
const typename S::Raw* state_before(const typename S::Raw* y, const typename S::Raw* h0, int64_t s,
                                    int64_t b, int64_t B, int64_t H, int64_t len, bool reverse) {
  if (s == 0) return h0 + b * H;
  return y + (position(s - 1, len, reverse) * B + b) * H;
}

template <typename S>
void backward(const void* y_, const void* h0_, const void* values_t_, const int32_t* indices_t,
              const int32_t* lane_row_t, const int32_t* lengths, const void* dy_,
              const void* dhT_, void* dx_, void* dh0_, int64_t T, int64_t B, const Layout& lay,
              int64_t act, bool reverse) {
  using Raw = typename S::Raw;
  const int64_t H = lay.hidden;
  const auto* y = static_cast<const Raw*>(y_);
  const auto* dy = static_cast<const Raw*>(dy_);
  auto* dx = static_cast<Raw*>(dx_);
  const std::vector<float> wt = to_float<S>(values_t_, lay.num_lanes * lay.slots);
  std::vector<float> dh = to_float<S>(dhT_, B * H), dz(B * H), acc(B * H);
  std::vector<int64_t> active;
  for (int64_t s = T - 1; s >= 0; --s) {
    active.clear();
    for (int64_t b = 0; b < B; ++b) {
      if (s < lengths[b]) {
        active.push_back(b);
      } else {  // outputs past the length are constant zeros: nothing flows back through them
        std::fill(dx + (s * B + b) * H, dx + (s * B + b + 1) * H, S::store(0.0f));
      }
    }
    for (int64_t b : active) {
      const int64_t p = position(s, lengths[b], reverse);
      const Raw* yp = y + (p * B + b) * H;
      const Raw* dyp = dy + (p * B + b) * H;
      Raw* dxp = dx + (p * B + b) * H;
      for (int64_t i = 0; i < H; ++i) {
        const float g = (dh[b * H + i] + S::load(dyp[i])) * activation_grad(act, S::load(yp[i]));
        dz[b * H + i] = g;
        dxp[i] = S::store(g);
      }
      std::fill(&acc[b * H], &acc[(b + 1) * H], 0.0f);
    }
    sparse_matvec(wt, indices_t, lane_row_t, lay, dz, active, acc);
    for (int64_t b : active) std::copy(&acc[b * H], &acc[(b + 1) * H], &dh[b * H]);
  }
  auto* dh0 = static_cast<Raw*>(dh0_);
  for (int64_t e = 0; e < B * H; ++e) dh0[e] = S::store(dh[e]);
}

ffi::Error BackwardImpl(ffi::AnyBuffer y, ffi::AnyBuffer h0, ffi::AnyBuffer values_t,
                        ffi::Buffer<ffi::S32> indices_t, ffi::Buffer<ffi::S32> lane_row_t,
                        ffi::Buffer<ffi::S32> lengths, ffi::AnyBuffer dy, ffi::AnyBuffer dh_final,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dh0,
                        int64_t activation, int64_t reverse, int64_t slots_per_lane,
                        int64_t warps_per_cta, int64_t reg_slots, int64_t load_bytes) {
  auto dims = y.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jax_sprnn_backward: y must be [T, B, H]");
  const int64_t T = dims[0], B = dims[1], H = dims[2];
  const auto dt = y.element_type();
  for (auto t : {h0.element_type(), values_t.element_type(), dy.element_type(),
                 dh_final.element_type(), dx->element_type(), dh0->element_type()})
    if (t != dt) return ffi::Error::InvalidArgument("jax_sprnn_backward: all float operands must share a dtype");
  if (dy.element_count() != y.element_count() || dh_final.element_count() != size_t(B * H) ||
      h0.element_count() != size_t(B * H) || lengths.element_count() != size_t(B))
    return ffi::Error::InvalidArgument("jax_sprnn_backward: dy must match y, h0/dh_final be [B, H], lengths [B]");
  Layout lay;
  if (auto e = check_layout("jax_sprnn_backward", H, indices_t.element_count(),
                            lane_row_t.element_count(), slots_per_lane, activation, &lay);
      e.failure())
    return e;
  if (values_t.element_count() != indices_t.element_count())
    return ffi::Error::InvalidArgument("jax_sprnn_backward: values_t and indices_t must have the same size");
  if (auto e = check_indices("jax_sprnn_backward", indices_t.typed_data(), lane_row_t.typed_data(), lay);
      e.failure())
    return e;
  if (auto e = check_lengths("jax_sprnn_backward", lengths.typed_data(), B, T); e.failure()) return e;
  const bool rev = reverse != 0;
#define JAX_SPRNN_BACKWARD(S)                                                                       \
  backward<S>(y.untyped_data(), h0.untyped_data(), values_t.untyped_data(), indices_t.typed_data(), \
              lane_row_t.typed_data(), lengths.typed_data(), dy.untyped_data(),                     \
              dh_final.untyped_data(), dx->untyped_data(), dh0->untyped_data(), T, B, lay,          \
              activation, rev)
  switch (dt) {
    case ffi::F32: JAX_SPRNN_BACKWARD(F32); break;
    case ffi::BF16: JAX_SPRNN_BACKWARD(BF16); break;
    case ffi::F16: JAX_SPRNN_BACKWARD(F16); break;
    default:
      return ffi::Error::InvalidArgument("jax_sprnn_backward: dtype must be float32, bfloat16 or float16");
  }
#undef JAX_SPRNN_BACKWARD
  return ffi::Error::Success();
}

// ------------------------------------------------ weight gradient --------------------------------

// dvalues[g, slot] = sum over the examples b of group g and their active steps s of
// h_before[s, b, col(slot)] * dz[p(s), b, row(slot)]; padding slots stay exactly 0. The loop order
// is fixed, so the result is bitwise reproducible.
template <typename S>
void weight_grad(const void* y_, const void* h0_, const void* dz_, const int32_t* indices,
                 const int32_t* lane_row, const int32_t* lengths, float* dvalues, int64_t T,
                 int64_t B, int64_t groups, const Layout& lay, bool reverse) {
  using Raw = typename S::Raw;
  const int64_t H = lay.hidden, K = lay.slots, n = lay.num_lanes * K, per_group = B / groups;
  const auto* y = static_cast<const Raw*>(y_);
  const auto* h0 = static_cast<const Raw*>(h0_);
  const auto* dz = static_cast<const Raw*>(dz_);
  std::fill(dvalues, dvalues + groups * n, 0.0f);
  std::vector<float> hb(H), dzb(H);
  for (int64_t b = 0; b < B; ++b) {
    float* out = dvalues + (b / per_group) * n;
    for (int64_t s = 0; s < lengths[b]; ++s) {
      const Raw* hp = state_before<S>(y, h0, s, b, B, H, lengths[b], reverse);
      const Raw* dzp = dz + (position(s, lengths[b], reverse) * B + b) * H;
      for (int64_t i = 0; i < H; ++i) {
        hb[i] = S::load(hp[i]);
        dzb[i] = S::load(dzp[i]);
      }
      for (int64_t e = 0; e < n; ++e) {
        const int32_t idx = indices[e];
        const int64_t row = lane_row[lane_of_slot(e, K)];
        if (idx < 0 || row < 0) continue;
        out[e] += hb[idx] * dzb[row];
      }
    }
  }
}

ffi::Error WeightGradImpl(ffi::AnyBuffer y, ffi::AnyBuffer h0, ffi::AnyBuffer dz,
                          ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> lane_row,
                          ffi::Buffer<ffi::S32> lengths, ffi::Result<ffi::Buffer<ffi::F32>> dvalues,
                          int64_t groups, int64_t reverse, int64_t slots_per_lane) {
  auto dims = y.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: y must be [T, B, H]");
  const int64_t T = dims[0], B = dims[1], H = dims[2];
  const auto dt = y.element_type();
  if (h0.element_type() != dt || dz.element_type() != dt)
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: y, h0 and dz must share a dtype");
  if (groups <= 0 || B % groups != 0)
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: groups must divide the batch");
  if (dz.element_count() != y.element_count() || h0.element_count() != size_t(B * H) ||
      lengths.element_count() != size_t(B))
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: dz must match y, h0 be [B, H], lengths [B]");
  Layout lay;
  if (auto e = check_layout("jax_sprnn_weight_grad", H, indices.element_count(),
                            lane_row.element_count(), slots_per_lane, kTanh, &lay);
      e.failure())
    return e;
  if (dvalues->element_count() != size_t(groups) * indices.element_count())
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: dvalues must be [groups, slots]");
  if (auto e = check_indices("jax_sprnn_weight_grad", indices.typed_data(), lane_row.typed_data(), lay);
      e.failure())
    return e;
  if (auto e = check_lengths("jax_sprnn_weight_grad", lengths.typed_data(), B, T); e.failure()) return e;
  const bool rev = reverse != 0;
#define JAX_SPRNN_WGRAD(S)                                                                         \
  weight_grad<S>(y.untyped_data(), h0.untyped_data(), dz.untyped_data(), indices.typed_data(),     \
                 lane_row.typed_data(), lengths.typed_data(), dvalues->typed_data(), T, B, groups, \
                 lay, rev)
  switch (dt) {
    case ffi::F32: JAX_SPRNN_WGRAD(F32); break;
    case ffi::BF16: JAX_SPRNN_WGRAD(BF16); break;
    case ffi::F16: JAX_SPRNN_WGRAD(F16); break;
    default:
      return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: dtype must be float32, bfloat16 or float16");
  }
#undef JAX_SPRNN_WGRAD
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_sprnn

namespace binds = jax_sprnn::bindings;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnForwardCpu, jax_sprnn::ForwardImpl,
                              binds::layout_attrs(binds::forward_operands(ffi::Ffi::Bind())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnBackwardCpu, jax_sprnn::BackwardImpl,
                              binds::layout_attrs(binds::backward_operands(ffi::Ffi::Bind())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnWeightGradCpu, jax_sprnn::WeightGradImpl,
                              binds::weight_grad_operands(ffi::Ffi::Bind())
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("slots_per_lane"));
