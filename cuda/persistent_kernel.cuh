// The persistent sparse RNN recurrences (Zhu et al., ICLR 2018): one kernel template, two cells.
//
// One launch runs a whole sequence: a cooperative grid (grid mode), or clusters (cluster mode,
// below). Every warp owns the nonzeros of the rows its lanes serve (docs/format.md): the first RS
// slots of each lane live in registers, the rest in shared memory. Per phase every CTA (grid mode)
//   1. stages the previous phase's state into shared memory as fp32 [plane][H][tile] (a plane is a
//      batch tile, so one vector load fetches a column's whole tile), waiting word by word on
//      Lamport timestamps,
//   2. gathers sum_k value * state[col] per lane and per plane, reduces each row's contiguous lanes
//      with a segmented shuffle, and lets the unit's cell lanes (one per batch entry of the plane)
//      run the cell, write its outputs and publish the new state with the tag of the phase.
// There is no grid barrier: a consumer spins only on the words it needs (all of them, in practice).
//
// The batch in passes: a kernel variant with kPlanesPerPass = 2 (tile 4; the handler launches it
// for two planes or more) walks the planes two at a time. A pass decodes each slot once and loads
// its column from both planes (8 accumulators), reduces the 8 sums in one segmented reduction, and
// runs the 8 entries' cells on 8 cell lanes at once; an odd last plane takes a one-plane pass.
// Each sum keeps its chain and order, so both variants give the same bits. (A B = 8 step was two
// full passes, each repeating the slot decode, the reduction's loop and the cell.)
//
// The cells:
//   ForwardCell   phase s = step s. Stages h_{s-1} (h0 first); h_s = act(x + U h_{s-1}), rounded to D.
//   BackwardCell  the backward recurrence on the transposed layout (U^T), run from the last step
//                 to the first: phase r handles step s = n_steps-1-r and stages dz_{s+1} (zeros
//                 first). dh_s = U^T dz_{s+1} while the example is still active at s+1, else
//                 dh_final; dz_s = (dh_s + dy[pos]) * act'(y[pos]) is written to dx and published
//                 in fp32. One extra phase (s = -1) turns the last matvec into dh0.
//
// Exchange protocol (workspace = 256-byte header + two exchange buffers, see the handlers):
//   * A word carries a state value and the tag of the phase that produced it, written with ONE
//     store, so the value and its tag travel together and no fence is needed between them.
//     Tag = phase + 1. See WideWords / NarrowWords for the two word forms. The 16-bit tag of
//     NarrowWords wraps safely: a reader at phase s can only find the tags of phases s-1 (wanted)
//     and s-3 in its buffer, which differ modulo 2^16, and the memset's 0 is overwritten for good by
//     phases 0 and 1.
//   * Phase s writes buffer s&1. Double buffering is enough: a producer cannot write phase s+2 into
//     a buffer before every CTA has read phase s from it, because it first needs every CTA's phase
//     s+1 words, which each CTA publishes only after staging (and a __syncthreads) of phase s. CTAs
//     that own no row publish nothing, so they also must not read: they skip the phase loop.
//   * Stale words from earlier calls are harmless: the handler memsets header and buffers on XLA's
//     stream before the launch (graph-safe, unlike any host-side epoch).
//   * Word layout in a buffer: the full batch planes as [plane][H][tile] (identical to the shared
//     memory layout, so staging them is a straight vector copy), then the last, partial plane (B not
//     a multiple of the tile) compacted as [H][B % tile]. Exactly B*H words.
//
// Cluster mode (p.cluster = N > 0; sm_90+; chosen by the handler for layouts of at most
// constants::kMaxClusterCtas CTAs): the layout's N CTAs form one thread-block cluster, and the grid
// holds R replicas of it, each running a slice of the batch with its own copy of the weights.
//   * No L2 exchange: a unit's lanes push its new state straight into the other staged copy of
//     every CTA of its cluster (distributed shared memory, `st.async`), and no barrier ends the
//     phase. Each staged copy has an mbarrier that counts the bytes the peers push into it; a CTA
//     waits on its own before it reads the copy (this CTA's own units are plain stores, seen after
//     its __syncthreads). Phase s reads copy s&1 and writes copy (s+1)&1 of every peer.
//   * Two copies suffice with no barrier: a peer writes phase s+1's pushes into copy s&1 only after
//     it received every unit's phase-s state, and each unit's lanes pushed that state after their
//     warp read copy s&1 (`complete_tx` has release semantics at cluster scope). An mbarrier phase
//     completes on its owner's expect_tx and all its bytes, in either order, so a fast peer may
//     push before the owner re-arms.
//   * A cluster barrier before the first phase makes sure every peer is running, its mbarriers
//     armed, before anyone writes its shared memory; one after the last phase keeps every CTA
//     resident while a peer may still write to it (after an error cut a phase short).
//   * Every CTA of a cluster runs every phase, rows or not, and all agree on the number of phases
//     (they read the same lengths). The mbarrier waits spin under the same bound as the grid
//     exchange's, so the stall test hook times out in either mode.
//
// Errors are never a hang and never a silent wrong answer:
//   * Every spin checks %globaltimer every kSpinCheckPeriod iterations; past the bound it sets the
//     timeout bit in the header flag, and every spin also gives up when it sees the flag set. A CTA
//     whose thread gave up leaves the phase loop at the next __syncthreads_or.
//   * Out-of-range indices / lane_row entries (clamped, so memory stays safe), a row with two runs
//     in one warp, and a grid-wide head count != H (checked at the end of the call) set the layout bit.
//   * lengths are clamped to [0, T] on the device (the host cannot read them).
//   * At the end of the call the last CTA to finish (finish_call) turns the flag into NaN outputs
//     and a deferred XLA error (deferred_errors.h).
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "persistent.h"
#include "sprnn_common.h"

namespace jax_sprnn::cuda {

constexpr int kSpinCheckPeriod = 64;  // spins between %globaltimer / flag checks
constexpr unsigned kFullMask = 0xffffffffu;

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
//   Bits      raw storage of one D element (sequence operands and results are read and written as
//             raw bits)
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
  using Slot = F32Slot;
  static constexpr int kRegsPerSlot = 2;
  static constexpr Bits kNaNBits = 0x7fc00000u;

  __device__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ static Bits to_bits(float f) { return __float_as_uint(f); }
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
  using Slot = uint32_t;
  static constexpr int kRegsPerSlot = 1;

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
  __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Bits to_bits(float f) { return __half_as_ushort(__float2half_rn(f)); }
  __device__ static float low_to_float(uint32_t w) { return to_float(static_cast<Bits>(w)); }
  __device__ static float high_to_float(uint32_t w) { return to_float(static_cast<Bits>(w >> 16)); }
};

