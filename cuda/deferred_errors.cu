// The deferred error reporting of the persistent kernels (see deferred_errors.h): the pinned host
// word, its device view for the kernels' finish_call, and the module's pending_error() /
// initialize().
#include "deferred_errors.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

#include "cuda_kernels.h"
#include "persistent.h"

namespace jax_sprnn::cuda {
namespace {

// ---- the host word (pinned, mapped host memory, allocated once) ---------------------------------

std::mutex g_error_word_mutex;
uint32_t* g_error_host = nullptr;    // host view
uint32_t* g_error_device = nullptr;  // device view (same address under UVA)

// Allocates the word unless the calling thread is capturing `stream` (cudaHostAlloc may not be
// called during capture). Without the word, errors still show as NaN outputs.
void ensure_error_word(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_error_word_mutex);
  if (g_error_host != nullptr) return;
  if (stream != nullptr) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    if (status != cudaStreamCaptureStatusNone) return;
  }
  void* host = nullptr;
  if (cudaHostAlloc(&host, sizeof(uint32_t), cudaHostAllocMapped | cudaHostAllocPortable) !=
      cudaSuccess) {
    cudaGetLastError();
    return;
  }
  void* device = nullptr;
  if (cudaHostGetDevicePointer(&device, host, 0) != cudaSuccess) {
    cudaGetLastError();
    cudaFreeHost(host);
    return;
  }
  *static_cast<volatile uint32_t*>(host) = 0;
  g_error_device = static_cast<uint32_t*>(device);
  g_error_host = static_cast<uint32_t*>(host);
}

uint32_t take_error_code() {
  uint32_t* word;
  {
    std::lock_guard<std::mutex> lock(g_error_word_mutex);
    word = g_error_host;
  }
  return word == nullptr ? 0u : __atomic_exchange_n(word, 0u, __ATOMIC_ACQ_REL);
}

std::string error_code_message(uint32_t code) {
  std::string msg = "jax_sprnn: a previous persistent kernel call ";
  if (code & kErrTimeout) {
    msg += "timed out waiting for another CTA's hidden state (spin bound exceeded: a CTA was not "
           "co-resident, or the packed layout leaves a row without a lane)";
  }
  if (code & kErrBadLayout) {
    msg += (code & kErrTimeout) ? " and " : "";
    msg += "found an invalid packed layout (an index or lane_row entry out of range, or a row "
           "without exactly one run of lanes)";
  }
  msg += "; its outputs were filled with NaN";
  return msg;
}

}  // namespace

ffi::Error take_deferred_error(cudaStream_t stream) {
  ensure_error_word(stream);
  if (const uint32_t code = take_error_code()) return ffi::Error::Internal(error_code_message(code));
  return ffi::Error::Success();
}

uint32_t* error_word_device() {
  std::lock_guard<std::mutex> lock(g_error_word_mutex);
  return g_error_device;
}

std::string TakePendingError() {
  const uint32_t code = take_error_code();
  return code ? error_code_message(code) : std::string();
}

void Initialize() { ensure_error_word(nullptr); }

}  // namespace jax_sprnn::cuda
