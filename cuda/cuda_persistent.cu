// XLA FFI handlers of the persistent recurrences (forward, backward) and of the synchronization
// floor, with the host machinery they share: checks, the shared-memory plan, co-residency, the
// in-stream workspace reset, the finisher and deferred error reporting. The kernels are in
// persistent_kernel.cuh and are compiled per (direction, dtype) in cuda/instances/.
//
// Errors (see persistent_kernel.cuh for the device side):
//   * A tiny finisher kernel runs after the persistent kernel on the same stream: if the flag is
//     set it fills the outputs with NaN and copies the flag into a pinned, mapped host word.
//   * DEFERRED REPORTING: a handler never synchronizes, so it cannot return the error of the call
//     that failed. It reads the host word at entry of the NEXT call and, if set, clears it and fails
//     that call with ffi::Error::Internal. pending_error() in the Python module reads and clears the
//     same word (call it after synchronizing). Under CUDA-graph capture the handler's host code runs
//     only at capture time, so there the NaN outputs and pending_error() are the signal.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_host.h"
#include "cuda_kernels.h"
#include "ffi_bindings.h"
#include "persistent_kernel.cuh"
#include "sprnn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_sprnn::cuda {
namespace {

// ================================================================================================
// The synchronization floor: the same exchange (16-bit words) with no compute
// ================================================================================================
//
// Every CTA publishes its contiguous share of the `words` words each step, as the forward kernel's
// head lanes do, and stages all of them. Word e at step s carries (its staged value at s-1) + 1,
// starting from 0, so *out = value of word 0 after the last step = steps (exact up to 2048).

__global__ void __launch_bounds__(kMaxThreadsPerCta, 1)
    sync_floor_kernel(const __grid_constant__ FloorParams p) {
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
      if (p.exchange_vector) {
        stage_words<X, 4, 8>(src, cur, p.words, tag, spin);
      } else {
        stage_words<X, 1, 8>(src, cur, p.words, tag, spin);
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

// ================================================================================================
// The finisher: turns a device-side error into NaN outputs and a host-visible flag
// ================================================================================================

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


// ================================================================================================
// Host: the deferred error word (pinned, mapped host memory, allocated once)
// ================================================================================================

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

// Launches the finisher for outputs of element type Bits.
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

// ================================================================================================
// Host: workspace layout
// ================================================================================================

// [header 256 B][exchange buffer 0][exchange buffer 1], each buffer `words` words. The buffers are
// 16-byte aligned (vector accesses) when the workspace has room for the padding; otherwise they are
// packed and the kernel uses scalar accesses.
struct ExchangeLayout {
  int64_t stride_bytes = 0;  // offset of buffer 1 from buffer 0
  int64_t used_bytes = 0;    // header + both buffers: what the handler memsets
  bool vector = false;
};

ExchangeLayout exchange_layout(int64_t words, int word_bytes, int64_t workspace_bytes,
                               const void* workspace) {
  ExchangeLayout l;
  const int64_t packed = words * word_bytes;
  const int64_t aligned = (packed + 15) / 16 * 16;
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

// Shared-memory plan of one persistent launch.
struct SmemPlan {
  int h_stride = 0;
  int h_buffers = 0;
  int w_offset = 0;
  int len_offset = 0;
  int total = 0;
};

// ================================================================================================
// Host: one persistent launch, for either direction
// ================================================================================================

// The operands of one call, after its handler checked their dtypes and shapes.
struct PersistentCall {
  const char* name;  // the FFI target, for messages
  Direction direction;
  ffi::DataType dt;
  int64_t T, B, H;
  const void* seq_a;
  const void* seq_b;
  const void* init;
  ffi::AnyBuffer values;
  ffi::Buffer<ffi::S32> indices;
  ffi::Buffer<ffi::S32> lane_row;
  ffi::Buffer<ffi::S32> lengths;
  void* seq_out;
  void* final_out;
  unsigned char* workspace;
  int64_t workspace_bytes;
};

struct LayoutAttrs {
  int64_t activation, reverse, slots_per_lane, warps_per_cta, reg_slots, load_bytes;
  int64_t spin_timeout_us, debug_stall_cta, grid_barrier;
};

ffi::Error launch_persistent(cudaStream_t stream, const PersistentCall& c, const LayoutAttrs& a) {
  const std::string name = c.name;
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(name + ": " + m); };
  const ffi::DataType dt = c.dt;
  Dtype kdt;
  if (!kernel_dtype(dt, &kdt)) return bad("the dtype must be float32, float16 or bfloat16");
  const int64_t T = c.T, B = c.B, H = c.H;

  // ---- the packed layout ----------------------------------------------------------------------
  if (c.lengths.element_count() != static_cast<size_t>(B))
    return bad("lengths must have B = " + std::to_string(B) + " entries, got " +
               std::to_string(c.lengths.element_count()));
  const int64_t n_lanes = static_cast<int64_t>(c.lane_row.element_count());
  if (n_lanes % kWarpSize != 0)
    return bad("lane_row size " + std::to_string(n_lanes) + " is not a multiple of 32");
  const int64_t NW = n_lanes / kWarpSize;
  const int64_t K = a.slots_per_lane;
  if (K < 0) return bad("slots_per_lane must be >= 0");
  const int64_t n_slots = NW * K * kWarpSize;
  if (static_cast<int64_t>(c.values.element_count()) != n_slots)
    return bad("values size " + std::to_string(c.values.element_count()) + " != NW*K*32 = " +
               std::to_string(n_slots) + " (NW = lane_row.size/32 = " + std::to_string(NW) +
               ", K = slots_per_lane = " + std::to_string(K) + ")");
  if (static_cast<int64_t>(c.indices.element_count()) != n_slots)
    return bad("indices size " + std::to_string(c.indices.element_count()) + " != values size " +
               std::to_string(n_slots));

  // ---- attributes -----------------------------------------------------------------------------
  if (!valid_activation(a.activation))
    return bad("activation must be 0 (tanh), 1 (relu) or 2 (identity), got " +
               std::to_string(a.activation));
  if (a.reverse != 0 && a.reverse != 1) return bad("reverse must be 0 or 1");
  if (a.load_bytes != 4 && a.load_bytes != 8 && a.load_bytes != 16)
    return bad("load_bytes must be 4, 8 or 16, got " + std::to_string(a.load_bytes));
  const int tile = static_cast<int>(a.load_bytes / 4);
  if (a.spin_timeout_us < 0) return bad("spin_timeout_us must be >= 0");
  if (a.debug_stall_cta < -1) return bad("debug_stall_cta must be >= -1");
  if (a.grid_barrier != 0 && a.debug_stall_cta != -1)
    return bad("grid_barrier (an ablation) cannot be combined with debug_stall_cta: it would hang");
  if (a.warps_per_cta < 1 || a.warps_per_cta * kWarpSize > kMaxThreadsPerCta)
    return bad("warps_per_cta must be in [1, 32], got " + std::to_string(a.warps_per_cta));
  const std::vector<int> rs_set = reg_slots_for(kdt);
  if (std::find(rs_set.begin(), rs_set.end(), a.reg_slots) == rs_set.end()) {
    std::string s;
    for (int r : rs_set) s += (s.empty() ? "" : ", ") + std::to_string(r);
    return bad("reg_slots " + std::to_string(a.reg_slots) + " is not instantiated for " +
               dtype_name(dt) + " (supported: " + s + ")");
  }
  if (a.reg_slots > K)
    return bad("reg_slots " + std::to_string(a.reg_slots) + " > slots_per_lane " + std::to_string(K));

  // ---- trivial cases --------------------------------------------------------------------------
  const size_t elem_bytes = ffi::ByteWidth(dt);
  if (B == 0 || H == 0) return ffi::Error::Success();
  if (T == 0) {  // no step: the final state is the initial one
    cudaError_t e = cudaMemcpyAsync(c.final_out, c.init, B * H * elem_bytes,
                                    cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return cuda_error("cudaMemcpyAsync(final state <- initial state)", e);
    return ffi::Error::Success();
  }

  // ---- layout-dependent checks ----------------------------------------------------------------
  if (NW == 0) return bad("lane_row is empty but H = " + std::to_string(H) + " rows need lanes");
  if (NW % a.warps_per_cta != 0)
    return bad("NW = " + std::to_string(NW) + " warps is not a multiple of warps_per_cta = " +
               std::to_string(a.warps_per_cta));
  if (dt != ffi::DataType::F32 && H > 65535)
    return bad("H = " + std::to_string(H) + " > 65535: 16-bit dtypes pack column indices in 16 bits");
  if (T > INT32_MAX || B > INT32_MAX || H > INT32_MAX || K > INT32_MAX)
    return bad("T, B, H and slots_per_lane must fit in int32");
  const int64_t ws_need = cuda_workspace_bytes(B, H);
  if (c.workspace_bytes < ws_need)
    return bad("workspace has " + std::to_string(c.workspace_bytes) +
               " bytes, needs 256 + 2*B*H*8 = " + std::to_string(ws_need));

  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  DeviceInfo dev;
  if ((e = device_info(device, &dev)) != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", e);
  if (!dev.cooperative)
    return ffi::Error::Internal(name + ": device " + std::to_string(device) +
                                " does not support cooperative launches");

  const int threads = static_cast<int>(a.warps_per_cta) * kWarpSize;
  const int rs = static_cast<int>(a.reg_slots);
  const PersistentKernelFn fn = lookup_persistent(c.direction, kdt, tile, rs, threads);
  if (fn == nullptr) {
    return bad("warps_per_cta = " + std::to_string(a.warps_per_cta) + " (" + std::to_string(threads) +
               " threads) exceeds the " + std::to_string(max_threads_of(kdt, rs)) +
               "-thread launch bound of the " + dtype_name(dt) + " load_bytes-" +
               std::to_string(a.load_bytes) + " reg_slots-" + std::to_string(rs) +
               " kernel (kernel_attributes() gives it)");
  }
  KernelInfo kinfo;
  if ((e = kernel_info(device, reinterpret_cast<const void*>(fn), dev, &kinfo)) != cudaSuccess)
    return cuda_error("cudaFuncGetAttributes/cudaFuncSetAttribute(persistent kernel)", e);

  // ---- shared memory: staged state (two copies when they fit), weight tier, lengths -----------
  const int64_t n_planes = (B + tile - 1) / tile;
  const int64_t h_floats = n_planes * H * tile;
  // The second copy starts 16-byte aligned: staging writes it with vector stores.
  const int64_t h_stride = align16(h_floats * 4) / 4;
  const int64_t slot_bytes = dt == ffi::DataType::F32 ? 8 : 4;
  const int64_t w_bytes = a.warps_per_cta * (K - a.reg_slots) * kWarpSize * slot_bytes;
  const int64_t len_bytes = B * 4;
  auto plan_total = [&](int buffers) { return buffers * h_stride * 4 + align16(w_bytes) + len_bytes; };
  SmemPlan smem;
  smem.h_buffers = plan_total(2) <= kinfo.max_dynamic_smem ? 2 : 1;
  const int64_t total = plan_total(smem.h_buffers);
  if (total > kinfo.max_dynamic_smem)
    return bad("the layer does not fit on chip: " + std::to_string(total) +
               " bytes of shared memory per CTA needed (staged state " + std::to_string(h_floats * 4) +
               " = ceil(B/tile)*H*tile*4, weight tier " + std::to_string(w_bytes) +
               " = warps_per_cta*(K-reg_slots)*32*" + std::to_string(slot_bytes) + "), " +
               std::to_string(kinfo.max_dynamic_smem) + " available");
  smem.h_stride = static_cast<int>(h_stride);
  smem.w_offset = static_cast<int>(smem.h_buffers * h_stride * 4);
  smem.len_offset = static_cast<int>(smem.w_offset + align16(w_bytes));
  smem.total = static_cast<int>(total);

  // ---- co-residency: every CTA must be resident at once --------------------------------------
  const int64_t grid = NW / a.warps_per_cta;
  int per_sm = 0;
  if ((e = ctas_per_sm(device, reinterpret_cast<const void*>(fn), threads, smem.total, &per_sm)) !=
      cudaSuccess)
    return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
  if (static_cast<int64_t>(per_sm) * dev.sm_count < grid)
    return bad("grid of " + std::to_string(grid) + " CTAs (" + std::to_string(threads) +
               " threads, " + std::to_string(smem.total) + " B shared memory each) exceeds the " +
               std::to_string(per_sm) + " CTAs/SM x " + std::to_string(dev.sm_count) +
               " SMs that can be co-resident");

  // ---- workspace: reset header and exchange buffers in-stream, then launch --------------------
  // The forward pass of 16-bit dtypes exchanges 4-byte words, everything else 8-byte words.
  const bool narrow = c.direction == Direction::kForward && dt != ffi::DataType::F32;
  const int word_bytes = narrow ? 4 : 8;
  unsigned char* ws = c.workspace;
  const ExchangeLayout xl = exchange_layout(B * H, word_bytes, c.workspace_bytes, ws);
  if ((e = cudaMemsetAsync(ws, 0, xl.used_bytes, stream)) != cudaSuccess)
    return cuda_error("cudaMemsetAsync(workspace)", e);

  PersistentParams prm{};
  prm.seq_a = c.seq_a;
  prm.seq_b = c.seq_b;
  prm.init = c.init;
  prm.values = c.values.untyped_data();
  prm.indices = c.indices.typed_data();
  prm.lane_row = c.lane_row.typed_data();
  prm.lengths = c.lengths.typed_data();
  prm.seq_out = c.seq_out;
  prm.final_out = c.final_out;
  prm.error_flag = reinterpret_cast<uint32_t*>(ws);
  prm.exchange[0] = ws + kHeaderBytes;
  prm.exchange[1] = ws + kHeaderBytes + xl.stride_bytes;
  prm.T = static_cast<int>(T);
  prm.B = static_cast<int>(B);
  prm.H = static_cast<int>(H);
  prm.K = static_cast<int>(K);
  prm.n_planes = static_cast<int>(n_planes);
  prm.n_full_planes = static_cast<int>(B / tile);
  prm.partial_rem = static_cast<int>(B % tile);
  prm.activation = static_cast<int>(a.activation);
  prm.reverse = static_cast<int>(a.reverse);
  prm.h_buffers = smem.h_buffers;
  prm.h_stride = smem.h_stride;
  prm.w_smem_offset = smem.w_offset;
  prm.len_smem_offset = smem.len_offset;
  prm.exchange_vector = xl.vector ? 1 : 0;
  prm.byte_offsets = H * tile * 4 <= 65536 ? 1 : 0;
  prm.stall_cta = static_cast<int>(std::min<int64_t>(a.debug_stall_cta, INT32_MAX));
  prm.grid_barrier = a.grid_barrier != 0 ? 1 : 0;
  constexpr int64_t kMaxSpinTimeoutUs = int64_t{3600} * 1'000'000;  // keeps the ns value in range
  prm.timeout_ns = static_cast<unsigned long long>(std::min(
                       a.spin_timeout_us > 0 ? a.spin_timeout_us : kDefaultSpinTimeoutUs,
                       kMaxSpinTimeoutUs)) * 1000ull;

  void* args[] = {&prm};
  e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(fn), dim3(static_cast<unsigned>(grid)),
                                  dim3(threads), args, static_cast<size_t>(smem.total), stream);
  if (e != cudaSuccess) return cuda_error("cudaLaunchCooperativeKernel(persistent kernel)", e);

  const size_t n_seq = static_cast<size_t>(T * B * H);
  const size_t n_final = static_cast<size_t>(B * H);
  if (dt == ffi::DataType::F32) {
    e = launch_finisher<uint32_t>(stream, dev, prm.error_flag, H, c.seq_out, n_seq, c.final_out,
                                  n_final, Storage<float>::kNaNBits);
  } else {
    e = launch_finisher<uint16_t>(stream, dev, prm.error_flag, H, c.seq_out, n_seq, c.final_out,
                                  n_final,
                                  dt == ffi::DataType::F16 ? Storage<__half>::kNaNBits
                                                           : Storage<__nv_bfloat16>::kNaNBits);
  }
  if (e != cudaSuccess) return cuda_error("launching the finisher kernel", e);
  return ffi::Error::Success();
}

// ================================================================================================
// Host: the forward and backward handlers (dtype and shape checks, then one launch)
// ================================================================================================

ffi::Error check_float_operands(const std::string& name,
                                std::initializer_list<std::pair<const char*, ffi::DataType>> operands,
                                ffi::DataType dt) {
  for (const auto& [what, t] : operands)
    if (t != dt)
      return ffi::Error::InvalidArgument(name + ": " + what + " must have dtype " + dtype_name(dt) +
                                         " like the other float operands, got " + dtype_name(t));
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer h0,
                       ffi::AnyBuffer values, ffi::Buffer<ffi::S32> indices,
                       ffi::Buffer<ffi::S32> lane_row, ffi::Buffer<ffi::S32> lengths,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> h_final,
                       ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t activation,
                       int64_t reverse, int64_t slots_per_lane, int64_t warps_per_cta,
                       int64_t reg_slots, int64_t load_bytes, int64_t spin_timeout_us,
                       int64_t debug_stall_cta, int64_t grid_barrier) {
  ensure_error_word(stream);
  if (const uint32_t code = take_error_code()) return ffi::Error::Internal(error_code_message(code));
  const std::string name = "jax_sprnn_forward";
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(name + ": " + m); };

  const ffi::DataType dt = x.element_type();
  Dtype kdt;
  if (!kernel_dtype(dt, &kdt)) return bad("x must be float32, float16 or bfloat16");
  if (auto err = check_float_operands(name, {{"h0", h0.element_type()}, {"values", values.element_type()},
                                             {"y", y->element_type()}, {"h_final", h_final->element_type()}},
                                      dt);
      err.failure())
    return err;
  const auto xd = x.dimensions();
  if (xd.size() != 3) return bad("x must be [T, B, H], got " + shape_string(xd));
  const int64_t B = xd[1], H = xd[2];
  if (h0.dimensions().size() != 2 || h0.dimensions()[0] != B || h0.dimensions()[1] != H)
    return bad("h0 must be [B, H] = [" + std::to_string(B) + ", " + std::to_string(H) + "], got " +
               shape_string(h0.dimensions()));
  if (!same_dims(y->dimensions(), xd)) return bad("y must have x's shape " + shape_string(xd));
  if (!same_dims(h_final->dimensions(), h0.dimensions()))
    return bad("h_final must have h0's shape " + shape_string(h0.dimensions()));

  const PersistentCall call{name.c_str(), Direction::kForward, dt, xd[0], B, H,
                            x.untyped_data(), nullptr, h0.untyped_data(), values, indices, lane_row,
                            lengths, y->untyped_data(), h_final->untyped_data(),
                            workspace->typed_data(), static_cast<int64_t>(workspace->element_count())};
  return launch_persistent(stream, call,
                           {activation, reverse, slots_per_lane, warps_per_cta, reg_slots,
                            load_bytes, spin_timeout_us, debug_stall_cta, grid_barrier});
}

ffi::Error BackwardImpl(cudaStream_t stream, ffi::AnyBuffer y, ffi::AnyBuffer h0,
                        ffi::AnyBuffer values_t, ffi::Buffer<ffi::S32> indices_t,
                        ffi::Buffer<ffi::S32> lane_row_t, ffi::Buffer<ffi::S32> lengths,
                        ffi::AnyBuffer dy, ffi::AnyBuffer dh_final, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                        int64_t activation, int64_t reverse, int64_t slots_per_lane,
                        int64_t warps_per_cta, int64_t reg_slots, int64_t load_bytes,
                        int64_t spin_timeout_us, int64_t debug_stall_cta, int64_t grid_barrier) {
  ensure_error_word(stream);
  if (const uint32_t code = take_error_code()) return ffi::Error::Internal(error_code_message(code));
  const std::string name = "jax_sprnn_backward";
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(name + ": " + m); };

  const ffi::DataType dt = y.element_type();
  Dtype kdt;
  if (!kernel_dtype(dt, &kdt)) return bad("y must be float32, float16 or bfloat16");
  if (auto err = check_float_operands(
          name, {{"h0", h0.element_type()}, {"values_t", values_t.element_type()},
                 {"dy", dy.element_type()}, {"dh_final", dh_final.element_type()},
                 {"dx", dx->element_type()}, {"dh0", dh0->element_type()}},
          dt);
      err.failure())
    return err;
  const auto yd = y.dimensions();
  if (yd.size() != 3) return bad("y must be [T, B, H], got " + shape_string(yd));
  const int64_t B = yd[1], H = yd[2];
  const int64_t state_dims[2] = {B, H};
  const ffi::Span<const int64_t> state(state_dims, 2);
  if (!same_dims(dy.dimensions(), yd)) return bad("dy must have y's shape " + shape_string(yd));
  if (!same_dims(dx->dimensions(), yd)) return bad("dx must have y's shape " + shape_string(yd));
  for (const auto& [what, dims] : {std::pair{"h0", h0.dimensions()}, std::pair{"dh_final", dh_final.dimensions()},
                                   std::pair{"dh0", dh0->dimensions()}})
    if (!same_dims(dims, state))
      return bad(std::string(what) + " must be [B, H] = " + shape_string(state) + ", got " +
                 shape_string(dims));

  const PersistentCall call{name.c_str(), Direction::kBackward, dt, yd[0], B, H,
                            y.untyped_data(), dy.untyped_data(), dh_final.untyped_data(), values_t,
                            indices_t, lane_row_t, lengths, dx->untyped_data(), dh0->untyped_data(),
                            workspace->typed_data(), static_cast<int64_t>(workspace->element_count())};
  return launch_persistent(stream, call,
                           {activation, reverse, slots_per_lane, warps_per_cta, reg_slots,
                            load_bytes, spin_timeout_us, debug_stall_cta, grid_barrier});
}

// Host: the synchronization-floor handler
// ================================================================================================

ffi::Error SyncFloorImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> /*x*/,
                         ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                         ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t steps, int64_t num_ctas,
                         int64_t threads, int64_t batch, int64_t hidden) {
  ensure_error_word(stream);
  if (const uint32_t code = take_error_code()) return ffi::Error::Internal(error_code_message(code));
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
  void* args[] = {&prm};
  e = cudaLaunchCooperativeKernel(fn, dim3(static_cast<unsigned>(num_ctas)),
                                  dim3(static_cast<unsigned>(threads)), args, smem_bytes, stream);
  if (e != cudaSuccess) return cuda_error("cudaLaunchCooperativeKernel(jax_sprnn_sync_floor)", e);
  e = launch_finisher<uint32_t>(stream, dev, prm.error_flag, -1, prm.out, 1, nullptr, 0,
                                Storage<float>::kNaNBits);
  if (e != cudaSuccess) return cuda_error("launching the finisher kernel", e);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_sprnn::cuda

// ================================================================================================
// FFI symbols
// ================================================================================================

namespace binds = jax_sprnn::bindings;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxSprnnForwardCuda, jax_sprnn::cuda::ForwardImpl,
    binds::cuda_hook_attrs(binds::layout_attrs(
        binds::forward_operands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
            .Ret<ffi::Buffer<ffi::U8>>())),  // workspace
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxSprnnBackwardCuda, jax_sprnn::cuda::BackwardImpl,
    binds::cuda_hook_attrs(binds::layout_attrs(
        binds::backward_operands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
            .Ret<ffi::Buffer<ffi::U8>>())),  // workspace
    {ffi::Traits::kCmdBufferCompatible});

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

// ================================================================================================
// Host helpers for the nanobind module
// ================================================================================================

namespace jax_sprnn::cuda {

std::string GetDeviceCount(int* count) {
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    cudaGetLastError();
    *count = 0;
    return "";
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_message("cudaGetDeviceCount", e);
  }
  return "";
}

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
  out->l2_bytes = static_cast<int64_t>(p.l2CacheSize);
  return "";
}

