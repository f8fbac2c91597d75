// XLA FFI handlers of the persistent recurrences (forward, backward): the operand checks, the
// shared-memory plan, co-residency, the in-stream workspace reset and the launch (the kernel ends
// the call itself: deferred_errors.h says how errors are reported). The kernels are in
// persistent_kernel.cuh and are compiled in the units CMakeLists.txt generates.
//
// Each recurrence has two targets sharing one implementation: the production one
// (jax_sprnn_forward / jax_sprnn_backward, the layout attributes only) and a hooked one
// (*_hooked, for tests and the ablation benchmark: the TestHooks attributes too), which the
// CUDA module hands out separately, in testing_registrations().

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "cuda_host.h"
#include "cuda_kernels.h"
#include "deferred_errors.h"
#include "ffi_bindings.h"
#include "ffi_checks.h"
#include "persistent_kernel.cuh"
#include "sprnn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_sprnn::cuda {
namespace {

// ================================================================================================
// Host: one persistent launch, for either direction
// ================================================================================================

// Shared-memory plan of one persistent launch.
struct SmemPlan {
  int h_stride = 0;
  int h_buffers = 0;
  int w_offset = 0;
  int cell_offset = 0;
  int len_offset = 0;
  int total = 0;
};

// The operands of one call, after its handler checked their dtypes and shapes.
struct PersistentCall {
  const char* name;  // the FFI target, for messages
  Direction direction;  // the recurrence: its cell, layout rows per unit and state width
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
  const void* c_init = nullptr;     // LSTM: c0
  void* c_final = nullptr;          // LSTM: c_final
  const float* hn_bias = nullptr;   // GRU: hn_bias
  const float* seq_u = nullptr;     // gated backward: u [T, B, G*H]
  const void* seq_state = nullptr;  // gated backward: c_before (LSTM) / h_before (GRU)
  float* du_out = nullptr;          // gated backward: du [T, B, G*H]
  void* cells_out = nullptr;        // LSTM forward: c after each position [T, B, H], or none
  // Independent problems of B / problems examples each (PersistentParams::problem_batch): the
  // sequence operands are [problems * B', T, .] in memory (batch-major), the weights' arrays hold
  // one block per problem, and the problems share lengths [B'].
  int64_t problems = 1;
};

struct LayoutAttrs {
  int64_t activation, reverse, slots_per_lane, warps_per_cta, reg_slots, load_bytes;
  int64_t batch_major = 0;  // the forward's x and y are [B, T, H] in memory (their XLA layout)
  int64_t tiles = 0;        // a tile layout (docs/format.md): the forward runs it on tensor cores
};

// The hooked targets' extra attributes; production calls run with these defaults.
struct TestHooks {
  int64_t spin_timeout_us = 0;   // the spin bound; 0: $JAX_SPRNN_SPIN_TIMEOUT_US, else the default
  int64_t debug_stall_cta = -1;  // this CTA never publishes (forces a timeout); -1: none
  int64_t grid_barrier = 0;      // a grid-wide barrier before each phase (ablation of the timestamps)
  int64_t exchange_mode = 0;     // 0: the handler's choice, 1: grid mode, 2: cluster mode (or an error)
};
constexpr int64_t kExchangeAuto = 0, kExchangeGrid = 1, kExchangeCluster = 2;

// The spin bound of a call: the hook, else $JAX_SPRNN_SPIN_TIMEOUT_US (read per call, so a process
// can change it between calls), else the default. Returns false on a malformed variable.
bool spin_timeout_us(const TestHooks& hooks, int64_t* out) {
  *out = hooks.spin_timeout_us > 0 ? hooks.spin_timeout_us : kDefaultSpinTimeoutUs;
  if (hooks.spin_timeout_us > 0) return true;
  const char* env = std::getenv("JAX_SPRNN_SPIN_TIMEOUT_US");
  if (env == nullptr || *env == '\0') return true;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  if (*end != '\0' || v <= 0) return false;
  *out = v;
  return true;
}

// How one launch exchanges the state (see PersistentParams::cluster).
struct ExchangePlan {
  int cluster = 0;              // CTAs per cluster; 0: grid mode
  int64_t replicas = 1;         // clusters per problem
  int64_t replica_batch = 0;    // examples per replica
  std::string why_not_cluster;  // why cluster mode cannot run this call ("" where it can)
};

// Cluster mode runs the layout's CTAs as one thread-block cluster, and replicates the cluster over
// each problem's batch `B` (the problems share out the clusters the device holds at once): one
// batch tile per replica while the device holds that many clusters at once, so a
// batch costs about one tile's step. It needs clusters (sm_90+), a layout of at most
// kMaxClusterCtas CTAs, two staged copies of the replica's state, and no grid-mode test hook.
// `smem_for(batch)` is the shared memory of a CTA with two staged copies of `batch` examples;
// `grid_fits`: whether one staged copy of the whole batch fits (grid mode).
template <class SmemFor>
ExchangePlan plan_exchange(int device, const void* fn, const DeviceInfo& dev, const KernelInfo& kinfo,
                           int64_t layout_ctas, int threads, int64_t B, int64_t problems, int tile,
                           const TestHooks& hooks, SmemFor smem_for, bool grid_fits) {
  ExchangePlan x;
  x.replica_batch = B;
  const std::string ctas = std::to_string(layout_ctas);
  if (hooks.exchange_mode == kExchangeGrid) {
    x.why_not_cluster = "grid mode was asked for";
  } else if (!dev.cluster) {
    x.why_not_cluster = "the device has no thread-block clusters (compute capability 9.0 and newer)";
  } else if (layout_ctas > constants::kMaxClusterCtas) {
    x.why_not_cluster = "the layout has " + ctas + " CTAs, more than a cluster's " +
                        std::to_string(constants::kMaxClusterCtas);
  } else if (hooks.grid_barrier != 0) {
    x.why_not_cluster = "grid_barrier (an ablation) tests the grid exchange";
  } else if (smem_for(tile) > kinfo.max_dynamic_smem) {
    x.why_not_cluster = "two staged copies of one batch tile need " + std::to_string(smem_for(tile)) +
                        " bytes of shared memory, " + std::to_string(kinfo.max_dynamic_smem) +
                        " available";
  } else {
    int active = 0;
    active_clusters(device, fn, threads, static_cast<int>(smem_for(tile)), static_cast<int>(layout_ctas),
                    &active);
    if (active == 0) {
      x.why_not_cluster = "no cluster of " + ctas + " CTAs (" + std::to_string(threads) +
                          " threads, " + std::to_string(smem_for(tile)) + " B of shared memory each) fits";
    } else {
      // As many replicas as the device holds at once (fewer, wider ones would need more shared
      // memory each). Where those are too wide to fit, grid mode runs the call if one staged copy
      // of the whole batch fits; else replicas as wide as fit run in waves (a cluster's CTAs are
      // co-resident, replicas need not be), which the planner's batch limit counts on
      // (jax_sprnn/planner.py: max_persistent_batch).
      const int64_t tiles = (B + tile - 1) / tile;
      const int64_t replicas = std::min<int64_t>(tiles, std::max<int64_t>(active / problems, 1));
      int64_t per_tiles = (tiles + replicas - 1) / replicas;
      const int64_t widest = per_tiles * tile;
      if (smem_for(widest) > kinfo.max_dynamic_smem && grid_fits && hooks.exchange_mode != kExchangeCluster) {
        x.why_not_cluster = "a replica of " + std::to_string(widest) + " examples (" +
                            std::to_string(active) + " clusters fit at once, for " + std::to_string(problems) +
                            " problem(s)) needs " + std::to_string(smem_for(widest)) +
                            " bytes of shared memory, " + std::to_string(kinfo.max_dynamic_smem) + " available";
        return x;
      }
      while (per_tiles > 1 && smem_for(per_tiles * tile) > kinfo.max_dynamic_smem) --per_tiles;
      x.cluster = static_cast<int>(layout_ctas);
      x.replica_batch = per_tiles * tile;
      x.replicas = (B + x.replica_batch - 1) / x.replica_batch;
    }
  }
  return x;
}

ffi::Error launch_persistent(cudaStream_t stream, const PersistentCall& c, const LayoutAttrs& a,
                             const TestHooks& hooks) {
  const std::string name = c.name;
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(name + ": " + m); };
  const ffi::DataType dt = c.dt;
  Dtype kdt;
  if (!kernel_dtype(dt, &kdt)) return bad("the dtype must be float32, float16 or bfloat16");
  const int64_t T = c.T, B = c.B, H = c.H;
  const int64_t problems = c.problems;
  if (problems < 1 || problems > constants::kMaxProblems || B % problems != 0)
    return bad("the batch of " + std::to_string(B) + " examples does not split into " +
               std::to_string(problems) + " problems (1 to " + std::to_string(constants::kMaxProblems) +
               ")");
  const int64_t Bp = B / problems;  // one problem's examples
  const int gates = gates_of(c.direction);
  const int64_t rows = row_gates_of(c.direction) * H;  // the layout's rows: a gated forward's gate rows
  const int64_t cols = state_width_of(c.direction) * H;  // the staged state: a gated backward's du

