// The deferred error reporting of the persistent kernels (see deferred_errors.h): the pinned host
// word, the finisher kernel, and the module's pending_error() / initialize().
#include "deferred_errors.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

#include "cuda_kernels.h"
#include "persistent.h"

namespace jax_sprnn::cuda {
namespace {

// `expected_heads` < 0 skips the head-count check (the sync-floor kernel has no layout).
template <typename Bits>
__global__ void finish_kernel(const uint32_t* __restrict__ header, int64_t expected_heads,
                              Bits* out0, size_t n0, Bits* out1, size_t n1, Bits nan_bits,
                              uint32_t* host_word) {
  // The persistent kernel has completed (stream order): plain loads see its writes.
  uint32_t code = header[0];
  if (expected_heads >= 0 && header[kHeadCountWord] != static_cast<uint64_t>(expected_heads))
    code |= kErrBadLayout;
  if (code == 0) return;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t first = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (size_t i = first; i < n0; i += stride) out0[i] = nan_bits;
  for (size_t i = first; i < n1; i += stride) out1[i] = nan_bits;
  if (first == 0 && host_word != nullptr) *reinterpret_cast<volatile uint32_t*>(host_word) = code;
}

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

template <typename Bits>
cudaError_t launch_finisher(cudaStream_t stream, const DeviceInfo& dev, const uint32_t* header,
                            int64_t expected_heads, void* out0, size_t n0, void* out1, size_t n1,
                            Bits nan_bits) {
  const size_t n = std::max(n0, n1);
  const int threads = 256;
  const int blocks = static_cast<int>(
      std::max<size_t>(1, std::min<size_t>((n + threads - 1) / threads, 2 * dev.sm_count)));
  finish_kernel<Bits><<<blocks, threads, 0, stream>>>(header, expected_heads, static_cast<Bits*>(out0), n0,
                                                      static_cast<Bits*>(out1), n1, nan_bits,
                                                      g_error_device);
  return cudaGetLastError();
}

template cudaError_t launch_finisher<uint32_t>(cudaStream_t, const DeviceInfo&, const uint32_t*,
                                               int64_t, void*, size_t, void*, size_t, uint32_t);
template cudaError_t launch_finisher<uint16_t>(cudaStream_t, const DeviceInfo&, const uint32_t*,
                                               int64_t, void*, size_t, void*, size_t, uint16_t);

std::string TakePendingError() {
  const uint32_t code = take_error_code();
  return code ? error_code_message(code) : std::string();
}

void Initialize() { ensure_error_word(nullptr); }

}  // namespace jax_sprnn::cuda
