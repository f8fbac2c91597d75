// The persistent sparse RNN forward kernel (Zhu et al., ICLR 2018) and its XLA FFI handler.
//
// One cooperative launch runs the whole sequence. Every warp owns the nonzeros of the rows its lanes
// serve (docs/format.md): the first RS slots of each lane live in registers, the rest in shared
// memory. Per step s every CTA
//   1. stages h_{s-1} into shared memory as fp32 [plane][H][tile] (a plane is a batch tile, so one
//      vector load fetches a column's whole tile), waiting word by word on Lamport timestamps,
//   2. gathers sum_k value * h[col] per lane and per plane, reduces each row's contiguous lanes with
//      a segmented shuffle, and lets the row's head lane apply the activation, round to D, write y
//      and publish the new state with the tag of step s.
// There is no grid barrier: a consumer spins only on the words it needs (all of h, in practice).
//
// Exchange protocol (workspace = 256-byte header + two exchange buffers, see ExchangeLayout):
//   * A word carries a state value and the tag of the step that produced it, written with ONE store,
//     so the value and its tag travel together and no fence is needed between them. Tag = step + 1.
//       - float32:          8-byte word (fp32 bits, uint32 tag)
//       - float16/bfloat16: 4-byte word (16-bit value bits, uint16 tag): half the L2 traffic of the
//         8-byte form, in the same workspace size. The 16-bit tag wraps safely: a reader at step s
//         can only find the tags of steps s-1 (wanted) and s-3 in its buffer, which differ modulo
//         2^16, and the memset's 0 is overwritten for good by steps 0 and 1.
//   * Step s writes buffer s&1. Double buffering is enough: a producer cannot write step s+2 into a
//     buffer before every CTA has read step s from it, because it first needs every CTA's step s+1
//     words, which each CTA publishes only after staging (and a __syncthreads) of step s. CTAs that
//     own no row publish nothing, so they also must not read: they skip the step loop.
//   * Stale words from earlier calls are harmless: the handler memsets header and buffers on XLA's
//     stream before the launch (graph-safe, unlike any host-side epoch).
//   * Word layout in a buffer: the full batch planes as [plane][H][tile] (identical to the shared
//     memory layout, so staging them is a straight vector copy), then the last, partial plane (B not
//     a multiple of the tile) compacted as [H][B % tile]. Exactly B*H words.
//
// Errors are never a hang and never a silent wrong answer:
//   * Every spin checks %globaltimer every kSpinCheckPeriod iterations; past the bound it sets the
//     timeout bit in the header flag, and every spin also gives up when it sees the flag set. A CTA
//     whose thread gave up leaves the step loop at the next __syncthreads_or.
//   * Out-of-range indices / lane_row entries (clamped, so memory stays safe), a row with two runs
//     in one warp, and a grid-wide head count != H (checked by the finisher) set the layout bit.
//   * lengths are clamped to [0, T] on the device (the host cannot read them).
//   * A tiny finisher kernel runs after the persistent kernel on the same stream: if the flag is
//     set it fills y and h_final with NaN and copies the flag into a pinned, mapped host word.
//   * DEFERRED REPORTING: the handler never synchronizes, so it cannot return the error of the call
//     that failed. It reads the host word at entry of the NEXT call and, if set, clears it and fails
//     that call with ffi::Error::Internal. pending_error() in the Python module reads and clears the
//     same word (call it after synchronizing). Under CUDA-graph capture the handler's host code runs
//     only at capture time, so there the NaN outputs and pending_error() are the signal.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_forward.h"
#include "sprnn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_sprnn::cuda {
namespace {

// ================================================================================================
// Protocol constants (shared by host and device code)
// ================================================================================================

constexpr int kHeaderBytes = 256;            // workspace header: word 0 error flag, word 1 heads
constexpr int kHeadCountWord = 1;            // header word counting head lanes (must end up == H)
constexpr uint32_t kErrTimeout = 1u;         // a spin exceeded its bound
constexpr uint32_t kErrBadLayout = 2u;       // the packed layout broke an invariant
constexpr int64_t kDefaultSpinTimeoutUs = 2'000'000;
constexpr int kSpinCheckPeriod = 64;         // spins between %globaltimer / flag checks
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreadsPerCta = 1024;


// ================================================================================================
// PTX wrappers: relaxed gpu-scope accesses for the exchange, the global timer
// ================================================================================================
//
// ld.relaxed.gpu is coherent at GPU scope (served by L2, never a stale L1 line) and asm volatile
// keeps every spin iteration a real load. A vector access is a set of element accesses, each single-
// copy atomic: the (value, tag) pair inside one 32- or 64-bit element is therefore always seen whole.

template <typename Word, int N>
struct WordVec {
  Word w[N];
};

__device__ __forceinline__ void ld_relaxed(WordVec<uint32_t, 4>& v, const uint32_t* p) {
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "l"(p));
}
__device__ __forceinline__ void ld_relaxed(WordVec<uint32_t, 1>& v, const uint32_t* p) {
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v.w[0]) : "l"(p));
}
__device__ __forceinline__ void ld_relaxed(WordVec<uint64_t, 2>& v, const uint64_t* p) {
  asm volatile("ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];" : "=l"(v.w[0]), "=l"(v.w[1]) : "l"(p));
}
__device__ __forceinline__ void ld_relaxed(WordVec<uint64_t, 1>& v, const uint64_t* p) {
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v.w[0]) : "l"(p));
}
__device__ __forceinline__ uint32_t ld_relaxed_u32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ void st_relaxed(uint32_t* p, uint32_t a) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(a) : "memory");
}
__device__ __forceinline__ void st_relaxed(uint32_t* p, uint32_t a, uint32_t b) {
  asm volatile("st.relaxed.gpu.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
}
__device__ __forceinline__ void st_relaxed(uint32_t* p, uint32_t a, uint32_t b, uint32_t c,
                                           uint32_t d) {
  asm volatile("st.relaxed.gpu.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b),
               "r"(c), "r"(d)
               : "memory");
}
__device__ __forceinline__ void st_relaxed(uint64_t* p, uint64_t a) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(a) : "memory");
}
__device__ __forceinline__ void st_relaxed(uint64_t* p, uint64_t a, uint64_t b) {
  asm volatile("st.relaxed.gpu.global.v2.u64 [%0], {%1, %2};" ::"l"(p), "l"(a), "l"(b) : "memory");
}

// An empty asm that "modifies" a register: the compiler must assume a new value on every pass, so it
// cannot hoist the decoding of a packed slot out of the step loop (which would double the register
// tier: one register for the value and one for the offset of every slot).
__device__ __forceinline__ void launder(uint32_t& r) { asm volatile("" : "+r"(r)); }
__device__ __forceinline__ void launder(float& r) { asm volatile("" : "+f"(r)); }

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ================================================================================================
// Storage traits: everything that depends on the storage dtype D
// ================================================================================================
//
//   Bits      raw storage of one D element (x, h0, y, h_final are read and written as raw bits)
//   Word      one exchange word (value + tag), see the file comment
//   Slot      one nonzero as held by a lane, in registers and in the shared-memory tier:
//               float32:    {fp32 value, byte offset of its column in a staged plane} (2 registers)
//               16-bit D:   (value bits << 16) | column (1 register; needs H <= 65535)
//             so the inner loop does no conversion for f32 and one (free for bf16: a mask) for
//             16-bit types; the staged h is always fp32.

