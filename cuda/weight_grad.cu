// The weight gradient of the recurrent kernel on its sparsity pattern only (a sampled dense-dense
// product), written straight into the packed value layout:
//
//   dvalues[g, slot] = sum over the examples b of group g and their active positions p of
//                      h_before[p, b, col(slot)] * dz[p, b, row(slot)]
//
// where h_before is the state the step at p started from (h0 for the first step). Padding slots
// and padding lanes get exactly 0; an out-of-range column or lane_row entry gets NaN (never a
// silent wrong value). Deterministic: every thread sums its slots over a fixed sequence of
// (position, example) pairs, and time chunks are added in a fixed order, with no atomics.
//
// Work split: a thread owns up to SPT (8 or 16: constants::weight_grad_slots_per_thread) slots of
// one lane (a lane's slots all belong to one row, so the row's dz is one value per pair). A CTA of
// constants::kWeightGradThreads (1024) threads stages the pairs' h_before and dz as fp32 rows in
// shared memory, up to 16 pairs at a time, and its threads gather from them. These numbers come from
// jax_sprnn/_constants.py, which the Python dispatch reads too (time chunks, shared-memory check).
// Big CTAs matter: every CTA stages whole rows, so the staging traffic is (slot blocks) x pairs x
// 2H, and only a block of many slots (8-16K) makes it small next to the gathers. The positions are
// then split into time chunks (grid.y) so that the GPU fills with one such CTA per SM; their partial
// sums go to a workspace and are added in chunk order by a second kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda_host.h"
#include "cuda_kernels.h"
#include "ffi_bindings.h"
#include "jax_sprnn_constants.h"  // generated from jax_sprnn/_constants.py
#include "sprnn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_sprnn::cuda {
namespace {

constexpr int kWgThreads = constants::kWeightGradThreads;
constexpr int kSptSmall = constants::kWeightGradSlotsPerThreadSmall;
constexpr int kSptLarge = constants::kWeightGradSlotsPerThreadLarge;
static_assert(kWgThreads % kWarpSize == 0 && kWgThreads <= 1024, "a CTA of whole warps");
static_assert(0 < kSptSmall && kSptSmall < kSptLarge, "launch() instantiates the two SPT");
constexpr int kMaxPairsPerStage = 16;
constexpr int64_t kStageBudgetBytes = 160 * 1024;  // one CTA per SM: most of its shared memory

struct WeightGradParams {
  const void* y;
  const void* h0;
  const void* dz;
  const int32_t* indices;
  const int32_t* lane_row;
  const int32_t* lengths;
  float* out;  // [groups, S], or the partial sums [time_chunks, groups, S]
  int T, B, H, K, n_lanes, groups, reverse, time_chunks, pairs_per_stage;
  int64_t n_slots;  // S = n_lanes * K
};

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return static_cast<float>(*p);
}
template <>
__device__ __forceinline__ float load_float<float>(const float* p) {
  return *p;
}

// acc[i] += h_before[col[i]] * dz[row] over the staged pairs ([pair][2][H]: h_before, then dz).
template <int SPT>
__device__ __forceinline__ void accumulate(const float* stage, int n_pairs, int H, int row,
                                           const int (&col)[SPT], float (&acc)[SPT]) {
  if (row < 0) return;
  for (int q = 0; q < n_pairs; ++q) {
    const float* hb = stage + static_cast<size_t>(q) * 2 * H;
    const float d = hb[H + row];
#pragma unroll
    for (int i = 0; i < SPT; ++i) acc[i] = fmaf(hb[max(col[i], 0)], d, acc[i]);
  }
}

