// Shared by the CPU and CUDA kernels: the enums and small helpers that both read the same way.
// The packed format itself is documented in docs/format.md.
#pragma once

#include <cmath>
#include <cstdint>

namespace jax_sprnn {

enum Activation : int64_t { kTanh = 0, kRelu = 1, kIdentity = 2 };

inline bool valid_activation(int64_t a) { return a == kTanh || a == kRelu || a == kIdentity; }

constexpr int kWarpSize = 32;

// Bytes of the CUDA handler's workspace result; primitives.py computes the same number.
inline int64_t cuda_workspace_bytes(int64_t batch, int64_t hidden) {
  return 256 + 2 * batch * hidden * 8;
}

}  // namespace jax_sprnn