struct alignas(8) F32Slot {
  float value;
  uint32_t byte_offset;
};

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  using Bits = uint32_t;
  using Word = uint64_t;
  using Slot = F32Slot;
  static constexpr int kWordBytes = 8;
  static constexpr int kRegsPerSlot = 2;
  static constexpr uint32_t kTagMask = 0xffffffffu;
  static constexpr Bits kNaNBits = 0x7fc00000u;
  static constexpr const char* kName = "float32";

  __device__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ static Bits to_bits(float f) { return __float_as_uint(f); }
  __device__ static Word make_word(Bits b, uint32_t tag) {
    return static_cast<uint64_t>(b) | (static_cast<uint64_t>(tag) << 32);
  }
  __device__ static bool has_tag(Word w, uint32_t tag) {
    return static_cast<uint32_t>(w >> 32) == tag;
  }
  __device__ static float word_value(Word w) { return __uint_as_float(static_cast<uint32_t>(w)); }
  static constexpr bool kHasColumnForm = false;  // offsets are always 32-bit byte offsets
  // `col` is in range; `shift` is ignored (float32 slots always hold byte offsets).
  template <int TILE>
  __device__ static Slot make_slot(Bits value, uint32_t col, uint32_t /*shift*/) {
    return Slot{__uint_as_float(value), col * (TILE * 4u)};
  }
  template <int TILE, bool kByteOffsets>
  __device__ static void decode_slot(Slot s, float& value, uint32_t& byte_offset) {
    value = s.value;
    byte_offset = s.byte_offset;
  }
  __device__ static void launder_slot(Slot& s) {
    launder(s.value);
    launder(s.byte_offset);
  }
};

// Shared by float16 and bfloat16: they differ only in the bits <-> float conversions.
template <typename Derived>
struct Storage16 {
  using Bits = uint16_t;
  using Word = uint32_t;
  using Slot = uint32_t;
  static constexpr int kWordBytes = 4;
  static constexpr int kRegsPerSlot = 1;
  static constexpr uint32_t kTagMask = 0xffffu;

  __device__ static Word make_word(Bits b, uint32_t tag) {
    return static_cast<uint32_t>(b) | (tag << 16);
  }
  __device__ static bool has_tag(Word w, uint32_t tag) { return (w >> 16) == tag; }
  __device__ static float word_value(Word w) { return Derived::low_to_float(w); }
  // The low half holds the column's byte offset in a staged plane when that fits in 16 bits
  // (H * tile * 4 <= 65536: one instruction to decode), else the column (two instructions).
  static constexpr bool kHasColumnForm = true;
  // `col` is in range; `shift` is log2(TILE * 4) for the byte-offset form, 0 for the column form.
  template <int TILE>
  __device__ static Slot make_slot(Bits value, uint32_t col, uint32_t shift) {
    return (static_cast<uint32_t>(value) << 16) | (col << shift);
  }
  template <int TILE, bool kByteOffsets>
  __device__ static void decode_slot(Slot s, float& value, uint32_t& byte_offset) {
    value = Derived::high_to_float(s);
    byte_offset = kByteOffsets ? (s & 0xffffu) : (s & 0xffffu) * (TILE * 4u);
  }
  __device__ static void launder_slot(Slot& s) { launder(s); }
};

template <>
struct Storage<__half> : Storage16<Storage<__half>> {
  static constexpr Bits kNaNBits = 0x7e00u;
  static constexpr const char* kName = "float16";
  __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Bits to_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
  __device__ static float low_to_float(uint32_t w) { return to_float(static_cast<Bits>(w)); }
  __device__ static float high_to_float(uint32_t w) { return to_float(static_cast<Bits>(w >> 16)); }
};