  // ---- the packed layout ----------------------------------------------------------------------
  // lengths: B of them, or none where every sequence runs all T steps (the lowering of a call
  // without seq_lengths passes none, so that XLA builds no [B] array of T for it).
  const size_t n_lengths = c.lengths.element_count();
  if (n_lengths != static_cast<size_t>(Bp) && n_lengths != 0)
    return bad("lengths must have B = " + std::to_string(Bp) +
               " entries (or none: every sequence runs all T steps), got " + std::to_string(n_lengths));
  const int64_t n_lanes = static_cast<int64_t>(c.lane_row.element_count());
  if (n_lanes % (kWarpSize * problems) != 0)
    return bad("lane_row size " + std::to_string(n_lanes) + " is not a multiple of 32" +
               (problems > 1 ? " times the " + std::to_string(problems) + " problems" : std::string()));
  const int64_t NW = n_lanes / kWarpSize / problems;  // one problem's warps
  const int64_t K = a.slots_per_lane;
  if (K < 0) return bad("slots_per_lane must be >= 0");
  const int64_t n_slots = NW * K * kWarpSize;  // one problem's slots
  const std::string per = problems > 1 ? std::to_string(problems) + "*" : "";
  if (static_cast<int64_t>(c.values.element_count()) != problems * n_slots)
    return bad("values size " + std::to_string(c.values.element_count()) + " != " + per + "NW*K*32 = " +
               std::to_string(problems * n_slots) + " (NW = lane_row.size/" + per + "32 = " +
               std::to_string(NW) + ", K = slots_per_lane = " + std::to_string(K) + ")");
  if (static_cast<int64_t>(c.indices.element_count()) != problems * n_slots)
    return bad("indices size " + std::to_string(c.indices.element_count()) + " != values size " +
               std::to_string(problems * n_slots));

