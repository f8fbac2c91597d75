// Host-side helpers shared by the CUDA handlers (see cuda_host.h).
#include "cuda_host.h"

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace jax_sprnn::cuda {
namespace {

std::mutex g_cache_mutex;
std::map<int, DeviceInfo> g_devices;
std::map<std::pair<int, const void*>, KernelInfo> g_kernels;
std::map<std::tuple<int, const void*, int, int>, int> g_occupancy;  // -> CTAs per SM
std::map<std::tuple<int, const void*, int, int, int>, int> g_clusters;  // -> co-resident clusters

}  // namespace

const char* dtype_name(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    default: return "unsupported";
  }
}

bool parse_dtype(const std::string& s, ffi::DataType* out) {
  if (s == "float32" || s == "f32") *out = ffi::DataType::F32;
  else if (s == "float16" || s == "f16") *out = ffi::DataType::F16;
  else if (s == "bfloat16" || s == "bf16") *out = ffi::DataType::BF16;
  else return false;
  return true;
}

std::string cuda_message(const char* what, cudaError_t e) {
  return std::string("jax_sprnn: ") + what + " failed: " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}

ffi::Error cuda_error(const char* what, cudaError_t e) {
  cudaGetLastError();  // clear a non-sticky error so it does not surface in an unrelated call
  return ffi::Error::Internal(cuda_message(what, e));
}

cudaError_t device_info(int device, DeviceInfo* out) {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  auto it = g_devices.find(device);
  if (it != g_devices.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  DeviceInfo info;
  int coop = 0;
  cudaError_t e = cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  int cluster = 0;
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, device);
  if (e != cudaSuccess) return e;
  info.cooperative = coop != 0;
  info.cluster = cluster != 0;
  g_devices[device] = info;
  *out = info;
  return cudaSuccess;
}

cudaError_t kernel_info(int device, const void* fn, const DeviceInfo& dev, KernelInfo* out) {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  const auto key = std::make_pair(device, fn);
  auto it = g_kernels.find(key);
  if (it != g_kernels.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, fn);
  if (e != cudaSuccess) return e;
  KernelInfo info;
  info.max_threads = attr.maxThreadsPerBlock;
  info.static_smem = static_cast<int>(attr.sharedSizeBytes);
  info.max_dynamic_smem = std::max(0, dev.smem_optin - info.static_smem);
  e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, info.max_dynamic_smem);
  if (e != cudaSuccess) return e;
  g_kernels[key] = info;
  *out = info;
  return cudaSuccess;
}

cudaError_t ctas_per_sm(int device, const void* fn, int threads, int smem_bytes, int* out) {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  const auto key = std::make_tuple(device, fn, threads, smem_bytes);
  auto it = g_occupancy.find(key);
  if (it != g_occupancy.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  int n = 0;
  cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, threads, smem_bytes);
  if (e != cudaSuccess) return e;
  g_occupancy[key] = n;
  *out = n;
  return cudaSuccess;
}

cudaError_t active_clusters(int device, const void* fn, int threads, int smem_bytes,
                            int cluster_size, int* out) {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  const auto key = std::make_tuple(device, fn, threads, smem_bytes, cluster_size);
  auto it = g_clusters.find(key);
  if (it != g_clusters.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  cudaError_t e = cudaSuccess;
  if (cluster_size > constants::kPortableClusterCtas)
    e = cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  int n = 0;
  if (e == cudaSuccess) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(cluster_size);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem_bytes;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster_size;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    e = cudaOccupancyMaxActiveClusters(&n, fn, &cfg);
  }
  if (e != cudaSuccess) {  // e.g. a size the device does not allow: no cluster of that size fits
    cudaGetLastError();  // not sticky: keep it from surfacing in an unrelated call
    n = 0;
  }
  g_clusters[key] = n;
  *out = n;
  return cudaSuccess;
}

bool kernel_dtype(ffi::DataType dtype, Dtype* out) {
  switch (dtype) {
    case ffi::DataType::F32: *out = Dtype::kF32; return true;
    case ffi::DataType::F16: *out = Dtype::kF16; return true;
    case ffi::DataType::BF16: *out = Dtype::kBF16; return true;
    default: return false;
  }
}

ExchangeLayout exchange_layout(int64_t words, int word_bytes, int64_t workspace_bytes,
                               const void* workspace) {
  ExchangeLayout l;
  const int64_t packed = words * word_bytes;
  const int64_t aligned = align16(packed);
  const bool base_aligned = reinterpret_cast<uintptr_t>(workspace) % 16 == 0;
  if (base_aligned && kHeaderBytes + 2 * aligned <= workspace_bytes) {
    l.stride_bytes = aligned;
    l.vector = true;
  } else {
    l.stride_bytes = packed;
    l.vector = false;
  }
  l.used_bytes = kHeaderBytes + l.stride_bytes + packed;
  return l;
}

std::string shape_string(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}
}  // namespace jax_sprnn::cuda