template <>
struct Storage<__nv_bfloat16> : Storage16<Storage<__nv_bfloat16>> {
  static constexpr Bits kNaNBits = 0x7fc0u;
  static constexpr const char* kName = "bfloat16";
  __device__ static float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  __device__ static Bits to_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  __device__ static float low_to_float(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ static float high_to_float(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
};

// fp32 vector of one staged column tile: the single shared-memory load a slot issues per plane.
template <int TILE>
struct TileVec;
template <>
struct TileVec<1> {
  using type = float;
  __device__ static float get(float v, int) { return v; }
};
template <>
struct TileVec<2> {
  using type = float2;
  __device__ static float get(float2 v, int t) { return t == 0 ? v.x : v.y; }
};
template <>
struct TileVec<4> {
  using type = float4;
  __device__ static float get(float4 v, int t) {
    return t == 0 ? v.x : t == 1 ? v.y : t == 2 ? v.z : v.w;
  }
};

// ================================================================================================
// The tunable shape of one forward-kernel instantiation
// ================================================================================================

// Launch bound (a multiple of 128 threads) and staging unroll per register-tier size, chosen so the
// kernel compiles without spilling (measured with nvcc 13.0 -Xptxas -v for sm_90: the register
// tier plus ~50-65 registers for staging, the gather pipeline and the epilogue). Two variants:
//   narrow: at most 512 threads, with room for 8 staging vectors in flight per thread;
//   wide:   more threads (for layouts whose CTAs need them) at a tighter register cap and 4
//           staging vectors per thread; instantiated only where it raises the bound.
// The handler takes the narrow variant whenever warps_per_cta fits it. The planner reads the bound
// back through kernel_attributes()["max_threads_per_block"].
constexpr int forward_max_threads(bool packed16, int rs, bool wide) {
  if (packed16) {
    if (wide) return rs == 0 ? 1024 : rs <= 16 ? 768 : rs <= 32 ? 640 : 0;
    return rs <= 64 ? 512 : rs <= 96 ? 384 : 256;
  }
  if (wide) return rs == 0 ? 768 : rs <= 16 ? 512 : 0;
  return rs <= 16 ? 384 : 256;
}
constexpr int forward_stage_unroll(bool packed16, int rs, bool wide) {
  if (wide) return 4;
  if (packed16) return rs <= 32 ? 8 : rs <= 96 ? 4 : rs <= 160 ? 8 : 4;
  return rs == 0 ? 8 : rs <= 16 ? 4 : rs <= 48 ? 8 : 4;
}
constexpr bool forward_has_wide(bool packed16, int rs) {
  return forward_max_threads(packed16, rs, true) > forward_max_threads(packed16, rs, false);
}

template <typename T, int TILE, int RS, bool WIDE>
struct ForwardConfig {
  using Dtype = T;
  using S = Storage<T>;
  static_assert(TILE == 1 || TILE == 2 || TILE == 4, "tile is 1, 2 or 4 floats (4, 8, 16 bytes)");
  static constexpr int kTile = TILE;
  static constexpr int kRegSlots = RS;
  static constexpr int kRegArray = RS > 0 ? RS : 1;
  // Independent accumulator sets: the slot loop is a chain of dependent FMAs per accumulator, so
  // keep at least 4 chains in flight whatever the tile.
  static constexpr int kChains = TILE >= 4 ? 1 : 4 / TILE;
  // Shared-memory-tier slots per loop iteration (a multiple of kChains).
  static constexpr int kSmemUnroll = 4;
  static constexpr int kVecWords = 16 / S::kWordBytes;
  // Launch bound and staging unroll (16-byte exchange vectors a thread keeps in flight). The launch
  // bound fixes ptxas's register cap: 65536 / (4 * 32 * ceil(threads / 128)) per thread, since each
  // of an SM's four schedulers owns a quarter of the register file.
  static constexpr int kMaxThreads = forward_max_threads(S::kRegsPerSlot == 1, RS, WIDE);
  static constexpr int kStageUnroll = forward_stage_unroll(S::kRegsPerSlot == 1, RS, WIDE);
  static_assert(kMaxThreads >= 128, "no such variant");
};

// ================================================================================================
// Kernel parameters (computed by the host; passed as a __grid_constant__)
// ================================================================================================

struct ForwardParams {
  const void* x;         // [T, B, H] D
  const void* h0;        // [B, H] D
  const void* values;    // [NW*K*32] D
  const int32_t* indices;
  const int32_t* lane_row;
  const int32_t* lengths;
  void* y;               // [T, B, H] D
  void* h_final;         // [B, H] D
  uint32_t* error_flag;  // workspace header word 0
  unsigned char* exchange[2];
  int T, B, H, K;
  int n_planes;          // ceil(B / tile)
  int n_full_planes;     // B / tile
  int partial_rem;       // B % tile
  int activation;
  int reverse;
  int h_buffers;         // staged copies of h in shared memory: 2 (one __syncthreads a step) or 1
  int h_floats;          // floats of one staged copy: n_planes * H * tile
  int w_smem_offset;     // bytes: start of the shared-memory weight tier
  int len_smem_offset;   // bytes: start of the clamped lengths
  int exchange_vector;   // 1: the exchange buffers are 16-byte aligned, use vector accesses
  int byte_offsets;      // 16-bit D: slots hold byte offsets (H * tile * 4 <= 65536), else columns
  int stall_cta;         // test hook: this CTA never publishes (-1: none)
  unsigned long long timeout_ns;
};

struct FloorParams {
  uint32_t* error_flag;
  unsigned char* exchange[2];
  float* out;
  int steps, words, h_buffers, exchange_vector;
  unsigned long long timeout_ns;
};

// ================================================================================================
// Device building blocks
// ================================================================================================

// Bounded waiting. One per thread; `aborted` is sticky, so after a timeout (or after another thread
// reported one) every further wait of this thread returns at once.
struct SpinControl {
  uint32_t* flag;
  unsigned long long timeout_ns;
  bool aborted;

  // Called every kSpinCheckPeriod spins of one wait; `deadline` is 0 at the start of the wait.
  __device__ __forceinline__ bool give_up(unsigned long long& deadline) {
    const unsigned long long now = globaltimer_ns();
    if (deadline == 0) {
      deadline = now + timeout_ns;
    } else if (now > deadline) {
      atomicOr(flag, kErrTimeout);
      aborted = true;
      return true;
    }
    if (ld_relaxed_u32(flag) != 0) {
      aborted = true;
      return true;
    }
    return false;
  }
};

template <class S, int VW>
__device__ __forceinline__ bool vec_has_tag(const WordVec<typename S::Word, VW>& v, uint32_t tag) {
  bool ok = true;
#pragma unroll
  for (int i = 0; i < VW; ++i) ok &= S::has_tag(v.w[i], tag);
  return ok;
}

template <int N>
__device__ __forceinline__ void store_floats(float* dst, const float (&f)[N]) {
  if constexpr (N == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);
  } else if constexpr (N == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(f[0], f[1]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = f[i];
  }
}

// Waits for one exchange word carrying `tag` and returns its value (garbage once aborted).
template <class S>
__device__ __forceinline__ float wait_word(const typename S::Word* src, uint32_t tag,
                                           SpinControl& spin) {
  WordVec<typename S::Word, 1> v;
  ld_relaxed(v, src);
  if (!S::has_tag(v.w[0], tag) && !spin.aborted) {
    unsigned long long deadline = 0;
    for (uint32_t iter = 1;; ++iter) {
      if (iter % kSpinCheckPeriod == 0 && spin.give_up(deadline)) break;
      ld_relaxed(v, src);
      if (S::has_tag(v.w[0], tag)) break;
    }
  }
  return S::word_value(v.w[0]);
}

// Stages words [0, n_words) of an exchange buffer into dst[0, n_words) as fp32: the full batch
// planes, whose exchange layout equals the shared-memory layout.
//   * Work is split into warp chunks of 32*U vectors; lane l of a warp takes vectors l, l+32, ...
//     of its chunk, so every load instruction is a coalesced 512-byte access and all U addresses
//     are one register plus an immediate offset (few registers next to the register tier).
//   * A thread keeps its U vectors in flight and re-issues all of its not-yet-tagged ones together:
//     a chunk costs about one L2 round trip after its last producer, not one per vector.
template <class S, int VW, int U>
__device__ __forceinline__ void stage_words(const typename S::Word* __restrict__ src,
                                            float* __restrict__ dst, int n_words, uint32_t tag,
                                            SpinControl& spin) {
  using Word = typename S::Word;
  constexpr int kChunk = 32 * U;
  const int lane = threadIdx.x & 31;
  const int n_warps = blockDim.x >> 5;
  const int n_vec = n_words / VW;
  for (int chunk = (threadIdx.x >> 5) * kChunk; chunk < n_vec && !spin.aborted;
       chunk += n_warps * kChunk) {
    const Word* s0 = src + static_cast<size_t>(chunk + lane) * VW;
    float* d0 = dst + static_cast<size_t>(chunk + lane) * VW;
    const int avail = n_vec - chunk - lane;  // vector u of this thread exists iff u*32 < avail
    WordVec<Word, VW> v[U];
    uint32_t pending = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u * 32 < avail) {
        ld_relaxed(v[u], s0 + u * 32 * VW);
        pending |= 1u << u;
      }
    }
    unsigned long long deadline = 0;
    for (uint32_t iter = 1;; ++iter) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (((pending >> u) & 1u) && vec_has_tag<S, VW>(v[u], tag)) {
          float f[VW];
#pragma unroll
          for (int k = 0; k < VW; ++k) f[k] = S::word_value(v[u].w[k]);
          store_floats<VW>(d0 + u * 32 * VW, f);
          pending &= ~(1u << u);
        }
      }
      if (pending == 0) break;
      if (iter % kSpinCheckPeriod == 0 && spin.give_up(deadline)) break;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if ((pending >> u) & 1u) ld_relaxed(v[u], s0 + u * 32 * VW);
      }
    }
  }
  // Words past the last whole vector.
  for (int i = n_vec * VW + static_cast<int>(threadIdx.x); i < n_words; i += blockDim.x)
    dst[i] = wait_word<S>(src + i, tag, spin);
}

template <class S, int TILE, bool kByteOffsets>
__device__ __forceinline__ void fma_slot(float (&acc)[TILE], typename S::Slot slot,
                                         const unsigned char* plane) {
  using V = TileVec<TILE>;
  float value;
  uint32_t byte_offset;
  S::template decode_slot<TILE, kByteOffsets>(slot, value, byte_offset);
  const typename V::type h = *reinterpret_cast<const typename V::type*>(plane + byte_offset);
#pragma unroll
  for (int t = 0; t < TILE; ++t) acc[t] = fmaf(value, V::get(h, t), acc[t]);
}