  // ---- attributes -----------------------------------------------------------------------------
  if (gates == 1 && !valid_activation(a.activation))
    return bad("activation must be 0 (tanh), 1 (relu) or 2 (identity), got " +
               std::to_string(a.activation));
  if (a.reverse < 0 || a.reverse >= (int64_t{1} << problems))
    return bad(problems == 1 ? std::string("reverse must be 0 or 1")
                             : "reverse must be a bit mask of the " + std::to_string(problems) + " problems");
  if (a.batch_major != 0 && a.batch_major != 1) return bad("batch_major must be 0 or 1");
  if (problems > 1 && a.batch_major != 1)
    return bad("several problems in one call need batch-major sequence operands (batch_major = 1)");
  if (a.load_bytes != 4 && a.load_bytes != 8 && a.load_bytes != 16)
    return bad("load_bytes must be 4, 8 or 16, got " + std::to_string(a.load_bytes));
  // The layout's tile (load_bytes / 4), or a narrower one for a batch of one or two: every step
  // gathers, reduces, runs the cell for and exchanges each entry of a tile, padding included. (In
  // cluster mode the tile may narrow further below, where replicas allow.) A tile layout keeps the
  // tile of 4 (its product takes 8 batch entries at once anyway).
  if (a.tiles != 0 && a.tiles != 1) return bad("tiles must be 0 or 1, got " + std::to_string(a.tiles));
  const bool tiles = a.tiles == 1;
  if (tiles) {
    if (!has_tile_variants(c.direction, kdt))
      return bad(std::string("a tile layout (tiles = 1) runs on tensor cores with float16 or bfloat16 "
                             "weights, got ") + dtype_name(dt));
    if (a.load_bytes != 16) return bad("a tile layout needs load_bytes = 16, got " + std::to_string(a.load_bytes));
    if (a.slots_per_lane != cols || cols % 16 != 0)
      return bad("a tile layout needs slots_per_lane = the state's " + std::to_string(cols) +
                 " columns, a multiple of 16; got slots_per_lane = " + std::to_string(a.slots_per_lane));
  }
  int tile = tiles ? 4 : constants::batch_tile(a.load_bytes / 4, Bp);
  if (hooks.spin_timeout_us < 0) return bad("spin_timeout_us must be >= 0");
  if (hooks.exchange_mode < kExchangeAuto || hooks.exchange_mode > kExchangeCluster)
    return bad("exchange_mode must be 0 (auto), 1 (grid) or 2 (cluster), got " +
               std::to_string(hooks.exchange_mode));
  int64_t timeout_us = 0;
  if (!spin_timeout_us(hooks, &timeout_us))
    return bad("JAX_SPRNN_SPIN_TIMEOUT_US must be a positive integer (microseconds), got '" +
               std::string(std::getenv("JAX_SPRNN_SPIN_TIMEOUT_US")) + "'");
  if (hooks.debug_stall_cta < -1) return bad("debug_stall_cta must be >= -1");
  if (hooks.grid_barrier != 0 && hooks.debug_stall_cta != -1)
    return bad("grid_barrier (an ablation) cannot be combined with debug_stall_cta: it would hang");
  if (a.warps_per_cta < 1 || a.warps_per_cta * kWarpSize > kMaxThreadsPerCta)
    return bad("warps_per_cta must be in [1, 32], got " + std::to_string(a.warps_per_cta));
  const std::vector<int> rs_set = tiles ? tile_reg_slots_for(c.direction) : reg_slots_for(c.direction, kdt);
  if (std::find(rs_set.begin(), rs_set.end(), a.reg_slots) == rs_set.end()) {
    std::string s;
    for (int r : rs_set) s += (s.empty() ? "" : ", ") + std::to_string(r);
    return bad("reg_slots " + std::to_string(a.reg_slots) + " is not instantiated for " +
               dtype_name(dt) + (gates > 1 ? " gated cells" : "") + (tiles ? " tile layouts" : "") +
               " (supported: " + s + ")");
  }
  if (a.reg_slots > K)
    return bad("reg_slots " + std::to_string(a.reg_slots) + " > slots_per_lane " + std::to_string(K));

  // ---- trivial cases --------------------------------------------------------------------------
  const size_t elem_bytes = ffi::ByteWidth(dt);
  if (B == 0 || H == 0) return ffi::Error::Success();
  if (T == 0) {  // no step: the final state is the initial one
    cudaError_t e = cudaMemcpyAsync(c.final_out, c.init, B * H * elem_bytes,
                                    cudaMemcpyDeviceToDevice, stream);
    if (e == cudaSuccess && c.c_final != nullptr)
      e = cudaMemcpyAsync(c.c_final, c.c_init, B * H * elem_bytes, cudaMemcpyDeviceToDevice, stream);
    if (e != cudaSuccess) return cuda_error("cudaMemcpyAsync(final state <- initial state)", e);
    return ffi::Error::Success();
  }

  // ---- layout-dependent checks ----------------------------------------------------------------
  if (NW == 0) return bad("lane_row is empty but " + std::to_string(rows) + " rows need lanes");
  if (NW % a.warps_per_cta != 0)
    return bad("NW = " + std::to_string(NW) + " warps is not a multiple of warps_per_cta = " +
               std::to_string(a.warps_per_cta));
  if (dt != ffi::DataType::F32 && cols > 65535)
    return bad("the state has " + std::to_string(cols) +
               " > 65535 columns: 16-bit dtypes pack column indices in 16 bits");
  if (T > INT32_MAX || B > INT32_MAX || H > INT32_MAX || K > INT32_MAX)
    return bad("T, B, H and slots_per_lane must fit in int32");
  if (B * H > INT32_MAX)  // (the kernel's Entry steps through the sequence operands in int32)
    return bad("B * H = " + std::to_string(B * H) + " must fit in int32");
  const int64_t ws_need = cuda_workspace_bytes(B, cols);
  if (c.workspace_bytes < ws_need)
    return bad("workspace has " + std::to_string(c.workspace_bytes) + " bytes, needs " +
               std::to_string(ws_need) + " (jax_sprnn/_constants.py: cuda_workspace_bytes)");

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
  if (!kernels_built(kdt)) return bad(kernels_missing(dtype_name(dt)));
  PersistentKernelFn fn = lookup_persistent(c.direction, kdt, tile, rs, threads, 1, tiles);
  if (fn == nullptr) {
    return bad("warps_per_cta = " + std::to_string(a.warps_per_cta) + " (" + std::to_string(threads) +
               " threads) exceeds the " + std::to_string(max_threads_of(c.direction, kdt, rs)) +
               "-thread launch bound of the " + dtype_name(dt) + " load_bytes-" +
               std::to_string(a.load_bytes) + " reg_slots-" + std::to_string(rs) +
               " kernel (kernel_attributes() gives it)");
  }
  KernelInfo kinfo;
  if ((e = kernel_info(device, reinterpret_cast<const void*>(fn), dev, &kinfo)) != cudaSuccess)
    return cuda_error("cudaFuncGetAttributes/cudaFuncSetAttribute(persistent kernel)", e);

