// How the persistent kernels (the recurrences and the sync floor) report errors without ever
// synchronizing (see persistent_kernel.cuh for the device side):
//   * Each call claims a slot of a ring of pinned, mapped host words, with a note of what it was
//     (target, dtype, T, B, H, mode). At the end of the kernel, the last CTA to finish checks the
//     call (finish_call): if the error flag is set it fills the outputs with NaN and copies the
//     flag into the call's slot.
//   * DEFERRED REPORTING: a handler never synchronizes, so it cannot return the error of the call
//     that failed. It reads the slots at entry of the NEXT call and, if one is set, clears it and
//     fails that call with ffi::Error::Internal, naming the call that failed (its number and
//     shapes), so that the report points at the cause, not at the unrelated call it arrives on.
//     pending_error() in the Python module reads and clears the same slots (call it after
//     synchronizing).
//   * JAX_SPRNN_SYNC_ERRORS=1 (debugging, like CUDA_LAUNCH_BLOCKING): each handler waits for its
//     own kernel and fails the very call whose kernel failed. Not while the stream is captured.
//   * Under CUDA-graph capture the handler's host code runs only at capture time, so there the NaN
//     outputs and pending_error() are the signal (each replay writes the captured call's slot).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda_host.h"
#include "xla/ffi/api/ffi.h"

namespace jax_sprnn::cuda {

// At the entry of a handler: sets up the slots (unless `stream` is being captured), then fails
// with the errors earlier calls left there, if any, and clears them.
ffi::Error take_deferred_error(cudaStream_t stream);

// What a call was, for the message that reports its error.
struct CallNote {
  const char* target;  // the FFI target (copied: it need only live through the claim)
  ffi::DataType dtype;
  int64_t T, B, H;
  int cluster;  // CTAs per cluster (cluster mode), 0: grid mode
};

// This call's slot: the device view of its word, for the kernel's FinishParams (null where the
// slots could not be allocated: then errors show as NaN outputs only), and its number.
struct ErrorSlot {
  uint32_t* device = nullptr;
  int index = -1;
};
ErrorSlot claim_error_slot(const CallNote& note);

// After the launch: with JAX_SPRNN_SYNC_ERRORS=1 (and the stream not captured), waits for the
// stream and fails with this call's own error, if its kernel set one; otherwise success at once.
ffi::Error check_call_now(cudaStream_t stream, const ErrorSlot& slot);

}  // namespace jax_sprnn::cuda