template <>
struct Storage<__nv_bfloat16> : Storage16<Storage<__nv_bfloat16>> {
  static constexpr Bits kNaNBits = 0x7fc0u;
  __device__ static float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  __device__ static Bits to_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
  __device__ static float low_to_float(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ static float high_to_float(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
};


// ================================================================================================
// Exchange words: a state value and the tag of the step that produced it, in ONE store
// ================================================================================================
//
//   WideWords      8 bytes: fp32 value bits | uint32 tag. The forward pass of float32 and the
//                  backward pass of every dtype (its exchanged dL/dz stays fp32, as on the CPU).
//   NarrowWords<S> 4 bytes: the value rounded to the 16-bit D | uint16 tag. The forward pass of
//                  float16 / bfloat16, whose state is D anyway: half the L2 traffic.
// make_word takes the value as a float; a forward value is already rounded to D, so converting it
// again is exact.

struct WideWords {
  using Word = uint64_t;
  static constexpr int kWordBytes = 8;
  static constexpr uint32_t kTagMask = 0xffffffffu;
  __device__ static Word make_word(float v, uint32_t tag) {
    return static_cast<uint64_t>(__float_as_uint(v)) | (static_cast<uint64_t>(tag) << 32);
  }
  __device__ static bool has_tag(Word w, uint32_t tag) {
    return static_cast<uint32_t>(w >> 32) == tag;
  }
  __device__ static float word_value(Word w) { return __uint_as_float(static_cast<uint32_t>(w)); }
};

template <class S>
struct NarrowWords {
  using Word = uint32_t;
  static constexpr int kWordBytes = 4;
  static constexpr uint32_t kTagMask = 0xffffu;
  __device__ static Word make_word(float v, uint32_t tag) {
    return static_cast<uint32_t>(S::to_bits(v)) | (tag << 16);
  }
  __device__ static bool has_tag(Word w, uint32_t tag) { return (w >> 16) == tag; }
  __device__ static float word_value(Word w) { return S::low_to_float(w); }
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
// The tunable shape of one kernel instantiation
// ================================================================================================

template <Direction DIR, typename T, int TILE, int RS, bool WIDE, int PP = 1, bool TILES = false>
struct PersistentConfig {
  using S = Storage<T>;
  using Elem = T;
  // The cell's gates (1 for the simple cell, 3 GRU, 4 LSTM), the layout rows of one unit (G for a
  // gated forward, else 1) and the state words of one unit and example (G for a gated backward,
  // whose state is the G gate cotangents, else 1).
  static constexpr int kGates = gates_of(DIR);
  static constexpr int kRowGates = row_gates_of(DIR);
  static constexpr int kStateWidth = state_width_of(DIR);
  // The simple cell's backward exchanges fp32 dz for every dtype (see the file comment); the gated
  // backward's du is rounded to the storage type before the product, so 16-bit words carry it.
  using X = std::conditional_t<DIR == Direction::kBackward || std::is_same_v<T, float>, WideWords,
                               NarrowWords<S>>;
  static_assert(TILE == 1 || TILE == 2 || TILE == 4, "tile is 1, 2 or 4 floats (4, 8, 16 bytes)");
  static constexpr Direction kDirection = DIR;
  static constexpr int kTile = TILE;
  // Batch planes one pass of the phase loop gathers together (see "The batch in passes"): 2 in
  // the variants the handler launches for two planes or more (tile 4 only: narrower tiles are the
  // plans whose state barely fits in shared memory), else 1.
  static constexpr int kPlanesPerPass = PP;
  static_assert(PP == 1 || (PP == 2 && TILE == 4), "two planes a pass with a tile of 4 only");
  static constexpr int kRegSlots = RS;
  static constexpr int kRegArray = RS > 0 && !TILES ? RS : 1;
  // A tile layout (docs/format.md, "Tile layouts"): the step's product runs on tensor cores over
  // dense 16-column strips of the weights, held as mma fragments. A lane's RS register slots are
  // RS / 16 strips of its warp (8 fragment words a thread each: the same 16-bit values as RS slots
  // of one lane, at half the registers, so the slot variants' launch bounds hold with room).
  static constexpr bool kTiles = TILES;
  static constexpr int kRegStrips = TILES ? RS / 16 : 0;
  static constexpr int kTileRegWords = TILES && RS > 0 ? RS / 2 : 1;
  static_assert(!TILES || (!std::is_same_v<T, float> && TILE == 4 && RS % 16 == 0 &&
                           (DIR == Direction::kForward || DIR == Direction::kLstm || DIR == Direction::kGru)),
                "tile variants: 16-bit forward recurrences, a batch tile of 4, whole register strips");
  // Independent accumulator sets of the slot loop, the same for every tile: an example's sums, and
  // so its rounding, must not depend on the tile it ran in, since the handler picks the tile from
  // the batch and the device (narrower tiles on more cluster replicas where those fit: a call's
  // examples then equal the same examples in any other call, bit for bit). One chain: the tile of
  // 4's accumulators already fill its registers (its two-plane variant spills), and a narrow
  // tile's chain of K dependent FMAs costs a few percent of its step (at K = 32, about 0.05 µs).
  static constexpr int kChains = 1;
  // Whether the phase loop keeps a cell lane's own batch entry (Entry: 7 registers) for the whole
  // call instead of building it from shared memory at every use: where a pass has one plane (its
  // entries are then the same every phase when the slice is one pass) and the register tier leaves
  // room (the small layers, whose step it shortens by 5-8%: RESULTS.md, 2026-12-06; the two-plane,
  // the wide and the large-tier variants spilled more with it).
  static constexpr bool kKeepEntry = PP == 1 && !WIDE && RS * S::kRegsPerSlot <= 48;
  // Whether the register slots are decoded once per call (value and column offset, two registers a
  // slot) rather than at every use, and the cell-lane fields once rather than per pass: the small
  // tiers, where that leaves the launch bound's room (at 16 register words both spilled).
  static constexpr bool kDecodeOnce = PP == 1 && !WIDE && RS * S::kRegsPerSlot <= 8;
  // Shared-memory-tier slots per loop iteration (a multiple of kChains).
  static constexpr int kSmemUnroll = 4;
  static constexpr int kVecWords = 16 / X::kWordBytes;
  // Launch bound and staging unroll (16-byte exchange vectors a thread keeps in flight). The launch
  // bound fixes ptxas's register cap: 65536 / (4 * 32 * ceil(threads / 128)) per thread, since each
  // of an SM's four schedulers owns a quarter of the register file.
  static constexpr int kMaxThreads = max_threads_of_variant(DIR, S::kRegsPerSlot == 1, RS, WIDE);
  static constexpr int kStageUnroll = stage_unroll_of_variant(DIR, S::kRegsPerSlot == 1, RS, WIDE);
  static_assert(kMaxThreads >= 128 && kMaxThreads % 128 == 0 && kMaxThreads <= kMaxThreadsPerCta,
                "no such variant (jax_sprnn/_constants.py: PERSISTENT_TIERS_16/32)");
  static_assert(kStageUnroll >= 1, "a variant stages at least one vector per thread");
  // Whether the phase loop is compiled once per exchange mode (persistent_body's ExchangeMode)
  // rather than once for both: without the other mode's branches and address arithmetic, the
  // cluster mode's step is shorter. Every direction's one-plane tiers of up to 16 registers of
  // slots, the forward recurrences' up to 32 at a tile of 1 or 2; a tile of 4 only in the
  // 384-thread variants (the others spilled). (Kernel time, fp16: 7-10% off the step at H = 256,
  // 9% at 1024 x 8, 7-9% off the simple and the LSTM backward's: RESULTS.md.) The rule is
  // jax_sprnn/_constants.py's, which the cost model shares. (kMaxThreads is the narrow bound
  // wherever the rule can hold: a wide variant never splits.)
  static constexpr bool kSplitModes = constants::split_modes(
      RS * S::kRegsPerSlot, TILE, is_backward_direction(DIR), kMaxThreads, PP, WIDE, TILES);
  // The workspace (constants::cuda_workspace_bytes) sizes each exchange buffer for the widest word.
  static_assert(X::kWordBytes <= constants::kExchangeWordBytes, "exchange word wider than the workspace");
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

// The end of every persistent kernel: the last CTA to finish checks the call. Where a CTA set the
// error flag, or the grid's head count differs from the layout's rows, it fills the outputs with NaN
// and leaves the error code in the call's pinned error slot, which the next call's handler reports
// (deferred_errors.h). Every thread of every CTA calls it. (It was a kernel of its own: one more
// launch, and its gap, in every call.) Out of line, so that its registers leave the phase loop's
// allocation as it was (inlined, ptxas moved a spill into the loop of the tightest tiers).
inline __device__ __noinline__ void finish_call(uint32_t* header, const FinishParams& f) {
  bool last = false;
  __syncthreads();  // this CTA's outputs are written...
  if (threadIdx.x == 0) {
    __threadfence();  // ...and visible to the whole grid before the count includes this CTA
    last = atomicAdd(header + kDoneCountWord, 1u) == gridDim.x - 1;
  }
  if (!__syncthreads_or(last)) return;
  __threadfence();  // (the acquire side: every other CTA's outputs and flags, as counted)
  uint32_t code = ld_relaxed_u32(header);
  if (f.expected_heads >= 0 &&
      ld_relaxed_u32(header + kHeadCountWord) != static_cast<unsigned long long>(f.expected_heads))
    code |= kErrBadLayout;
  if (code == 0) return;
  for (int o = 0; o < f.n_out; ++o) {
    const FinishOutput& out = f.out[o];
    for (unsigned long long i = threadIdx.x; i < out.n; i += blockDim.x) {
      if (out.bytes == 2) {
        static_cast<uint16_t*>(out.data)[i] = static_cast<uint16_t>(out.nan_bits);
      } else {
        static_cast<uint32_t*>(out.data)[i] = out.nan_bits;
      }
    }
  }
  if (threadIdx.x == 0 && f.host_word != nullptr) *reinterpret_cast<volatile uint32_t*>(f.host_word) = code;
}

template <class X, int VW>
__device__ __forceinline__ bool vec_has_tag(const WordVec<typename X::Word, VW>& v, uint32_t tag) {
  bool ok = true;
#pragma unroll
  for (int i = 0; i < VW; ++i) ok &= X::has_tag(v.w[i], tag);
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

template <int N>
__device__ __forceinline__ void load_floats(const float* src, float (&f)[N]) {
  if constexpr (N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
  } else if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(src);
    f[0] = v.x, f[1] = v.y;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = src[i];
  }
}

// A NaN probe of staged values: probe = fma(v, 0, probe) stays 0 while every v is finite and turns
// NaN for good at the first Inf or NaN (0 * Inf = NaN), one FMA a value (no fast-math here).
__device__ __forceinline__ void probe_finite(float& probe, float v) { probe = fmaf(v, 0.0f, probe); }

// Waits for one exchange word carrying `tag` and returns its value (garbage once aborted).
template <class X>
__device__ __forceinline__ float wait_word(const typename X::Word* src, uint32_t tag,
                                           SpinControl& spin) {
  WordVec<typename X::Word, 1> v;
  ld_relaxed(v, src);
  if (!X::has_tag(v.w[0], tag) && !spin.aborted) {
    unsigned long long deadline = 0;
    for (uint32_t iter = 1;; ++iter) {
      if (iter % kSpinCheckPeriod == 0 && spin.give_up(deadline)) break;
      ld_relaxed(v, src);
      if (X::has_tag(v.w[0], tag)) break;
    }
  }
  return X::word_value(v.w[0]);
}

// Where staged vector v (of VW words) goes in shared memory.
struct DenseDst {  // the full batch planes: the exchange layout equals the shared-memory layout
  float* base;
  int vw;
  __device__ __forceinline__ float* operator()(int v) const { return base + v * vw; }
};
struct PartialPlaneDst {  // the compacted [H][rem] partial plane into its [H][TILE] shared plane
  float* base;
  int rem, tile;
  __device__ __forceinline__ float* operator()(int i) const {
    const int j = i / rem;
    return base + j * tile + (i - j * rem);
  }
};

// Stages the n_vec vectors of VW exchange words at src into shared memory as fp32, vector v to
// dst(v).
//   * Work is split into warp chunks of 32*U vectors; lane l of a warp takes vectors l, l+32, ...
//     of its chunk, so every load instruction is a coalesced access and, for DenseDst, all U
//     addresses are one register plus an immediate offset (few registers next to the register tier).
//   * A thread keeps its U vectors in flight and re-issues all of its not-yet-tagged ones together:
//     a chunk costs about one L2 round trip after its last producer, not one per vector. (Waiting
//     word by word instead made a B=1 step cost one L2 round trip per H/threads words.)
template <class X, int VW, int U, class Dst>
__device__ __forceinline__ void stage_vectors(const typename X::Word* __restrict__ src, Dst dst,
                                              int n_vec, uint32_t tag, SpinControl& spin, float& probe) {
  using Word = typename X::Word;
  constexpr int kChunk = 32 * U;
  const int lane = threadIdx.x & 31;
  const int n_warps = blockDim.x >> 5;
  for (int chunk = (threadIdx.x >> 5) * kChunk; chunk < n_vec && !spin.aborted;
       chunk += n_warps * kChunk) {
    const Word* s0 = src + static_cast<size_t>(chunk + lane) * VW;
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
        if (((pending >> u) & 1u) && vec_has_tag<X, VW>(v[u], tag)) {
          float f[VW];
#pragma unroll
          for (int k = 0; k < VW; ++k) {
            f[k] = X::word_value(v[u].w[k]);
            probe_finite(probe, f[k]);
          }
          store_floats<VW>(dst(chunk + lane + u * 32), f);
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
}

// Stages words [0, n_words) of an exchange buffer into dst[0, n_words): the full batch planes.
template <class X, int VW, int U>
__device__ __forceinline__ void stage_words(const typename X::Word* __restrict__ src,
                                            float* __restrict__ dst, int n_words, uint32_t tag,
                                            SpinControl& spin, float& probe) {
  const int n_vec = n_words / VW;
  stage_vectors<X, VW, U>(src, DenseDst{dst, VW}, n_vec, tag, spin, probe);
  // Words past the last whole vector.
  for (int i = n_vec * VW + static_cast<int>(threadIdx.x); i < n_words; i += blockDim.x) {
    dst[i] = wait_word<X>(src + i, tag, spin);
    probe_finite(probe, dst[i]);
  }
}

// One slot of the pass's PP planes (planes `plane_bytes` apart): the slot is decoded once, then
// each plane's column tile is one shared-memory load and TILE FMAs into acc[q * TILE + t].
template <class S, int TILE, int PP, bool kByteOffsets>
__device__ __forceinline__ void fma_slot(float (&acc)[PP * TILE], typename S::Slot slot,
                                         const unsigned char* plane, int plane_bytes) {
  using V = TileVec<TILE>;
  float value;
  uint32_t byte_offset;
  S::template decode_slot<TILE, kByteOffsets>(slot, value, byte_offset);
#pragma unroll
  for (int q = 0; q < PP; ++q) {
    const typename V::type h =
        *reinterpret_cast<const typename V::type*>(plane + q * plane_bytes + byte_offset);
#pragma unroll
    for (int t = 0; t < TILE; ++t) acc[q * TILE + t] = fmaf(value, V::get(h, t), acc[q * TILE + t]);
  }
}

// acc[q * TILE + t] = sum over this lane's slots of value * h[plane + q][col][t] for the PP planes
// of a pass (see "The batch in passes"): the register tier (unrolled, compile-time indices only),
// then the shared-memory tier [warp][slot][lane]. Each accumulator's chain, and so each sum's
// rounding, is the same whatever PP is.
template <class Cfg, bool kByteOffsets, int PP>
__device__ __forceinline__ void gather_planes(float (&acc)[PP * Cfg::kTile],
                                              typename Cfg::S::Slot (&reg)[Cfg::kRegArray],
                                              const typename Cfg::S::Slot* w_lane, int n_smem_slots,
                                              const unsigned char* plane, int plane_bytes) {
  using S = typename Cfg::S;
  using Slot = typename S::Slot;
  constexpr int TILE = Cfg::kTile;
  constexpr int N = PP * TILE;
  constexpr int CH = Cfg::kChains;
  constexpr int SU = Cfg::kSmemUnroll;
  float a[CH][N];
#pragma unroll
  for (int c = 0; c < CH; ++c)
#pragma unroll
    for (int t = 0; t < N; ++t) a[c][t] = 0.0f;
#pragma unroll
  for (int k = 0; k < Cfg::kRegSlots; ++k)
    if constexpr (!Cfg::kDecodeOnce) S::launder_slot(reg[k]);  // decode per use, not hoisted
#pragma unroll
  for (int k = 0; k < Cfg::kRegSlots; ++k)
    fma_slot<S, TILE, PP, kByteOffsets>(a[k % CH], reg[k], plane, plane_bytes);
  int k = 0;
  for (; k + SU <= n_smem_slots; k += SU) {
    Slot w[SU];
#pragma unroll
    for (int u = 0; u < SU; ++u) w[u] = w_lane[(k + u) * 32];
#pragma unroll
    for (int u = 0; u < SU; ++u) fma_slot<S, TILE, PP, kByteOffsets>(a[u % CH], w[u], plane, plane_bytes);
  }
  for (; k < n_smem_slots; ++k) fma_slot<S, TILE, PP, kByteOffsets>(a[0], w_lane[k * 32], plane, plane_bytes);
#pragma unroll
  for (int t = 0; t < N; ++t) {
    acc[t] = a[0][t];
#pragma unroll
    for (int c = 1; c < CH; ++c) acc[t] += a[c][t];
  }
}

// ---- dense tiles on tensor cores (a tile layout: docs/format.md, "Tile layouts") -------------
//
// In a tile layout every lane serves one row (or none) and its slot k holds column k (padding:
// ~k, value 0), so a warp's 32 rows over a strip of 16 columns are two 16x16 A operands of
// mma.m16n8k16 (rows 0-15 and 16-31 of the warp), and the pass's PT <= 8 batch entries are the
// 8 columns of its B operand. Fragments (PTX ISA, "mma.m16n8k16"), with g = lane / 4, q = lane % 4:
//   A word r (two 16-bit values, the lower column in the low half): row g + 8 (r & 1), columns
//     2q, 2q + 1 (+ 8 where r & 2);
//   B word 0: state columns 2q, 2q + 1 of batch entry g; word 1: columns 2q + 8, 2q + 9;
//   C: rows g (c0, c1) and g + 8 (c2, c3), batch entries 2q and 2q + 1.
// A thread holds 8 A words a strip (m-tile 0's four, then m-tile 1's): the register tier's strips
// in registers, the others in shared memory as [strip][m-tile][lane][4 words] (conflict-free
// 16-byte loads). The state stays staged as fp32; each strip's B words are converted from it.
// mma.m16n8k16 with fp32 accumulation and the conversion of two floats to its 16-bit pair, for
// T = __half (f16) or __nv_bfloat16 (bf16): PTX type names pasted into one asm string each.
#define JAX_SPRNN_CVT_PAIR(type, r, lo, hi) asm("cvt.rn." type "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo))
#define JAX_SPRNN_MMA_16816(type, c, a, b0, b1)                                                  \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." type "." type ".f32 {%0, %1, %2, %3}, "          \
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"                                             \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                            \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
struct Mma {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "16-bit types only");
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  // The pair (lo, hi) rounded to T, lo in the low half (the lower column of an operand's pair).
  __device__ static uint32_t pack(float lo, float hi) {
    uint32_t r;
    if constexpr (kBf16) {
      JAX_SPRNN_CVT_PAIR("bf16", r, lo, hi);
    } else {
      JAX_SPRNN_CVT_PAIR("f16", r, lo, hi);
    }
    return r;
  }
  // c += A B for A's four words at `a` and B's two.
  __device__ static void mma(float (&c)[4], const uint32_t* a, uint32_t b0, uint32_t b1) {
    if constexpr (kBf16) {
      JAX_SPRNN_MMA_16816("bf16", c, a, b0, b1);
    } else {
      JAX_SPRNN_MMA_16816("f16", c, a, b0, b1);
    }
  }
};
#undef JAX_SPRNN_CVT_PAIR
#undef JAX_SPRNN_MMA_16816

// A word of strip `strip`, m-tile `mt` (rows 16 mt .. 16 mt + 15 of the warp), register `r`: two
// slots of the packed layout read from global memory at init (`warp_slots`: the warp's first slot).
// A slot must hold its own column k (real) or ~k (padding, whose value counts as 0); anything else
// sets `bad` and counts as 0.
template <class S>
__device__ __forceinline__ uint32_t tile_word(const typename S::Bits* values, const int32_t* indices,
                                              size_t warp_slots, int strip, int mt, int r, int lane,
                                              bool& bad) {
  const int row_lane = mt * 16 + (lane >> 2) + ((r & 1) ? 8 : 0);
  const int k0 = strip * 16 + 2 * (lane & 3) + ((r & 2) ? 8 : 0);
  uint32_t word = 0;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const size_t slot = warp_slots + static_cast<size_t>(k0 + e) * 32 + row_lane;
    const int idx = __ldg(indices + slot);
    const uint32_t v = __ldg(values + slot);
    bad |= (idx < 0 ? ~idx : idx) != k0 + e;
    word |= (idx == k0 + e ? v : 0u) << (16 * e);
  }
  return word;
}

// acc[t] = the product of this lane's row with batch entry t of the pass's PT = PP * TILE entries
// (planes plane .. plane + PP - 1 of the staged state at `hp`), on tensor cores: the register
// strips (compile-time indices only), then `n_smem_strips` strips from shared memory (`w_frag`:
// this warp's first, offset by lane * 4 words). Two accumulator chains hide the mma latency.
template <class Cfg, int PP>
__device__ __forceinline__ void tile_product(float (&acc)[PP * Cfg::kTile],
                                             const uint32_t (&treg)[Cfg::kTileRegWords],
                                             const uint32_t* w_frag, int n_smem_strips, const float* hp,
                                             int plane_floats) {
  using M = Mma<typename Cfg::Elem>;
  constexpr int TILE = Cfg::kTile;
  constexpr int PT = PP * TILE;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const bool live = g < PT;  // B columns past the pass's entries are zero
  const float* h_col = hp + (g / TILE) * plane_floats + g % TILE + 2 * (lane & 3) * TILE;
  float c[2][2][4];  // [chain][m-tile][C register]
#pragma unroll
  for (int ch = 0; ch < 2; ++ch)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) c[ch][mt][i] = 0.0f;
  auto strip = [&](int k_strip, const uint32_t* a, float (&ch)[2][4]) {
    float x0 = 0.0f, x1 = 0.0f, x2 = 0.0f, x3 = 0.0f;
    if (live) {
      const float* h = h_col + k_strip * 16 * TILE;
      x0 = h[0];
      x1 = h[TILE];
      x2 = h[8 * TILE];
      x3 = h[9 * TILE];
    }
    const uint32_t b0 = M::pack(x0, x1), b1 = M::pack(x2, x3);
    M::mma(ch[0], a, b0, b1);
    M::mma(ch[1], a + 4, b0, b1);
  };
#pragma unroll
  for (int k = 0; k < Cfg::kRegStrips; ++k) strip(k, &treg[k * 8], c[k & 1]);
  auto smem_strip = [&](int s, float (&ch)[2][4]) {
    uint32_t a[8];
    const uint4 a0 = *reinterpret_cast<const uint4*>(w_frag + s * 256);
    const uint4 a1 = *reinterpret_cast<const uint4*>(w_frag + s * 256 + 128);
    a[0] = a0.x, a[1] = a0.y, a[2] = a0.z, a[3] = a0.w;
    a[4] = a1.x, a[5] = a1.y, a[6] = a1.z, a[7] = a1.w;
    strip(Cfg::kRegStrips + s, a, ch);
  };
  int s = 0;
  for (; s + 2 <= n_smem_strips; s += 2) {
    smem_strip(s, c[0]);
    smem_strip(s + 1, c[1]);
  }
  if (s < n_smem_strips) smem_strip(s, c[0]);
  // Row L of the warp (this lane's) is C row L % 16 of m-tile L / 16: held by lanes 4 (L % 8) + t / 2,
  // register 2 ((L / 8) % 2) + t % 2. Every lane sends the four candidates; each keeps its own.
#pragma unroll
  for (int t = 0; t < PT; ++t) {
    const int src = ((lane & 7) << 2) | (t >> 1);
    float v[4];
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int mt = m >> 1, i = 2 * (m & 1) + (t & 1);
      v[m] = __shfl_sync(kFullMask, c[0][mt][i] + c[1][mt][i], src);
    }
    const int m = lane >> 3;  // (a select, not a dynamic index into local memory)
    acc[t] = m == 0 ? v[0] : m == 1 ? v[1] : m == 2 ? v[2] : v[3];
  }
}

// ---- non-finite states: the dense product's NaN (docs/reliability.md, "NaN and Inf") ---------
//
// Every path computes x + h @ (mask * kernel) in IEEE arithmetic: a pruned weight is a 0 that
// multiplies every h[j], so row r of example b is NaN exactly when one of the n_bad[b] non-finite
// values of b's state sits in a column that r reads with no nonzero weight. A phase whose staged
// state holds an Inf or NaN (finite phases never come here) therefore counts, per row and entry,
// the non-finite values that its nonzero slots read; fewer than n_bad means NaN. Its sum runs over
// the nonzero slots only (a padding slot's 0 * Inf would give NaN where the rule can give +-Inf),
// with the fast gather's chains and order, so the rows of finite examples keep their bits.

// counts[t] += the non-finite values of entry t in a staged plane (strided over the CTA).
template <int TILE>
__device__ __forceinline__ void count_nonfinite_plane(const float* plane, int cols, int* counts) {
  int c[TILE] = {};
  for (int j = threadIdx.x; j < cols; j += blockDim.x)
#pragma unroll
    for (int t = 0; t < TILE; ++t) c[t] += !isfinite(plane[j * TILE + t]);
#pragma unroll
  for (int t = 0; t < TILE; ++t)
    if (c[t] != 0) atomicAdd(counts + t, c[t]);
}

template <int TILE>
struct CountedSums {
  float acc[TILE];   // the lane's partial sums per entry
  int count[TILE];   // the non-finite values its nonzero slots read, per entry
};

// The slow gather: gather_plane's sums over this lane's nonzero slots only, each in the chain the
// fast gather gives it, and per entry the count of non-finite values they read. The slots are read
// from the packed arrays again (rare, and no second copy of the register tier's unrolled code).
template <class Cfg>
__device__ __forceinline__ CountedSums<Cfg::kTile> gather_plane_counting(const PersistentParams& p,
                                                                      size_t lane_base,
                                                                      const float* plane) {
  CountedSums<Cfg::kTile> out;
  float (&acc)[Cfg::kTile] = out.acc;
  int (&count)[Cfg::kTile] = out.count;
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  constexpr int TILE = Cfg::kTile;
  constexpr int CH = Cfg::kChains;
  constexpr int RS = Cfg::kRegSlots;
  static_assert(Cfg::kSmemUnroll % CH == 0, "an unrolled group of the shared tier spans whole chains");
  const Bits* values = static_cast<const Bits*>(p.values);
  const int n_smem = p.K - RS;
  const int n_grouped = n_smem - n_smem % Cfg::kSmemUnroll;  // the shared tier's unrolled slots
  float a[CH][TILE];
#pragma unroll
  for (int c = 0; c < CH; ++c)
#pragma unroll
    for (int t = 0; t < TILE; ++t) a[c][t] = 0.0f;
#pragma unroll
  for (int t = 0; t < TILE; ++t) count[t] = 0;
  for (int k = 0; k < p.K; ++k) {
    const float value = S::to_float(__ldg(values + lane_base + static_cast<size_t>(k) * 32));
    const int col = __ldg(p.indices + lane_base + static_cast<size_t>(k) * 32);
    if (value == 0.0f || col < 0) continue;  // padding, or a zero weight: the pruned 0's rule
    const int chain = k < RS ? k % CH : (k - RS < n_grouped ? (k - RS) % CH : 0);
    // (an out-of-range column is flagged at init)
    const float* h = plane + min(col, Cfg::kStateWidth * p.H - 1) * TILE;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      if (c != chain) continue;
#pragma unroll
      for (int t = 0; t < TILE; ++t) {
        a[c][t] = fmaf(value, h[t], a[c][t]);
        count[t] += !isfinite(h[t]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < TILE; ++t) {
    acc[t] = a[0][t];
#pragma unroll
    for (int c = 1; c < CH; ++c) acc[t] += a[c][t];
  }
  return out;
}

// Segmented reduction: lane l adds lane l+off while l+off is still in its row's run; after the loop
// the head lane holds the row sum. max_seg is warp-uniform.
template <int TILE, typename V>
__device__ __forceinline__ void segmented_sum(V (&v)[TILE], int seg_end, int max_seg) {
  const int lane = threadIdx.x & 31;
  for (int off = 1; off < max_seg; off <<= 1) {
    const bool take = lane + off < seg_end;
#pragma unroll
    for (int t = 0; t < TILE; ++t) {
      const V other = __shfl_down_sync(kFullMask, v[t], off);
      if (take) v[t] += other;
    }
  }
}

template <int TILE>
struct RowSums {
  float acc[TILE];
};

// A plane of a non-finite phase, start to end (every thread of the CTA calls it): the plane's
// non-finite values per entry (`counts`, two planes' worth alternating, so no barrier is needed
// after), the counting gather, the segmented sums, and the rule's NaN at the heads. Not inlined,
// so that the fast path keeps its registers. kPerWarp (a phase loop without CTA barriers: the
// self-pushes of cluster mode): each warp counts the whole plane itself, no barrier, no `counts`.
template <class Cfg, bool kPerWarp = false>
__device__ __noinline__ RowSums<Cfg::kTile> nonfinite_row_sums(const PersistentParams& p,
                                                               size_t lane_base, const float* plane,
                                                               int* counts, int seg_end, int max_seg) {
  constexpr int TILE = Cfg::kTile;
  int warp_counts[TILE] = {};  // (kPerWarp)
  if constexpr (kPerWarp) {
    for (int j = threadIdx.x & 31; j < Cfg::kStateWidth * p.H; j += 32)
#pragma unroll
      for (int t = 0; t < TILE; ++t) warp_counts[t] += !isfinite(plane[j * TILE + t]);
#pragma unroll
    for (int t = 0; t < TILE; ++t) warp_counts[t] = __reduce_add_sync(kFullMask, warp_counts[t]);
  } else {
    if (threadIdx.x < TILE) counts[threadIdx.x] = 0;
    __syncthreads();
    count_nonfinite_plane<TILE>(plane, Cfg::kStateWidth * p.H, counts);
  }
  CountedSums<TILE> sums = gather_plane_counting<Cfg>(p, lane_base, plane);
  if constexpr (!kPerWarp) __syncthreads();  // the plane's counts are complete
  segmented_sum<TILE>(sums.acc, seg_end, max_seg);
  segmented_sum<TILE>(sums.count, seg_end, max_seg);
  RowSums<TILE> out;
#pragma unroll
  for (int t = 0; t < TILE; ++t)  // (at the heads, whose sums the cells read)
    out.acc[t] = sums.count[t] < (kPerWarp ? warp_counts[t] : counts[t]) ? __int_as_float(0x7fc00000) : sums.acc[t];
  return out;
}

// ---- cluster mode (sm_90 and newer; the host never launches it on older devices) -------------

// The cluster barrier, release/acquire at cluster scope. Every thread of every CTA of the cluster
// must call it (it is .aligned). It runs twice a call: before the first phase (every peer is
// running, its mbarriers armed, before anyone writes its shared memory) and after the last (no CTA
// leaves while a peer may still write its shared memory, even where an error cut a phase short).
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

// The phases in between need no barrier: each staged copy of the state has an mbarrier that counts
// the bytes the peers push into it (st.async ... complete_tx), and a CTA waits on its own mbarrier
// before it reads the copy. (The cluster barrier a phase cost a third of a step: its arrive waits
// for every outstanding DSMEM store of the warp. The exchange probe's mbar-N mode measured this
// design at 1.4-2.1x below it: benchmarks/RESULTS.md.)
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// `arrivals` a phase (the owner thread's expect_tx, and with self-pushes one more from each other
// warp), so a phase completes when those arrivals and all its bytes are in, in any order.
__device__ __forceinline__ void mbar_init(uint64_t* mbar, uint32_t arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(mbar)), "r"(arrivals) : "memory");
#endif
}
// Makes the initialised mbarriers visible to the peers' complete_tx (before the first barrier).
__device__ __forceinline__ void mbar_init_fence() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// (The phase loop's mbarriers and flags by their shared-window addresses, formed once a call where
// registers allow: per use, each cost a special-register read and three uniform instructions on the
// step's chain.)
__device__ __forceinline__ void mbar_expect(uint32_t mbar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;"
               ::"r"(mbar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t mbar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(mbar) : "memory");
#endif
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t mbar, uint32_t parity) {
  uint32_t done = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(mbar), "r"(parity)
      : "memory");
#endif
  return done != 0;
}

// Waits, under the spin bound, until the phase of `mbar` with this parity has completed. The stall
// hook's CTA (PersistentParams::stall_cta, tests: `stalled`) waits for its own units' state, which
// it no longer writes and which so never arrives, under the bound as its peers do (a one-CTA
// cluster has no peer whose wait would time out). One loop for both: a second loop after this one
// cost the fp32 GRU's wide tier 24 bytes of spills.
__device__ __forceinline__ void wait_pushed_state(uint32_t mbar, uint32_t parity, bool stalled,
                                                  SpinControl& spin) {
  unsigned long long deadline = 0;
  for (uint32_t iter = 1; !spin.aborted && (stalled || !mbar_try_wait(mbar, parity)); ++iter) {
    if (iter % kSpinCheckPeriod == 0) spin.give_up(deadline);
  }
}

// A flag word of this CTA's shared memory, read as it is now (no cached value): by its
// shared-window address, or by its variable.
__device__ __forceinline__ int read_flag(uint32_t addr) {
  int v = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.volatile.shared::cta.u32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
#endif
  return v;
}
__device__ __forceinline__ int read_flag(const int* flag) { return *static_cast<const volatile int*>(flag); }

// N floats into the peer's shared memory at the cluster address `dst`, their bytes counted on the
// peer's mbarrier at `mbar`. The complete_tx has release semantics at cluster scope, so everything
// this thread did before (its reads of the copy the peer overwrites next, a flag store) is ordered
// before the peer sees the bytes.
template <int N>
__device__ __forceinline__ void st_async_floats(uint32_t dst, const float (&f)[N], uint32_t mbar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (N == 4) {
    asm volatile(
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
        ::"r"(dst), "r"(__float_as_uint(f[0])), "r"(__float_as_uint(f[1])), "r"(__float_as_uint(f[2])),
        "r"(__float_as_uint(f[3])), "r"(mbar) : "memory");
  } else if constexpr (N == 2) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];"
                 ::"r"(dst), "r"(__float_as_uint(f[0])), "r"(__float_as_uint(f[1])), "r"(mbar) : "memory");
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
                   ::"r"(dst + 4u * i), "r"(__float_as_uint(f[i])), "r"(mbar) : "memory");
  }
