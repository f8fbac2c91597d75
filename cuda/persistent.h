// What the host code and the kernel instantiations of the persistent recurrence share: the protocol
// constants, the kernel parameters, the instantiation set and its lookup (see persistent_kernel.cuh
// for the kernel, cuda_persistent.cu for the handlers). Compiled by nvcc only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "jax_sprnn_constants.h"  // generated from jax_sprnn/_constants.py

namespace jax_sprnn::cuda {

// ---- protocol constants --------------------------------------------------------------------------
// Workspace: [header][exchange buffer 0][exchange buffer 1]; its size is constants::cuda_workspace_bytes.
constexpr int kHeaderBytes = static_cast<int>(constants::kWorkspaceHeaderBytes);
constexpr int kHeadCountWord = 1;        // header word counting head lanes (must end up == H)
constexpr int kDoneCountWord = 2;        // header word counting the CTAs that finished (finish_call)
constexpr uint32_t kErrTimeout = 1u;     // a spin exceeded its bound
constexpr uint32_t kErrBadLayout = 2u;   // the packed layout broke an invariant
constexpr int64_t kDefaultSpinTimeoutUs = constants::kDefaultSpinTimeoutUs;
constexpr int kMaxThreadsPerCta = 1024;
using constants::cuda_workspace_bytes;

// The header holds the error word and the head count, and keeps the exchange buffers after it
// 16-byte aligned (vector accesses).
static_assert(kHeaderBytes % 16 == 0 && kHeaderBytes >= (kDoneCountWord + 1) * 4,
              "the workspace header must hold its words and keep the buffers 16-byte aligned");
static_assert(constants::kExchangeBuffers == 2, "the kernels double-buffer the exchange");
static_assert(constants::kMaxProblems <= 31, "PersistentParams::reverse (an int) holds one bit per problem");

// The recurrences that run as one persistent kernel. They share the packed-weight tiers, the
// staging of the exchanged state and the gather; they differ in the cell (epilogue) and the word
// they exchange (persistent_kernel.cuh: ForwardCell, BackwardCell, LstmCell, GruCell). kLstm and
// kGru are the gated cells' forward recurrences, on a layout of G gate rows per hidden unit;
// kLstmBackward and kGruBackward their backward recurrences, on the transposed layout (one row per
// unit over G*H columns), which exchange the G gate cotangents of every unit.
enum class Direction { kForward, kBackward, kLstm, kGru, kLstmBackward, kGruBackward };
// G: the cell's gates (1 for the simple cell).
constexpr int gates_of(Direction d) {
  return d == Direction::kLstm || d == Direction::kLstmBackward ? 4
         : d == Direction::kGru || d == Direction::kGruBackward ? 3
                                                                : 1;
}
constexpr bool is_gated_backward(Direction d) {
  return d == Direction::kLstmBackward || d == Direction::kGruBackward;
}
constexpr bool is_backward_direction(Direction d) { return d == Direction::kBackward || is_gated_backward(d); }
// Layout rows per hidden unit (a gated forward's G gate rows), and words exchanged per unit and
// example (a gated backward's G gate cotangents): the state a step stages is state_width_of * H wide.
constexpr int row_gates_of(Direction d) { return is_gated_backward(d) ? 1 : gates_of(d); }
constexpr int state_width_of(Direction d) { return is_gated_backward(d) ? gates_of(d) : 1; }
enum class Dtype { kF32, kF16, kBF16 };

// Whether this build holds dt's persistent kernels (CMake's JAX_SPRNN_KERNEL_DTYPES; all by default).
constexpr bool kernels_built(Dtype dt) {
#ifdef JAX_SPRNN_KERNEL_DTYPE_MASK
  return ((JAX_SPRNN_KERNEL_DTYPE_MASK >> static_cast<int>(dt)) & 1) != 0;
#else
  return true;
#endif
}
// Why a call in a dtype without kernels is refused (the handler's and kernel_attributes' message).
inline std::string kernels_missing(const std::string& dtype) {
  return "this build has no " + dtype + " persistent kernels (built with a subset in JAX_SPRNN_KERNEL_DTYPES)";
}

// ---- the end of a call (persistent_kernel.cuh: finish_call; deferred_errors.h) -------------------
// The outputs a failed call fills with NaN: a recurrence's sequence, final state, the LSTM's c_final
// and cell states, a gated backward's du.
constexpr int kMaxFinishOutputs = 5;
struct FinishOutput {
  void* data;
  unsigned long long n;  // elements
  uint32_t nan_bits;     // a quiet NaN of the element type
  int bytes;             // 2 or 4
};
struct FinishParams {
  FinishOutput out[kMaxFinishOutputs];
  int n_out;
  long long expected_heads;  // the layout's rows (each has exactly one head lane); < 0: no check
  uint32_t* host_word;       // device view of this call's pinned error slot (deferred_errors.h); null: none
};

// ---- kernel parameters (computed by the host; passed as a __grid_constant__) --------------------
//
//                forward             backward
//   seq_a        x      [T, B, H]    y  [T, B, H] (the forward outputs)
//   seq_b        -                   dy [T, B, H]
//   init         h0     [B, H]       dh_final [B, H]
//   seq_out      y      [T, B, H]    dx [T, B, H] (dL/dz per position)
//   final_out    h_final [B, H]      dh0 [B, H]
// The gated cells' forward (kLstm, kGru) reads seq_a = x [T, B, G*H] and, for the LSTM, c_init
// (c0 [B, H]) and writes c_final; the GRU reads hn_bias [H] (float32).
// Their backward (kLstmBackward, kGruBackward; operands in step order, time-major, never reversed):
//   seq_a x [T, B, G*H], seq_u u = h_before @ kernel [T, B, G*H] (float32), seq_b dy [T, B, H],
//   seq_state c_before (LSTM) or h_before (GRU) [T, B, H], init dh_final, c_init dc_final (LSTM),
//   hn_bias (GRU) -> seq_out dx [T, B, G*H], du_out du [T, B, G*H] (float32), final_out dh0,
//   c_final dc0 (LSTM).
struct PersistentParams {
  const void* seq_a;
  const void* seq_b;
  const void* init;
  const void* values;    // [NW*K*32] D
  const int32_t* indices;
  const int32_t* lane_row;
  const int32_t* lengths;  // [B], or null: every sequence runs all T steps
  void* seq_out;
  void* final_out;
  const void* c_init;    // LSTM: c0 [B, H]
  void* c_final;         // LSTM: c_final [B, H]
  const float* hn_bias;  // GRU: the recurrent n term's bias [H]
  const float* seq_u;      // gated backward: the recurrent products u [T, B, G*H]
  const void* seq_state;   // gated backward: c_before (LSTM) or h_before (GRU) [T, B, H]
  float* du_out;           // gated backward: du [T, B, G*H]
  void* cells_out;         // LSTM forward: c after each position [T, B, H] (like y), or null
  uint32_t* error_flag;  // workspace header word 0
  unsigned char* exchange[2];
  int T, B, H, K;       // B: the whole batch (the stride of the [T, B, H] operands)
  // Exchange mode. 0: grid mode, one cooperative grid runs the layer and the state goes through the
  // L2 exchange buffers. N > 0: cluster mode, the layer runs inside one thread-block cluster of N
  // CTAs (the layout's CTAs) and the state is pushed into every peer's shared memory (DSMEM), one
  // cluster barrier a step; the grid is R such clusters, replica r running examples
  // [r * replica_batch, min(B, (r + 1) * replica_batch)).
  int cluster;
  int replica_batch;     // examples per replica (B in grid mode); the last replica may have fewer
  // Independent problems in one launch (a bidirectional layer's two directions): examples
  // [q * problem_batch, (q + 1) * problem_batch) are problem q, which has its own weights (the
  // q-th block of problem_slots slots in values/indices, of problem_lanes entries in lane_row),
  // runs from its end where bit q of `reverse` is set, and reads lengths[0, problem_batch).
  // Cluster mode: problem_replicas clusters per problem, problem-major. Grid mode: one launch per
  // problem, first_problem being its index. One problem: problem_batch = B, first_problem = 0.
  int problem_batch;
  int problem_replicas;
  int first_problem;
  int problem_lanes;
  long long problem_slots;
  // The batch planes of one replica (the last replica's surplus planes hold no example and compute
  // zeros): parameters rather than values computed in the kernel, which has no register to spare.
  int n_planes;          // ceil(replica_batch / tile)
  int n_full_planes;     // replica_batch / tile
  int partial_rem;       // replica_batch % tile
  int activation;
  int reverse;           // bit q: problem q runs from each sequence's last valid step
  int batch_major;       // the sequence operands are [B, T, width] in memory (else [T, B, width])
  int h_buffers;         // staged copies of the state in shared memory: 2 (one __syncthreads a step) or 1
  int h_stride;          // floats from one staged copy to the next: ceil(replica_batch/tile)*H*tile, rounded up to 4
  int w_smem_offset;     // bytes: start of the shared-memory weight tier
  int cell_smem_offset;  // bytes: the cell state [plane][unit slot][tile] (LSTM c, gated backward carry)
  int len_smem_offset;   // bytes: start of the clamped lengths
  int exchange_vector;   // 1: the exchange buffers are 16-byte aligned, use vector accesses
  int byte_offsets;      // 16-bit D: slots hold byte offsets (H * tile * 4 <= 65536), else columns
  int stall_cta;         // test hook: this CTA never publishes (-1: none)
  int grid_barrier;      // ablation only: a grid-wide barrier before each phase's staging
  unsigned long long timeout_ns;
  FinishParams finish;
};

using PersistentKernelFn = void (*)(PersistentParams);

// ---- the instantiation set -----------------------------------------------------------------------
//
// Register-tier sizes, and per size the launch bound (a multiple of 128 threads) and staging unroll
// of its variants: jax_sprnn/_constants.py holds them (PERSISTENT_TIERS_16/32, where the bounds are
// explained) and the planner derives its thread limits from the same tables. Two variants:
//   narrow: at most 512 threads, with room for more staging vectors in flight per thread;
//   wide:   more threads (for layouts whose CTAs need them) at a tighter register cap and fewer
//           staging vectors per thread; instantiated only where it raises the bound.
// Both directions use the same bounds, so a layout planned for the forward kernel also runs
// backward.
using constants::RegSlots16;  // 16-bit types hold one slot per register
using constants::RegSlots32;  // float32 two, so its set stops where its budget reaches 255 registers
using constants::RegSlotsGated16;  // the gated cells' smaller sets (_constants.py says why)
using constants::RegSlotsGated32;
constexpr bool is_gated(Direction d) { return gates_of(d) > 1; }
constexpr int max_threads_of_variant(Direction d, bool packed16, int rs, bool wide) {
  return is_gated(d) ? constants::gated_max_threads(packed16, rs, wide)
                     : constants::persistent_max_threads(packed16, rs, wide);
}
constexpr int stage_unroll_of_variant(Direction d, bool packed16, int rs, bool wide) {
  return is_gated(d) ? constants::gated_stage_unroll(packed16, rs, wide)
                     : constants::persistent_stage_unroll(packed16, rs, wide);
}
constexpr bool persistent_has_wide(Direction d, bool packed16, int rs) {
  return max_threads_of_variant(d, packed16, rs, true) > max_threads_of_variant(d, packed16, rs, false);
}

// The kernel of (direction, dtype, tile, reg_slots) for a CTA of `threads` threads: the narrow
// variant when it fits, else the wide one when it exists and fits, else nullptr. threads <= 0 asks
// for the variant with the largest bound. Each (direction, dtype) is compiled in translation units
// of its own (generated by CMakeLists.txt), so the build runs them in parallel.
template <Direction D, Dtype T>
PersistentKernelFn lookup_persistent_kernel(int tile, int reg_slots, int threads, int planes_per_pass,
                                            bool tiles);

// Defined only in the instance translation units: other TUs must not instantiate the kernels.
#define JAX_SPRNN_EXTERN_LOOKUPS(DIR)                                                            \
  extern template PersistentKernelFn lookup_persistent_kernel<DIR, Dtype::kF32>(int, int, int, int, bool);  \
  extern template PersistentKernelFn lookup_persistent_kernel<DIR, Dtype::kF16>(int, int, int, int, bool);  \
  extern template PersistentKernelFn lookup_persistent_kernel<DIR, Dtype::kBF16>(int, int, int, int, bool);
JAX_SPRNN_EXTERN_LOOKUPS(Direction::kLstm)
JAX_SPRNN_EXTERN_LOOKUPS(Direction::kGru)
JAX_SPRNN_EXTERN_LOOKUPS(Direction::kLstmBackward)
JAX_SPRNN_EXTERN_LOOKUPS(Direction::kGruBackward)
#undef JAX_SPRNN_EXTERN_LOOKUPS
extern template PersistentKernelFn lookup_persistent_kernel<Direction::kForward, Dtype::kF32>(int, int, int, int, bool);
extern template PersistentKernelFn lookup_persistent_kernel<Direction::kForward, Dtype::kF16>(int, int, int, int, bool);
extern template PersistentKernelFn lookup_persistent_kernel<Direction::kForward, Dtype::kBF16>(int, int, int, int, bool);
extern template PersistentKernelFn lookup_persistent_kernel<Direction::kBackward, Dtype::kF32>(int, int, int, int, bool);
extern template PersistentKernelFn lookup_persistent_kernel<Direction::kBackward, Dtype::kF16>(int, int, int, int, bool);
extern template PersistentKernelFn lookup_persistent_kernel<Direction::kBackward, Dtype::kBF16>(int, int, int, int, bool);

template <Direction D>
PersistentKernelFn lookup_of_dtype(Dtype dt, int tile, int rs, int threads, int pp, bool tiles) {
  switch (dt) {
    case Dtype::kF32: return lookup_persistent_kernel<D, Dtype::kF32>(tile, rs, threads, pp, tiles);
    case Dtype::kF16: return lookup_persistent_kernel<D, Dtype::kF16>(tile, rs, threads, pp, tiles);
    case Dtype::kBF16: return lookup_persistent_kernel<D, Dtype::kBF16>(tile, rs, threads, pp, tiles);
  }
  return nullptr;
}

// planes_per_pass: 1, or 2 for the variant that gathers two batch planes a pass (tile 4 only;
// persistent_kernel.cuh, "The batch in passes"). tiles: the tensor-core variant of a tile layout
// (has_tile_variants). nullptr where no such kernel exists.
inline PersistentKernelFn lookup_persistent(Direction dir, Dtype dt, int tile, int rs, int threads,
                                            int planes_per_pass = 1, bool tiles = false) {
  const int pp = planes_per_pass;
  switch (dir) {
    case Direction::kForward: return lookup_of_dtype<Direction::kForward>(dt, tile, rs, threads, pp, tiles);
    case Direction::kBackward: return lookup_of_dtype<Direction::kBackward>(dt, tile, rs, threads, pp, tiles);
    case Direction::kLstm: return lookup_of_dtype<Direction::kLstm>(dt, tile, rs, threads, pp, tiles);
    case Direction::kGru: return lookup_of_dtype<Direction::kGru>(dt, tile, rs, threads, pp, tiles);
    case Direction::kLstmBackward:
      return lookup_of_dtype<Direction::kLstmBackward>(dt, tile, rs, threads, pp, tiles);
    case Direction::kGruBackward:
      return lookup_of_dtype<Direction::kGruBackward>(dt, tile, rs, threads, pp, tiles);
  }
  return nullptr;
}

// Tile layouts (docs/format.md) run on tensor cores in the 16-bit forward recurrences; their
// register tiers are constants::TileRegSlots16 / TileRegSlotsGated16 (whole 16-slot strips).
constexpr bool has_tile_variants(Direction d, Dtype dt) {
  return dt != Dtype::kF32 && (d == Direction::kForward || d == Direction::kLstm || d == Direction::kGru);
}
using constants::TileRegSlots16;
using constants::TileRegSlotsGated16;

template <int... RS>
std::vector<int> to_vector(std::integer_sequence<int, RS...>) {
  return {RS...};
}

inline std::vector<int> tile_reg_slots_for(Direction dir) {
  return is_gated(dir) ? to_vector(TileRegSlotsGated16{}) : to_vector(TileRegSlots16{});
}

inline std::vector<int> reg_slots_for(Direction dir, Dtype dt) {
  if (is_gated(dir)) return dt == Dtype::kF32 ? to_vector(RegSlotsGated32{}) : to_vector(RegSlotsGated16{});
  return dt == Dtype::kF32 ? to_vector(RegSlots32{}) : to_vector(RegSlots16{});
}

// The largest launch bound over the variants of one (direction, dtype, reg_slots); the tile does
// not matter.
inline int max_threads_of(Direction dir, Dtype dt, int rs) {
  const bool packed16 = dt != Dtype::kF32;
  return std::max(max_threads_of_variant(dir, packed16, rs, false),
                  persistent_has_wide(dir, packed16, rs) ? max_threads_of_variant(dir, packed16, rs, true) : 0);
}

}  // namespace jax_sprnn::cuda
