// U's rows, built once per call from the packed layout (docs/format.md) for the CPU kernels, and
// how they are split over threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cpu_parallel.h"
#include "sprnn_common.h"
#include "xla/ffi/api/ffi.h"

namespace jax_sprnn::cpu {

// The shape of a packed layout (the handlers check it against their operands first): U has
// gates * hidden rows (a gated kernel's gate rows, row g * hidden + i gate g of unit i) and hidden
// columns (the state).
// A transposed layout (the backward recurrences' U^T) swaps them: hidden rows, gates * hidden
// columns (for a gated kernel, unit j's weights into every gate column).
struct Layout {
  int64_t num_lanes = 0, slots = 0, hidden = 0, gates = 1;
  bool transposed = false;
  int64_t rows() const { return transposed ? hidden : gates * hidden; }
  int64_t cols() const { return transposed ? gates * hidden : hidden; }
};

// An uninitialized array (std::vector would zero it first, a pass the build below does not need)
// that keeps its memory when asked for less.
template <typename T>
struct Buffer {
  std::unique_ptr<T[]> data;
  int64_t capacity = 0;
  void reserve(int64_t n) {
    if (n <= capacity) return;
    data.reset(new T[size_t(n)]);
    capacity = n;
  }
  T* get() const { return data.get(); }
  T& operator[](int64_t i) const { return data[i]; }
};

// U's real entries (the packed slots less the padding), in row order. The padding is not kept: a
// pruned weight is 0 wherever it sits, and the kernels give a step whose state is not all finite
// the dense product's NaN by counting (cpu_kernels.cc, poison_row), not through the padding slots,
// whose columns are arbitrary (docs/format.md, invariant 3). A row's lanes are one run inside one
// warp (docs/format.md, invariant 1; check_indices enforces it), so warps count and fill their rows
// independently.
struct Rows {
  int64_t num_rows = 0, nnz = 0;
  std::vector<int32_t> begin, end;  // [rows]: row r's entries are [begin[r], end[r])
  std::vector<int32_t> lane_real;   // [lanes]: each lane's real slots
  // [slots]: the column an entry reads, as uint16_t up to H = 65536 (the weights' bytes per entry
  // bound a step: each thread streams its rows' entries from L3), else int32_t
  bool narrow = false;
  Buffer<uint16_t> col16;
  Buffer<int32_t> col32;
  Buffer<float> val;     // [slots]: a real entry's value in float32 (the recurrences)
  Buffer<int32_t> slot;  // [slots]: a real entry's flat offset in the packed arrays (weight gradient)

  int64_t count(int64_t r) const { return end[r] - begin[r]; }
  template <typename Index>
  const Index* col() const {
    if constexpr (std::is_same_v<Index, uint16_t>) {
      return col16.get();
    } else {
      return col32.get();
    }
  }
};

// Calls fn(Index{}) with the column type of `m`.
template <typename Fn>
auto with_index(const Rows& m, Fn&& fn) {
  return m.narrow ? fn(uint16_t{}) : fn(int32_t{});
}

// Rows reused from call to call: filling fresh memory cost more in page faults than the build
// itself. A call takes one (or a new one) and gives it back; as many are kept as ran at once.
class RowsCache {
 public:
  struct GiveBack {
    void operator()(Rows* rows) const { RowsCache::instance().give(rows); }
  };
  using Lease = std::unique_ptr<Rows, GiveBack>;

  static RowsCache& instance() {
    static RowsCache* cache = new RowsCache;  // never destroyed: a lease may end during exit
    return *cache;
  }
  Lease take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return Lease(new Rows);
    Lease lease(free_.back().release());
    free_.pop_back();
    return lease;
  }

 private:
  void give(Rows* rows) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(rows);
  }
  std::mutex mu_;
  std::vector<std::unique_ptr<Rows>> free_;
};

// Counts warp w's real slots, lane by lane and row by row (its rows are its own).
inline void count_warp(Rows& m, const int32_t* indices, const int32_t* lane_row, int64_t K, int64_t w) {
  const int64_t base = w * K * kWarpSize;
  const int32_t* rows = lane_row + w * kWarpSize;
  int32_t* real = m.lane_real.data() + w * kWarpSize;
  std::fill(real, real + kWarpSize, 0);
  for (int64_t k = 0; k < K; ++k)
    for (int l = 0; l < kWarpSize; ++l) {  // branch-free: a fifth of the slots, at random, are padding
      const int32_t used = rows[l] >= 0, padding = int32_t(uint32_t(indices[base + k * kWarpSize + l]) >> 31);
      real[l] += used & (padding ^ 1);
    }
  for (int l = 0; l < kWarpSize; ++l)
    if (rows[l] >= 0) m.end[rows[l]] += real[l];  // counts for now; build_rows turns them into offsets
}