#endif
}

// Copies the TILE values of one (row, plane), already in this CTA's own staged copy at
// `local_dst`, into the same place of the CTAs of the cluster with ranks first, first + stride, ...
// < n_ranks (`local_mbar` is that copy's mbarrier; the same offsets in each peer). The lanes of a
// unit's run share its pushes this way. The own copy took plain stores from the cell lanes (seen
// after the __syncthreads that follows the next phase's wait), so no peer counts them; with
// kSelfToo (`v` is the value, not yet in the own copy) it takes a push too, counted alike. A
// non-finite value first writes `flag_value` into those CTAs' `local_flag`, this one's included
// (rare, so the finite step pays one test a value): the readers then need no pass over their copy.
// (`local_flag` is a shared-window address, or the flag's variable where the variant keeps none.)
template <int TILE, bool kSelfToo = false, class Flag>
__device__ __forceinline__ void push_tile(const float* local_dst, const float (&v)[TILE], int first,
                                          int stride, int n_ranks, uint32_t local_mbar, Flag local_flag,
                                          int flag_value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int self = static_cast<int>(cluster.block_rank());  // (%cluster_ctarank: no live register)
  bool finite = true;
#pragma unroll
  for (int t = 0; t < TILE; ++t) finite &= isfinite(v[t]);
  const uint32_t dst = smem_u32(local_dst);
  for (int r = first; r < n_ranks; r += stride) {
    if (!finite) {
      if constexpr (std::is_pointer_v<Flag>) {
        *cluster.map_shared_rank(local_flag, r) = flag_value;
      } else {
        uint32_t peer_flag;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(peer_flag) : "r"(local_flag), "r"(r));
        asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(peer_flag), "r"(flag_value) : "memory");
      }
    }
    if (kSelfToo || r != self) {
      uint32_t peer_dst, peer_mbar;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(peer_dst) : "r"(dst), "r"(r));
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(peer_mbar) : "r"(local_mbar), "r"(r));
      st_async_floats<TILE>(peer_dst, v, peer_mbar);
    }
  }
