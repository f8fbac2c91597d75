// How the persistent kernels (the recurrences and the sync floor) report errors without ever
// synchronizing (see persistent_kernel.cuh for the device side):
//   * At the end of the kernel, the last CTA to finish checks the call (finish_call): if the error
//     flag is set it fills the outputs with NaN and copies the flag into a pinned, mapped host word.
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

// The device view of the pinned host word, for a kernel's FinishParams (null where it could not be
// allocated: then errors show as NaN outputs only).
uint32_t* error_word_device();

}  // namespace jax_sprnn::cuda
