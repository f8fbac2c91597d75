// `jax_sprnn_sync_floor`, a benchmark target (registered by the CUDA module's
// testing_registrations(), not with the production targets): the forward kernel's exchange of
// 16-bit words on a grid of CTAs, with no compute, so its time per step is the floor that the
// synchronization alone sets.
//
// Every CTA publishes its contiguous share of the `words` words each step, as the forward kernel's
// head lanes do, and stages all of them. Word e at step s carries (its staged value at s-1) + 1,
// starting from 0, so *out = value of word 0 after the last step = steps (exact up to 2048).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_host.h"
#include "cuda_kernels.h"
#include "deferred_errors.h"
#include "persistent_kernel.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_sprnn::cuda {
namespace {

struct FloorParams {
  uint32_t* error_flag;
  unsigned char* exchange[2];
  float* out;
  int steps, words, h_buffers, exchange_vector;
  unsigned long long timeout_ns;
  FinishParams finish;
};

__device__ __forceinline__ void sync_floor_body(const FloorParams& p) {
  using X = NarrowWords<Storage<__half>>;
  using Word = X::Word;
  extern __shared__ __align__(16) unsigned char smem[];
  float* const stage0 = reinterpret_cast<float*>(smem);
  float* const stage1 = stage0 + (p.h_buffers == 2 ? (p.words + 3) / 4 * 4 : 0);  // 16-byte aligned
  const int per_cta = (p.words + gridDim.x - 1) / gridDim.x;
  const int own_begin = min(p.words, static_cast<int>(blockIdx.x) * per_cta);
  const int own_end = min(p.words, own_begin + per_cta);
  SpinControl spin{p.error_flag, p.timeout_ns, false};
  Word* const buf0 = reinterpret_cast<Word*>(p.exchange[0]);
  Word* const buf1 = reinterpret_cast<Word*>(p.exchange[1]);

  // A CTA that publishes nothing must not read either (see the double-buffering argument).
  if (own_begin >= own_end) return;
  float last = 0.0f;
  for (int s = 0; s < p.steps; ++s) {
    float* const cur = (p.h_buffers == 2 && (s & 1)) ? stage1 : stage0;
    if (s == 0) {
      for (int i = threadIdx.x; i < p.words; i += blockDim.x) cur[i] = 0.0f;
    } else {
      const Word* src = (s & 1) ? buf0 : buf1;
      const uint32_t tag = static_cast<uint32_t>(s) & X::kTagMask;
      float probe = 0.0f;  // the kernel's finiteness probe; unused here, so compiled away
      if (p.exchange_vector) {
        stage_words<X, 4, 8>(src, cur, p.words, tag, spin, probe);
      } else {
        stage_words<X, 1, 8>(src, cur, p.words, tag, spin, probe);
      }
    }
    if (__syncthreads_or(spin.aborted)) return;
    Word* const dst = (s & 1) ? buf1 : buf0;
    const uint32_t out_tag = static_cast<uint32_t>(s + 1) & X::kTagMask;
    for (int i = own_begin + threadIdx.x; i < own_end; i += blockDim.x) {
      const float v = cur[i] + 1.0f;
      if (i == 0) last = v;
      st_relaxed(dst + i, X::make_word(v, out_tag));
    }
    if (p.h_buffers == 1) __syncthreads();
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.out = last;
}

__global__ void __launch_bounds__(kMaxThreadsPerCta, 1)
    sync_floor_kernel(const __grid_constant__ FloorParams p) {
  sync_floor_body(p);
  finish_call(p.error_flag, p.finish);  // as the recurrences end their calls
}

ffi::Error SyncFloorImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> /*x*/,
                         ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                         ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t steps, int64_t num_ctas,
                         int64_t threads, int64_t batch, int64_t hidden) {
  if (auto err = take_deferred_error(stream); err.failure()) return err;
  auto bad = [](const std::string& m) { return ffi::Error::InvalidArgument("jax_sprnn_sync_floor: " + m); };
  if (steps < 1 || steps > INT32_MAX) return bad("steps must be in [1, 2^31)");
  if (num_ctas < 1 || num_ctas > INT32_MAX) return bad("num_ctas must be >= 1");
  if (threads < 32 || threads > kMaxThreadsPerCta || threads % 32 != 0)
    return bad("threads must be a multiple of 32 in [32, 1024]");
  if (batch < 1 || hidden < 1 || batch * hidden > INT32_MAX) return bad("batch and hidden must be >= 1");
  if (out->element_count() < 1) return bad("out must have at least one element");
  const int64_t words = batch * hidden;
  const int64_t ws_need = cuda_workspace_bytes(batch, hidden);
  const int64_t ws_bytes = static_cast<int64_t>(workspace->element_count());
  if (ws_bytes < ws_need)
    return bad("workspace has " + std::to_string(ws_bytes) + " bytes, needs " + std::to_string(ws_need));
  if (num_ctas > words) return bad("num_ctas must be <= batch*hidden (every CTA publishes a word)");

  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  DeviceInfo dev;
  if ((e = device_info(device, &dev)) != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", e);
  const void* fn = reinterpret_cast<const void*>(&sync_floor_kernel);
  KernelInfo kinfo;
  if ((e = kernel_info(device, fn, dev, &kinfo)) != cudaSuccess)
    return cuda_error("cudaFuncGetAttributes/cudaFuncSetAttribute(sync floor kernel)", e);
  const int64_t one = align16(words * 4);
  const int h_buffers = 2 * one <= kinfo.max_dynamic_smem ? 2 : 1;
  if (h_buffers * one > kinfo.max_dynamic_smem)
    return bad("batch*hidden*4 = " + std::to_string(words * 4) + " bytes of staged h exceed the " +
               std::to_string(kinfo.max_dynamic_smem) + " bytes of shared memory per CTA");
  const int smem_bytes = static_cast<int>(h_buffers * one);
  int per_sm = 0;
  if ((e = ctas_per_sm(device, fn, static_cast<int>(threads), smem_bytes, &per_sm)) != cudaSuccess)
    return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
  if (static_cast<int64_t>(per_sm) * dev.sm_count < num_ctas)
    return bad(std::to_string(num_ctas) + " CTAs exceed the " + std::to_string(per_sm) + " x " +
               std::to_string(dev.sm_count) + " that can be co-resident");

  unsigned char* ws = workspace->typed_data();
  const ExchangeLayout xl = exchange_layout(words, 4, ws_bytes, ws);
  if ((e = cudaMemsetAsync(ws, 0, xl.used_bytes, stream)) != cudaSuccess)
    return cuda_error("cudaMemsetAsync(workspace)", e);
  FloorParams prm{};
  prm.error_flag = reinterpret_cast<uint32_t*>(ws);
  prm.exchange[0] = ws + kHeaderBytes;
  prm.exchange[1] = ws + kHeaderBytes + xl.stride_bytes;
  prm.out = out->typed_data();
  prm.steps = static_cast<int>(steps);
  prm.words = static_cast<int>(words);
  prm.h_buffers = h_buffers;
  prm.exchange_vector = xl.vector ? 1 : 0;
  prm.timeout_ns = static_cast<unsigned long long>(kDefaultSpinTimeoutUs) * 1000ull;
  prm.finish.out[0] = FinishOutput{prm.out, 1, Storage<float>::kNaNBits, 4};
  prm.finish.n_out = 1;
  prm.finish.expected_heads = -1;  // (no layout)
  const ErrorSlot slot = claim_error_slot({"jax_sprnn_sync_floor", ffi::DataType::F16, steps, batch, hidden, 0});
  prm.finish.host_word = slot.device;
  void* args[] = {&prm};
  e = cudaLaunchCooperativeKernel(fn, dim3(static_cast<unsigned>(num_ctas)),
                                  dim3(static_cast<unsigned>(threads)), args, smem_bytes, stream);
  if (e != cudaSuccess) return cuda_error("cudaLaunchCooperativeKernel(jax_sprnn_sync_floor)", e);
  return check_call_now(stream, slot);
}

}  // namespace
}  // namespace jax_sprnn::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnSyncFloorCuda, jax_sprnn::cuda::SyncFloorImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()      // x (dummy)
                                  .Ret<ffi::Buffer<ffi::U8>>()       // workspace
                                  .Ret<ffi::Buffer<ffi::F32>>()      // out
                                  .Attr<int64_t>("steps")
                                  .Attr<int64_t>("num_ctas")
                                  .Attr<int64_t>("threads")
                                  .Attr<int64_t>("batch")
                                  .Attr<int64_t>("hidden"),
                              {ffi::Traits::kCmdBufferCompatible});
