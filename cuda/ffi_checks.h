// Operand checks that the C++ (CPU) and CUDA handlers share, so both say the same about a bad call:
// the gated targets' messages, and the gated backward recurrence's operands (jax_sprnn_gated_backward).
// Host code only.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jax_sprnn::ffi_checks {

namespace ffi = xla::ffi;
using Dims = ffi::AnyBuffer::Dimensions;

inline std::string shape_text(const int64_t* dims, size_t rank) {
  std::string text = "[";
  for (size_t d = 0; d < rank; ++d) text += (d ? ", " : "") + std::to_string(dims[d]);
  return text + "]";
}

inline const char* dtype_name(ffi::DataType dt) {
  switch (dt) {
    case ffi::F32: return "float32";
    case ffi::BF16: return "bfloat16";
    case ffi::F16: return "float16";
    case ffi::F64: return "float64";
    default: return "another dtype";
  }
}

// What a gated handler's errors say: "<who>: <name> must ..." and the cell they are about.
struct GatedChecks {
  std::string who, cell;  // cell: "for the LSTM (gates = 4)"

  ffi::Error fail(const std::string& what) const { return ffi::Error::InvalidArgument(who + ": " + what); }
  // Buffer `name` must be `want` (written `what`, e.g. "[B, H]").
  ffi::Error shape(const char* name, Dims got, std::vector<int64_t> want, const char* what) const {
    if (got == Dims(want)) return ffi::Error::Success();
    return fail(std::string(name) + " must be " + what + " = " + shape_text(want.data(), want.size()) +
                " " + cell + ", got " + shape_text(got.begin(), got.size()));
  }
  // Buffer `name` must have no element (it belongs to the other cell).
  ffi::Error empty(const char* name, Dims got) const {
    size_t n = 1;
    for (int64_t d : got) n *= size_t(d);
    if (n == 0) return ffi::Error::Success();
    return fail(std::string(name) + " must have no element " + cell + ", got " + shape_text(got.begin(), got.size()));
  }
  // An optional buffer: `want`, or no element.
  ffi::Error shape_or_empty(const char* name, Dims got, std::vector<int64_t> want, const char* what) const {
    size_t n = 1;
    for (int64_t d : got) n *= size_t(d);
    if (n == 0) return ffi::Error::Success();
    return shape(name, got, want, what);
  }
};

inline GatedChecks checks_for(const char* who, int64_t gates) {
  return GatedChecks{who, gates == 4 ? "for the LSTM (gates = 4)" : "for the GRU (gates = 3)"};
}

struct Sizes {
  int64_t T, B, H;
};