#else
  __trap();
#endif
}

// The examples one launch's CTAs run together: the whole batch in grid mode, one replica's slice in
// cluster mode. Cells index the [T, B, H] operands with b0 + b for a slice-local b in [0, n).
struct BatchSlice {
  int b0, n;
  int problem;  // the problem the slice belongs to (PersistentParams::problem_batch)
  int reverse;  // whether that problem runs from each sequence's end
};

// Where this CTA sits: its rank among the CTAs that run its slice (the layout's CTA index), their
// number, and the slice. Cheap enough to recompute where needed, which keeps them out of the
// registers of the phase loop.
__device__ __forceinline__ int cta_rank(const PersistentParams& p) {
  return p.cluster > 0 ? static_cast<int>(blockIdx.x) % p.cluster : static_cast<int>(blockIdx.x);
}
__device__ __forceinline__ int slice_ctas(const PersistentParams& p) {
  return p.cluster > 0 ? p.cluster : static_cast<int>(gridDim.x);
}
__device__ __forceinline__ int replica_of(const PersistentParams& p) {
  if (p.cluster == 0) return 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Read per use (volatile: never hoisted into a register that lives through the phase loop).
  uint32_t id;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(id));
  return static_cast<int>(id);
#else
  return static_cast<int>(blockIdx.x) / p.cluster;
#endif
}
__device__ __forceinline__ BatchSlice batch_slice(const PersistentParams& p) {
  const int r = replica_of(p);
  const int local = r % p.problem_replicas;  // the replica's rank among its problem's
  const int problem = p.first_problem + r / p.problem_replicas;
  const int b0 = local * p.replica_batch;    // (within the problem)
  return BatchSlice{problem * p.problem_batch + b0, min(p.replica_batch, p.problem_batch - b0), problem,
                    (p.reverse >> problem) & 1};
}

// Where the slice's problem's weights start: its block of values/indices and of lane_row.
__device__ __forceinline__ size_t problem_slot_base(const PersistentParams& p, const BatchSlice& bs) {
  return static_cast<size_t>(bs.problem) * static_cast<size_t>(p.problem_slots);
}
__device__ __forceinline__ size_t problem_lane_base(const PersistentParams& p, const BatchSlice& bs) {
  return static_cast<size_t>(bs.problem) * static_cast<size_t>(p.problem_lanes);
}

// The row of (step t, example gb) in a sequence operand of rows of `width` elements: [T, B, width]
// in memory, or [B, T, width] where the lowering asked XLA for the batch-major layout (so that a
// [B, T, H] call needs no transposes).
__device__ __forceinline__ size_t seq_row(const PersistentParams& p, int t, int gb) {
  return p.batch_major ? static_cast<size_t>(gb) * p.T + t : static_cast<size_t>(t) * p.B + gb;
}

// out[s_begin:T, slice] = 0 for a sequence output of rows of `width` elements (steps past the
// slice's longest sequence), strided over the CTAs that run the slice.
template <typename Elem>
__device__ void zero_steps(const PersistentParams& p, Elem* out, int width, int s_begin) {
  const BatchSlice bs = batch_slice(p);
  const int cta = cta_rank(p), n_ctas = slice_ctas(p);
  const size_t step_elems = static_cast<size_t>(bs.n) * width;
  const size_t end = static_cast<size_t>(p.T - s_begin) * step_elems;
  const size_t stride = static_cast<size_t>(n_ctas) * blockDim.x;
  for (size_t i = static_cast<size_t>(cta) * blockDim.x + threadIdx.x; i < end; i += stride) {
    const int s = s_begin + static_cast<int>(i / step_elems);
    const size_t at = i % step_elems;
    const int b = static_cast<int>(at / width);
    out[seq_row(p, s, bs.b0 + b) * width + (at - static_cast<size_t>(b) * width)] = Elem(0);
  }
}

// Every sequence output past step s_begin: seq_out (rows of kStateWidth * H: y, dz or dx) and the
// gated backward's du.
template <class Cfg>
__device__ void zero_tail_steps(const PersistentParams& p, int s_begin) {
  const int width = Cfg::kStateWidth * p.H;
  zero_steps(p, static_cast<typename Cfg::S::Bits*>(p.seq_out), width, s_begin);
  if constexpr (is_gated_backward(Cfg::kDirection)) zero_steps(p, p.du_out, width, s_begin);
  if constexpr (Cfg::kDirection == Direction::kLstm)
    if (p.cells_out != nullptr) zero_steps(p, static_cast<typename Cfg::S::Bits*>(p.cells_out), p.H, s_begin);
}

// One batch entry of the slice as a cell sees it: where its steps sit in the sequence operands.
// Built from shared memory per use, or once per call where a lane runs the same entry in every phase
// (persistent_body, kKeepEntry): at H = 256, B = 1 the per-use build (the slice and the length from
// shared memory, the layout's branches, 64-bit products) was a fifth of the step's instructions.
// Offsets count elements of an operand of rows of H (a row of G * H: the offset times G).
struct Entry {
  int b;           // in the slice; b >= the slice's n marks a partial plane's padding
  int gb;          // in the batch
  int len;         // its sequence length (0 for padding)
  int step;        // the offset from one step's row to the next (negative where the problem runs
                   // reversed; |B * H| < 2^31, checked by the handler)
  long long at0;   // the offset of step 0's row: position 0, or len - 1 when reversed
  bool valid;      // b < the slice's n
  __device__ bool runs(int s) const { return s >= 0 && s < len; }
  // The offset of step s's row (s < len), at the step's position: s, or len - 1 - s when reversed.
  // (One IMAD.WIDE: the per-use form was a chain of 64-bit products.)
  __device__ size_t at(int s) const { return static_cast<size_t>(at0 + static_cast<long long>(s) * step); }
};

__device__ __forceinline__ Entry make_entry(const PersistentParams& p, BatchSlice bs, const int* len, int b) {
  Entry e;
  e.b = b;
  e.valid = b < bs.n;
  e.gb = bs.b0 + b;
  e.len = e.valid ? len[b] : 0;
  const int step = (p.batch_major ? 1 : p.B) * p.H;
  e.step = bs.reverse ? -step : step;
  e.at0 = static_cast<long long>(seq_row(p, bs.reverse ? max(e.len - 1, 0) : 0, e.gb) * p.H);
  return e;
}

// ================================================================================================
// The cells: what a unit's cell lanes do with its gathered sums, per (phase, pass)
// ================================================================================================
//
// A unit's cell runs on its cell lanes: the first min(span, PP * TILE) lanes of the unit (its G
// gate runs, adjacent from the unit's lane), one batch entry t of the pass each, so the
// activations, the outputs' stores and the operand loads of a pass run in parallel instead of
// one entry after another on one lane (Nsight Compute, LSTM H=1024 B=32: 74% of the warp
// instructions ran on one lane). A unit whose span is narrower than the pass takes several rounds.
//
// A cell prefetches the sequence operands of one (phase, pass, entry) into registers (issued one
// pass ahead, so their latency hides behind the slot loop or the next phase's wait), then `finish`
// computes the value to publish from the entry's G gate sums and writes the outputs. `h_prev` is
// the entry's staged state (fp32), `cell` its cell-state slot (the LSTM's c, a gated backward's
// carry; unused otherwise). A gated backward cell publishes G values (its `finish` fills them).

// A cell's tanh and logistic function in the storage type S: for 16-bit layers the hardware's
// tanh.approx.f32 (one MUFU.TANH; relative error at most about 2^-11, half an fp16 ulp, before the
// rounding to S that follows every cell), where tanhf and expf's quotient are chains of about 20
// dependent instructions on the step's critical path; for float32 layers the accurate functions.
template <class S>
__device__ __forceinline__ float cell_tanh(float z) {
  if constexpr (S::kRegsPerSlot == 1) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(z));
    return y;
  } else {
    return tanhf(z);
  }
}
template <class S>
__device__ __forceinline__ float cell_sigmoid(float z) {
  if constexpr (S::kRegsPerSlot == 1) {
    return fmaf(0.5f, cell_tanh<S>(0.5f * z), 0.5f);
  } else {
    return 1.0f / (1.0f + expf(-z));
  }
}
// The simple cell's activation (sprnn_common.h's `activate`), its tanh as cell_tanh.
template <class S>
__device__ __forceinline__ float cell_activate(int64_t act, float z) {
  return act == kTanh ? cell_tanh<S>(z) : activate(act, z);
}

// The frame of every forward cell's epilogue, for batch entry b of the slice: while the example
// runs, the cell's new state `step()` (bits of D) and y at the step's position; past its end the
// state is held and y is 0; at the last phase h_final, and whatever `at_last(gb)` adds (the LSTM's
// c_final). `cell`: the LSTM's c (after step()), written like y into p.cells_out where the caller
// asked for it (null otherwise). Returns the published value (0 for the padding entries of a
// partial plane).
template <class S, class Step, class AtLast>
__device__ __forceinline__ float forward_epilogue(const PersistentParams& p, const Entry& e, int unit,
                                                  int s, int n_phases, float h_prev, Step step,
                                                  AtLast at_last, const float* cell = nullptr) {
  using Bits = typename S::Bits;
  if (!e.valid) return 0.0f;
  Bits* y = static_cast<Bits*>(p.seq_out);
  Bits* cells = cell != nullptr ? static_cast<Bits*>(p.cells_out) : nullptr;
  const int gb = e.gb;
  Bits hb;
  if (s < e.len) {
    hb = step();
    const size_t at = e.at(s) + unit;
    y[at] = hb;
    if (cells != nullptr) cells[at] = S::to_bits(*cell);
  } else {  // past this sequence's end: the state is frozen, y is 0
    hb = S::to_bits(h_prev);
    const size_t at = seq_row(p, s, gb) * p.H + unit;
    y[at] = Bits(0);
    if (cells != nullptr) cells[at] = Bits(0);
  }
  if (s + 1 == n_phases) {
    static_cast<Bits*>(p.final_out)[static_cast<size_t>(gb) * p.H + unit] = hb;
    at_last(gb);
  }
  return S::to_float(hb);
}

// The offset of (step s, entry e)'s row in a sequence operand of rows of `gates` * H, or -1 when
// the example does not run at s.
__device__ __forceinline__ long long operand_at(const Entry& e, int s, int gates) {
  return e.runs(s) ? static_cast<long long>(e.at(s) * gates) : -1;
}

template <class Cfg>
struct ForwardCell {
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  static constexpr int TILE = Cfg::kTile;
  Bits xr;

  __device__ static int phases(int n_steps) { return n_steps; }
  __device__ void init_entries(const PersistentParams&, BatchSlice, int, float*, int, int, int) {}
  __device__ static void copy_initial_carry(const PersistentParams&, BatchSlice, size_t, size_t) {}

  __device__ static void stage_initial(const PersistentParams& p, BatchSlice bs, float* h,
                                       int plane_floats, float& probe) {
    // A thread takes kColumns columns of a plane at a time: their TILE * kColumns loads are in
    // flight together (one at a time, a T = 1 call spent most of its time in this loop's L2
    // round trips), then one vector store per column. A partial plane's padding gets its 0 again.
    constexpr int kColumns = 2;
    const Bits* h0 = static_cast<const Bits*>(p.init) + static_cast<size_t>(bs.b0) * p.H;
    for (int plane = 0; plane * TILE < bs.n; ++plane) {
      const int rows = min(TILE, bs.n - plane * TILE);
      const Bits* src = h0 + static_cast<size_t>(plane) * TILE * p.H;
      for (int j0 = threadIdx.x; j0 < p.H; j0 += kColumns * blockDim.x) {
        float f[kColumns][TILE];
#pragma unroll
        for (int c = 0; c < kColumns; ++c) {
          const int j = j0 + c * blockDim.x;
#pragma unroll
          for (int t = 0; t < TILE; ++t)
            f[c][t] = j < p.H && t < rows ? S::to_float(__ldg(src + static_cast<size_t>(t) * p.H + j)) : 0.0f;
        }
#pragma unroll
        for (int c = 0; c < kColumns; ++c) {
          const int j = j0 + c * blockDim.x;
          if (j >= p.H) break;
#pragma unroll
          for (int t = 0; t < TILE; ++t) probe_finite(probe, f[c][t]);
          store_floats<TILE>(h + plane * plane_floats + j * TILE, f[c]);
        }
      }
    }
  }

  __device__ void prefetch(const PersistentParams& p, const Entry& e, int unit, int s, int /*n_steps*/) {
    const long long at = operand_at(e, s, 1);
    xr = at >= 0 ? __ldg(static_cast<const Bits*>(p.seq_a) + at + unit) : Bits(0);
  }