// acc[t] = sum over this lane's slots of value * h[plane][col][t]: the register tier (unrolled,
// compile-time indices only), then the shared-memory tier [warp][slot][lane].
template <class Cfg, bool kByteOffsets>
__device__ __forceinline__ void gather_plane(float (&acc)[Cfg::kTile],
                                             typename Cfg::S::Slot (&reg)[Cfg::kRegArray],
                                             const typename Cfg::S::Slot* w_lane, int n_smem_slots,
                                             const unsigned char* plane) {
  using S = typename Cfg::S;
  using Slot = typename S::Slot;
  constexpr int TILE = Cfg::kTile;
  constexpr int CH = Cfg::kChains;
  constexpr int SU = Cfg::kSmemUnroll;
  float a[CH][TILE];
#pragma unroll
  for (int c = 0; c < CH; ++c)
#pragma unroll
    for (int t = 0; t < TILE; ++t) a[c][t] = 0.0f;
#pragma unroll
  for (int k = 0; k < Cfg::kRegSlots; ++k) S::launder_slot(reg[k]);  // decode per use, not hoisted
#pragma unroll
  for (int k = 0; k < Cfg::kRegSlots; ++k)
    fma_slot<S, TILE, kByteOffsets>(a[k % CH], reg[k], plane);
  int k = 0;
  for (; k + SU <= n_smem_slots; k += SU) {
    Slot w[SU];
#pragma unroll
    for (int u = 0; u < SU; ++u) w[u] = w_lane[(k + u) * 32];
#pragma unroll
    for (int u = 0; u < SU; ++u) fma_slot<S, TILE, kByteOffsets>(a[u % CH], w[u], plane);
  }
  for (; k < n_smem_slots; ++k) fma_slot<S, TILE, kByteOffsets>(a[0], w_lane[k * 32], plane);
#pragma unroll
  for (int t = 0; t < TILE; ++t) {
    acc[t] = a[0][t];
#pragma unroll
    for (int c = 1; c < CH; ++c) acc[t] += a[c][t];
  }
}

__device__ __forceinline__ float activate(int activation, float z) {
  switch (activation) {
    case kTanh:
      return tanhf(z);
    case kRelu:
      return z < 0.0f ? 0.0f : z;  // NaN propagates, as in the reference
    default:
      return z;
  }
}

// Publishes the TILE words of one (row, full plane). `dst` is the row's first word.
template <class S, int TILE>
__device__ __forceinline__ void publish_tile(typename S::Word* dst, const typename S::Word (&w)[TILE],
                                             bool vector) {
  if (vector) {
    if constexpr (S::kWordBytes == 4 && TILE == 4) {
      st_relaxed(dst, w[0], w[1], w[2], w[3]);
      return;
    } else if constexpr (S::kWordBytes == 4 && TILE == 2) {
      st_relaxed(dst, w[0], w[1]);
      return;
    } else if constexpr (S::kWordBytes == 8 && TILE >= 2) {
#pragma unroll
      for (int t = 0; t < TILE; t += 2) st_relaxed(dst + t, w[t], w[t + 1]);
      return;
    }
  }
#pragma unroll
  for (int t = 0; t < TILE; ++t) st_relaxed(dst + t, w[t]);
}

// Grid-stride y[s_begin:T] = 0 (steps past the longest sequence).
template <class S>
__device__ void zero_tail_steps(const ForwardParams& p, int s_begin) {
  using Bits = typename S::Bits;
  Bits* y = static_cast<Bits*>(p.y);
  const size_t begin = static_cast<size_t>(s_begin) * p.B * p.H;
  const size_t end = static_cast<size_t>(p.T) * p.B * p.H;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = begin + static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += stride) {
    y[i] = Bits(0);
  }
}