  // ---- exchange mode --------------------------------------------------------------------------
  const int64_t layout_ctas = NW / a.warps_per_cta;
  // (A tile layout holds its weights as mma fragments: 2 bytes a slot, no index.)
  const int64_t slot_bytes = tiles ? 2 : dt == ffi::DataType::F32 ? 8 : 4;
  const int64_t w_bytes = a.warps_per_cta * (K - a.reg_slots) * kWarpSize * slot_bytes;
  // The cell state stays in shared memory too (one float per unit slot and example): the LSTM's c,
  // a gated backward's carry beside dh. (At a tile t; cell_bytes and plan_total at the call's.)
  auto cell_bytes_at = [&](int t, int64_t batch) {
    return constants::cell_state_smem_bytes(batch, t, a.warps_per_cta, gates, is_gated_backward(c.direction));
  };
  auto plan_total_at = [&](int t, int64_t batch, int buffers) {
    return constants::persistent_smem_bytes(cols, batch, t, w_bytes, buffers, cell_bytes_at(t, batch));
  };
  auto cell_bytes = [&](int64_t batch) { return cell_bytes_at(tile, batch); };
  auto plan_total = [&](int64_t batch, int buffers) { return plan_total_at(tile, batch, buffers); };
  auto exchange_at = [&](int t, PersistentKernelFn f, const KernelInfo& info) {
    return plan_exchange(device, reinterpret_cast<const void*>(f), dev, info, layout_ctas, threads, Bp,
                         problems, t, hooks, [&](int64_t batch) { return plan_total_at(t, batch, 2); },
                         plan_total_at(t, Bp, 1) <= info.max_dynamic_smem);
  };
  ExchangePlan xp = exchange_at(tile, fn, kinfo);
  // In cluster mode, the narrowest tile at which every replica runs one batch plane, where the
  // device holds that many replicas at once: a narrow tile's step gathers, reduces and runs the
  // cell for fewer entries (at H = 256 and 1024, fp16, 10%: 1.50 and 2.20 µs a step at tile 1
  // against 2.13 and 3.45 at tile 4, H200, 2026-12-04), and the replicas run side by side. The
  // sums do not depend on the tile (persistent_kernel.cuh: kChains), so neither do the results.
  for (int narrow = 1; xp.cluster > 0 && !tiles && narrow < tile; narrow *= 2) {
    const PersistentKernelFn narrow_fn = lookup_persistent(c.direction, kdt, narrow, rs, threads, 1, false);
    if (narrow_fn == nullptr) continue;
    KernelInfo narrow_info;
    if ((e = kernel_info(device, reinterpret_cast<const void*>(narrow_fn), dev, &narrow_info)) != cudaSuccess)
      return cuda_error("cudaFuncGetAttributes/cudaFuncSetAttribute(persistent kernel)", e);
    const ExchangePlan narrow_xp = exchange_at(narrow, narrow_fn, narrow_info);
    if (narrow_xp.cluster > 0 && narrow_xp.replica_batch <= narrow) {
      tile = narrow;
      fn = narrow_fn;
      kinfo = narrow_info;
      xp = narrow_xp;
      break;
    }
  }
  if (hooks.exchange_mode == kExchangeCluster && xp.cluster == 0)
    return bad("cluster mode was asked for but cannot run: " + xp.why_not_cluster);
  const bool in_cluster = xp.cluster > 0;

  // ---- shared memory: staged state (two copies when they fit), weight tier, lengths -----------
  const int64_t slice = xp.replica_batch;  // the examples one CTA stages
  const int64_t n_planes = (slice + tile - 1) / tile;

  // ---- the kernel: two planes or more take the variant that gathers two planes a pass ----------
  // (persistent_kernel.cuh, "The batch in passes"). It has the same launch bound and no more static
  // shared memory (the one-plane kernel may hold a copy of its body per exchange mode, each with its
  // own static set: kSplitModes), so the plan above holds for it; its own attributes, occupancy and
  // cluster setting are what the launch uses.
  PersistentKernelFn launch_fn = fn;
  if (n_planes >= 2 && tile == 4) {
    const PersistentKernelFn pair_fn = lookup_persistent(c.direction, kdt, tile, rs, threads, 2, tiles);
    KernelInfo pair_info;
    if (pair_fn == nullptr) return bad("no two-plane kernel for this layout (a build without it?)");
    if ((e = kernel_info(device, reinterpret_cast<const void*>(pair_fn), dev, &pair_info)) != cudaSuccess)
      return cuda_error("cudaFuncGetAttributes/cudaFuncSetAttribute(persistent kernel)", e);
    int pair_clusters = 1;
    if (in_cluster)  // (also allows the non-portable cluster sizes for this kernel)
      active_clusters(device, reinterpret_cast<const void*>(pair_fn), threads,
                      static_cast<int>(plan_total(slice, 2)), xp.cluster, &pair_clusters);
    if (pair_info.max_dynamic_smem >= kinfo.max_dynamic_smem && pair_clusters > 0) launch_fn = pair_fn;
  }
  const int64_t h_floats = n_planes * cols * tile;
  // The second copy starts 16-byte aligned: staging writes it with vector stores.
  const int64_t h_stride = align16(h_floats * 4) / 4;
  SmemPlan smem;
  smem.h_buffers = in_cluster || plan_total(slice, 2) <= kinfo.max_dynamic_smem ? 2 : 1;
  const int64_t total = plan_total(slice, smem.h_buffers);
  if (total > kinfo.max_dynamic_smem)
    return bad("the layer does not fit on chip: " + std::to_string(total) +
               " bytes of shared memory per CTA needed (staged state " + std::to_string(h_floats * 4) +
               " = ceil(B/tile)*" + (cols == H ? "H" : "G*H") + "*tile*4, weight tier " +
               std::to_string(w_bytes) + " = warps_per_cta*(K-reg_slots)*32*" + std::to_string(slot_bytes) +
               (cell_bytes(slice) ? ", cell state " + std::to_string(cell_bytes(slice)) : std::string()) + "), " +
               std::to_string(kinfo.max_dynamic_smem) + " available");
  smem.h_stride = static_cast<int>(h_stride);
  smem.w_offset = static_cast<int>(smem.h_buffers * h_stride * 4);
  smem.cell_offset = static_cast<int>(smem.w_offset + align16(w_bytes));
  smem.len_offset = static_cast<int>(smem.cell_offset + cell_bytes(slice));
  smem.total = static_cast<int>(total);