// Writes warp w's real entries from their rows' offsets (begin). With `raw` values the entries get
// val, without, slot. Branch-free (padding slots come at random): a padding slot, or any slot of an
// idle lane, writes its column (and a value or slot nobody reads) at index `trash`, which only the
// caller's thread writes.
template <typename S, typename Index>
void fill_warp(Rows& m, const int32_t* indices, const int32_t* lane_row, int64_t K, int64_t w,
               const typename S::Raw* raw, int32_t trash) {
  Index* col = const_cast<Index*>(m.col<Index>());
  const int64_t base = w * K * kWarpSize;
  const int32_t* rows = lane_row + w * kWarpSize;
  int32_t next_real[kWarpSize], used[kWarpSize];  // each lane's first entry
  for (int l = 0; l < kWarpSize; ++l) {
    used[l] = rows[l] >= 0;
    if (!used[l]) {
      next_real[l] = trash;
      continue;
    }
    const bool first = l == 0 || rows[l - 1] != rows[l];
    next_real[l] = first ? m.begin[rows[l]] : next_real[l - 1] + m.lane_real[w * kWarpSize + l - 1];
  }
  for (int l = 0; l < kWarpSize; ++l) {  // lane by lane: its cursor stays in a register
    int32_t real_at = next_real[l];
    const int32_t live = used[l];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = base + k * kWarpSize + l;
      const int32_t idx = indices[e], padding = int32_t(uint32_t(idx) >> 31);
      const int32_t at = padding ? trash : real_at;
      real_at += live & (padding ^ 1);
      col[at] = Index(idx ^ -padding);  // ~idx for padding
      if (raw != nullptr) {
        m.val[at] = S::load(raw[e]);
      } else {
        m.slot[at] = int32_t(e);
      }
    }
  }
}

// U's rows of a packed layout (values: storage-type values for the recurrences, or nullptr for
// the weight gradient): the warps count, one thread turns counts into offsets, the warps fill.
template <typename S>
void build_rows(Rows& m, const int32_t* indices, const int32_t* lane_row, const Layout& lay,
                const void* values, xla::ffi::ThreadPool* pool, int64_t threads) {
  const int64_t R = lay.rows(), warps = lay.num_lanes / kWarpSize;
  m.num_rows = R;
  for (auto* v : {&m.begin, &m.end}) v->assign(R, 0);
  m.lane_real.resize(lay.num_lanes);
  // The entries fit in [0, slots); after them, each chunk of the fill gets its own trash index,
  // kTrashStride apart so that two threads never write one cache line.
  constexpr int64_t kTrashStride = 32;
  const int64_t slots = lay.num_lanes * lay.slots, extra = kTrashStride * threads;
  m.narrow = lay.cols() <= 65536;
  if (m.narrow) {
    m.col16.reserve(slots + extra);
  } else {
    m.col32.reserve(slots + extra);
  }
  if (values != nullptr) {
    m.val.reserve(slots + extra);
  } else {
    m.slot.reserve(slots + extra);
  }
  const auto* raw = static_cast<const typename S::Raw*>(values);
  auto build = [&](int64_t stage, int64_t c, int64_t) {
    const int64_t w0 = warps * c / threads, w1 = warps * (c + 1) / threads;
    if (stage == 0) {
      for (int64_t w = w0; w < w1; ++w) count_warp(m, indices, lane_row, lay.slots, w);
    } else if (stage == 1 && c == 0) {
      int64_t at = 0;
      for (int64_t r = 0; r < R; ++r) {
        m.begin[r] = int32_t(at);
        at += m.end[r];
        m.end[r] = int32_t(at);
      }
      m.nnz = at;
    } else if (stage == 2) {
      const auto trash = int32_t(slots + kTrashStride * c);
      for (int64_t w = w0; w < w1; ++w) {
        if (m.narrow) {
          fill_warp<S, uint16_t>(m, indices, lane_row, lay.slots, w, raw, trash);
        } else {
          fill_warp<S, int32_t>(m, indices, lane_row, lay.slots, w, raw, trash);
        }
      }
    }
  };
  run_stages(pool, threads, 3, threads, build);
}

// Unit boundaries of `chunks` ranges of about equal cost. Unit i of U's rows / gates is its rows
// i, units + i, ..., (gates - 1) * units + i (a gated cell's epilogue needs all of a unit's gates;
// gates = 1: the units are the rows) and costs its nonzeros times `per_nonzero` plus `per_unit`.
inline std::vector<int64_t> balanced_units(const Rows& m, int64_t gates, int64_t chunks,
                                           int64_t per_nonzero, int64_t per_unit) {
  const int64_t units = m.num_rows / gates;
  const double total = double(m.nnz) * per_nonzero + double(units) * per_unit;
  std::vector<int64_t> bounds(chunks + 1, units);
  bounds[0] = 0;
  double cost = 0;
  int64_t c = 1;
  for (int64_t i = 0; i < units && c < chunks; ++i) {
    for (int64_t g = 0; g < gates; ++g) cost += double(m.count(g * units + i)) * per_nonzero;
    cost += per_unit;
    while (c < chunks && cost >= total * c / chunks) bounds[c++] = i + 1;
  }
  return bounds;
}

inline int64_t widest(const std::vector<int64_t>& bounds) {
  int64_t w = 0;
  for (size_t c = 0; c + 1 < bounds.size(); ++c) w = std::max(w, bounds[c + 1] - bounds[c]);
  return w;
}

}  // namespace jax_sprnn::cpu