  __device__ float finish(const PersistentParams& p, const Entry& e, int unit, int s, int n_phases,
                          const float (&z)[1], float h_prev, float* /*cell*/) const {
    return forward_epilogue<S>(
        p, e, unit, s, n_phases, h_prev,
        [&] {
          return S::to_bits(cell_activate<S>(p.activation, z[0] + S::to_float(xr)));
        },
        [](int) {});
  }
};

template <class Cfg>
struct BackwardCell {
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  static constexpr int TILE = Cfg::kTile;
  Bits yr, dyr;  // y and dy at the step's position

  __device__ static int phases(int n_steps) { return n_steps + 1; }
  __device__ void init_entries(const PersistentParams&, BatchSlice, int, float*, int, int, int) {}
  __device__ static void copy_initial_carry(const PersistentParams&, BatchSlice, size_t, size_t) {}

  // Phase 0's matvec is never used (dh of the last step is dh_final): stage zeros.
  __device__ static void stage_initial(const PersistentParams& p, BatchSlice bs, float* h,
                                       int plane_floats, float& /*probe*/) {
    for (int i = threadIdx.x; i < p.n_planes * plane_floats; i += blockDim.x) h[i] = 0.0f;
  }

  // Phase r handles step s = n_steps - 1 - r (s = -1: the dh0 phase).
  __device__ void prefetch(const PersistentParams& p, const Entry& e, int unit, int r, int n_steps) {
    const long long at = operand_at(e, n_steps - 1 - r, 1);
    yr = at >= 0 ? __ldg(static_cast<const Bits*>(p.seq_a) + at + unit) : Bits(0);
    dyr = at >= 0 ? __ldg(static_cast<const Bits*>(p.seq_b) + at + unit) : Bits(0);
  }

  __device__ float finish(const PersistentParams& p, const Entry& e, int unit, int r, int n_phases,
                          const float (&z)[1], float /*h_prev*/, float* /*cell*/) const {
    if (!e.valid) return 0.0f;
    Bits* dx = static_cast<Bits*>(p.seq_out);
    const int s = n_phases - 2 - r;
    const int L = e.len;
    const int gb = e.gb;
    // dL/dh_s: the matvec of dz_{s+1} while the example was still running at s+1, else dh_final
    // (loaded here, not prefetched: it is needed once per example).
    const float dh = s + 1 < L ? z[0]
                               : S::to_float(__ldg(static_cast<const Bits*>(p.init) +
                                                   static_cast<size_t>(gb) * p.H + unit));
    if (s < 0) {
      static_cast<Bits*>(p.final_out)[static_cast<size_t>(gb) * p.H + unit] = S::to_bits(dh);
      return 0.0f;
    }
    if (s >= L) {  // past this sequence's end: nothing flows back through its zero outputs
      dx[seq_row(p, s, gb) * p.H + unit] = Bits(0);
      return 0.0f;
    }
    const float dz = (dh + S::to_float(dyr)) * activation_grad(p.activation, S::to_float(yr));
    dx[e.at(s) + unit] = S::to_bits(dz);
    return dz;
  }
};


// ---- the gated cells' forward recurrences (LSTM, GRU): Flax's math (docs/gated.md) -------------
//
// The layout has G gate rows per hidden unit, the rows of unit i (i, H+i, ..., (G-1)H+i) on adjacent
// runs of one warp in gate order (docs/format.md, invariant 5). After the segmented reduction each
// cell lane takes its entry's G row sums from the heads of the unit's gate runs by shuffles, runs
// the cell, writes the outputs and publishes h. Only h is exchanged: the LSTM's c stays in this
// CTA's shared memory for the whole sequence. c and h are rounded to D after every step, and the
// LSTM's h' is computed from the rounded c', as the other implementations do.

template <class Cfg>
struct GatedInputs {
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  static constexpr int G = Cfg::kGates;
  Bits xr[G];  // the unit's G input projections at the step's position

  __device__ static int phases(int n_steps) { return n_steps; }

  __device__ static void stage_initial(const PersistentParams& p, BatchSlice bs, float* h,
                                       int plane_floats, float& probe) {
    ForwardCell<Cfg>::stage_initial(p, bs, h, plane_floats, probe);
  }

  __device__ void prefetch(const PersistentParams& p, const Entry& e, int unit, int s, int /*n_steps*/) {
    const long long at = operand_at(e, s, G);
    const Bits* x = static_cast<const Bits*>(p.seq_a) + (at >= 0 ? at + unit : 0);
#pragma unroll
    for (int g = 0; g < G; ++g) xr[g] = at >= 0 ? __ldg(x + static_cast<size_t>(g) * p.H) : Bits(0);
  }

  __device__ float z(const float (&acc)[G], int g) const { return acc[g] + S::to_float(xr[g]); }
};

template <class Cfg>
struct LstmCell : GatedInputs<Cfg> {
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  static constexpr int TILE = Cfg::kTile;

  // c0 of the unit's entries b_first, b_first + b_step, ... (over every plane, padding included)
  // into their cell-state slots (`cell` is plane 0's entry 0, planes `stride` apart). The unit's
  // lanes share the work whichever lane later runs which entry: they are one warp, and a barrier
  // separates this from the first phase's cells.
  __device__ void init_entries(const PersistentParams& p, BatchSlice bs, int unit, float* cell,
                               int stride, int b_first, int b_step) {
    const Bits* c0 = static_cast<const Bits*>(p.c_init);
    for (int b = b_first; b < p.n_planes * TILE; b += b_step)
      cell[b / TILE * stride + b % TILE] =
          b < bs.n ? S::to_float(__ldg(c0 + static_cast<size_t>(bs.b0 + b) * p.H + unit)) : 0.0f;
  }

  // Every sequence of the slice is empty: c_final = c0, strided over the slice's threads.
  __device__ static void copy_initial_carry(const PersistentParams& p, BatchSlice bs, size_t first,
                                            size_t stride) {
    const Bits* c0 = static_cast<const Bits*>(p.c_init) + static_cast<size_t>(bs.b0) * p.H;
    Bits* c_final = static_cast<Bits*>(p.c_final) + static_cast<size_t>(bs.b0) * p.H;
    for (size_t i = first; i < static_cast<size_t>(bs.n) * p.H; i += stride) c_final[i] = c0[i];
  }

  __device__ float finish(const PersistentParams& p, const Entry& e, int unit, int s, int n_phases,
                          const float (&acc)[4], float h_prev, float* cell) const {
    return forward_epilogue<S>(
        p, e, unit, s, n_phases, h_prev,
        [&] {
          const float i = cell_sigmoid<S>(this->z(acc, 0)), f = cell_sigmoid<S>(this->z(acc, 1));
          const float g = cell_tanh<S>(this->z(acc, 2)), o = cell_sigmoid<S>(this->z(acc, 3));
          const float c = S::to_float(S::to_bits(f * *cell + i * g));
          *cell = c;
          return S::to_bits(o * cell_tanh<S>(c));
        },
        [&](int gb) {
          static_cast<Bits*>(p.c_final)[static_cast<size_t>(gb) * p.H + unit] = S::to_bits(*cell);
        },
        p.cells_out != nullptr ? cell : nullptr);
  }
};

template <class Cfg>
struct GruCell : GatedInputs<Cfg> {
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  float hn_bias = 0.0f;  // the unit's bias of the recurrent n term (inside the reset gate's product)

  __device__ void init_entries(const PersistentParams& p, BatchSlice bs, int unit, float*, int, int, int) {
    hn_bias = __ldg(p.hn_bias + static_cast<size_t>(bs.problem) * p.H + unit);  // (the problem's [H])
  }
  __device__ static void copy_initial_carry(const PersistentParams&, BatchSlice, size_t, size_t) {}

  __device__ float finish(const PersistentParams& p, const Entry& e, int unit, int s, int n_phases,
                          const float (&acc)[3], float h_prev, float* /*cell*/) const {
    return forward_epilogue<S>(
        p, e, unit, s, n_phases, h_prev,
        [&] {
          const float r = cell_sigmoid<S>(this->z(acc, 0)), zg = cell_sigmoid<S>(this->z(acc, 1));
          const float n = cell_tanh<S>(S::to_float(this->xr[2]) + r * (acc[2] + hn_bias));
          return S::to_bits((1.0f - zg) * n + zg * h_prev);
        },
        [](int) {});
  }
};

// ---- the gated cells' backward recurrences (docs/gated.md) --------------------------------------
//
// What jax_sprnn/gated_backward.py's scan (and the C++ kernel) computes, with the same rounding
// points, on the transposed layout: row j holds unit j's weights into every gate column, and the
// staged state is the G gate cotangents du of the step after (rounded to D, as the 16-bit product
// reads them), so a unit's row sum is the part of its dh that went through U. Phase r handles step
// s = n_steps - 1 - r of the step-ordered operands (s = -1: the carry's phase). A cell lane adds the
// carry's direct part (the GRU's dh * z; the LSTM has none), meets dy in D, runs the cell's local
// derivative from the forward's x and u, writes dx and du, and publishes du's G words. The carry
// beside dh (the LSTM's dc, the GRU's direct part) stays in shared memory, like the forward's c.
template <class Cfg>
struct GatedBackwardCell {
  using S = typename Cfg::S;
  using Bits = typename S::Bits;
  static constexpr int G = Cfg::kGates;
  static constexpr int TILE = Cfg::kTile;
  static constexpr bool kLstm = G == 4;
  Bits xr[G];    // the step's x of the unit's gates
  float ur[G];   // the step's recurrent products u = h_before @ kernel of the unit's gates
  Bits state_r;  // c_before (LSTM) or h_before (GRU)
  Bits dyr;
  float hn_bias = 0.0f;  // GRU

  __device__ static int phases(int n_steps) { return n_steps + 1; }

  // The carry beside dh per entry: the LSTM's dc starts at dc_final, the GRU's direct part at 0.
  // (Entries shared among the unit's lanes as LstmCell::init_entries does.)
  __device__ void init_entries(const PersistentParams& p, BatchSlice bs, int unit, float* cell,
                               int stride, int b_first, int b_step) {
    if constexpr (!kLstm) hn_bias = __ldg(p.hn_bias + static_cast<size_t>(bs.problem) * p.H + unit);
    const Bits* dc_final = static_cast<const Bits*>(p.c_init);
    for (int b = b_first; b < p.n_planes * TILE; b += b_step)
      cell[b / TILE * stride + b % TILE] =
          kLstm && b < bs.n ? S::to_float(__ldg(dc_final + static_cast<size_t>(bs.b0 + b) * p.H + unit)) : 0.0f;
  }

  // Every sequence of the slice is empty: the LSTM's dc0 = dc_final.
  __device__ static void copy_initial_carry(const PersistentParams& p, BatchSlice bs, size_t first,
                                            size_t stride) {
    if constexpr (kLstm) LstmCell<Cfg>::copy_initial_carry(p, bs, first, stride);
  }

  __device__ static void stage_initial(const PersistentParams& p, BatchSlice bs, float* h,
                                       int plane_floats, float& probe) {
    BackwardCell<Cfg>::stage_initial(p, bs, h, plane_floats, probe);
  }

  __device__ void prefetch(const PersistentParams& p, const Entry& e, int unit, int r, int n_steps) {
    const long long off = operand_at(e, n_steps - 1 - r, 1);  // -1: not running
    const size_t gates_at = off >= 0 ? static_cast<size_t>(off) * G + unit : 0;
    const size_t state_at = off >= 0 ? static_cast<size_t>(off) + unit : 0;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      xr[g] = off >= 0 ? __ldg(static_cast<const Bits*>(p.seq_a) + gates_at + static_cast<size_t>(g) * p.H) : Bits(0);
      ur[g] = off >= 0 ? __ldg(p.seq_u + gates_at + static_cast<size_t>(g) * p.H) : 0.0f;
    }
    state_r = off >= 0 ? __ldg(static_cast<const Bits*>(p.seq_state) + state_at) : Bits(0);
    dyr = off >= 0 ? __ldg(static_cast<const Bits*>(p.seq_b) + state_at) : Bits(0);
  }

  __device__ static float rounded(float v) { return S::to_float(S::to_bits(v)); }

  // `z[0]`: the unit's row sum of the staged du; `carry`: the entry's carry beside dh; `out`: the
  // G words to publish (du rounded to D; 0 where nothing flows).
  __device__ void finish(const PersistentParams& p, const Entry& e, int unit, int r, int n_phases,
                         const float (&z)[1], float* carry, float (&out)[G]) const {
#pragma unroll
    for (int g = 0; g < G; ++g) out[g] = 0.0f;
    if (!e.valid) return;
    const int s = n_phases - 2 - r;
    const int L = e.len;
    const int gb = e.gb;
    const size_t at_state = static_cast<size_t>(gb) * p.H + unit;
    // dh of the state step s produced: through U (plus the GRU's direct part) while the example ran
    // at s + 1, else dh_final (loaded here: it is needed once per example).
    const float dh = s + 1 < L ? rounded((kLstm ? 0.0f : *carry) + z[0])
                               : S::to_float(__ldg(static_cast<const Bits*>(p.init) + at_state));
    if (s < 0) {  // the carry's phase
      static_cast<Bits*>(p.final_out)[at_state] = S::to_bits(dh);
      if constexpr (kLstm) static_cast<Bits*>(p.c_final)[at_state] = S::to_bits(*carry);
      return;
    }
    const size_t at = seq_row(p, s, gb) * G * p.H + unit;
    Bits* dx = static_cast<Bits*>(p.seq_out) + at;
    float* du = p.du_out + at;
    float d[G];  // du of the unit's gates
    if (s >= L) {  // past the example's end: no cotangent flows, the carry is held
#pragma unroll
      for (int g = 0; g < G; ++g) {
        dx[static_cast<size_t>(g) * p.H] = Bits(0);
        du[static_cast<size_t>(g) * p.H] = 0.0f;
      }
      return;
    }
    const float dh_out = rounded(dh + S::to_float(dyr));  // the carry's and dy's parts meet in D
    if constexpr (kLstm) {
      const float i = cell_sigmoid<S>(S::to_float(xr[0]) + ur[0]), f = cell_sigmoid<S>(S::to_float(xr[1]) + ur[1]);
      const float g = cell_tanh<S>(S::to_float(xr[2]) + ur[2]), o = cell_sigmoid<S>(S::to_float(xr[3]) + ur[3]);
      const float c_prev = S::to_float(state_r);
      const float tc = cell_tanh<S>(rounded(f * c_prev + i * g));
      const float dc = rounded(*carry + rounded(dh_out * o * (1.0f - tc * tc)));
      d[0] = dc * g * (i * (1.0f - i));
      d[1] = dc * c_prev * (f * (1.0f - f));
      d[2] = dc * i * (1.0f - g * g);
      d[3] = dh_out * tc * (o * (1.0f - o));
      *carry = rounded(dc * f);
#pragma unroll
      for (int k = 0; k < G; ++k) dx[static_cast<size_t>(k) * p.H] = S::to_bits(d[k]);
    } else {
      const float rg = cell_sigmoid<S>(S::to_float(xr[0]) + ur[0]), zg = cell_sigmoid<S>(S::to_float(xr[1]) + ur[1]);
      const float a = ur[2] + hn_bias;
      const float n = cell_tanh<S>(S::to_float(xr[2]) + rg * a);
      const float dn = dh_out * (1.0f - zg) * (1.0f - n * n);
      d[0] = dn * a * (rg * (1.0f - rg));
      d[1] = (dh_out * S::to_float(state_r) - dh_out * n) * (zg * (1.0f - zg));
      d[2] = dn * rg;  // the recurrent n term's cotangent (its input part's is dn)
      *carry = rounded(dh_out * zg);
      dx[0] = S::to_bits(d[0]);
      dx[p.H] = S::to_bits(d[1]);
      dx[2 * static_cast<size_t>(p.H)] = S::to_bits(dn);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      du[static_cast<size_t>(g) * p.H] = d[g];
      out[g] = rounded(d[g]);  // the 16-bit product reads du in D
    }
  }
};