  // ---- co-residency (grid mode): every CTA must be resident at once. (In cluster mode only each
  //      cluster's CTAs must be, which the cluster launch guarantees: replicas may run in waves.)
  const int64_t grid = in_cluster ? problems * xp.replicas * xp.cluster : layout_ctas;
  int per_sm = 0;
  if ((e = ctas_per_sm(device, reinterpret_cast<const void*>(launch_fn), threads, smem.total, &per_sm)) !=
      cudaSuccess)
    return cuda_error("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
  if (!in_cluster && static_cast<int64_t>(per_sm) * dev.sm_count < grid)
    return bad("grid of " + std::to_string(grid) + " CTAs (" + std::to_string(threads) +
               " threads, " + std::to_string(smem.total) + " B shared memory each) exceeds the " +
               std::to_string(per_sm) + " CTAs/SM x " + std::to_string(dev.sm_count) +
               " SMs that can be co-resident");

  // ---- workspace: reset header and exchange buffers in-stream, then launch --------------------
  // 16-bit dtypes exchange 4-byte words (PersistentConfig::X), except the simple cell's backward,
  // which exchanges fp32 dz in 8-byte words like float32.
  const bool narrow = c.direction != Direction::kBackward && dt != ffi::DataType::F32;
  const int word_bytes = narrow ? 4 : 8;
  unsigned char* ws = c.workspace;
  const ExchangeLayout xl = exchange_layout(B * cols, word_bytes, c.workspace_bytes, ws);
  // (Cluster mode exchanges nothing through the workspace: only its header is reset.)
  if ((e = cudaMemsetAsync(ws, 0, in_cluster ? kHeaderBytes : xl.used_bytes, stream)) != cudaSuccess)
    return cuda_error("cudaMemsetAsync(workspace)", e);

  PersistentParams prm{};
  prm.seq_a = c.seq_a;
  prm.seq_b = c.seq_b;
  prm.init = c.init;
  prm.values = c.values.untyped_data();
  prm.indices = c.indices.typed_data();
  prm.lane_row = c.lane_row.typed_data();
  prm.lengths = n_lengths != 0 ? c.lengths.typed_data() : nullptr;
  prm.seq_out = c.seq_out;
  prm.final_out = c.final_out;
  prm.c_init = c.c_init;
  prm.c_final = c.c_final;
  prm.hn_bias = c.hn_bias;
  prm.seq_u = c.seq_u;
  prm.seq_state = c.seq_state;
  prm.du_out = c.du_out;
  prm.cells_out = c.cells_out;
  prm.error_flag = reinterpret_cast<uint32_t*>(ws);
  prm.exchange[0] = ws + kHeaderBytes;
  prm.exchange[1] = ws + kHeaderBytes + xl.stride_bytes;
  prm.T = static_cast<int>(T);
  prm.B = static_cast<int>(B);
  prm.H = static_cast<int>(H);
  prm.K = static_cast<int>(K);
  prm.cluster = xp.cluster;
  prm.replica_batch = static_cast<int>(slice);
  prm.problem_batch = static_cast<int>(Bp);
  prm.problem_replicas = in_cluster ? static_cast<int>(xp.replicas) : 1;
  prm.first_problem = 0;
  prm.problem_lanes = static_cast<int>(NW * kWarpSize);
  prm.problem_slots = static_cast<long long>(n_slots);
  prm.n_planes = static_cast<int>(n_planes);
  prm.n_full_planes = static_cast<int>(slice / tile);
  prm.partial_rem = static_cast<int>(slice % tile);
  prm.activation = static_cast<int>(a.activation);
  prm.reverse = static_cast<int>(a.reverse);
  prm.batch_major = static_cast<int>(a.batch_major);
  prm.h_buffers = smem.h_buffers;
  prm.h_stride = smem.h_stride;
  prm.w_smem_offset = smem.w_offset;
  prm.cell_smem_offset = smem.cell_offset;
  prm.len_smem_offset = smem.len_offset;
  prm.exchange_vector = xl.vector ? 1 : 0;
  prm.byte_offsets = cols * tile * 4 <= 65536 ? 1 : 0;
  prm.stall_cta = static_cast<int>(std::min<int64_t>(hooks.debug_stall_cta, INT32_MAX));
  prm.grid_barrier = hooks.grid_barrier != 0 ? 1 : 0;
  constexpr int64_t kMaxSpinTimeoutUs = int64_t{3600} * 1'000'000;  // keeps the ns value in range
  prm.timeout_ns =
      static_cast<unsigned long long>(std::min(timeout_us, kMaxSpinTimeoutUs)) * 1000ull;

  // ---- what a failed call fills with NaN (finish_call, at the kernel's end) --------------------
  // Every layout row has exactly one head lane.
  const unsigned long long n_seq = static_cast<unsigned long long>(T * B * cols);
  const unsigned long long n_final = static_cast<unsigned long long>(B * H);
  const uint32_t nan_bits = dt == ffi::DataType::F32   ? Storage<float>::kNaNBits
                            : dt == ffi::DataType::F16 ? Storage<__half>::kNaNBits
                                                       : Storage<__nv_bfloat16>::kNaNBits;
  const int bytes = static_cast<int>(elem_bytes);
  FinishParams& fin = prm.finish;
  auto poison = [&](void* data, unsigned long long n, uint32_t bits, int width) {
    if (data != nullptr && n > 0) fin.out[fin.n_out++] = FinishOutput{data, n, bits, width};
  };
  poison(c.seq_out, n_seq, nan_bits, bytes);
  poison(c.final_out, n_final, nan_bits, bytes);
  poison(c.c_final, n_final, nan_bits, bytes);
  poison(c.cells_out, n_seq, nan_bits, bytes);
  poison(c.du_out, n_seq, Storage<float>::kNaNBits, 4);
  fin.expected_heads = rows * (in_cluster ? problems : 1);  // (grid mode: a launch per problem)
  const ErrorSlot slot = claim_error_slot({c.name, dt, T, B, H, in_cluster ? static_cast<int>(xp.cluster) : 0});
  fin.host_word = slot.device;

  if (in_cluster) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(grid));
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem.total);
    cfg.stream = stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = static_cast<unsigned>(xp.cluster);
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    e = cudaLaunchKernelEx(&cfg, launch_fn, prm);
    if (e != cudaSuccess) return cuda_error("cudaLaunchKernelEx(persistent kernel, cluster mode)", e);
  } else {
    // Grid mode runs the problems one after another, each on the whole grid, with the workspace
    // reset in between (the first launch's reset is above).
    for (int64_t q = 0; q < problems; ++q) {
      if (q > 0 && (e = cudaMemsetAsync(ws, 0, xl.used_bytes, stream)) != cudaSuccess)
        return cuda_error("cudaMemsetAsync(workspace)", e);
      prm.first_problem = static_cast<int>(q);
      void* args[] = {&prm};
      e = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(launch_fn), dim3(static_cast<unsigned>(grid)),
                                      dim3(threads), args, static_cast<size_t>(smem.total), stream);
      if (e != cudaSuccess) return cuda_error("cudaLaunchCooperativeKernel(persistent kernel)", e);
    }
  }
  return check_call_now(stream, slot);  // (JAX_SPRNN_SYNC_ERRORS=1 only: this call's own error)
}


