// The CUDA kernels of jax_sprnn: XLA FFI handler symbols and the host helpers that the nanobind
// module (cuda_module.cc) exposes to the Python planner.
//
// This header is compiled by the host C++ compiler as well as by nvcc, so it names no CUDA types.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/api.h"

// Production targets. `jax_sprnn_forward` / `jax_sprnn_backward` on CUDA: the persistent
// recurrences; see docs/format.md for the arguments, results and attributes.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnForwardCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnBackwardCuda);
// `jax_sprnn_weight_grad` on CUDA: the sampled weight gradient, deterministic (weight_grad.cu).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnWeightGradCuda);
// `jax_sprnn_gated_forward` on CUDA: the LSTM's and the GRU's forward persistent recurrences.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnGatedForwardCuda);
// `jax_sprnn_gated_backward` on CUDA: their backward persistent recurrences.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnGatedBackwardCuda);

// Test and benchmark targets, registered apart from the production ones.
// `jax_sprnn_forward_hooked` / `jax_sprnn_backward_hooked`: the recurrences with the test hooks
// (spin bound, a stalled CTA, a grid barrier per phase) as attributes (cuda_persistent.cu).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnForwardHookedCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnBackwardHookedCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnGatedForwardHookedCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnGatedBackwardHookedCuda);
// `jax_sprnn_sync_floor`: the forward kernel's exchange protocol with no compute (sync_floor.cu).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnSyncFloorCuda);

namespace jax_sprnn::cuda {

struct DeviceProperties {
  std::string name;
  int major = 0;
  int minor = 0;
  int sm_count = 0;
  int regs_per_sm = 0;
  int regs_per_block = 0;
  int64_t smem_per_sm = 0;
  int64_t smem_per_block_optin = 0;
  int max_threads_per_sm = 0;
  int max_threads_per_block = 0;
  bool cooperative_launch = false;
  bool cluster_launch = false;  // thread-block clusters (sm_90 and newer)
  int64_t l2_bytes = 0;
};

// What the compiler made of one persistent-kernel instantiation (cudaFuncGetAttributes).
struct KernelAttributes {
  int num_regs = 0;
  int64_t local_bytes = 0;        // per-thread local memory: non-zero means register spills
  int max_threads_per_block = 0;  // the launch bound the instantiation was compiled for
  int64_t static_smem_bytes = 0;
};

// All helpers below return "" on success and an error message otherwise (device_queries.cu).
std::string GetDeviceProperties(int device, DeviceProperties* out);

// The compile-time register-slot counts instantiated for `dtype` ("float32", "float16", "bfloat16",
// or the short forms "f32", "f16", "bf16"). An empty dtype gives the counts instantiated for every
// dtype. gates: 1 (the simple cell), 3 (GRU) or 4 (LSTM). An unknown dtype or gate count gives an
// empty list.
std::vector<int> SupportedRegSlots(const std::string& dtype, int gates = 1);

// `tile` is the staged-h load width in floats (1, 2 or 4, i.e. load_bytes / 4). Each (dtype, tile,
// reg_slots) has one or two compiled variants with different launch bounds; `threads` picks the one
// a CTA of that many threads would run, and threads <= 0 the one with the largest bound. `backward`
// picks the backward-recurrence kernel, gates = 3 / 4 the GRU's / LSTM's forward kernel.
std::string GetKernelAttributes(const std::string& dtype, int tile, int reg_slots, int device,
                                int threads, bool backward, int gates,
                                int planes_per_pass, bool tiles, KernelAttributes* out);

// The deferred error of an earlier persistent-kernel call (see deferred_errors.h), or "" if none.
// Clears it. Only meaningful once the stream that ran the call has been synchronized.
std::string TakePendingError();

// Best-effort one-time setup (the pinned host word used for deferred error reporting). Call it
// outside any CUDA-graph capture, e.g. when the handlers are registered. Never throws.
void Initialize();

}  // namespace jax_sprnn::cuda