template <typename T, int SPT>
__global__ void __launch_bounds__(kWgThreads, 1)
    weight_grad_kernel(const __grid_constant__ WeightGradParams p) {
  extern __shared__ __align__(16) float stage[];  // [pairs_per_stage][2][H], then lengths [B]
  int* const len = reinterpret_cast<int*>(stage + static_cast<size_t>(p.pairs_per_stage) * 2 * p.H);
  const int tid = threadIdx.x;
  const int H = p.H, B = p.B, K = p.K;
  for (int b = tid; b < B; b += blockDim.x) len[b] = min(max(p.lengths[b], 0), p.T);

  // ---- this thread's slots --------------------------------------------------------------------
  const int64_t gt = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;
  const int64_t n_chunks_k = (K + SPT - 1) / SPT;
  const bool active = gt < static_cast<int64_t>(p.n_lanes) * n_chunks_k;
  const int kc = active ? static_cast<int>(gt / p.n_lanes) : 0;
  const int lane_lin = active ? static_cast<int>(gt % p.n_lanes) : 0;
  const int warp = lane_lin >> 5, lane = lane_lin & 31;
  int row = active ? p.lane_row[lane_lin] : -1;
  bool bad = row < -1 || row >= H;
  if (bad) row = -1;
  int col[SPT];  // the slot's column, or -1: padding (~j), not a weight
#pragma unroll
  for (int i = 0; i < SPT; ++i) {
    const int k = kc * SPT + i;
    col[i] = -1;
    if (active && k < K) {
      const int idx = p.indices[(static_cast<int64_t>(warp) * K + k) * 32 + lane];
      bad |= idx >= H;
      if (idx >= 0 && idx < H && row >= 0) col[i] = idx;
    }
  }
  float acc[SPT];
#pragma unroll
  for (int i = 0; i < SPT; ++i) acc[i] = 0.0f;
  __syncthreads();  // lengths

  // ---- the pairs of this (group, time chunk), staged kPairs at a time ------------------------
  const T* y = static_cast<const T*>(p.y);
  const T* h0 = static_cast<const T*>(p.h0);
  const T* dz = static_cast<const T*>(p.dz);
  const int g = blockIdx.y / p.time_chunks, c = blockIdx.y % p.time_chunks;
  const int per_group = B / p.groups;
  const int chunk_len = (p.T + p.time_chunks - 1) / p.time_chunks;
  const int p_begin = c * chunk_len, p_end = min(p.T, p_begin + chunk_len);
  int staged = 0;
  for (int pos = p_begin; pos < p_end; ++pos) {
    for (int b = g * per_group; b < (g + 1) * per_group; ++b) {
      const int L = len[b];
      if (pos >= L) continue;  // dz is 0 past the length: skip the pair (block-uniform)
      const bool first = p.reverse ? pos == L - 1 : pos == 0;
      const int before = p.reverse ? pos + 1 : pos - 1;
      const T* hb_src = first ? h0 + static_cast<size_t>(b) * H
                              : y + (static_cast<size_t>(before) * B + b) * H;
      const T* dz_src = dz + (static_cast<size_t>(pos) * B + b) * H;
      float* dst = stage + static_cast<size_t>(staged) * 2 * H;
      for (int j = tid; j < H; j += blockDim.x) {
        dst[j] = load_float(hb_src + j);
        dst[H + j] = load_float(dz_src + j);
      }
      if (++staged == p.pairs_per_stage) {
        __syncthreads();
        accumulate(stage, staged, H, row, col, acc);
        __syncthreads();
        staged = 0;
      }
    }
  }
  if (staged > 0) {
    __syncthreads();
    accumulate(stage, staged, H, row, col, acc);
  }

  // ---- results ----------------------------------------------------------------------------------
  if (!active) return;
  float* out = p.out + (static_cast<int64_t>(c) * p.groups + g) * p.n_slots;
#pragma unroll
  for (int i = 0; i < SPT; ++i) {
    const int k = kc * SPT + i;
    if (k < K)
      out[(static_cast<int64_t>(warp) * K + k) * 32 + lane] =
          bad ? __int_as_float(0x7fc00000) : col[i] >= 0 ? acc[i] : 0.0f;
  }
}

// out[i] = sum over chunks c, in order, of partial[c * n + i].
__global__ void sum_chunks_kernel(const float* __restrict__ partial, float* __restrict__ out,
                                  int64_t n, int chunks) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[c * n + i];
    out[i] = s;
  }
}

