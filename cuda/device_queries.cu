// The device and kernel queries of the CUDA module (cuda_kernels.h): what the planner and the tests
// read about the GPU and about the compiled persistent-kernel instantiations.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "cuda_host.h"
#include "cuda_kernels.h"
#include "persistent.h"

namespace jax_sprnn::cuda {

std::string GetDeviceProperties(int device, DeviceProperties* out) {
  cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_message("cudaGetDeviceProperties", e);
  }
  out->name = p.name;
  out->major = p.major;
  out->minor = p.minor;
  out->sm_count = p.multiProcessorCount;
  out->regs_per_sm = p.regsPerMultiprocessor;
  out->regs_per_block = p.regsPerBlock;
  out->smem_per_sm = static_cast<int64_t>(p.sharedMemPerMultiprocessor);
  out->smem_per_block_optin = static_cast<int64_t>(p.sharedMemPerBlockOptin);
  out->max_threads_per_sm = p.maxThreadsPerMultiProcessor;
  out->max_threads_per_block = p.maxThreadsPerBlock;
  out->cooperative_launch = p.cooperativeLaunch != 0;
  int cluster = 0;
  e = cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_message("cudaDeviceGetAttribute(cudaDevAttrClusterLaunch)", e);
  }
  out->cluster_launch = cluster != 0;
  out->l2_bytes = static_cast<int64_t>(p.l2CacheSize);
  return "";
}

namespace {
// The recurrence of a gate count (1: the simple cell, 3: GRU, 4: LSTM), or false.
bool direction_of(int gates, bool backward, Direction* out) {
  if (gates == 1) *out = backward ? Direction::kBackward : Direction::kForward;
  else if (gates == 3) *out = backward ? Direction::kGruBackward : Direction::kGru;
  else if (gates == 4) *out = backward ? Direction::kLstmBackward : Direction::kLstm;
  else return false;
  return true;
}
}  // namespace

std::vector<int> SupportedRegSlots(const std::string& dtype, int gates) {
  Direction dir;
  if (!direction_of(gates, false, &dir)) return {};
  // Without a dtype: float32's set, a subset of the 16-bit one.
  if (dtype.empty()) return reg_slots_for(dir, Dtype::kF32);
  ffi::DataType dt;
  Dtype kdt;
  if (!parse_dtype(dtype, &dt) || !kernel_dtype(dt, &kdt)) return {};
  return reg_slots_for(dir, kdt);
}

std::string GetKernelAttributes(const std::string& dtype, int tile, int reg_slots, int device,
                                int threads, bool backward, int gates, int planes_per_pass,
                                bool tiles, KernelAttributes* out) {
  ffi::DataType dt;
  Dtype kdt;
  if (!parse_dtype(dtype, &dt) || !kernel_dtype(dt, &kdt))
    return "unknown dtype '" + dtype + "' (float32, float16, bfloat16)";
  Direction dir;
  if (!direction_of(gates, backward, &dir))
    return "gates must be 1, 3 or 4, got " + std::to_string(gates);
  if (!kernels_built(kdt)) return kernels_missing(dtype);
  const PersistentKernelFn fn = lookup_persistent(dir, kdt, tile, reg_slots, threads, planes_per_pass, tiles);
  if (fn == nullptr)
    return std::string("no ") + (tiles ? "tile-layout " : "") + (backward ? "backward" : "forward") +
           " kernel (gates " +
           std::to_string(gates) + ") for dtype " + dtype + ", tile " + std::to_string(tile) +
           ", " + std::to_string(planes_per_pass) + " plane(s) a pass" +
           ", reg_slots " + std::to_string(reg_slots) + ", " + std::to_string(threads) + " threads";
  int previous = 0;
  cudaError_t e = cudaGetDevice(&previous);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_message("cudaGetDevice", e);
  }
  if (device != previous && (e = cudaSetDevice(device)) != cudaSuccess) {
    cudaGetLastError();
    return cuda_message("cudaSetDevice", e);
  }
  cudaFuncAttributes attr;
  e = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(fn));
  if (device != previous) cudaSetDevice(previous);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_message("cudaFuncGetAttributes", e);
  }
  out->num_regs = attr.numRegs;
  out->local_bytes = static_cast<int64_t>(attr.localSizeBytes);
  out->max_threads_per_block = attr.maxThreadsPerBlock;
  out->static_smem_bytes = static_cast<int64_t>(attr.sharedSizeBytes);
  return "";
}

}  // namespace jax_sprnn::cuda