// The cell of a recurrence.
template <class Cfg>
using CellOf = std::conditional_t<
    Cfg::kDirection == Direction::kForward, ForwardCell<Cfg>,
    std::conditional_t<
        Cfg::kDirection == Direction::kBackward, BackwardCell<Cfg>,
        std::conditional_t<
            Cfg::kDirection == Direction::kLstm, LstmCell<Cfg>,
            std::conditional_t<Cfg::kDirection == Direction::kGru, GruCell<Cfg>, GatedBackwardCell<Cfg>>>>>;

// What a lane does in its unit's cell, packed into one register that the phase loop decodes per use
// (kept whole, so the loop does not hold five more registers next to the register tier):
//   bits 0-4   entry: the lane's first batch entry of a pass, 31 when it runs no cell;
//   bits 5-10  the unit's span (lanes); 11-15 the unit's lane; 16: the lane belongs to a unit;
//   bits 17-31 the lanes heading the unit's gates 1..G-1 (5 bits each; G <= 4).
struct CellLane {
  uint32_t bits;
  __device__ CellLane(bool in_unit, int offset, int span, int unit_lane, uint32_t gate_lanes, int tile)
      : bits(static_cast<uint32_t>(in_unit && offset < tile ? offset : 31) |
             (static_cast<uint32_t>(in_unit ? span : 0) << 5) | (static_cast<uint32_t>(unit_lane) << 11) |
             (static_cast<uint32_t>(in_unit) << 16) | (gate_lanes << 17)) {}
  __device__ int entry() const { return bits & 31u; }
  __device__ int span() const { return (bits >> 5) & 63u; }
  __device__ int unit_lane() const { return (bits >> 11) & 31u; }
  __device__ bool in_unit() const { return (bits >> 16) & 1u; }
  __device__ bool runs_cell(int tile) const { return entry() < tile; }
  // The head of gate g's run (g = 0: the unit's lane).
  __device__ int gate_head(int g) const { return g == 0 ? unit_lane() : (bits >> (17 + 5 * (g - 1))) & 31u; }
};

// ================================================================================================
// The persistent kernel
// ================================================================================================

// Which exchange a compiled copy of the phase loop serves: either, chosen per use from
// `PersistentParams::cluster` (one copy for both), or one of them (a copy each: see kSplitModes).
enum class ExchangeMode { kRunTime, kGrid, kCluster };