// ================================================================================================
// The persistent forward kernel
// ================================================================================================

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kMaxThreads, 1)
    sprnn_forward_kernel(const __grid_constant__ ForwardParams p) {
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  using Word = typename S::Word;
  using Slot = typename S::Slot;
  constexpr int TILE = Cfg::kTile;
  constexpr int RS = Cfg::kRegSlots;

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_steps;        // number of steps that do any work: max over b of lengths[b]
  __shared__ uint32_t s_error;   // layout errors found at init by this CTA

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warps_per_cta = blockDim.x >> 5;
  const int gwarp = blockIdx.x * warps_per_cta + warp;
  const int B = p.B, H = p.H, K = p.K;
  const int n_smem_slots = K - RS;
  const int plane_floats = H * TILE;

  float* const h_stage0 = reinterpret_cast<float*>(smem);
  float* const h_stage1 = h_stage0 + (p.h_buffers == 2 ? p.h_floats : 0);
  Slot* const w_tier = reinterpret_cast<Slot*>(smem + p.w_smem_offset);
  int* const len_smem = reinterpret_cast<int*>(smem + p.len_smem_offset);

  // ---- init: lengths --------------------------------------------------------------------------
  if (tid == 0) {
    s_steps = 0;
    s_error = 0;
  }
  // The partial plane's padded batch entries are never staged: they stay 0 in both copies.
  if (p.partial_rem != 0) {
    float* pad0 = h_stage0 + p.n_full_planes * plane_floats;
    float* pad1 = h_stage1 + p.n_full_planes * plane_floats;
    for (int i = tid; i < plane_floats; i += blockDim.x) {
      pad0[i] = 0.0f;
      pad1[i] = 0.0f;
    }
  }
  __syncthreads();
  for (int b = tid; b < B; b += blockDim.x) {
    const int L = min(max(__ldg(p.lengths + b), 0), p.T);  // clamp: lengths must be in [0, T]
    len_smem[b] = L;
    atomicMax(&s_steps, L);
  }

  // ---- init: which row each lane serves, and its segment for the reduction -------------------
  int row = __ldg(p.lane_row + static_cast<size_t>(gwarp) * 32 + lane);
  if (row < -1 || row >= H) {
    atomicOr(&s_error, kErrBadLayout);
    row = -1;
  }
  const int prev_row = __shfl_up_sync(kFullMask, row, 1);
  const bool run_start = lane == 0 || row != prev_row;
  const bool is_head = run_start && row >= 0;
  const uint32_t starts = __ballot_sync(kFullMask, run_start);
  const uint32_t later_starts = lane == 31 ? 0u : starts & (kFullMask << (lane + 1));
  const int seg_end = later_starts ? __ffs(later_starts) - 1 : 32;  // one past this run's last lane
  const int max_seg = __reduce_max_sync(kFullMask, is_head ? seg_end - lane : 1);
  {  // A row must be one contiguous run per warp: two heads of one row would both publish it.
    const uint32_t heads = __ballot_sync(kFullMask, is_head);
    const uint32_t same_row = __match_any_sync(kFullMask, row);
    if (is_head && __popc(same_row & heads) > 1) atomicOr(&s_error, kErrBadLayout);
    // Every row needs exactly one head in the whole grid; the finisher compares the count with H
    // (a missing row would otherwise go unnoticed when no step waits for it, e.g. T = 1).
    if (lane == 0 && heads != 0) atomicAdd(p.error_flag + kHeadCountWord, __popc(heads));
  }

  // ---- init: weights. The first RS slots stay in registers (indexed by compile-time constants
  //      only), the rest go to shared memory as [warp][slot][lane] (conflict-free).
  const Bits* values = static_cast<const Bits*>(p.values);
  const size_t lane_base = static_cast<size_t>(gwarp) * K * 32 + lane;
  bool bad_index = false;
  const bool byte_offsets = p.byte_offsets != 0;
  const uint32_t col_shift = byte_offsets ? (TILE == 4 ? 4u : TILE == 2 ? 3u : 2u) : 0u;
  // An out-of-range column is clamped (so the gather stays inside shared memory) and reported:
  // the finisher then replaces the outputs with NaN.
  auto make_slot = [&](Bits v, int col) {
    col = col < 0 ? ~col : col;  // padding stores ~j (docs/format.md); its value is 0
    bad_index |= static_cast<unsigned>(col) >= static_cast<unsigned>(H);
    return S::template make_slot<TILE>(v, min(static_cast<unsigned>(col), static_cast<unsigned>(H - 1)),
                                       col_shift);
  };
  Slot reg[Cfg::kRegArray];
#pragma unroll
  for (int k = 0; k < RS; ++k) {
    reg[k] = make_slot(__ldg(values + lane_base + static_cast<size_t>(k) * 32),
                       __ldg(p.indices + lane_base + static_cast<size_t>(k) * 32));
  }
  Slot* const w_lane = w_tier + static_cast<size_t>(warp) * n_smem_slots * 32 + lane;
  for (int k = 0; k < n_smem_slots; ++k) {
    w_lane[static_cast<size_t>(k) * 32] =
        make_slot(__ldg(values + lane_base + static_cast<size_t>(RS + k) * 32),
                  __ldg(p.indices + lane_base + static_cast<size_t>(RS + k) * 32));
  }
  if (bad_index) atomicOr(&s_error, kErrBadLayout);
  const bool cta_has_rows = __syncthreads_or(row >= 0);  // also publishes s_steps, s_error, w_tier
  if (tid == 0 && s_error != 0) atomicOr(p.error_flag, s_error);
  const int n_steps = s_steps;

  const Bits* x = static_cast<const Bits*>(p.x);
  Bits* y = static_cast<Bits*>(p.y);
  Bits* h_final = static_cast<Bits*>(p.h_final);

  if (n_steps == 0) {  // every sequence is empty: h_final = h0, y = 0
    const Bits* h0 = static_cast<const Bits*>(p.h0);
    const size_t n = static_cast<size_t>(B) * H;
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + tid; i < n;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
      h_final[i] = h0[i];
    }
    zero_tail_steps<S>(p, 0);
    return;
  }

  SpinControl spin{p.error_flag, p.timeout_ns, false};
  const bool publishes = static_cast<int>(blockIdx.x) != p.stall_cta;
  Word* const xbuf0 = reinterpret_cast<Word*>(p.exchange[0]);
  Word* const xbuf1 = reinterpret_cast<Word*>(p.exchange[1]);
  const int n_full_words = p.n_full_planes * plane_floats;

  // x for (step, plane), prefetched by head lanes one plane ahead so its latency hides behind the
  // slot loop or the next step's wait.
  Bits xr[TILE];
  auto load_x = [&](int s, int plane) {
#pragma unroll
    for (int t = 0; t < TILE; ++t) {
      const int b = plane * TILE + t;
      xr[t] = Bits(0);
      if (b < B) {
        const int L = len_smem[b];
        if (s < L) {
          const int pos = p.reverse ? L - 1 - s : s;
          xr[t] = __ldg(x + (static_cast<size_t>(pos) * B + b) * H + row);
        }
      }
    }
  };

  if (cta_has_rows) {
    if (is_head) load_x(0, 0);
    for (int s = 0; s < n_steps; ++s) {
      float* const h_cur = (p.h_buffers == 2 && (s & 1)) ? h_stage1 : h_stage0;

      // ---- 1. stage h_{s-1} ---------------------------------------------------------------
      if (s == 0) {
        const Bits* h0 = static_cast<const Bits*>(p.h0);
        for (int b = 0; b < B; ++b) {
          float* dst = h_cur + (b / TILE) * plane_floats + (b % TILE);
          for (int j = tid; j < H; j += blockDim.x) {
            dst[j * TILE] = S::to_float(__ldg(h0 + static_cast<size_t>(b) * H + j));
          }
        }
      } else {
        const Word* src = (s & 1) ? xbuf0 : xbuf1;  // step s-1 wrote buffer (s-1)&1
        const uint32_t tag = static_cast<uint32_t>(s) & S::kTagMask;
        if (p.exchange_vector) {
          stage_words<S, Cfg::kVecWords, Cfg::kStageUnroll>(src, h_cur, n_full_words, tag, spin);
        } else {
          stage_words<S, 1, Cfg::kStageUnroll>(src, h_cur, n_full_words, tag, spin);
        }
        if (p.partial_rem != 0) {  // the compacted [H][rem] partial plane
          const int rem = p.partial_rem;
          float* dst = h_cur + n_full_words;
          for (int i = tid; i < rem * H; i += blockDim.x) {
            const int j = i / rem;
            dst[j * TILE + (i - j * rem)] = wait_word<S>(src + n_full_words + i, tag, spin);
          }
        }
      }
      if (__syncthreads_or(spin.aborted)) break;  // staged h visible; leave together on error

      // ---- 2. per plane: gather, reduce, epilogue ------------------------------------------
      Word* const dst_buf = (s & 1) ? xbuf1 : xbuf0;
      const uint32_t out_tag = static_cast<uint32_t>(s + 1) & S::kTagMask;
      const bool last_step = s + 1 == n_steps;
      for (int plane = 0; plane < p.n_planes; ++plane) {
        const unsigned char* hp =
            reinterpret_cast<const unsigned char*>(h_cur + plane * plane_floats);
        float acc[TILE];
        if (!S::kHasColumnForm || byte_offsets) {
          gather_plane<Cfg, true>(acc, reg, w_lane, n_smem_slots, hp);
        } else {
          gather_plane<Cfg, false>(acc, reg, w_lane, n_smem_slots, hp);
        }
        // Segmented reduction: lane l adds lane l+off while l+off is still in its row's run;
        // after the loop the head lane holds the row sum. max_seg is warp-uniform.
        for (int off = 1; off < max_seg; off <<= 1) {
          const bool take = lane + off < seg_end;
#pragma unroll
          for (int t = 0; t < TILE; ++t) {
            const float other = __shfl_down_sync(kFullMask, acc[t], off);
            if (take) acc[t] += other;
          }
        }

        if (is_head) {
          Word words[TILE];
#pragma unroll
          for (int t = 0; t < TILE; ++t) {
            const int b = plane * TILE + t;
            Bits hb = Bits(0);
            if (b < B) {
              const int L = len_smem[b];
              if (s < L) {
                const int pos = p.reverse ? L - 1 - s : s;
                hb = S::to_bits(activate(p.activation, acc[t] + S::to_float(xr[t])));
                y[(static_cast<size_t>(pos) * B + b) * H + row] = hb;
              } else {  // past this sequence's end: the state is frozen, y is 0
                hb = S::to_bits(h_cur[plane * plane_floats + row * TILE + t]);
                y[(static_cast<size_t>(s) * B + b) * H + row] = Bits(0);
              }
              if (last_step) h_final[static_cast<size_t>(b) * H + row] = hb;
            }
            words[t] = S::make_word(hb, out_tag);
          }
          if (publishes && !last_step) {  // nobody reads the last step's words
            if (plane < p.n_full_planes) {
              publish_tile<S, TILE>(dst_buf + plane * plane_floats + row * TILE, words,
                                    p.exchange_vector != 0);
            } else {
              Word* dst = dst_buf + n_full_words + row * p.partial_rem;
#pragma unroll
              for (int t = 0; t < TILE; ++t)
                if (t < p.partial_rem) st_relaxed(dst + t, words[t]);
            }
          }
          // Prefetch x for the next (step, plane).
          if (plane + 1 < p.n_planes) {
            load_x(s, plane + 1);
          } else if (s + 1 < n_steps) {
            load_x(s + 1, 0);
          }
        }
      }
      // With one staged copy, the next step's staging must wait for every warp's gather.
      if (p.h_buffers == 1) __syncthreads();
    }
  }
  zero_tail_steps<S>(p, n_steps);
}

