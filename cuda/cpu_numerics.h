// The floating-point pieces of the CPU kernels: the storage types (float32, and bfloat16 and float16
// as raw bits) and the activation over a row of values, each written so that loops over a row
// vectorize.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "sprnn_common.h"

#if defined(__GNUC__) || defined(__clang__)
#define JAX_SPRNN_INLINE __attribute__((always_inline)) inline
#else
#define JAX_SPRNN_INLINE inline
#endif

namespace jax_sprnn::cpu {

// ---- storage types: float32 as is; bfloat16 and float16 as raw bits, round to nearest even ----

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

// Branch-free: integer masks select among the cases, so that loops over a row vectorize (a branch,
// or a select on floats, keeps GCC from vectorizing them).
struct F16 {
  using Raw = uint16_t;
  static float load(Raw h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    const uint32_t normal = ((exp + 112u) << 23) | (mant << 13);
    const uint32_t special = 0x7f800000u | (mant << 13);  // Inf or NaN
    // a subnormal (or zero) as 2^-14 * (1 + m/1024) - 2^-14: exact, and no denormal operand (which
    // denormals-are-zero would flush)
    const uint32_t tiny = bits_of(float_of(0x38800000u | (mant << 13)) - float_of(0x38800000u));
    const uint32_t is_tiny = 0u - uint32_t(exp == 0), is_special = 0u - uint32_t(exp == 31);
    return float_of(sign | (tiny & is_tiny) | (special & is_special) | (normal & ~(is_tiny | is_special)));
  }
  static Raw store(float f) {
    const uint32_t u = bits_of(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // overflow, Inf or NaN
    // a float16 subnormal or zero: let the FPU round it
    const uint32_t tiny = bits_of(float_of(a) + 0.5f) - 0x3f000000u;
    const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // rebias, round to nearest even
    const uint32_t is_big = 0u - uint32_t(a >= 0x47800000u), is_tiny = 0u - uint32_t(a < 0x38800000u);
    return Raw(sign | (big & is_big) | (tiny & is_tiny) | (normal & ~(is_big | is_tiny)));
  }
};

// ---- the activation over a row of values, in a loop the compiler vectorizes ---------------------------

inline uint64_t bits_of(double d) { uint64_t u; std::memcpy(&u, &d, 8); return u; }
inline double double_of(uint64_t u) { double d; std::memcpy(&d, &u, 8); return d; }

// exp(y) = scale * (1 + em1) for |y| <= 700, with scale = 2^n, n = round(y / ln 2), and em1 =
// expm1(r) of the rest r = y - n ln 2 (|r| <= ln(2) / 2), relative error < 2e-14: straight-line
// double arithmetic that vectorizes (the activations below build on it).
struct ExpParts {
  double scale, em1;
};
JAX_SPRNN_INLINE ExpParts exp_parts(double y) {
  const double shift = 0x1.8p52;
  const double nd = y * 1.4426950408889634 + shift;
  const double k = nd - shift;
  const double r = (y - k * 0x1.62e42fefa39efp-1) - k * 0x1.abc9e3b39803fp-56;
  const double scale = double_of((bits_of(nd) - bits_of(shift) + 1023) << 52);
  double p = 1.0 / 39916800;  // exp(r) - 1 = r + r^2/2 + ... + r^11/11!
  p = p * r + 1.0 / 3628800;
  p = p * r + 1.0 / 362880;
  p = p * r + 1.0 / 40320;
  p = p * r + 1.0 / 5040;
  p = p * r + 1.0 / 720;
  p = p * r + 1.0 / 120;
  p = p * r + 1.0 / 24;
  p = p * r + 1.0 / 6;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return {scale, p * r};
}

// tanh for float32 in straight-line code that vectorizes (glibc's tanhf, through expm1f, cost twice
// the rest of a step). Evaluated in double as expm1(2|x|) / (expm1(2|x|) + 2), which has no
// cancellation anywhere, so the float is the correctly rounded tanh but in the rarest ties (checked
// over every float: 15 of 2^32 are 1 ulp off; glibc's tanhf is 1 ulp off on ~3%). No selects on
// floating-point values: GCC would move the arithmetic into branches, which do not vectorize.
JAX_SPRNN_INLINE float tanh_f32(float x) {
  const uint32_t xb = bits_of(x), mag = xb & 0x7fffffffu;
  // |x| clamped to 10, where tanh rounds to 1.0f (NaN too: it is restored at the end)
  const ExpParts e = exp_parts(2.0 * double(float_of(std::min(mag, 0x41200000u))));
  // expm1(y) = 2^n (exp(r) - 1) + 2^n - 1
  const double em1 = e.scale * e.em1 + (e.scale - 1.0);
  const uint32_t t = bits_of(float(em1 / (em1 + 2.0))) | (xb & 0x80000000u);
  const uint32_t nan = 0u - uint32_t(mag > 0x7f800000u);  // all ones for NaN: give x back
  return float_of((t & ~nan) | (xb & nan));
}

// The logistic sigmoid 1 / (1 + exp(-x)) for float32, the same way: with e = exp(-|x|) in double,
// 1 / (1 + e) for x >= 0 and e / (1 + e) below (no cancellation: tiny results keep their relative
// accuracy), selected by integer masks.
JAX_SPRNN_INLINE float sigmoid_f32(float x) {
  const uint32_t xb = bits_of(x), mag = xb & 0x7fffffffu;
  // |x| clamped to 120, where sigmoid(-|x|) = 8e-53 rounds to 0.0f and sigmoid(|x|) to 1.0f
  const ExpParts e = exp_parts(-double(float_of(std::min(mag, 0x42f00000u))));
  const double ex = e.scale * e.em1 + e.scale;
  const double d = 1.0 + ex;
  const uint32_t above = bits_of(float(1.0 / d)), below = bits_of(float(ex / d));
  const uint32_t negative = 0u - (xb >> 31), nan = 0u - uint32_t(mag > 0x7f800000u);
  const uint32_t s = (below & negative) | (above & ~negative);
  return float_of((s & ~nan) | (xb & nan));
}

// 1 for Inf or NaN, 0 otherwise, in integer arithmetic (an OR over a row then vectorizes).
JAX_SPRNN_INLINE uint32_t not_finite(float v) { return uint32_t((bits_of(v) & 0x7f800000u) == 0x7f800000u); }

// z[0, n) = act(z[0, n)) in place.
template <int ACT>
JAX_SPRNN_INLINE void activate_row(float* z, int64_t n) {
  if constexpr (ACT == kTanh) {
    for (int64_t i = 0; i < n; ++i) z[i] = tanh_f32(z[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) z[i] = activate(ACT, z[i]);
  }
}

}  // namespace jax_sprnn::cpu