// The recurrence of one CTA (the kernel below adds the end of the call).
template <class Cfg, ExchangeMode kMode>
__device__ __forceinline__ void persistent_body(const PersistentParams& p) {
  using S = typename Cfg::S;
  using X = typename Cfg::X;
  using Bits = typename S::Bits;
  using Word = typename X::Word;
  using Slot = typename S::Slot;
  using Cell = CellOf<Cfg>;
  constexpr int TILE = Cfg::kTile;
  constexpr int RS = Cfg::kRegSlots;
  constexpr int kPassEntries = Cfg::kPlanesPerPass * TILE;  // the entries of the widest pass
  constexpr int RG = Cfg::kRowGates;    // layout rows per unit (a gated forward's G gates)
  constexpr int SW = Cfg::kStateWidth;  // state words per unit (a gated backward's G cotangents)

  // Self-pushes (the cluster copy of a tile-1 variant, where a pass's one value is in a register of
  // every lane of its unit): a CTA's own units reach its next copy by st.async too, counted on its
  // mbarrier like a peer's, so the wait alone makes the whole copy visible and no __syncthreads
  // follows it. Instead every warp arrives on the copy's mbarrier once it has read the copy's phase
  // (warp 0 with the byte count), so that no phase of a copy completes before every warp has seen
  // the one before: the mbarrier's phase parity cannot alias, and nobody overwrites a copy a warp
  // still reads.
  // Only the tiers of up to 16 register words of slots: the forward's tier of 32 (H = 1024) ran 5%
  // slower with them (H100, 2026-12-07).
  constexpr bool kSelfPush = kMode == ExchangeMode::kCluster && TILE == 1 && RS * S::kRegsPerSlot <= 16;
  // Phase s's pushed non-finite flag: four words with self-pushes (see s_pushed_nonfinite), else two.
  constexpr int kFlagMask = kSelfPush ? 3 : 1;

  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_steps;        // number of steps that do any work: max over b of lengths[b]
  __shared__ uint32_t s_error;   // layout errors found at init by this CTA
  __shared__ int s_nonfinite[2][4];  // (non-finite phases) per entry of a plane: its non-finite values
  // Cluster mode: s_pushed_nonfinite[s & kFlagMask] == s when a peer pushed an Inf or NaN of phase
  // s's staged state (push_tile). Phase numbers never repeat, so the words need no reset. Four with
  // self-pushes (below), two without: with no barrier after the wait, a warp that holds no unit may
  // read phase s's word while a peer already writes phase s+2's; phase s+4's waits for that warp's
  // arrival on the copy's mbarrier, which follows its read.
  __shared__ int s_pushed_nonfinite[kFlagMask + 1];
  // Cluster mode: s_mbar[c] counts the bytes the peers push into staged copy c in a phase, which
  // are the state of the units that other CTAs hold (s_own_units: this CTA's), or with self-pushes
  // of every unit.
  __shared__ uint64_t s_mbar[2];
  __shared__ int s_own_units;
  // This CTA's batch slice, read per use in the phase loop: from shared memory it costs one load,
  // where batch_slice() costs a dozen instructions (%clusterid is a division) and a register pair
  // kept through the loop would cost the large register tiers spills.
  __shared__ BatchSlice s_slice;
  // The planner keeps constants::kKernelSmemReserve bytes free for these (twice where the kernel
  // holds a copy of this body per exchange mode, each with its own set: kSplitModes) and for the
  // 16-byte alignment of the dynamic regions (at most 12 + 15 bytes: launch_persistent's smem plan).
  static_assert((Cfg::kSplitModes ? 2 : 1) *
                            (sizeof(s_steps) + sizeof(s_error) + sizeof(s_nonfinite) + sizeof(s_pushed_nonfinite) +
                             sizeof(s_mbar) + sizeof(s_own_units) + sizeof(s_slice)) +
                        12 + 15 <=
                    constants::kKernelSmemReserve,
                "the kernel's static shared memory outgrew the planner's reserve");

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warps_per_cta = blockDim.x >> 5;
  // Grid mode: CTA = blockIdx.x, one slice = the whole batch. Cluster mode: CTA = rank in the
  // cluster (the layout has one CTA per rank), one slice per cluster.
  const bool in_cluster = kMode == ExchangeMode::kRunTime ? p.cluster > 0 : kMode == ExchangeMode::kCluster;
  const int gwarp = cta_rank(p) * warps_per_cta + warp;
  const int H = p.H, K = p.K;
  const int n_planes = p.n_planes;
  const int n_full_planes = p.n_full_planes;
  const int partial_rem = p.partial_rem;
  const int n_smem_slots = K - RS;
  const int cols = SW * H;  // the staged state's columns
  const int plane_floats = cols * TILE;

  float* const h_stage0 = reinterpret_cast<float*>(smem);
  float* const h_stage1 = h_stage0 + (p.h_buffers == 2 ? p.h_stride : 0);
  Slot* const w_tier = reinterpret_cast<Slot*>(smem + p.w_smem_offset);
  int* const len_smem = reinterpret_cast<int*>(smem + p.len_smem_offset);
  float* const cell_state = reinterpret_cast<float*>(smem + p.cell_smem_offset);  // (LSTM, gated backward)

  // ---- init: lengths --------------------------------------------------------------------------
  if (tid == 0) {
    s_steps = 0;
    s_error = 0;
    for (int i = 0; i <= kFlagMask; ++i) s_pushed_nonfinite[i] = 0;  // (before the first cluster barrier)
    s_own_units = 0;
    s_slice = batch_slice(p);
    if (in_cluster) {
      mbar_init(&s_mbar[0], kSelfPush ? warps_per_cta : 1);
      mbar_init(&s_mbar[1], kSelfPush ? warps_per_cta : 1);
      mbar_init_fence();
    }
  }
  // The partial plane's padded batch entries are never staged: they stay 0 in both copies.
  if (partial_rem != 0) {
    float* pad0 = h_stage0 + n_full_planes * plane_floats;
    float* pad1 = h_stage1 + n_full_planes * plane_floats;
    for (int i = tid; i < plane_floats; i += blockDim.x) {
      pad0[i] = 0.0f;
      pad1[i] = 0.0f;
    }
  }
  __syncthreads();
  const BatchSlice slice = batch_slice(p);
  for (int b = tid; b < slice.n; b += blockDim.x) {
    // (no lengths: every sequence runs all T steps; else clamped, since lengths must be in [0, T])
    const int lb = slice.b0 - slice.problem * p.problem_batch + b;  // (the problems share lengths)
    const int L = p.lengths == nullptr ? p.T : min(max(__ldg(p.lengths + lb), 0), p.T);
    len_smem[b] = L;
    atomicMax(&s_steps, L);
  }

  // ---- init: which row each lane serves, and its segment for the reduction -------------------
  // (A row is a gate row of a gated forward: G*H rows, unit i's gates at i, H+i, ...)
  int row = __ldg(p.lane_row + problem_lane_base(p, slice) + static_cast<size_t>(gwarp) * 32 + lane);
  if (row < -1 || row >= RG * H) {
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
    // Every row needs exactly one head in the whole grid; finish_call compares the count with H
    // (a missing row would otherwise go unnoticed when no phase waits for it, e.g. T = 1).
    // (A problem's replicas hold the same layout: only its first one counts.)
    if (lane == 0 && heads != 0 && replica_of(p) % p.problem_replicas == 0)
      atomicAdd(p.error_flag + kHeadCountWord, __popc(heads));
  }
  // A unit's lane: the head of its (first) gate row.
  const bool is_unit = is_head && row < H;
  const uint32_t units = __ballot_sync(kFullMask, is_unit);
  if (lane == 0 && units != 0) atomicAdd(&s_own_units, __popc(units));
  // Gated cells: the lanes heading gates 1..G-1 of this lane's unit (5 bits each), which are the
  // next G-1 run starts (invariant 5); checked against their rows. Other lanes name themselves.
  uint32_t gate_lanes = 0;
  if constexpr (RG > 1) {
    uint32_t later = lane == 31 ? 0u : starts & (kFullMask << (lane + 1));
    bool bad_unit = false;
#pragma unroll
    for (int g = 1; g < RG; ++g) {
      const int src = is_unit && later ? __ffs(later) - 1 : lane;
      bad_unit |= is_unit && later == 0u;
      later &= later - 1;
      gate_lanes |= static_cast<uint32_t>(src) << (5 * (g - 1));
      const int src_row = __shfl_sync(kFullMask, row, src);
      bad_unit |= is_unit && src_row != g * H + row;
    }
    if (bad_unit) atomicOr(&s_error, kErrBadLayout);
  }
  // The cell lanes (see "The cells"): a unit's lanes run from its lane to the end of its last gate
  // run; lane unit_lane + t runs entry t of a pass for t < min(span, PP * TILE), and entries
  // t + span, t + 2 span, ... in later rounds where the span is narrower than the pass.
  const uint32_t units_upto = units & (kFullMask >> (31 - lane));
  const int unit_lane = units_upto ? 31 - __clz(units_upto) : lane;
  int last_gate_head = lane;
  if constexpr (RG > 1) last_gate_head = (gate_lanes >> (5 * (RG - 2))) & 31u;
  // One past the unit's last lane: the seg_end of its last gate's head.
  const int unit_end = __shfl_sync(kFullMask, __shfl_sync(kFullMask, seg_end, last_gate_head), unit_lane);
  const bool in_unit = units_upto != 0 && lane < unit_end;
  const int span = unit_end - unit_lane;
  // A pass of PP planes has PP * TILE entries: the rounds of a one-plane and of a two-plane pass.
  const int rounds1 = __reduce_max_sync(kFullMask, is_unit ? (TILE + span - 1) / span : 0);
  const int rounds2 = __reduce_max_sync(kFullMask, is_unit ? (kPassEntries + span - 1) / span : 0);
  CellLane cell_lane{in_unit, lane - unit_lane, span, unit_lane,
                     __shfl_sync(kFullMask, gate_lanes, unit_lane), kPassEntries};
  const int unit = __shfl_sync(kFullMask, row, unit_lane);
  // The cell-state slot of the unit in this CTA (a warp holds at most 32/RG units).
  const int unit_slot = warp * (32 / RG) + __popc(units & ((1u << unit_lane) - 1u));

  // ---- init: weights. The first RS slots stay in registers (indexed by compile-time constants
  //      only), the rest go to shared memory as [warp][slot][lane] (conflict-free).
  const Bits* values = static_cast<const Bits*>(p.values);
  const size_t lane_base = problem_slot_base(p, slice) + static_cast<size_t>(gwarp) * K * 32 + lane;
  bool bad_index = false;
  const bool byte_offsets = p.byte_offsets != 0;
  const uint32_t col_shift = byte_offsets ? (TILE == 4 ? 4u : TILE == 2 ? 3u : 2u) : 0u;
  // An out-of-range column is clamped (so the gather stays inside shared memory) and reported:
  // finish_call then replaces the outputs with NaN.
  auto make_slot = [&](Bits v, int col) {
    col = col < 0 ? ~col : col;  // padding stores ~j (docs/format.md); its value is 0
    bad_index |= static_cast<unsigned>(col) >= static_cast<unsigned>(cols);
    return S::template make_slot<TILE>(v, min(static_cast<unsigned>(col), static_cast<unsigned>(cols - 1)),
                                       col_shift);
  };
  Slot reg[Cfg::kRegArray];
  uint32_t treg[Cfg::kTileRegWords];  // a tile layout's register strips (tile_product)
  // A tile layout's shared-memory strips: this warp's, offset to this lane's first word.
  const int n_smem_strips = (K - RS) / 16;
  const uint32_t* const w_frag =
      reinterpret_cast<const uint32_t*>(w_tier) + static_cast<size_t>(warp) * n_smem_strips * 256 + lane * 4;
  if constexpr (Cfg::kTiles) {
    // Every slot is read by exactly one thread of its warp, which checks its column.
    const size_t warp_slots = problem_slot_base(p, slice) + static_cast<size_t>(gwarp) * K * 32;
    bad_index |= K % 16 != 0 || K != cols;
#pragma unroll
    for (int k = 0; k < Cfg::kRegStrips; ++k)
#pragma unroll
      for (int w = 0; w < 8; ++w)
        treg[k * 8 + w] = tile_word<S>(values, p.indices, warp_slots, k, w >> 2, w & 3, lane, bad_index);
    uint32_t* const frag = reinterpret_cast<uint32_t*>(w_tier) + static_cast<size_t>(warp) * n_smem_strips * 256;
    for (int st = 0; st < n_smem_strips; ++st) {
#pragma unroll
      for (int w = 0; w < 8; ++w)
        frag[st * 256 + (w >> 2) * 128 + lane * 4 + (w & 3)] =
            tile_word<S>(values, p.indices, warp_slots, Cfg::kRegStrips + st, w >> 2, w & 3, lane, bad_index);
    }
  }
#pragma unroll
  for (int k = 0; k < (Cfg::kTiles ? 0 : RS); ++k) {
    reg[k] = make_slot(__ldg(values + lane_base + static_cast<size_t>(k) * 32),
                       __ldg(p.indices + lane_base + static_cast<size_t>(k) * 32));
  }
  Slot* const w_lane = w_tier + static_cast<size_t>(warp) * n_smem_slots * 32 + lane;
  if constexpr (!Cfg::kTiles) {  // kBatch slots' loads in flight at a time, then their stores
    constexpr int kBatch = 4;
    const Bits* lane_values = values + lane_base + static_cast<size_t>(RS) * 32;
    const int* lane_indices = p.indices + lane_base + static_cast<size_t>(RS) * 32;
    int k = 0;
    for (; k + kBatch <= n_smem_slots; k += kBatch) {
      Bits v[kBatch];
      int col[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        v[u] = __ldg(lane_values + static_cast<size_t>(k + u) * 32);
        col[u] = __ldg(lane_indices + static_cast<size_t>(k + u) * 32);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) w_lane[static_cast<size_t>(k + u) * 32] = make_slot(v[u], col[u]);
    }
    for (; k < n_smem_slots; ++k) {
      w_lane[static_cast<size_t>(k) * 32] = make_slot(__ldg(lane_values + static_cast<size_t>(k) * 32),
                                                      __ldg(lane_indices + static_cast<size_t>(k) * 32));
    }
  }
  if (bad_index) atomicOr(&s_error, kErrBadLayout);
  const bool cta_has_rows = __syncthreads_or(row >= 0);  // also publishes s_steps, s_error, w_tier
  if (tid == 0 && s_error != 0) atomicOr(p.error_flag, s_error);
  const int n_steps = s_steps;

  if (n_steps == 0) {  // every sequence of the slice is empty: final_out = init, seq_out = 0
    const BatchSlice bs = batch_slice(p);
    const size_t first = static_cast<size_t>(bs.b0) * H;
    const Bits* init = static_cast<const Bits*>(p.init) + first;
    Bits* final_out = static_cast<Bits*>(p.final_out) + first;
    const size_t n = static_cast<size_t>(bs.n) * H;
    const size_t first_thread = static_cast<size_t>(cta_rank(p)) * blockDim.x + tid;
    const size_t n_threads = static_cast<size_t>(slice_ctas(p)) * blockDim.x;
    for (size_t i = first_thread; i < n; i += n_threads) final_out[i] = init[i];
    Cell::copy_initial_carry(p, bs, first_thread, n_threads);
    zero_tail_steps<Cfg>(p, 0);
    return;
  }

  SpinControl spin{p.error_flag, p.timeout_ns, false};
  const bool publishes = static_cast<int>(blockIdx.x) != p.stall_cta;
  Word* const xbuf0 = reinterpret_cast<Word*>(p.exchange[0]);
  Word* const xbuf1 = reinterpret_cast<Word*>(p.exchange[1]);
  const int n_full_words = n_full_planes * plane_floats;
  const int n_phases = Cell::phases(n_steps);

  // Ablation (benchmarks only): the per-phase grid barrier that the timestamps replace. Every CTA
  // must then take part in every barrier, rows or not; the tags still guard the data.
  if (p.grid_barrier && !cta_has_rows) {
    for (int s = 1; s < n_phases; ++s) cooperative_groups::this_grid().sync();
  }
  // Cluster mode: every peer must be running, its mbarriers armed for the copies that phases 1 and 2
  // read, before anyone writes its shared memory. Every CTA runs every phase, rows or not.
  // (A phase's expected bytes: the state of every unit the other CTAs hold, in every plane.)
  // (Recomputed at each use from shared memory: no register of the phase loop holds it.)
  auto pushed_bytes = [&] {
    if constexpr (kSelfPush) return static_cast<uint32_t>(H * SW * n_planes * TILE * static_cast<int>(sizeof(float)));
    return static_cast<uint32_t>(max(H - *static_cast<volatile int*>(&s_own_units), 0) * SW * n_planes *
                                 TILE * static_cast<int>(sizeof(float)));
  };
  // This thread's arrival for the next phase of a copy: the owner's with the bytes, and with
  // self-pushes each other warp's lane 0 (after its whole warp has read the copy's phase before).
  auto arm = [&](uint32_t mbar) {
    if (tid == 0) {
      mbar_expect(mbar, pushed_bytes());
    } else if (kSelfPush && lane == 0) {
      mbar_arrive(mbar);
    }
  };
  if (in_cluster) {
    if (n_phases > 1) arm(smem_u32(&s_mbar[1]));
    if (n_phases > 2) arm(smem_u32(&s_mbar[0]));
    cluster_barrier();
  }
  // Copy c's mbarrier and phase c's pushed non-finite flag (cluster mode), by their shared-window
  // addresses: formed once and kept in two registers where a cluster copy's small tier has them to
  // spare (ptxas otherwise forms each again at each use, a special-register read and three uniform
  // instructions); the other variants form them per use, as before (the larger tiers and the
  // run-time copy spilled when they kept them).
  constexpr bool kKeepAddresses = kMode == ExchangeMode::kCluster && RS * S::kRegsPerSlot <= 16;
  uint32_t mbar_addr = smem_u32(&s_mbar[0]), flag_addr = smem_u32(&s_pushed_nonfinite[0]);
  if constexpr (kKeepAddresses) {
    launder(mbar_addr);
    launder(flag_addr);
  }
  auto mbar_of = [&](int c) {
    return kKeepAddresses ? mbar_addr + c * uint32_t{sizeof(s_mbar[0])} : smem_u32(&s_mbar[c]);
  };
  auto flag_of = [&](int c) {
    if constexpr (kKeepAddresses) return flag_addr + c * uint32_t{sizeof(s_pushed_nonfinite[0])};
    else return &s_pushed_nonfinite[c];
  };
  if (cta_has_rows || in_cluster) {
    // A cell lane's operands (x, ...) are loaded a pass ahead, so that the step never waits on
    // them: the first round's, and a tile layout's every round's (its rows are one lane each, so a
    // lane runs the cells of all the pass's entries in rounds: RESULTS.md, "Dense tiles"), one
    // Cell per round. A layout whose spans are narrower than planned (an error, reported) loads
    // its later rounds in the round, and so does a variant of 64 registers a thread (1024
    // threads), where the extra operands would spill inside the phase loop.
    constexpr int kAheadRounds = Cfg::kTiles && Cfg::kMaxThreads < 1024 ? (kPassEntries + RG - 1) / RG : 1;
    Cell cells[kAheadRounds];
    // Each round's entries of the pass that starts at `first` in phase `ph`.
    // The batch entry b of the slice; the lane's own entry of the first pass from registers where
    // the variant keeps it (every phase's only entry when the slice is one pass of one round).
    const Entry own_entry = make_entry(p, s_slice, len_smem, cell_lane.entry());
    auto entry_at = [&](int b) {
      return Cfg::kKeepEntry && b == own_entry.b ? own_entry : make_entry(p, s_slice, len_smem, b);
    };
    auto prefetch_pass = [&](int ph, int first) {
#pragma unroll
      for (int r = 0; r < kAheadRounds; ++r)
        cells[r].prefetch(p, entry_at(first + cell_lane.entry() + r * cell_lane.span()), unit, ph, n_steps);
    };
    // The cell state (the LSTM's c, a gated backward's carry beside dh): [plane][unit slot][tile],
    // a warp holding 32/RG unit slots.
    const int cell_plane_floats = warps_per_cta * (32 / RG) * TILE;
    float* const unit_cell = cell_state + unit_slot * TILE;  // the LSTM's c of the unit, plane 0
    if (cell_lane.in_unit()) {
      cells[0].init_entries(p, s_slice, unit, unit_cell, cell_plane_floats,
                            lane - cell_lane.unit_lane(), cell_lane.span());
    }
#pragma unroll
    for (int r = 1; r < kAheadRounds; ++r) cells[r] = cells[0];  // (the GRU's hn_bias)
    if (cell_lane.runs_cell(kPassEntries)) prefetch_pass(0, 0);
    for (int s = 0; s < n_phases; ++s) {
      float* const h_cur = (p.h_buffers == 2 && (s & 1)) ? h_stage1 : h_stage0;

      // ---- 1. stage the state of phase s-1 ---------------------------------------------------
      float probe = 0.0f;  // turns NaN where this thread staged an Inf or NaN
      if (s == 0) {
        Cell::stage_initial(p, s_slice, h_cur, plane_floats, probe);
      } else if (in_cluster) {
        // The peers' pushes of phase s-1 into copy s&1: that copy's (s-1)/2-th phase (its
        // parity). The __syncthreads_or below then shows this CTA's own plain stores too.
        wait_pushed_state(mbar_of(s & 1), static_cast<uint32_t>((s - 1) >> 1) & 1u, !publishes, spin);
      } else {
        if (p.grid_barrier) cooperative_groups::this_grid().sync();
        const Word* src = (s & 1) ? xbuf0 : xbuf1;  // phase s-1 wrote buffer (s-1)&1
        const uint32_t tag = static_cast<uint32_t>(s) & X::kTagMask;
        if (p.exchange_vector) {
          stage_words<X, Cfg::kVecWords, Cfg::kStageUnroll>(src, h_cur, n_full_words, tag, spin, probe);
        } else {
          stage_words<X, 1, Cfg::kStageUnroll>(src, h_cur, n_full_words, tag, spin, probe);
        }
        if (partial_rem != 0) {  // the compacted [H][rem] partial plane, one word per vector
          stage_vectors<X, 1, Cfg::kStageUnroll>(
              src + n_full_words, PartialPlaneDst{h_cur + n_full_words, partial_rem, TILE},
              partial_rem * cols, tag, spin, probe);
        }
      }
      // The staged state is visible; `nonfinite` (CTA-uniform) says whether it holds an Inf or NaN.
      bool nonfinite;
      if constexpr (kSelfPush) {
        if (s > 0) {
          // The wait made the whole copy visible to this thread. A warp leaves on error by itself
          // (the others find the error flag in their waits); each warp re-arms once all its lanes
          // are past the wait.
          if (__any_sync(kFullMask, spin.aborted)) break;
          nonfinite = read_flag(flag_of(s & kFlagMask)) == s;
          if (s + 2 < n_phases) arm(mbar_of(s & 1));
        } else {
          nonfinite = __syncthreads_or(probe != probe);  // (the initial state: plain stores, no wait)
        }
      } else {
        if (__syncthreads_or(spin.aborted || probe != probe)) {
          if (__syncthreads_or(spin.aborted)) break;  // leave together on error
          nonfinite = true;
        } else {
          nonfinite = false;
        }
        if (in_cluster && s > 0) {
          // A peer's flag store came before its pushes' complete_tx (push_tile): seen with them.
          nonfinite = read_flag(flag_of(s & kFlagMask)) == s;
          // Every thread has seen copy s&1's phase complete: re-arm it for phase s+2's state.
          if (s + 2 < n_phases) arm(mbar_of(s & 1));
        }
      }

      // ---- 2. per pass of PP planes: gather, reduce, cell (see "The batch in passes") -------
      Word* const dst_buf = (s & 1) ? xbuf1 : xbuf0;
      const uint32_t out_tag = static_cast<uint32_t>(s + 1) & X::kTagMask;
      const bool last_phase = s + 1 == n_phases;
      float* const h_next = (s & 1) ? h_stage0 : h_stage1;  // cluster mode: the peers' next copy
      int plane = 0;  // the pass's first plane
      auto pass = [&](auto planes_per_pass) {
        constexpr int PP = decltype(planes_per_pass)::value;
        constexpr int PT = PP * TILE;  // the pass's entries: entry t is plane + t / TILE, column t % TILE
        const float* hp = h_cur + plane * plane_floats;
        float acc[PT];
        if (!nonfinite) {
          if constexpr (Cfg::kTiles) {  // (a tile layout's rows are one lane each: nothing to reduce)
            tile_product<Cfg, PP>(acc, treg, w_frag, n_smem_strips, hp, plane_floats);
          } else {
            const unsigned char* hp_bytes = reinterpret_cast<const unsigned char*>(hp);
            if (!S::kHasColumnForm || byte_offsets) {
              gather_planes<Cfg, true, PP>(acc, reg, w_lane, n_smem_slots, hp_bytes, plane_floats * 4);
            } else {
              gather_planes<Cfg, false, PP>(acc, reg, w_lane, n_smem_slots, hp_bytes, plane_floats * 4);
            }
            segmented_sum<PT>(acc, seg_end, max_seg);
          }
        } else {
#pragma unroll
          for (int q = 0; q < PP; ++q) {
            const RowSums<TILE> sums = nonfinite_row_sums<Cfg, kSelfPush>(
                p, problem_slot_base(p, s_slice) + static_cast<size_t>(gwarp) * K * 32 + lane,
                hp + q * plane_floats,
                s_nonfinite[(plane + q) & 1], seg_end, max_seg);
#pragma unroll
            for (int t = 0; t < TILE; ++t) acc[q * TILE + t] = sums.acc[t];
          }
        }

        // The cells, on the cell lanes: entry t's G gate sums from the heads of the unit's gate
        // runs (every lane takes part in the shuffles; each keeps its own entry's sums).
        if constexpr (!Cfg::kDecodeOnce) launder(cell_lane.bits);  // (decoded per pass, not kept)
        const int rounds = PP == 1 ? rounds1 : rounds2;
        // One entry a pass: one round, entry 0, run by the unit's lane alone, said as constants so
        // that the entry's plane, column and address fold away. (Not the simple cell's backward,
        // whose tile-1 tiers spilled 8-50 bytes with it.)
        constexpr bool kOneEntry = PT == 1 && Cfg::kDirection != Direction::kBackward;
        float out[SW] = {};  // the words this lane publishes for its entry (a gated backward: G)
        // Round r of the pass (rounds is warp-uniform: 1 unless a span < PT), its operands in
        // `cell`, loaded ahead unless `load`.
        auto run_round = [&](int r, Cell& cell, bool load) {
          const int t = kOneEntry ? 0 : cell_lane.entry() + r * cell_lane.span();
          const bool runs = kOneEntry ? cell_lane.entry() == 0 : t < PT;
          float z[RG];
          if constexpr (Cfg::kTiles && RG == 1) {
            // A tile layout's simple-cell row is one lane, its own cell lane: its sums, no shuffle.
            z[0] = 0.0f;
#pragma unroll
            for (int u = 0; u < PT; ++u)
              if (u == t) z[0] = acc[u];
          } else if constexpr (RG == 1 && PT == 1) {
            // One entry a pass: its one cell lane is its unit's lane, the head of the row's run,
            // which holds the row's sum (segmented_sum): no shuffle on the step's chain.
            z[0] = acc[0];
          } else {
#pragma unroll
            for (int g = 0; g < RG; ++g) {
              const int src = cell_lane.gate_head(g);
              z[g] = 0.0f;
#pragma unroll
              for (int u = 0; u < PT; ++u) {
                const float v = __shfl_sync(kFullMask, acc[u], src);
                if (u == t) z[g] = v;
              }
            }
          }
          if (runs) {
            const int pl = plane + t / TILE;  // the entry's plane and its column in the plane
            const int tt = t % TILE;
            const Entry e = entry_at(plane * TILE + t);
            if (load) cell.prefetch(p, e, unit, s, n_steps);
            float* const unit_entry_cell = unit_cell + pl * cell_plane_floats + tt;
            if constexpr (SW == 1) {
              out[0] = cell.finish(p, e, unit, s, n_phases, z,
                                   h_cur[pl * plane_floats + unit * TILE + tt], unit_entry_cell);
            } else {
              cell.finish(p, e, unit, s, n_phases, z, unit_entry_cell, out);
            }
#pragma unroll
            for (int w = 0; w < SW; ++w) {  // word w of the unit is column w * H + unit
              const int col = w * H + unit;
              if (!in_cluster && publishes && !last_phase) {  // nobody reads the last phase's words
                const Word word = X::make_word(out[w], out_tag);
                if (pl < n_full_planes) {
                  st_relaxed(dst_buf + pl * plane_floats + col * TILE + tt, word);
                } else if (tt < partial_rem) {
                  st_relaxed(dst_buf + n_full_words + col * partial_rem + tt, word);
                }
              }
              if constexpr (!kSelfPush) {
                if (in_cluster && publishes && !last_phase) {  // this CTA's own copy (pushed below)
                  h_next[pl * plane_floats + col * TILE + tt] = out[w];
                }
              }
            }
          }
        };
        if constexpr (kAheadRounds > 1) {
#pragma unroll
          for (int r = 0; r < kAheadRounds; ++r)
            if (r < rounds) run_round(r, cells[r], false);
          for (int r = kAheadRounds; r < rounds; ++r) run_round(r, cells[0], true);
        } else {
          if constexpr (kOneEntry) {
            run_round(0, cells[0], false);  // (a warp without units runs it on no lane)
          } else {
            for (int r = 0; r < rounds; ++r) run_round(r, cells[0], r > 0);
          }
        }
        // The operands of the next (phase, pass).
        if (cell_lane.runs_cell(kPassEntries)) {
          if (plane + PP < n_planes) {
            prefetch_pass(s, (plane + PP) * TILE);
          } else if (s + 1 < n_phases) {
            prefetch_pass(s + 1, 0);
          }
        }
        if (in_cluster && publishes && !last_phase) {
          // Into the other staged copy of every peer: the cell lanes stored the pass's new values
          // in this CTA's copy (in one round or several, where a span is narrower than the pass);
          // every lane of the unit reads a plane's TILE of them back as one vector, and lane j of a
          // span of n lanes pushes it to ranks j, j + n, ... (a gated forward's lanes push h only).
          // One entry a pass (PT == 1): the unit's lane computed it, and the other lanes take it by
          // shuffle rather than back from the own copy (no store-to-load round trip on the chain).
          if constexpr (PT != 1) __syncwarp();  // the cell lanes' stores, seen by their units' lanes
#pragma unroll
          for (int q = 0; q < PP; ++q) {
#pragma unroll
            for (int w = 0; w < SW; ++w) {
              const float* own = h_next + (plane + q) * plane_floats + (w * H + unit) * TILE;
              float v[TILE];
              if constexpr (PT == 1) v[0] = __shfl_sync(kFullMask, out[w], cell_lane.unit_lane());
              if (cell_lane.in_unit()) {
                if constexpr (PT != 1) load_floats<TILE>(own, v);
                push_tile<TILE, kSelfPush>(own, v, lane - cell_lane.unit_lane(), cell_lane.span(), p.cluster,
                                           mbar_of((s + 1) & 1), flag_of((s + 1) & kFlagMask), s + 1);
              }
            }
          }
        }
      };
      while (plane < n_planes) {  // warp-uniform: two planes a pass while two remain
        if (Cfg::kPlanesPerPass == 2 && plane + 1 < n_planes) {
          pass(std::integral_constant<int, Cfg::kPlanesPerPass>{});
          plane += Cfg::kPlanesPerPass;
        } else {
          pass(std::integral_constant<int, 1>{});
          plane += 1;
        }
      }
      if (!in_cluster && p.h_buffers == 1) {
        __syncthreads();  // with one staged copy, the next staging must wait for every gather
      }
    }
    // (After a normal last phase every push has landed and been waited for; after an error, a peer
    // may still be pushing into this CTA, which must stay resident until then.)
    if (in_cluster && n_phases > 1) cluster_barrier();
  }
  zero_tail_steps<Cfg>(p, n_steps);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kMaxThreads, 1)
    sprnn_persistent_kernel(const __grid_constant__ PersistentParams p) {
  if constexpr (Cfg::kSplitModes) {
    if (p.cluster > 0) {
      persistent_body<Cfg, ExchangeMode::kCluster>(p);
    } else {
      persistent_body<Cfg, ExchangeMode::kGrid>(p);
    }
  } else {
    persistent_body<Cfg, ExchangeMode::kRunTime>(p);
  }
  finish_call(p.error_flag, p.finish);
}