// ================================================================================================
// The synchronization floor: the same exchange (16-bit words) with no compute
// ================================================================================================
//
// Every CTA publishes its contiguous share of the `words` words each step, as the forward kernel's
// head lanes do, and stages all of them. Word e at step s carries (its staged value at s-1) + 1,
// starting from 0, so *out = value of word 0 after the last step = steps (exact up to 2048).

__global__ void __launch_bounds__(kMaxThreadsPerCta, 1)
    sync_floor_kernel(const __grid_constant__ FloorParams p) {
  using S = Storage<__half>;
  using Word = S::Word;
  extern __shared__ __align__(16) unsigned char smem[];
  float* const stage0 = reinterpret_cast<float*>(smem);
  float* const stage1 = stage0 + (p.h_buffers == 2 ? p.words : 0);
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
      const uint32_t tag = static_cast<uint32_t>(s) & S::kTagMask;
      if (p.exchange_vector) {
        stage_words<S, 4, 8>(src, cur, p.words, tag, spin);
      } else {
        stage_words<S, 1, 8>(src, cur, p.words, tag, spin);
      }
    }
    if (__syncthreads_or(spin.aborted)) return;
    Word* const dst = (s & 1) ? buf1 : buf0;
    const uint32_t out_tag = static_cast<uint32_t>(s + 1) & S::kTagMask;
    for (int i = own_begin + threadIdx.x; i < own_end; i += blockDim.x) {
      const float v = cur[i] + 1.0f;
      if (i == 0) last = v;
      st_relaxed(dst + i, S::make_word(S::to_bits(v), out_tag));
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
// Host: the instantiation set and its lookup
// ================================================================================================

using ForwardKernelFn = void (*)(ForwardParams);

// Register-tier sizes. 16-bit types hold one slot per register, float32 two, so the float32 set
// stops where its budget (2*RS + overhead) reaches the 255-register limit.
using RegSlots16 = std::integer_sequence<int, 0, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192>;
using RegSlots32 = std::integer_sequence<int, 0, 8, 16, 24, 32, 48, 64, 96>;

template <int... RS>
std::vector<int> to_vector(std::integer_sequence<int, RS...>) {
  return {RS...};
}

// The variant for a CTA of `threads` threads: the narrow one when it fits, else the wide one when
// it exists and fits, else nullptr. threads <= 0 asks for the variant with the largest bound.
template <typename T, int TILE, int RS>
ForwardKernelFn pick_variant(int threads) {
  using Narrow = ForwardConfig<T, TILE, RS, false>;
  if (threads > 0 && threads <= Narrow::kMaxThreads) return &sprnn_forward_kernel<Narrow>;
  if constexpr (forward_has_wide(Storage<T>::kRegsPerSlot == 1, RS)) {
    using Wide = ForwardConfig<T, TILE, RS, true>;
    if (threads <= Wide::kMaxThreads) return &sprnn_forward_kernel<Wide>;
  } else {
    if (threads <= 0) return &sprnn_forward_kernel<Narrow>;
  }
  return nullptr;
}

template <typename T, int TILE, int... RS>
ForwardKernelFn pick_reg_slots(int rs, int threads, std::integer_sequence<int, RS...>) {
  ForwardKernelFn fn = nullptr;
  ((rs == RS ? (fn = pick_variant<T, TILE, RS>(threads), 0) : 0), ...);
  return fn;
}

template <typename T, typename Seq>
ForwardKernelFn pick_tile(int tile, int rs, int threads, Seq seq) {
  switch (tile) {
    case 1: return pick_reg_slots<T, 1>(rs, threads, seq);
    case 2: return pick_reg_slots<T, 2>(rs, threads, seq);
    case 4: return pick_reg_slots<T, 4>(rs, threads, seq);
    default: return nullptr;
  }
}

ForwardKernelFn lookup_forward_kernel(ffi::DataType dtype, int tile, int rs, int threads) {
  switch (dtype) {
    case ffi::DataType::F32: return pick_tile<float>(tile, rs, threads, RegSlots32{});
    case ffi::DataType::F16: return pick_tile<__half>(tile, rs, threads, RegSlots16{});
    case ffi::DataType::BF16: return pick_tile<__nv_bfloat16>(tile, rs, threads, RegSlots16{});
    default: return nullptr;
  }
}

// The largest launch bound over the variants of one (dtype, tile, reg_slots).
int max_threads_of(ffi::DataType dtype, int tile, int rs) {
  const bool packed16 = dtype != ffi::DataType::F32;
  (void)tile;  // the bounds do not depend on the tile
  return std::max(forward_max_threads(packed16, rs, false),
                  forward_has_wide(packed16, rs) ? forward_max_threads(packed16, rs, true) : 0);
}

std::vector<int> reg_slots_for(ffi::DataType dtype) {
  return dtype == ffi::DataType::F32 ? to_vector(RegSlots32{}) : to_vector(RegSlots16{});
}

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

// ================================================================================================
// Host: cached per-device / per-kernel facts (thread-safe; each CUDA query runs once)
// ================================================================================================

std::string cuda_message(const char* what, cudaError_t e) {
  return std::string("jax_sprnn: ") + what + " failed: " + cudaGetErrorName(e) + " (" +
         cudaGetErrorString(e) + ")";
}

ffi::Error cuda_error(const char* what, cudaError_t e) {
  cudaGetLastError();  // clear a non-sticky error so it does not surface in an unrelated call
  return ffi::Error::Internal(cuda_message(what, e));
}

struct DeviceInfo {
  int sm_count = 0;
  int smem_optin = 0;
  bool cooperative = false;
};

struct KernelInfo {
  int max_threads = 0;
  int static_smem = 0;
  int max_dynamic_smem = 0;  // what cudaFuncSetAttribute allowed
};

std::mutex g_cache_mutex;
std::map<int, DeviceInfo> g_devices;
std::map<std::pair<int, const void*>, KernelInfo> g_kernels;
std::map<std::tuple<int, const void*, int, int>, int> g_occupancy;  // -> CTAs per SM

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
  if (e != cudaSuccess) return e;
  info.cooperative = coop != 0;
  g_devices[device] = info;
  *out = info;
  return cudaSuccess;
}