// ================================================================================================
// Host: the forward and backward handlers (dtype and shape checks, then one launch)
// ================================================================================================
//
// `Hooks` is empty for the production targets and (spin_timeout_us, debug_stall_cta, grid_barrier,
// exchange_mode) for the hooked ones: one implementation, two FFI signatures.

// The target's name, for messages.
template <typename... Hooks>
std::string target_name(const char* base) {
  static_assert(sizeof...(Hooks) == 0 || sizeof...(Hooks) == 4, "no hooks, or all of TestHooks");
  return std::string(base) + (sizeof...(Hooks) ? "_hooked" : "");
}

ffi::Error check_float_operands(const std::string& name,
                                std::initializer_list<std::pair<const char*, ffi::DataType>> operands,
                                ffi::DataType dt) {
  for (const auto& [what, t] : operands)
    if (t != dt)
      return ffi::Error::InvalidArgument(name + ": " + what + " must have dtype " + dtype_name(dt) +
                                         " like the other float operands, got " + dtype_name(t));
  return ffi::Error::Success();
}

// The sequence operand of a forward or backward call: [T, B, H] for one problem, or
// [problems, T, B, H] for several (whose memory is [problems, B, T, H]: batch_major). Sets
// (T, B, H), B counting every problem's examples, and `state`, the [B, H] (or [problems, B, H])
// shape of the states; an empty string where the shape is right, else what it must be.
struct SeqShape {
  int64_t T = 0, B = 0, H = 0;
  std::vector<int64_t> state;
};
std::string seq_shape(const char* what, ffi::Span<const int64_t> d, int64_t problems, SeqShape* out) {
  if (problems == 1 && d.size() == 3) {
    *out = SeqShape{d[0], d[1], d[2], {d[1], d[2]}};
    return "";
  }
  if (problems > 1 && d.size() == 4 && d[0] == problems) {
    *out = SeqShape{d[1], d[0] * d[2], d[3], {d[0], d[2], d[3]}};
    return "";
  }
  return std::string(what) + " must be " +
         (problems == 1 ? "[T, B, H]" : "[" + std::to_string(problems) + ", T, B, H] (one [T, B, H] a problem)") +
         ", got " + shape_string(d);
}
std::string state_shape_error(const char* what, ffi::Span<const int64_t> got, const SeqShape& s) {
  if (same_dims(got, ffi::Span<const int64_t>(s.state.data(), s.state.size()))) return "";
  return std::string(what) + " must be " + shape_string(ffi::Span<const int64_t>(s.state.data(), s.state.size())) +
         ", got " + shape_string(got);
}

template <typename... Hooks>
ffi::Error ForwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer h0,
                       ffi::AnyBuffer values, ffi::Buffer<ffi::S32> indices,
                       ffi::Buffer<ffi::S32> lane_row, ffi::Buffer<ffi::S32> lengths,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> h_final,
                       ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t activation,
                       int64_t reverse, int64_t slots_per_lane, int64_t warps_per_cta,
                       int64_t reg_slots, int64_t load_bytes, int64_t batch_major, int64_t problems,
                       int64_t tiles, Hooks... hooks) {
  if (auto err = take_deferred_error(stream); err.failure()) return err;
  const std::string name = target_name<Hooks...>("jax_sprnn_forward");
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(name + ": " + m); };

  const ffi::DataType dt = x.element_type();
  Dtype kdt;
  if (!kernel_dtype(dt, &kdt)) return bad("x must be float32, float16 or bfloat16");
  if (auto err = check_float_operands(name, {{"h0", h0.element_type()}, {"values", values.element_type()},
                                             {"y", y->element_type()}, {"h_final", h_final->element_type()}},
                                      dt);
      err.failure())
    return err;
  // (x and y are [T, B, H] to XLA; batch_major says that their layout puts B outermost.)
  if (problems < 1) return bad("problems must be >= 1, got " + std::to_string(problems));
  const auto xd = x.dimensions();
  SeqShape sh;
  std::string why = seq_shape("x", xd, problems, &sh);
  if (why.empty()) why = state_shape_error("h0", h0.dimensions(), sh);
  if (!why.empty()) return bad(why);
  if (!same_dims(y->dimensions(), xd)) return bad("y must have x's shape " + shape_string(xd));
  if (!same_dims(h_final->dimensions(), h0.dimensions()))
    return bad("h_final must have h0's shape " + shape_string(h0.dimensions()));

  PersistentCall call{name.c_str(), Direction::kForward, dt, sh.T, sh.B, sh.H,
                      x.untyped_data(), nullptr, h0.untyped_data(), values, indices, lane_row,
                      lengths, y->untyped_data(), h_final->untyped_data(),
                      workspace->typed_data(), static_cast<int64_t>(workspace->element_count())};
  call.problems = problems;
  return launch_persistent(stream, call,
                           {activation, reverse, slots_per_lane, warps_per_cta, reg_slots, load_bytes,
                            batch_major, tiles},
                           TestHooks{hooks...});
}

template <typename... Hooks>
ffi::Error BackwardImpl(cudaStream_t stream, ffi::AnyBuffer y, ffi::AnyBuffer h0,
                        ffi::AnyBuffer values_t, ffi::Buffer<ffi::S32> indices_t,
                        ffi::Buffer<ffi::S32> lane_row_t, ffi::Buffer<ffi::S32> lengths,
                        ffi::AnyBuffer dy, ffi::AnyBuffer dh_final, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::Buffer<ffi::U8>> workspace,
                        int64_t activation, int64_t reverse, int64_t slots_per_lane,
                        int64_t warps_per_cta, int64_t reg_slots, int64_t load_bytes,
                        int64_t batch_major, int64_t problems, Hooks... hooks) {
  if (auto err = take_deferred_error(stream); err.failure()) return err;
  const std::string name = target_name<Hooks...>("jax_sprnn_backward");
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
  if (problems < 1) return bad("problems must be >= 1, got " + std::to_string(problems));
  const auto yd = y.dimensions();
  SeqShape sh;
  if (std::string why = seq_shape("y", yd, problems, &sh); !why.empty()) return bad(why);
  if (!same_dims(dy.dimensions(), yd)) return bad("dy must have y's shape " + shape_string(yd));
  if (!same_dims(dx->dimensions(), yd)) return bad("dx must have y's shape " + shape_string(yd));
  for (const auto& [what, dims] : {std::pair{"h0", h0.dimensions()}, std::pair{"dh_final", dh_final.dimensions()},
                                   std::pair{"dh0", dh0->dimensions()}})
    if (std::string why = state_shape_error(what, dims, sh); !why.empty()) return bad(why);

  PersistentCall call{name.c_str(), Direction::kBackward, dt, sh.T, sh.B, sh.H,
                      y.untyped_data(), dy.untyped_data(), dh_final.untyped_data(), values_t,
                      indices_t, lane_row_t, lengths, dx->untyped_data(), dh0->untyped_data(),
                      workspace->typed_data(), static_cast<int64_t>(workspace->element_count())};
  call.problems = problems;
  // (batch_major: y, dy and dx are [B, T, H] in memory, as the forward's x and y can be)
  return launch_persistent(stream, call,
                           {activation, reverse, slots_per_lane, warps_per_cta, reg_slots, load_bytes,
                            batch_major},
                           TestHooks{hooks...});
}