// ================================================================================================
// The instantiation set and its lookup (explicitly instantiated in the units CMakeLists.txt
// generates: per (direction, dtype), and for the simple cell per group of batch tile and planes a
// pass)
// ================================================================================================

template <Direction DIR, typename T, int TILE, int PP, int RS, bool TILES = false>
PersistentKernelFn pick_variant(int threads) {
  constexpr bool packed16 = Storage<T>::kRegsPerSlot == 1;
  using Narrow = PersistentConfig<DIR, T, TILE, RS, false, PP, TILES>;
  if (threads > 0 && threads <= Narrow::kMaxThreads) return &sprnn_persistent_kernel<Narrow>;
  if constexpr (persistent_has_wide(DIR, packed16, RS)) {
    using Wide = PersistentConfig<DIR, T, TILE, RS, true, PP, TILES>;
    if (threads <= Wide::kMaxThreads) return &sprnn_persistent_kernel<Wide>;
  } else {
    if (threads <= 0) return &sprnn_persistent_kernel<Narrow>;
  }
  return nullptr;
}

template <Direction DIR, typename T, int TILE, int PP, bool TILES = false, int... RS>
PersistentKernelFn pick_reg_slots(int rs, int threads, std::integer_sequence<int, RS...>) {
  PersistentKernelFn fn = nullptr;
  ((rs == RS ? (fn = pick_variant<DIR, T, TILE, PP, RS, TILES>(threads), 0) : 0), ...);
  return fn;
}

template <Dtype DT>
struct DtypeOf;
template <>
struct DtypeOf<Dtype::kF32> {
  using type = float;
  using slots = RegSlots32;
  using gated_slots = RegSlotsGated32;
};
template <>
struct DtypeOf<Dtype::kF16> {
  using type = __half;
  using slots = RegSlots16;
  using gated_slots = RegSlotsGated16;
};
template <>
struct DtypeOf<Dtype::kBF16> {
  using type = __nv_bfloat16;
  using slots = RegSlots16;
  using gated_slots = RegSlotsGated16;
};

// One group of a (direction, dtype)'s kernels: a batch tile, planes a pass, and slot or tile
// layout, over every register tier. nullptr where the group has no kernels (tile layouts are the
// 16-bit forward recurrences' only: persistent.h, has_tile_variants).
template <Direction DIR, Dtype DT, int TILE, int PP, bool TILES>
PersistentKernelFn lookup_persistent_group(int rs, int threads) {
  using T = typename DtypeOf<DT>::type;
  if constexpr (TILES) {
    if constexpr (has_tile_variants(DIR, DT) && TILE == 4) {
      using TileSeq = std::conditional_t<is_gated(DIR), TileRegSlotsGated16, TileRegSlots16>;
      return pick_reg_slots<DIR, T, 4, PP, true>(rs, threads, TileSeq{});
    } else {
      return nullptr;
    }
  } else {
    using Seq = std::conditional_t<is_gated(DIR), typename DtypeOf<DT>::gated_slots,
                                   typename DtypeOf<DT>::slots>;
    return pick_reg_slots<DIR, T, TILE, PP>(rs, threads, Seq{});
  }
}

#ifdef JAX_SPRNN_KERNEL_STUB
// A unit of a dtype left out of the build (CMake's JAX_SPRNN_KERNEL_DTYPES): no layout has a kernel.
template <Direction DIR, Dtype DT>
PersistentKernelFn lookup_persistent_kernel(int, int, int, int, bool) { return nullptr; }
#else
template <Direction DIR, Dtype DT>
PersistentKernelFn lookup_persistent_kernel(int tile, int rs, int threads, int planes_per_pass, bool tiles) {
  if (tiles) {  // a tile layout: tile 4
    if (tile != 4) return nullptr;
    if (planes_per_pass == 2) return lookup_persistent_group<DIR, DT, 4, 2, true>(rs, threads);
    return planes_per_pass == 1 ? lookup_persistent_group<DIR, DT, 4, 1, true>(rs, threads) : nullptr;
  }
  if (planes_per_pass == 2) return tile == 4 ? lookup_persistent_group<DIR, DT, 4, 2, false>(rs, threads) : nullptr;
  if (planes_per_pass != 1) return nullptr;
  switch (tile) {
    case 1: return lookup_persistent_group<DIR, DT, 1, 1, false>(rs, threads);
    case 2: return lookup_persistent_group<DIR, DT, 2, 1, false>(rs, threads);
    case 4: return lookup_persistent_group<DIR, DT, 4, 1, false>(rs, threads);
    default: return nullptr;
  }
}
#endif

// The build's translation units (generated by CMakeLists.txt): one per (recurrence, dtype) that
// instantiates lookup_persistent_kernel, and through it its groups; for the simple cell's
// recurrences, the largest, that unit declares the groups of one-plane and two-plane passes
// extern and one unit per such group instantiates it.
#define JAX_SPRNN_EXTERN_GROUP(DIR, DT, TILE, PP, TILES) \
  extern template PersistentKernelFn lookup_persistent_group<DIR, DT, TILE, PP, TILES>(int, int);
#ifdef JAX_SPRNN_KERNEL_STUB
#define JAX_SPRNN_INSTANTIATE_GROUP(DIR, DT, TILE, PP, TILES)
#else
#define JAX_SPRNN_INSTANTIATE_GROUP(DIR, DT, TILE, PP, TILES) \
  template PersistentKernelFn lookup_persistent_group<DIR, DT, TILE, PP, TILES>(int, int);
#endif

}  // namespace jax_sprnn::cuda
