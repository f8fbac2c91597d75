// Host-side helpers shared by the CUDA handlers: cached device and kernel facts, error messages,
// dtype names, the workspace layout and shape strings. Compiled by nvcc (the handlers are .cu files).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "persistent.h"
#include "xla/ffi/api/ffi.h"

namespace jax_sprnn::cuda {

namespace ffi = xla::ffi;

struct DeviceInfo {
  int sm_count = 0;
  int smem_optin = 0;
  bool cooperative = false;
  bool cluster = false;  // thread-block clusters (sm_90 and newer)
};

struct KernelInfo {
  int max_threads = 0;
  int static_smem = 0;
  int max_dynamic_smem = 0;  // what cudaFuncSetAttribute allowed
};

// Each CUDA query runs once per (device, kernel, ...) and is cached; all are thread-safe.
cudaError_t device_info(int device, DeviceInfo* out);
// Function attributes of `fn` on `device`, raising its dynamic shared-memory limit to the device
// maximum the first time.
cudaError_t kernel_info(int device, const void* fn, const DeviceInfo& dev, KernelInfo* out);
cudaError_t ctas_per_sm(int device, const void* fn, int threads, int smem_bytes, int* out);
// How many clusters of `cluster_size` CTAs of `fn` can be resident at once (0: none, including a
// size the device does not allow). Asks for the non-portable size past the portable one.
cudaError_t active_clusters(int device, const void* fn, int threads, int smem_bytes,
                            int cluster_size, int* out);

std::string cuda_message(const char* what, cudaError_t e);
// Clears a non-sticky error so that it does not surface in an unrelated call.
ffi::Error cuda_error(const char* what, cudaError_t e);

const char* dtype_name(ffi::DataType dtype);
bool parse_dtype(const std::string& s, ffi::DataType* out);
// The kernel dtype of an XLA element type; false for anything but F32, F16, BF16.
bool kernel_dtype(ffi::DataType dtype, Dtype* out);

// The persistent kernels' workspace: [header kHeaderBytes][exchange buffer 0][exchange buffer 1],
// each buffer `words` words. The buffers are 16-byte aligned (vector accesses) when the workspace has
// room for the padding; otherwise they are packed and the kernel uses scalar accesses.
struct ExchangeLayout {
  int64_t stride_bytes = 0;  // offset of buffer 1 from buffer 0
  int64_t used_bytes = 0;    // header + both buffers: what the handler memsets
  bool vector = false;
};
ExchangeLayout exchange_layout(int64_t words, int word_bytes, int64_t workspace_bytes,
                               const void* workspace);

std::string shape_string(ffi::Span<const int64_t> dims);
bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b);
using constants::align16;

}  // namespace jax_sprnn::cuda