// Function attributes of `fn` on the current device `device`, raising its dynamic shared-memory
// limit to the device maximum the first time.
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

// Shared-memory plan of one forward launch.
struct SmemPlan {
  int h_floats = 0;
  int h_buffers = 0;
  int w_offset = 0;
  int len_offset = 0;
  int total = 0;
};

int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

// ================================================================================================
// Host: the forward handler
// ================================================================================================

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

ffi::Error ForwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer h0,
                       ffi::AnyBuffer values, ffi::Buffer<ffi::S32> indices,
                       ffi::Buffer<ffi::S32> lane_row, ffi::Buffer<ffi::S32> lengths,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> h_final,
                       ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t activation,
                       int64_t reverse, int64_t slots_per_lane, int64_t warps_per_cta,
                       int64_t reg_slots, int64_t load_bytes, int64_t spin_timeout_us,
                       int64_t debug_stall_cta) {
  ensure_error_word(stream);
  if (const uint32_t code = take_error_code()) return ffi::Error::Internal(error_code_message(code));

  auto bad = [](const std::string& m) { return ffi::Error::InvalidArgument("jax_sprnn_forward: " + m); };

  // ---- dtypes ---------------------------------------------------------------------------------
  const ffi::DataType dt = x.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::F16 && dt != ffi::DataType::BF16)
    return bad("x must be float32, float16 or bfloat16");
  if (h0.element_type() != dt || values.element_type() != dt || y->element_type() != dt ||
      h_final->element_type() != dt)
    return bad(std::string("x, h0, values, y and h_final must share one dtype (x is ") +
               dtype_name(dt) + ")");

  // ---- shapes ---------------------------------------------------------------------------------
  const auto xd = x.dimensions();
  if (xd.size() != 3) return bad("x must be [T, B, H], got " + shape_string(xd));
  const int64_t T = xd[0], B = xd[1], H = xd[2];
  if (h0.dimensions().size() != 2 || h0.dimensions()[0] != B || h0.dimensions()[1] != H)
    return bad("h0 must be [B, H] = [" + std::to_string(B) + ", " + std::to_string(H) + "], got " +
               shape_string(h0.dimensions()));
  if (!same_dims(y->dimensions(), xd)) return bad("y must have x's shape " + shape_string(xd));
  if (!same_dims(h_final->dimensions(), h0.dimensions()))
    return bad("h_final must have h0's shape " + shape_string(h0.dimensions()));
  if (lengths.element_count() != static_cast<size_t>(B))
    return bad("lengths must have B = " + std::to_string(B) + " entries, got " +
               std::to_string(lengths.element_count()));
  const int64_t n_lanes = static_cast<int64_t>(lane_row.element_count());
  if (n_lanes % kWarpSize != 0)
    return bad("lane_row size " + std::to_string(n_lanes) + " is not a multiple of 32");
  const int64_t NW = n_lanes / kWarpSize;
  const int64_t K = slots_per_lane;
  if (K < 0) return bad("slots_per_lane must be >= 0");
  const int64_t n_slots = NW * K * kWarpSize;
  if (static_cast<int64_t>(values.element_count()) != n_slots)
    return bad("values size " + std::to_string(values.element_count()) + " != NW*K*32 = " +
               std::to_string(n_slots) + " (NW = lane_row.size/32 = " + std::to_string(NW) +
               ", K = slots_per_lane = " + std::to_string(K) + ")");
  if (static_cast<int64_t>(indices.element_count()) != n_slots)
    return bad("indices size " + std::to_string(indices.element_count()) + " != values size " +
               std::to_string(n_slots));

  // ---- attributes -----------------------------------------------------------------------------
  if (!valid_activation(activation))
    return bad("activation must be 0 (tanh), 1 (relu) or 2 (identity), got " +
               std::to_string(activation));
  if (reverse != 0 && reverse != 1) return bad("reverse must be 0 or 1");
  if (load_bytes != 4 && load_bytes != 8 && load_bytes != 16)
    return bad("load_bytes must be 4, 8 or 16, got " + std::to_string(load_bytes));
  const int tile = static_cast<int>(load_bytes / 4);
  if (spin_timeout_us < 0) return bad("spin_timeout_us must be >= 0");
  if (debug_stall_cta < -1) return bad("debug_stall_cta must be >= -1");
  if (warps_per_cta < 1 || warps_per_cta * kWarpSize > kMaxThreadsPerCta)
    return bad("warps_per_cta must be in [1, 32], got " + std::to_string(warps_per_cta));
  const std::vector<int> rs_set = reg_slots_for(dt);
  if (std::find(rs_set.begin(), rs_set.end(), reg_slots) == rs_set.end()) {
    std::string s;
    for (int r : rs_set) s += (s.empty() ? "" : ", ") + std::to_string(r);
    return bad("reg_slots " + std::to_string(reg_slots) + " is not instantiated for " +
               dtype_name(dt) + " (supported: " + s + ")");
  }
  if (reg_slots > K)
    return bad("reg_slots " + std::to_string(reg_slots) + " > slots_per_lane " + std::to_string(K));

  // ---- trivial cases --------------------------------------------------------------------------
  const size_t elem_bytes = ffi::ByteWidth(dt);
  if (B == 0 || H == 0) return ffi::Error::Success();
  if (T == 0) {  // no step: h_final = h0
    cudaError_t e = cudaMemcpyAsync(h_final->untyped_data(), h0.untyped_data(), B * H * elem_bytes,
                                    cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return cuda_error("cudaMemcpyAsync(h_final <- h0)", e);
    return ffi::Error::Success();
  }

  // ---- layout-dependent checks ----------------------------------------------------------------
  if (NW == 0) return bad("lane_row is empty but H = " + std::to_string(H) + " rows need lanes");
  if (NW % warps_per_cta != 0)
    return bad("NW = " + std::to_string(NW) + " warps is not a multiple of warps_per_cta = " +
               std::to_string(warps_per_cta));
  if (dt != ffi::DataType::F32 && H > 65535)
    return bad("H = " + std::to_string(H) + " > 65535: 16-bit dtypes pack column indices in 16 bits");
  if (T > INT32_MAX || B > INT32_MAX || H > INT32_MAX || K > INT32_MAX)
    return bad("T, B, H and slots_per_lane must fit in int32");
  const int64_t ws_need = cuda_workspace_bytes(B, H);
  const int64_t ws_bytes = static_cast<int64_t>(workspace->element_count());
  if (ws_bytes < ws_need)
    return bad("workspace has " + std::to_string(ws_bytes) + " bytes, needs 256 + 2*B*H*8 = " +
               std::to_string(ws_need));

  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return cuda_error("cudaGetDevice", e);
  DeviceInfo dev;
  if ((e = device_info(device, &dev)) != cudaSuccess) return cuda_error("cudaDeviceGetAttribute", e);
  if (!dev.cooperative)
    return ffi::Error::Internal("jax_sprnn_forward: device " + std::to_string(device) +
                                " does not support cooperative launches");

  const int threads = static_cast<int>(warps_per_cta) * kWarpSize;
  const ForwardKernelFn fn = lookup_forward_kernel(dt, tile, static_cast<int>(reg_slots), threads);
  if (fn == nullptr) {
    const int bound = max_threads_of(dt, tile, static_cast<int>(reg_slots));
    return bad("warps_per_cta = " + std::to_string(warps_per_cta) + " (" + std::to_string(threads) +
               " threads) exceeds the " + std::to_string(bound) + "-thread launch bound of the " +
               dtype_name(dt) + " load_bytes-" + std::to_string(load_bytes) + " reg_slots-" +
               std::to_string(reg_slots) + " kernel (kernel_attributes() gives it)");
  }
  KernelInfo kinfo;
  if ((e = kernel_info(device, reinterpret_cast<const void*>(fn), dev, &kinfo)) != cudaSuccess)
    return cuda_error("cudaFuncGetAttributes/cudaFuncSetAttribute(forward kernel)", e);

  // ---- shared memory: staged h (two copies when they fit), weight tier, lengths ---------------
  const int64_t n_planes = (B + tile - 1) / tile;
  const int64_t h_floats = n_planes * H * tile;
  const int64_t slot_bytes = dt == ffi::DataType::F32 ? 8 : 4;
  const int64_t w_bytes = warps_per_cta * (K - reg_slots) * kWarpSize * slot_bytes;
  const int64_t len_bytes = B * 4;
  auto plan_total = [&](int buffers) { return align16(buffers * h_floats * 4) + align16(w_bytes) + len_bytes; };
  SmemPlan smem;
  smem.h_buffers = plan_total(2) <= kinfo.max_dynamic_smem ? 2 : 1;
  const int64_t total = plan_total(smem.h_buffers);
  if (total > kinfo.max_dynamic_smem)
    return bad("the layer does not fit on chip: " + std::to_string(total) +
               " bytes of shared memory per CTA needed (staged h " + std::to_string(h_floats * 4) +
               " = ceil(B/tile)*H*tile*4, weight tier " + std::to_string(w_bytes) +
               " = warps_per_cta*(K-reg_slots)*32*" + std::to_string(slot_bytes) + "), " +
               std::to_string(kinfo.max_dynamic_smem) + " available");
  smem.h_floats = static_cast<int>(h_floats);
  smem.w_offset = static_cast<int>(align16(smem.h_buffers * h_floats * 4));
  smem.len_offset = static_cast<int>(smem.w_offset + align16(w_bytes));
  smem.total = static_cast<int>(total);

  // ---- co-residency: every CTA must be resident at once --------------------------------------
  const int64_t grid = NW / warps_per_cta;
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
  const int word_bytes = dt == ffi::DataType::F32 ? 8 : 4;
  unsigned char* ws = workspace->typed_data();
  const ExchangeLayout xl = exchange_layout(B * H, word_bytes, ws_bytes, ws);
  if ((e = cudaMemsetAsync(ws, 0, xl.used_bytes, stream)) != cudaSuccess)
    return cuda_error("cudaMemsetAsync(workspace)", e);

  ForwardParams prm{};
  prm.x = x.untyped_data();
  prm.h0 = h0.untyped_data();
  prm.values = values.untyped_data();
  prm.indices = indices.typed_data();
  prm.lane_row = lane_row.typed_data();
  prm.lengths = lengths.typed_data();
  prm.y = y->untyped_data();
  prm.h_final = h_final->untyped_data();
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
  prm.activation = static_cast<int>(activation);
  prm.reverse = static_cast<int>(reverse);
  prm.h_buffers = smem.h_buffers;
  prm.h_floats = smem.h_floats;
  prm.w_smem_offset = smem.w_offset;
  prm.len_smem_offset = smem.len_offset;
  prm.exchange_vector = xl.vector ? 1 : 0;
  prm.byte_offsets = H * tile * 4 <= 65536 ? 1 : 0;
  prm.stall_cta = static_cast<int>(std::min<int64_t>(debug_stall_cta, INT32_MAX));
  constexpr int64_t kMaxSpinTimeoutUs = int64_t{3600} * 1'000'000;  // keeps the ns value in range
  prm.timeout_ns = static_cast<unsigned long long>(std::min(
                       spin_timeout_us > 0 ? spin_timeout_us : kDefaultSpinTimeoutUs,
                       kMaxSpinTimeoutUs)) * 1000ull;

  void* args[] = {&prm};
  e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(fn), dim3(static_cast<unsigned>(grid)),
                                  dim3(threads), args, static_cast<size_t>(smem.total), stream);
  if (e != cudaSuccess) return cuda_error("cudaLaunchCooperativeKernel(jax_sprnn_forward)", e);

  const size_t n_y = static_cast<size_t>(T * B * H);
  const size_t n_h = static_cast<size_t>(B * H);
  if (dt == ffi::DataType::F32) {
    e = launch_finisher<uint32_t>(stream, dev, prm.error_flag, H, prm.y, n_y, prm.h_final, n_h,
                                  Storage<float>::kNaNBits);
  } else {
    e = launch_finisher<uint16_t>(stream, dev, prm.error_flag, H, prm.y, n_y, prm.h_final, n_h,
                                  dt == ffi::DataType::F16 ? Storage<__half>::kNaNBits
                                                           : Storage<__nv_bfloat16>::kNaNBits);
  }
  if (e != cudaSuccess) return cuda_error("launching the finisher kernel", e);
  return ffi::Error::Success();
}

