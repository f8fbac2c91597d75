// Shared by the CPU and CUDA kernels: the enums and small helpers that both read the same way.
// The packed format itself is documented in docs/format.md.
#pragma once

#include <cmath>
#include <cstdint>

namespace jax_sprnn {

enum Activation : int64_t { kTanh = 0, kRelu = 1, kIdentity = 2 };

inline bool valid_activation(int64_t a) { return a == kTanh || a == kRelu || a == kIdentity; }

constexpr int kWarpSize = 32;

// The cell's nonlinearity and its derivative, one definition for the CPU and the CUDA kernels.
#if defined(__CUDACC__)
#define JAX_SPRNN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define JAX_SPRNN_HOST_DEVICE inline
#endif

JAX_SPRNN_HOST_DEVICE float activate(int64_t act, float z) {
  switch (act) {
    case kTanh: return tanhf(z);
    case kRelu: return z < 0.0f ? 0.0f : z;  // NaN propagates, as in the reference
    default: return z;
  }
}

// d act / d z, written in terms of the output h = act(z) (all the backward pass keeps).
JAX_SPRNN_HOST_DEVICE float activation_grad(int64_t act, float h) {
  switch (act) {
    case kTanh: return 1.0f - h * h;
    case kRelu: return h > 0.0f ? 1.0f : 0.0f;
    default: return 1.0f;
  }
}

}  // namespace jax_sprnn