template <typename T, int SPT>
cudaError_t launch_spt(cudaStream_t stream, const WeightGradParams& p, dim3 grid, int smem_bytes,
                       const DeviceInfo& dev, int device) {
  const void* fn = reinterpret_cast<const void*>(&weight_grad_kernel<T, SPT>);
  KernelInfo kinfo;
  cudaError_t e = kernel_info(device, fn, dev, &kinfo);
  if (e != cudaSuccess) return e;
  weight_grad_kernel<T, SPT><<<grid, kWgThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(cudaStream_t stream, const WeightGradParams& p, dim3 grid, int smem_bytes,
                   const DeviceInfo& dev, int device) {
  return constants::weight_grad_slots_per_thread(p.K) == kSptSmall
             ? launch_spt<T, kSptSmall>(stream, p, grid, smem_bytes, dev, device)
             : launch_spt<T, kSptLarge>(stream, p, grid, smem_bytes, dev, device);
}

ffi::Error WeightGradImpl(cudaStream_t stream, ffi::AnyBuffer y, ffi::AnyBuffer h0,
                          ffi::AnyBuffer dz, ffi::Buffer<ffi::S32> indices,
                          ffi::Buffer<ffi::S32> lane_row, ffi::Buffer<ffi::S32> lengths,
                          ffi::Result<ffi::Buffer<ffi::F32>> dvalues,
                          ffi::Result<ffi::Buffer<ffi::F32>> workspace, int64_t groups,
                          int64_t reverse, int64_t slots_per_lane, int64_t time_chunks) {
  const std::string name = "jax_sprnn_weight_grad";
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(name + ": " + m); };
  const ffi::DataType dt = y.element_type();
  Dtype kdt;
  if (!kernel_dtype(dt, &kdt)) return bad("y must be float32, float16 or bfloat16");
  if (h0.element_type() != dt || dz.element_type() != dt)
    return bad(std::string("h0 and dz must have y's dtype ") + dtype_name(dt));
  const auto yd = y.dimensions();
  if (yd.size() != 3) return bad("y must be [T, B, H], got " + shape_string(yd));
  const int64_t T = yd[0], B = yd[1], H = yd[2];
  if (!same_dims(dz.dimensions(), yd)) return bad("dz must have y's shape " + shape_string(yd));
  if (h0.element_count() != static_cast<size_t>(B * H))
    return bad("h0 must be [B, H] = [" + std::to_string(B) + ", " + std::to_string(H) + "]");
  if (lengths.element_count() != static_cast<size_t>(B))
    return bad("lengths must have B = " + std::to_string(B) + " entries");
  if (groups < 1 || B % groups != 0)
    return bad("groups = " + std::to_string(groups) + " must divide the batch " + std::to_string(B));
  const int64_t n_lanes = static_cast<int64_t>(lane_row.element_count());
  const int64_t K = slots_per_lane;
  if (n_lanes % kWarpSize != 0 || K < 0)
    return bad("lane_row size must be a multiple of 32 and slots_per_lane >= 0");
  const int64_t S = n_lanes * K;
  if (static_cast<int64_t>(indices.element_count()) != S)
    return bad("indices size " + std::to_string(indices.element_count()) + " != lanes * K = " +
               std::to_string(S));
  if (static_cast<int64_t>(dvalues->element_count()) != groups * S)
    return bad("dvalues must be [groups, S] = [" + std::to_string(groups) + ", " + std::to_string(S) + "]");
  if (time_chunks < 1 || time_chunks > 65535 || groups * time_chunks > 65535)
    return bad("time_chunks must be in [1, 65535 / groups], got " + std::to_string(time_chunks));
  if (time_chunks > 1 &&
      static_cast<int64_t>(workspace->element_count()) < time_chunks * groups * S)
    return bad("workspace must hold time_chunks * groups * S = " +
               std::to_string(time_chunks * groups * S) + " floats");
  if (reverse != 0 && reverse != 1) return bad("reverse must be 0 or 1");
  if (T > INT32_MAX || B > INT32_MAX || H > INT32_MAX || K > INT32_MAX || n_lanes > INT32_MAX)
    return bad("T, B, H, slots_per_lane and the lane count must fit in int32");

  float* out = dvalues->typed_data();
  if (S == 0) return ffi::Error::Success();
  if (T == 0 || B == 0 || H == 0) {
    cudaError_t e = cudaMemsetAsync(out, 0, groups * S * sizeof(float), stream);
    return e == cudaSuccess ? ffi::Error::Success() : cuda_error("cudaMemsetAsync(dvalues)", e);
  }

  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  DeviceInfo dev;
  if ((e = device_info(device, &dev)) != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", e);
  // As many pairs as the budget holds besides the lengths; at least one (the least the Python
  // dispatch checks: constants::weight_grad_smem_bytes with one pair).
  const int64_t lengths_bytes = constants::weight_grad_smem_bytes(H, B, 0);
  const int64_t pair_bytes = constants::weight_grad_smem_bytes(H, B, 1) - lengths_bytes;
  const int64_t budget = std::min<int64_t>(kStageBudgetBytes, dev.smem_optin - lengths_bytes);
  const int64_t pairs = std::clamp<int64_t>(budget / pair_bytes, 1, kMaxPairsPerStage);
  const int64_t smem_bytes = constants::weight_grad_smem_bytes(H, B, pairs);
  if (smem_bytes > dev.smem_optin)
    return bad("H = " + std::to_string(H) + ", B = " + std::to_string(B) + " need " +
               std::to_string(smem_bytes) + " bytes of shared memory (2*H*4 + B*4), " +
               std::to_string(dev.smem_optin) + " available");

  WeightGradParams p{};
  p.y = y.untyped_data();
  p.h0 = h0.untyped_data();
  p.dz = dz.untyped_data();
  p.indices = indices.typed_data();
  p.lane_row = lane_row.typed_data();
  p.lengths = lengths.typed_data();
  p.out = time_chunks > 1 ? workspace->typed_data() : out;
  p.T = static_cast<int>(T);
  p.B = static_cast<int>(B);
  p.H = static_cast<int>(H);
  p.K = static_cast<int>(K);
  p.n_lanes = static_cast<int>(n_lanes);
  p.groups = static_cast<int>(groups);
  p.reverse = static_cast<int>(reverse);
  p.time_chunks = static_cast<int>(time_chunks);
  p.pairs_per_stage = static_cast<int>(pairs);
  p.n_slots = S;
  const int spt = constants::weight_grad_slots_per_thread(K);
  const int64_t threads_needed = n_lanes * ((K + spt - 1) / spt);
  const int64_t blocks = (threads_needed + kWgThreads - 1) / kWgThreads;
  if (blocks > INT32_MAX) return bad("the layout is too large for one grid");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(groups * time_chunks));
  switch (kdt) {
    case Dtype::kF32: e = launch<float>(stream, p, grid, static_cast<int>(smem_bytes), dev, device); break;
    case Dtype::kF16: e = launch<__half>(stream, p, grid, static_cast<int>(smem_bytes), dev, device); break;
    case Dtype::kBF16: e = launch<__nv_bfloat16>(stream, p, grid, static_cast<int>(smem_bytes), dev, device); break;
  }
  if (e != cudaSuccess) return cuda_error("launching the weight-gradient kernel", e);
  if (time_chunks > 1) {
    const int64_t n = groups * S;
    const int rblocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 8 * dev.sm_count));
    sum_chunks_kernel<<<rblocks, 256, 0, stream>>>(workspace->typed_data(), out, n,
                                                  static_cast<int>(time_chunks));
    if ((e = cudaGetLastError()) != cudaSuccess) return cuda_error("launching the chunk sum", e);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_sprnn::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxSprnnWeightGradCuda, jax_sprnn::cuda::WeightGradImpl,
    jax_sprnn::bindings::weight_grad_operands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
        .Ret<ffi::Buffer<ffi::F32>>()  // workspace (partial sums of the time chunks)
        .Attr<int64_t>("groups")
        .Attr<int64_t>("reverse")
        .Attr<int64_t>("slots_per_lane")
        .Attr<int64_t>("time_chunks"),
    {ffi::Traits::kCmdBufferCompatible});