// ================================================================================================
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnForwardCuda, jax_sprnn::cuda::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()             // x
                                  .Arg<ffi::AnyBuffer>()             // h0
                                  .Arg<ffi::AnyBuffer>()             // values
                                  .Arg<ffi::Buffer<ffi::S32>>()      // indices
                                  .Arg<ffi::Buffer<ffi::S32>>()      // lane_row
                                  .Arg<ffi::Buffer<ffi::S32>>()      // lengths
                                  .Ret<ffi::AnyBuffer>()             // y
                                  .Ret<ffi::AnyBuffer>()             // h_final
                                  .Ret<ffi::Buffer<ffi::U8>>()       // workspace
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("slots_per_lane")
                                  .Attr<int64_t>("warps_per_cta")
                                  .Attr<int64_t>("reg_slots")
                                  .Attr<int64_t>("load_bytes")
                                  .Attr<int64_t>("spin_timeout_us")
                                  .Attr<int64_t>("debug_stall_cta"),
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
  if (!parse_dtype(dtype, &dt)) return {};
  return reg_slots_for(dt);
}

std::string GetKernelAttributes(const std::string& dtype, int tile, int reg_slots, int device,
                                int threads, KernelAttributes* out) {
  ffi::DataType dt;
  if (!parse_dtype(dtype, &dt)) return "unknown dtype '" + dtype + "' (float32, float16, bfloat16)";
  const ForwardKernelFn fn = lookup_forward_kernel(dt, tile, reg_slots, threads);
  if (fn == nullptr)
    return "no forward kernel for dtype " + dtype + ", tile " + std::to_string(tile) +
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