std::vector<int> SupportedRegSlots(const std::string& dtype) {
  if (dtype.empty()) return to_vector(RegSlots32{});  // RegSlots32 is a subset of RegSlots16
  ffi::DataType dt;
  Dtype kdt;
  if (!parse_dtype(dtype, &dt) || !kernel_dtype(dt, &kdt)) return {};
  return reg_slots_for(kdt);
}

std::string GetKernelAttributes(const std::string& dtype, int tile, int reg_slots, int device,
                                int threads, bool backward, KernelAttributes* out) {
  ffi::DataType dt;
  Dtype kdt;
  if (!parse_dtype(dtype, &dt) || !kernel_dtype(dt, &kdt))
    return "unknown dtype '" + dtype + "' (float32, float16, bfloat16)";
  const PersistentKernelFn fn = lookup_persistent(
      backward ? Direction::kBackward : Direction::kForward, kdt, tile, reg_slots, threads);
  if (fn == nullptr)
    return std::string("no ") + (backward ? "backward" : "forward") + " kernel for dtype " + dtype + ", tile " + std::to_string(tile) +
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

std::string TakePendingError() {
  const uint32_t code = take_error_code();
  return code ? error_code_message(code) : std::string();
}

void Initialize() { ensure_error_word(nullptr); }

}  // namespace jax_sprnn::cuda
