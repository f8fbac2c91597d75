// How the persistent kernels (the recurrences and the sync floor) report errors without ever
// synchronizing (see persistent_kernel.cuh for the device side):
//   * A tiny finisher kernel runs after the persistent kernel on the same stream: if the flag is
//     set it fills the outputs with NaN and copies the flag into a pinned, mapped host word.
//   * DEFERRED REPORTING: a handler never synchronizes, so it cannot return the error of the call
//     that failed. It reads the host word at entry of the NEXT call and, if set, clears it and fails
//     that call with ffi::Error::Internal. pending_error() in the Python module reads and clears the
//     same word (call it after synchronizing). Under CUDA-graph capture the handler's host code runs
//     only at capture time, so there the NaN outputs and pending_error() are the signal.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_host.h"
#include "xla/ffi/api/ffi.h"

namespace jax_sprnn::cuda {

// At the entry of a handler: sets up the host word (unless `stream` is being captured), then fails
// with the error an earlier call left there, if any, and clears it.
ffi::Error take_deferred_error(cudaStream_t stream);

// Launches the finisher on `stream` after a persistent kernel whose workspace header is `header`:
// on an error flag, or when the head count differs from `expected_heads` (< 0: no check), it fills
// out0[0:n0] and out1[0:n1] with `nan_bits` and sets the host word. Bits: uint32_t or uint16_t.
template <typename Bits>
cudaError_t launch_finisher(cudaStream_t stream, const DeviceInfo& dev, const uint32_t* header,
                            int64_t expected_heads, void* out0, size_t n0, void* out1, size_t n1,
                            Bits nan_bits);

extern template cudaError_t launch_finisher<uint32_t>(cudaStream_t, const DeviceInfo&, const uint32_t*,
                                                      int64_t, void*, size_t, void*, size_t, uint32_t);
extern template cudaError_t launch_finisher<uint16_t>(cudaStream_t, const DeviceInfo&, const uint32_t*,
                                                      int64_t, void*, size_t, void*, size_t, uint16_t);

}  // namespace jax_sprnn::cuda