// The gated cells' forward (docs/format.md, "Gated kernels"): the LSTM (gates = 4) carries c0 /
// c_final [B, H] and an empty hn_bias; the GRU (gates = 3) an empty c0 / c_final and hn_bias [H].
// Several problems (as ForwardImpl takes them) add a leading [problems] axis to every operand but
// lengths, hn_bias included ([problems, H]).
template <typename... Hooks>
ffi::Error GatedForwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer c0,
                            ffi::AnyBuffer values, ffi::Buffer<ffi::S32> indices,
                            ffi::Buffer<ffi::S32> lane_row, ffi::Buffer<ffi::S32> lengths,
                            ffi::Buffer<ffi::F32> hn_bias, ffi::Result<ffi::AnyBuffer> y,
                            ffi::Result<ffi::AnyBuffer> h_final, ffi::Result<ffi::AnyBuffer> c_final,
                            ffi::Result<ffi::AnyBuffer> cells,
                            ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t gates,
                            int64_t reverse, int64_t slots_per_lane, int64_t warps_per_cta,
                            int64_t reg_slots, int64_t load_bytes, int64_t batch_major, int64_t problems,
                            int64_t tiles, Hooks... hooks) {
  if (auto err = take_deferred_error(stream); err.failure()) return err;
  const std::string name = target_name<Hooks...>("jax_sprnn_gated_forward");
  auto bad = [&](const std::string& m) { return ffi::Error::InvalidArgument(name + ": " + m); };
  if (gates != 3 && gates != 4)
    return bad("gates must be 3 (GRU) or 4 (LSTM), got " + std::to_string(gates));
  const bool lstm = gates == 4;

  const ffi::DataType dt = x.element_type();
  Dtype kdt;
  if (!kernel_dtype(dt, &kdt)) return bad("x must be float32, float16 or bfloat16");
  if (auto err = check_float_operands(name, {{"h0", h0.element_type()}, {"c0", c0.element_type()},
                                             {"values", values.element_type()}, {"y", y->element_type()},
                                             {"h_final", h_final->element_type()},
                                             {"c_final", c_final->element_type()},
                                             {"cells", cells->element_type()}},
                                      dt);
      err.failure())
    return err;
  if (problems < 1) return bad("problems must be >= 1, got " + std::to_string(problems));
  // x is [T, B, G*H] (or [problems, T, B, G*H]); y, the LSTM's cells and the states have H.
  const auto xd = x.dimensions();
  SeqShape sh;
  std::string why = seq_shape("x", xd, problems, &sh);
  if (why.empty() && sh.H % gates != 0)
    why = "x's last dimension must be " + std::to_string(gates) + "*H, got " + shape_string(xd);
  if (!why.empty()) return bad(why);
  sh.H /= gates;
  sh.state.back() = sh.H;
  std::vector<int64_t> seq_dims(xd.begin(), xd.end());
  seq_dims.back() = sh.H;
  const ffi::Span<const int64_t> seq(seq_dims.data(), seq_dims.size());
  if (!same_dims(y->dimensions(), seq)) return bad("y must be " + shape_string(seq));
  for (const auto& [what, dims] : {std::pair{"h0", h0.dimensions()}, std::pair{"h_final", h_final->dimensions()}})
    if (std::string e = state_shape_error(what, dims, sh); !e.empty()) return bad(e);
  if (lstm) {
    for (const auto& [what, dims] : {std::pair{"the LSTM's c0", c0.dimensions()},
                                     std::pair{"the LSTM's c_final", c_final->dimensions()}})
      if (std::string e = state_shape_error(what, dims, sh); !e.empty()) return bad(e);
    if (hn_bias.element_count() != 0) return bad("the LSTM takes no hn_bias (it must be empty)");
    if (cells->element_count() != 0 && !same_dims(cells->dimensions(), seq))
      return bad("the LSTM's cells must be " + shape_string(seq) + " or empty, got " +
                 shape_string(cells->dimensions()));
  } else {
    if (c0.element_count() != 0 || c_final->element_count() != 0 || cells->element_count() != 0)
      return bad("the GRU has no cell state: c0, c_final and cells must be empty");
    if (hn_bias.element_count() != static_cast<size_t>(problems * sh.H))
      return bad("hn_bias must be " + std::string(problems > 1 ? "[problems, H] = [" + std::to_string(problems) + ", "
                                                               : "[H] = [") +
                 std::to_string(sh.H) + "], got " + shape_string(hn_bias.dimensions()));
  }

  PersistentCall call{name.c_str(), lstm ? Direction::kLstm : Direction::kGru, dt, sh.T, sh.B, sh.H,
                      x.untyped_data(), nullptr, h0.untyped_data(), values, indices, lane_row,
                      lengths, y->untyped_data(), h_final->untyped_data(),
                      workspace->typed_data(), static_cast<int64_t>(workspace->element_count())};
  call.problems = problems;
  if (lstm) {
    call.c_init = c0.untyped_data();
    call.c_final = c_final->untyped_data();
    call.cells_out = cells->element_count() != 0 ? cells->untyped_data() : nullptr;
  } else {
    call.hn_bias = hn_bias.typed_data();  // (problem q's at q * H)
  }
  // (batch_major: x, y and the LSTM's cells are [B, T, .] in memory, as in the simple forward)
  return launch_persistent(stream, call,
                           {0, reverse, slots_per_lane, warps_per_cta, reg_slots, load_bytes, batch_major,
                            tiles},
                           TestHooks{hooks...});
}