// x [T, B, G*H], u (float32, same), h_before [T, B, H], c_before, dy [T, B, H], dh_final [B, H],
// dc_final, hn_bias -> dx [T, B, G*H], du (float32, same), dh0 [B, H], dc0. LSTM: c_before,
// dc_final and dc0 as their h twins, hn_bias empty; GRU: the reverse, hn_bias float32 [H]. The float
// operands share x's dtype. Several `problems` (the CUDA target's stacked form) give every operand
// but lengths [B] a leading [problems] axis. On success `sizes` holds T, B (every problem's
// examples) and H.
inline ffi::Error check_operands(const char* who, int64_t gates, const ffi::AnyBuffer& x,
                                 const ffi::Buffer<ffi::F32>& u, const ffi::AnyBuffer& h_before,
                                 const ffi::AnyBuffer& c_before, const ffi::AnyBuffer& dy,
                                 const ffi::AnyBuffer& dh_final, const ffi::AnyBuffer& dc_final,
                                 const ffi::Buffer<ffi::F32>& hn_bias, const ffi::AnyBuffer& values_t,
                                 const ffi::Buffer<ffi::S32>& lengths, const ffi::AnyBuffer& dx,
                                 const ffi::Buffer<ffi::F32>& du, const ffi::AnyBuffer& dh0,
                                 const ffi::AnyBuffer& dc0, Sizes* sizes, int64_t problems = 1) {
  const GatedChecks check = checks_for(who, gates);
  if (gates != 3 && gates != 4) return check.fail("gates must be 3 (GRU) or 4 (LSTM), got " + std::to_string(gates));
  if (problems < 1) return check.fail("problems must be >= 1, got " + std::to_string(problems));
  const bool lstm = gates == 4;
  const bool stacked = problems > 1;
  const Dims dims = x.dimensions();
  const size_t lead = stacked ? 1 : 0;
  if (dims.size() != 3 + lead || (stacked && dims[0] != problems) || dims[2 + lead] % gates != 0)
    return check.fail(std::string("x must be ") + (stacked ? "[problems, T, B, G*H]" : "[T, B, G*H]") +
                      " with G = gates = " + std::to_string(gates) +
                      (stacked ? " and problems = " + std::to_string(problems) : std::string()) + ", got " +
                      shape_text(dims.begin(), dims.size()));
  const int64_t T = dims[lead], B = dims[1 + lead], H = dims[2 + lead] / gates, W = gates * H;
  // The expected shape with the problems' axis (if any), and how messages write it.
  auto want = [&](std::vector<int64_t> v) {
    if (stacked) v.insert(v.begin(), problems);
    return v;
  };
  auto what = [&](const char* text) {
    std::string t(text);
    return stacked ? t.insert(t.find('[') + 1, "problems, ") : t;
  };
  for (auto e : {check.shape("u", u.dimensions(), want({T, B, W}), what("float32 [T, B, G*H]").c_str()),
                 check.shape("h_before", h_before.dimensions(), want({T, B, H}), what("[T, B, H]").c_str()),
                 lstm ? check.shape("c_before", c_before.dimensions(), want({T, B, H}), what("[T, B, H]").c_str())
                      : check.empty("c_before", c_before.dimensions()),
                 check.shape("dy", dy.dimensions(), want({T, B, H}), what("[T, B, H]").c_str()),
                 check.shape("dh_final", dh_final.dimensions(), want({B, H}), what("[B, H]").c_str()),
                 lstm ? check.shape("dc_final", dc_final.dimensions(), want({B, H}), what("[B, H]").c_str())
                      : check.empty("dc_final", dc_final.dimensions()),
                 lstm ? check.empty("hn_bias", hn_bias.dimensions())
                      : check.shape("hn_bias", hn_bias.dimensions(), want({H}), what("float32 [H]").c_str()),
                 check.shape("lengths", lengths.dimensions(), {B}, "int32 [B]"),
                 check.shape("dx", dx.dimensions(), want({T, B, W}), what("[T, B, G*H]").c_str()),
                 check.shape("du", du.dimensions(), want({T, B, W}), what("float32 [T, B, G*H]").c_str()),
                 check.shape("dh0", dh0.dimensions(), want({B, H}), what("[B, H]").c_str()),
                 lstm ? check.shape("dc0", dc0.dimensions(), want({B, H}), what("[B, H]").c_str())
                      : check.empty("dc0", dc0.dimensions())})
    if (e.failure()) return e;
  const auto dt = x.element_type();
  const std::pair<const char*, ffi::DataType> typed[] = {
      {"h_before", h_before.element_type()}, {"c_before", c_before.element_type()},
      {"dy", dy.element_type()}, {"dh_final", dh_final.element_type()},
      {"dc_final", dc_final.element_type()}, {"values_t", values_t.element_type()},
      {"dx", dx.element_type()}, {"dh0", dh0.element_type()}, {"dc0", dc0.element_type()}};
  for (const auto& [name, type] : typed)
    if (type != dt)
      return check.fail(std::string(name) + " is " + dtype_name(type) + " but x is " + dtype_name(dt) +
                        ": x, the states, the cotangents and values_t must share one dtype");
  *sizes = Sizes{T, problems * B, H};
  return ffi::Error::Success();
}

}  // namespace jax_sprnn::ffi_checks