// The gated cells' backward recurrence (docs/gated.md; the operands of jax_sprnn_gated_backward,
// checked as the CPU handler checks them, in step order on the transposed layout), plus the
// workspace.
template <typename... Hooks>
ffi::Error GatedBackwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> u,
                             ffi::AnyBuffer h_before, ffi::AnyBuffer c_before, ffi::AnyBuffer dy,
                             ffi::AnyBuffer dh_final, ffi::AnyBuffer dc_final, ffi::Buffer<ffi::F32> hn_bias,
                             ffi::AnyBuffer values_t, ffi::Buffer<ffi::S32> indices_t,
                             ffi::Buffer<ffi::S32> lane_row_t, ffi::Buffer<ffi::S32> lengths,
                             ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> du,
                             ffi::Result<ffi::AnyBuffer> dh0, ffi::Result<ffi::AnyBuffer> dc0,
                             ffi::Result<ffi::Buffer<ffi::U8>> workspace, int64_t gates,
                             int64_t slots_per_lane, int64_t warps_per_cta, int64_t reg_slots,
                             int64_t load_bytes, int64_t batch_major, int64_t problems, Hooks... hooks) {
  if (auto err = take_deferred_error(stream); err.failure()) return err;
  const std::string name = target_name<Hooks...>("jax_sprnn_gated_backward");
  ffi_checks::Sizes n;
  if (auto err = ffi_checks::check_operands(name.c_str(), gates, x, u, h_before, c_before, dy,
                                                       dh_final, dc_final, hn_bias, values_t, lengths,
                                                       *dx, *du, *dh0, *dc0, &n, problems);
      err.failure())
    return err;
  const bool lstm = gates == 4;
  PersistentCall call{name.c_str(), lstm ? Direction::kLstmBackward : Direction::kGruBackward,
                      x.element_type(), n.T, n.B, n.H, x.untyped_data(), dy.untyped_data(),
                      dh_final.untyped_data(), values_t, indices_t, lane_row_t, lengths,
                      dx->untyped_data(), dh0->untyped_data(), workspace->typed_data(),
                      static_cast<int64_t>(workspace->element_count())};
  call.problems = problems;
  call.seq_u = u.typed_data();
  call.seq_state = lstm ? c_before.untyped_data() : h_before.untyped_data();
  call.du_out = du->typed_data();
  if (lstm) {
    call.c_init = dc_final.untyped_data();
    call.c_final = dc0->untyped_data();
  } else {
    call.hn_bias = hn_bias.typed_data();
  }
  // T = 0 leaves dx and du without elements; the handler copies dh_final (and dc_final) over.
  // (Step order: no problem runs reversed. batch_major: the sequences are [B, T, .] in memory, as
  // the forward's; several problems need it.)
  return launch_persistent(stream, call,
                           {0, 0, slots_per_lane, warps_per_cta, reg_slots, load_bytes, batch_major},
                           TestHooks{hooks...});
}

// Plain names for the instantiations: a template argument list would split the macros' arguments.
constexpr auto ForwardProduction = &ForwardImpl<>;
constexpr auto BackwardProduction = &BackwardImpl<>;
constexpr auto ForwardHooked = &ForwardImpl<int64_t, int64_t, int64_t, int64_t>;
constexpr auto BackwardHooked = &BackwardImpl<int64_t, int64_t, int64_t, int64_t>;
constexpr auto GatedForwardProduction = &GatedForwardImpl<>;
constexpr auto GatedForwardHooked = &GatedForwardImpl<int64_t, int64_t, int64_t, int64_t>;
constexpr auto GatedBackwardProduction = &GatedBackwardImpl<>;
constexpr auto GatedBackwardHooked = &GatedBackwardImpl<int64_t, int64_t, int64_t, int64_t>;

// The production bindings: the operands, the workspace result, the layout attributes.
auto forward_binding() {
  return bindings::layout_attrs(
             bindings::forward_operands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                 .Ret<ffi::Buffer<ffi::U8>>())  // workspace
      .Attr<int64_t>("batch_major")
      .Attr<int64_t>("problems")
      .Attr<int64_t>("tiles");
}
auto gated_forward_binding() {
  return bindings::gated_attrs(
             bindings::gated_forward_operands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                 .Ret<ffi::Buffer<ffi::U8>>())  // workspace
      .Attr<int64_t>("batch_major")
      .Attr<int64_t>("problems")
      .Attr<int64_t>("tiles");
}
auto gated_backward_binding() {
  return bindings::gated_backward_operands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
      .Ret<ffi::Buffer<ffi::U8>>()  // workspace
      .Attr<int64_t>("gates")
      .Attr<int64_t>("slots_per_lane")
      .Attr<int64_t>("warps_per_cta")
      .Attr<int64_t>("reg_slots")
      .Attr<int64_t>("load_bytes")
      .Attr<int64_t>("batch_major")
      .Attr<int64_t>("problems");
}
auto backward_binding() {
  return bindings::layout_attrs(
             bindings::backward_operands(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                 .Ret<ffi::Buffer<ffi::U8>>())  // workspace
      .Attr<int64_t>("batch_major")
      .Attr<int64_t>("problems");
}

}  // namespace
}  // namespace jax_sprnn::cuda

// ================================================================================================
// FFI symbols
// ================================================================================================

namespace sc = jax_sprnn::cuda;

// Production targets (registrations()).
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnForwardCuda, sc::ForwardProduction, sc::forward_binding(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnBackwardCuda, sc::BackwardProduction, sc::backward_binding(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnGatedForwardCuda, sc::GatedForwardProduction,
                              sc::gated_forward_binding(), {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnGatedBackwardCuda, sc::GatedBackwardProduction,
                              sc::gated_backward_binding(), {ffi::Traits::kCmdBufferCompatible});

// Test and benchmark targets (testing_registrations()): the same, plus the hooks.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnForwardHookedCuda, sc::ForwardHooked,
                              jax_sprnn::bindings::cuda_hook_attrs(sc::forward_binding()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnBackwardHookedCuda, sc::BackwardHooked,
                              jax_sprnn::bindings::cuda_hook_attrs(sc::backward_binding()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnGatedForwardHookedCuda, sc::GatedForwardHooked,
                              jax_sprnn::bindings::cuda_hook_attrs(sc::gated_forward_binding()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnGatedBackwardHookedCuda, sc::GatedBackwardHooked,
                              jax_sprnn::bindings::cuda_hook_attrs(sc::gated_backward_binding()),
                              {ffi::Traits::kCmdBufferCompatible});
