// CPU kernels of jax_sprnn as XLA FFI handlers. They read the same packed arrays as the CUDA kernel
// (docs/format.md), so CI exercises the packer, the handlers and the primitive plumbing for real.
// The numerics mirror the GPU: float32 accumulation, the state rounded to the storage dtype each step.
//
// Where the speed comes from:
// - each call walks the packed slots once into U's rows (cpu_rows.h: the column and float32 value
//   of every real nonzero, row by row), so a step is a row-by-row sparse product with 16-bit values
//   converted once per call;
// - the state is float32 in batch tiles [H][BT]: a nonzero multiplies BT contiguous floats, vectors
//   of the ISA's width, with several independent partial sums per row;
// - the rows of a step are split over XLA's CPU thread pool (cpu_parallel.h);
// - the hot loops are compiled for AVX-512, AVX2 and the baseline ISA, picked at run time
//   (JAX_SPRNN_CPU_ISA=baseline|avx2 narrows the choice, JAX_SPRNN_CPU_THREADS=n caps the threads);
// - the row's activation and the 16-bit conversions are branch-free loops (cpu_numerics.h).
//
// The gated cells' forward (LSTM, GRU: docs/gated.md) is the same recurrence over U's G*H gate rows:
// a thread owns a range of units and multiplies the rows of all their gates, then a per-unit
// epilogue (LstmCell, GruCell) combines a unit's G sums; the LSTM's c stays in float32 [B][H].
#include "cpu_kernels.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cpu_numerics.h"
#include "cpu_parallel.h"
#include "cpu_rows.h"
#include "ffi_bindings.h"
#include "ffi_checks.h"
#include "sprnn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_sprnn {
namespace {

using namespace cpu;  // NOLINT: the CPU kernels' own pieces (cpu_numerics.h, cpu_rows.h)

inline int64_t column_of(int32_t idx) { return idx < 0 ? ~idx : idx; }

// The gate counts of the gated cells (docs/gated.md); the simple cell has 1.
constexpr int64_t kGru = 3, kLstm = 4;

// Position of kernel step s for an example of length len.
inline int64_t position(int64_t s, int64_t len, bool reverse) { return reverse ? len - 1 - s : s; }

ffi::Error check_layout(const char* who, int64_t hidden, int64_t gates, int64_t num_slots,
                        int64_t num_lanes, int64_t slots_per_lane, int64_t activation, Layout* out) {
  std::string w(who);
  if (!valid_activation(activation))
    return ffi::Error::InvalidArgument(w + ": activation must be 0 (tanh), 1 (relu) or 2 (identity)");
  if (slots_per_lane <= 0 || num_lanes % kWarpSize != 0 || num_slots != num_lanes * slots_per_lane)
    return ffi::Error::InvalidArgument(
        w + ": indices must have num_lanes * slots_per_lane elements and lane_row a multiple of 32 (got " +
        std::to_string(num_slots) + " slots, " + std::to_string(num_lanes) + " lanes, slots_per_lane " +
        std::to_string(slots_per_lane) + ")");
  out->num_lanes = num_lanes;
  out->slots = slots_per_lane;
  out->hidden = hidden;
  out->gates = gates;
  return ffi::Error::Success();
}

ffi::Error check_indices(const char* who, const int32_t* indices, const int32_t* lane_row,
                         const Layout& lay) {
  std::vector<bool> seen(lay.rows(), false);  // rows whose run of lanes has started
  for (int64_t g = 0; g < lay.num_lanes; ++g) {
    const int32_t row = lane_row[g];
    if (row < -1 || row >= lay.rows())
      return ffi::Error::InvalidArgument(
          std::string(who) + ": lane_row[" + std::to_string(g) + "] = " + std::to_string(row) +
          " is out of range [-1, " + std::to_string(lay.rows()) + ") (" +
          (lay.rows() == lay.hidden ? std::string("the H rows")
                                    : "the G*H = " + std::to_string(lay.gates) + "*" +
                                          std::to_string(lay.hidden) + " gate rows") +
          ")");
    const bool continues = g % kWarpSize != 0 && lane_row[g - 1] == row;
    if (row < 0 || continues) continue;
    if (seen[row])  // the kernels build each warp's rows on their own (docs/format.md, invariant 1)
      return ffi::Error::InvalidArgument(std::string(who) + ": the lanes of row " + std::to_string(row) +
                                         " are not one contiguous run inside one warp (lane_row[" +
                                         std::to_string(g) + "])");
    seen[row] = true;
  }
  const int64_t n = lay.num_lanes * lay.slots;
  for (int64_t e = 0; e < n; ++e) {
    int64_t j = column_of(indices[e]);
    if (j >= lay.cols())
      return ffi::Error::InvalidArgument(std::string(who) + ": indices[" + std::to_string(e) +
                                         "] names column " + std::to_string(j) + " >= " +
                                         (lay.transposed ? "G*H " : "hidden ") + std::to_string(lay.cols()));
  }
  return ffi::Error::Success();
}

ffi::Error check_lengths(const char* who, const int32_t* lengths, int64_t B, int64_t T) {
  for (int64_t b = 0; b < B; ++b)
    if (lengths[b] < 0 || lengths[b] > T)
      return ffi::Error::InvalidArgument(std::string(who) + ": lengths[" + std::to_string(b) + "] = " +
                                         std::to_string(lengths[b]) + " is outside [0, T=" +
                                         std::to_string(T) + "]");
  return ffi::Error::Success();
}

// Every check of a packed layout of `gates` * `hidden` rows and `hidden` columns (indices and
// lane_row as given, with `num_values` values, or any number when it is negative) and of the
// lengths of B sequences of T steps; fills `lay`.
ffi::Error check_packed(const char* who, int64_t hidden, int64_t gates, ffi::Buffer<ffi::S32> indices,
                        ffi::Buffer<ffi::S32> lane_row, int64_t num_values, int64_t slots_per_lane,
                        int64_t activation, ffi::Buffer<ffi::S32> lengths, int64_t B, int64_t T,
                        Layout* lay, bool transposed = false) {
  if (auto e = check_layout(who, hidden, gates, indices.element_count(), lane_row.element_count(),
                            slots_per_lane, activation, lay);
      e.failure())
    return e;
  lay->transposed = transposed;
  if (num_values >= 0 && num_values != int64_t(indices.element_count()))
    return ffi::Error::InvalidArgument(std::string(who) + ": the values and the indices must have the same size");
  if (auto e = check_indices(who, indices.typed_data(), lane_row.typed_data(), *lay); e.failure()) return e;
  return check_lengths(who, lengths.typed_data(), B, T);
}


// ---- how the work is split ----------------------------------------------------------------------

// The batch runs in tiles of BT examples (BT one of these; padding examples of the last tile stay 0).
int64_t tile_width(int64_t batch) { return batch <= 1 ? 1 : batch <= 4 ? 4 : batch <= 8 ? 8 : 16; }

// ---- the hot loops (compiled once per ISA below) --------------------------------------------------

// An empty asm statement: the loop vectorizer leaves a loop that holds one alone. The product loops
// are already vector code; vectorized again over the nonzeros, they became gathers and spills.
#if defined(__GNUC__) || defined(__clang__)
#define JAX_SPRNN_NO_LOOP_VECTORIZE() __asm__ volatile("")
#else
#define JAX_SPRNN_NO_LOOP_VECTORIZE()
#endif

// L floats as a GCC/Clang vector. The kernels use vectors of the ISA's native width W (4, 8 or 16
// floats) and hold a batch tile of BT floats as BT / W of them: a wider generic vector, lowered by
// GCC for a narrower ISA, went through the stack. (Specializations, not an alias template: GCC drops
// a dependent vector_size there.) Loads and stores are unaligned memcpy's.
template <int L>
struct Tile;
template <>
struct Tile<4> {
  typedef float Vec __attribute__((vector_size(16)));
};
template <>
struct Tile<8> {
  typedef float Vec __attribute__((vector_size(32)));
};
template <>
struct Tile<16> {
  typedef float Vec __attribute__((vector_size(64)));
};

// The sum of the L floats at p, in a fixed order (halves added lane by lane down to 4, then a tree).
template <int L>
JAX_SPRNN_INLINE float lane_sum(const float* p) {
  if constexpr (L == 4) {
    return (p[0] + p[2]) + (p[1] + p[3]);
  } else {
    using Half = typename Tile<L / 2>::Vec;
    Half a, b;
    std::memcpy(&a, p, sizeof(Half));
    std::memcpy(&b, p + L / 2, sizeof(Half));
    a += b;
    float q[L / 2];
    std::memcpy(q, &a, sizeof(Half));
    return lane_sum<L / 2>(q);
  }
}

// Where the state is not all finite, the sparse sum alone would differ from the dense product
// h @ (mask * kernel) that the reference and the dense path compute (docs/reliability.md): there a
// pruned weight's 0 multiplies every h[j], and 0 * Inf and 0 * NaN are NaN. Row r of example j gets
// that NaN exactly when one of the example's nonfinite[j] non-finite values sits in a column the
// row has no entry in, i.e. when fewer of the row's entries than nonfinite[j] read a non-finite h.
// (The real entries themselves are in the sum: value * Inf gives +-Inf or NaN, as in IEEE.)
template <int BT, typename Index>
JAX_SPRNN_INLINE void poison_row(const Rows& m, int64_t r, const float* h, const int32_t* nonfinite,
                                 float* out) {
  const Index* col = m.col<Index>();
  int32_t seen[BT] = {};
  for (int64_t k = m.begin[r]; k < m.end[r]; ++k)
    for (int j = 0; j < BT; ++j) seen[j] += int32_t(not_finite(h[int64_t(col[k]) * BT + j]));
  for (int j = 0; j < BT; ++j)
    if (seen[j] < nonfinite[j]) out[j] = std::numeric_limits<float>::quiet_NaN();
}

// out[0, BT) = sum over row r's nonzeros of value * h[col, 0, BT) (h in [H][BT] tiles), made the
// dense product's NaN by poison_row when `nonfinite` (per example of the tile, its count of
// non-finite values of h) is given; W: the ISA's vector width in floats. U independent partial
// sums keep the FMA units busy (a single chain would wait on every add's latency).
template <int BT, int W, typename Index>
JAX_SPRNN_INLINE void row_product(const Rows& m, int64_t r, const float* h, const int32_t* nonfinite,
                                  float* out) {
  const Index* col = m.col<Index>() + m.begin[r];
  const float* val = m.val.get() + m.begin[r];
  const int64_t n = m.count(r);
  if constexpr (BT == 1) {
    constexpr int U = 8;
    float acc[U] = {};
    int64_t k = 0;
    for (; k + U <= n; k += U) {
      JAX_SPRNN_NO_LOOP_VECTORIZE();  // faster than AVX2 or AVX-512 gathers on a Zen 5
      for (int u = 0; u < U; ++u) acc[u] += val[k + u] * h[col[k + u]];
    }
    for (; k < n; ++k) acc[0] += val[k] * h[col[k]];
    out[0] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  } else {
    constexpr int L = BT < W ? BT : W;  // floats per vector
    constexpr int P = BT / L;           // vectors per batch tile
    constexpr int U = P <= 2 ? 4 : 2;
    using V = typename Tile<L>::Vec;
    V acc[U][P] = {};
    V hv;
    int64_t k = 0;
    for (; k + U <= n; k += U) {
      JAX_SPRNN_NO_LOOP_VECTORIZE();
      for (int u = 0; u < U; ++u) {
        const float* hc = h + int64_t(col[k + u]) * BT;
        for (int p = 0; p < P; ++p) {
          std::memcpy(&hv, hc + p * L, sizeof(V));
          acc[u][p] += val[k + u] * hv;
        }
      }
    }
    for (; k < n; ++k)
      for (int p = 0; p < P; ++p) {
        std::memcpy(&hv, h + int64_t(col[k]) * BT + p * L, sizeof(V));
        acc[0][p] += val[k] * hv;
      }
    for (int u = 1; u < U; ++u)
      for (int p = 0; p < P; ++p) acc[0][p] += acc[u][p];
    for (int p = 0; p < P; ++p) std::memcpy(out + p * L, &acc[0][p], sizeof(V));
  }
  if (nonfinite != nullptr) poison_row<BT, Index>(m, r, h, nonfinite, out);
}

// Rows [r0, r1) of U h for one batch tile: acc[(r - r0) * BT + j].
template <int BT, int W, typename Index>
JAX_SPRNN_INLINE void tile_products(const Rows& m, int64_t r0, int64_t r1, const float* h,
                                    const int32_t* nonfinite, float* acc) {
  for (int64_t r = r0; r < r1; ++r)
    row_product<BT, W, Index>(m, r, h, nonfinite, acc + (r - r0) * BT);
}

// What the stages of a recurrence share. The state it carries from step to step is float32 in batch
// tiles, [tiles][H][BT]; stage q reads state[q % 2] and writes state[(q + 1) % 2]. U has gates * H
// rows (the gated cells' gate rows), and a stage's rows come in whole units: unit i is rows
// i, H + i, ..., (gates - 1) * H + i.
struct Recurrence {
  const Rows* rows;
  int64_t T, B, H, BT, tiles, threads;
  int64_t gates = 1;
  const int32_t* lengths;
  bool reverse;
  float* state[2];
  // [stages + 1]: whether some value of the state stage q reads is not finite (then poison_row runs).
  std::atomic<uint8_t>* nonfinite;
};

struct Forward : Recurrence {
  const void* x;  // [T, B, gates * H]
  void* y;        // [T, B, H]
  float* c = nullptr;              // the LSTM's cell state, [B][H], rounded to the storage type
  void* cells = nullptr;           // the LSTM's cell state after each position [T, B, H], or none
  const float* hn_bias = nullptr;  // the GRU's [H]
};

// Rounds the new state z[0, n) of one example to the storage type into yp[0, n) and, as the next
// step reads it, back into z and the state tile (next[k * BT]); returns whether it is all finite.
template <typename S>
JAX_SPRNN_INLINE bool emit_state(float* z, int64_t n, typename S::Raw* yp, float* next, int64_t BT) {
  uint32_t nonfinite = 0;
  for (int64_t k = 0; k < n; ++k) {
    const typename S::Raw out = S::store(z[k]);
    yp[k] = out;
    z[k] = S::load(out);
    nonfinite |= not_finite(z[k]);
  }
  for (int64_t k = 0; k < n; ++k) next[k * BT] = z[k];
  return nonfinite == 0;
}

// z[k] = x[g * H + k] + acc[(g * n + k) * BT] for k in [0, n): gate g's input plus its rows' sums
// (acc: the stage's sums of one example, [gates][n][BT] from its column).
template <typename S>
JAX_SPRNN_INLINE void gate_sums(const typename S::Raw* x, const float* acc, int64_t g, int64_t H,
                                int64_t n, int64_t BT, float* z) {
  for (int64_t k = 0; k < n; ++k) z[k] = S::load(x[g * H + k]) + acc[(g * n + k) * BT];
}

// The cells: step() updates units [i0, i0 + n) of example b, still running, at its position, from
// x (the position's inputs, [gates * H]), h (its state tile at unit i0, stride BT) and acc; it writes
// y (at unit i0) and the next state tile (at unit i0, stride BT), and returns whether the new h is
// finite. z: scratch for 5 * n floats.

// The simple cell: h' = act(x + U h).
template <typename S, int ACT>
struct SimpleCell {
  static JAX_SPRNN_INLINE bool step(const Forward& f, int64_t, int64_t i0, int64_t n,
                                    const typename S::Raw* x, const float*, const float* acc,
                                    typename S::Raw* y, float* next, float* z) {
    gate_sums<S>(x + i0, acc, 0, f.H, n, f.BT, z);
    activate_row<ACT>(z, n);
    return emit_state<S>(z, n, y, next, f.BT);
  }
};

// The LSTM (gates i, f, g, o); c' is rounded to the storage type before h' = o tanh(c') reads it.
template <typename S>
struct LstmCell {
  static JAX_SPRNN_INLINE bool step(const Forward& f, int64_t b, int64_t i0, int64_t n,
                                    const typename S::Raw* x, const float*, const float* acc,
                                    typename S::Raw* y, float* next, float* z) {
    for (int64_t g = 0; g < kLstm; ++g) gate_sums<S>(x + i0, acc, g, f.H, n, f.BT, z + g * n);
    float* c = f.c + b * f.H + i0;
    for (int64_t k = 0; k < n; ++k) {
      const float in = sigmoid_f32(z[k]), forget = sigmoid_f32(z[n + k]);
      const float cand = tanh_f32(z[2 * n + k]), out = sigmoid_f32(z[3 * n + k]);
      const float c_new = S::load(S::store(forget * c[k] + in * cand));
      c[k] = c_new;
      z[k] = out * tanh_f32(c_new);
    }
    if (f.cells != nullptr) {  // at y's place in the same-shaped cells
      auto* cells = static_cast<typename S::Raw*>(f.cells) + (y - static_cast<const typename S::Raw*>(f.y));
      for (int64_t k = 0; k < n; ++k) cells[k] = S::store(c[k]);
    }
    return emit_state<S>(z, n, y, next, f.BT);
  }
};

// The GRU (gates r, z, n): n = tanh(x_n + r (u_n + hn_bias)), h' = (1 - z) n + z h.
template <typename S>
struct GruCell {
  static JAX_SPRNN_INLINE bool step(const Forward& f, int64_t, int64_t i0, int64_t n,
                                    const typename S::Raw* x, const float* h, const float* acc,
                                    typename S::Raw* y, float* next, float* z) {
    const int64_t H = f.H, BT = f.BT;
    gate_sums<S>(x + i0, acc, 0, H, n, BT, z);
    gate_sums<S>(x + i0, acc, 1, H, n, BT, z + n);
    float* x_n = z + 2 * n;
    float* u_n = z + 3 * n;  // plus hn_bias
    float* h_old = z + 4 * n;
    for (int64_t k = 0; k < n; ++k) {
      x_n[k] = S::load(x[2 * H + i0 + k]);
      u_n[k] = acc[(2 * n + k) * BT] + f.hn_bias[i0 + k];
      h_old[k] = h[k * BT];
    }
    for (int64_t k = 0; k < n; ++k) {
      const float reset = sigmoid_f32(z[k]), update = sigmoid_f32(z[n + k]);
      const float cand = tanh_f32(x_n[k] + reset * u_n[k]);
      z[k] = (1.0f - update) * cand + update * h_old[k];
    }
    return emit_state<S>(z, n, y, next, f.BT);
  }
};

// The forward step s of batch tile t on units [i0, i1), given acc = U h ([gates][i1 - i0][BT]):
// Cell::step for the examples still running; the others keep their carry (h, and an LSTM's c in
// place) and get y[s] = 0. Returns whether every new h is finite. z: scratch for 5 (i1 - i0) floats.
template <typename S, typename Cell>
JAX_SPRNN_INLINE bool forward_epilogue(const Forward& f, int64_t s, int64_t t, int64_t i0, int64_t i1,
                                       const float* acc, float* z) {
  using Raw = typename S::Raw;
  const int64_t H = f.H, B = f.B, BT = f.BT;
  const auto* x = static_cast<const Raw*>(f.x);
  auto* y = static_cast<Raw*>(f.y);
  const float* h = f.state[s & 1] + t * H * BT;
  float* next = f.state[(s + 1) & 1] + t * H * BT;
  bool finite = true;
  for (int64_t j = 0; j < BT && t * BT + j < B; ++j) {
    const int64_t b = t * BT + j, len = f.lengths[b];
    if (s < len) {
      const int64_t at = position(s, len, f.reverse) * B + b;
      finite &= Cell::step(f, b, i0, i1 - i0, x + at * f.gates * H, h + i0 * BT + j, acc + j,
                           y + at * H + i0, next + i0 * BT + j, z);
    } else {
      Raw* ys = y + (s * B + b) * H;
      for (int64_t r = i0; r < i1; ++r) {
        const float v = h[r * BT + j];
        ys[r] = S::store(0.0f);
        next[r * BT + j] = v;
        finite &= std::isfinite(v);
      }
      if (f.cells != nullptr)
        for (int64_t r = i0; r < i1; ++r) static_cast<Raw*>(f.cells)[(s * B + b) * H + r] = S::store(0.0f);
    }
  }
  return finite;
}

struct Backward : Recurrence {
  const void* y;
  const void* dy;
  void* dx;
  float* dh;  // [B][H]
};

// The backward pass's stage q runs kernel step s = T - q: first dh = U^T dz_s for the examples
// running at s (acc; no product at q = 0, where dh is dh_final), then for step s - 1:
// dz = (dh + dy[p]) * act'(y[p]), dx[p] = dz, the state the next stage multiplies (float32).
// This is its elementwise part for batch tile t on rows [r0, r1); returns whether dz is finite.
template <typename S, int ACT>
JAX_SPRNN_INLINE bool backward_epilogue(const Backward& g, int64_t q, int64_t t, int64_t r0, int64_t r1,
                                        const float* acc, float* z) {
  using Raw = typename S::Raw;
  const int64_t H = g.H, B = g.B, BT = g.BT, T = g.T, s = T - q;
  const auto* y = static_cast<const Raw*>(g.y);
  const auto* dy = static_cast<const Raw*>(g.dy);
  auto* dx = static_cast<Raw*>(g.dx);
  float* next = g.state[(q + 1) & 1] + t * H * BT;
  bool finite = true;
  for (int64_t j = 0; j < BT && t * BT + j < B; ++j) {
    const int64_t b = t * BT + j, len = g.lengths[b];
    float* dh = g.dh + b * H;
    if (s < T && s < len)
      for (int64_t r = r0; r < r1; ++r) dh[r] = acc[(r - r0) * BT + j];
    if (s == 0) continue;
    if (s - 1 < len) {
      const int64_t p = position(s - 1, len, g.reverse);
      const Raw* yp = y + (p * B + b) * H;
      const Raw* dyp = dy + (p * B + b) * H;
      Raw* dxp = dx + (p * B + b) * H;
      uint32_t nonfinite = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const float dz = (dh[r] + S::load(dyp[r])) * activation_grad(ACT, S::load(yp[r]));
        z[r - r0] = dz;
        dxp[r] = S::store(dz);
        nonfinite |= not_finite(dz);
      }
      finite &= nonfinite == 0;
      for (int64_t r = r0; r < r1; ++r) next[r * BT + j] = z[r - r0];
    } else {  // outputs past the length are constant zeros: nothing flows back through them
      Raw* dxs = dx + ((s - 1) * B + b) * H;
      for (int64_t r = r0; r < r1; ++r) {
        next[r * BT + j] = 0.0f;
        dxs[r] = S::store(0.0f);
      }
    }
  }
  return finite;
}

// The weight gradient runs over blocks of kPairBlock (example, step) pairs: a stage packs the block's
// h_before and dz rows transposed, [H][kPairBlock] float32, the next one adds, for every nonzero
// (i, j), the block's dot product of dz[i] and h_before[j] to its slot.
constexpr int64_t kPairBlock = 128;  // 16 * 8: block_sums<8>

struct WeightGrad {
  const Rows* rows;
  int64_t B, H;
  const int32_t* lengths;
  bool reverse;
  const void* y;
  const void* h0;
  const void* dz;
  const std::vector<std::pair<int32_t, int32_t>>* pairs;  // (b, s) of the group, b-major
  float* h_t;   // [H][kPairBlock]
  float* dz_t;  // [H][kPairBlock]
  float* dvalues;
};

// The state that step s of example b started from: h0, or the output of the previous active step.
template <typename Raw>
const Raw* state_before(const Raw* y, const Raw* h0, int64_t s, int64_t b, int64_t B, int64_t H,
                        int64_t len, bool reverse) {
  if (s == 0) return h0 + b * H;
  return y + (position(s - 1, len, reverse) * B + b) * H;
}

// Packs the columns [c0, c1) (multiples of 16) of pair block `block`; pairs past the end give zeros.
// 16 pairs at a time: their rows converted to float32 one after the other (contiguous, so the
// conversion vectorizes) into `rows` (scratch for 32 * H floats), then transposed.
template <typename S>
JAX_SPRNN_INLINE void pack_pairs(const WeightGrad& w, int64_t block, int64_t c0, int64_t c1, float* rows) {
  using Raw = typename S::Raw;
  constexpr int64_t kGroup = 16;
  const int64_t H = w.H, B = w.B, n = int64_t(w.pairs->size());
  const auto* y = static_cast<const Raw*>(w.y);
  const auto* h0 = static_cast<const Raw*>(w.h0);
  const auto* dz = static_cast<const Raw*>(w.dz);
  float* h_rows = rows;
  float* dz_rows = rows + kGroup * H;
  for (int64_t c = c0; c < c1; c += kGroup) {
    for (int64_t u = 0; u < kGroup; ++u) {
      const int64_t at = block * kPairBlock + c + u;
      float* hr = h_rows + u * H;
      float* dr = dz_rows + u * H;
      if (at >= n) {
        std::fill(hr, hr + H, 0.0f);
        std::fill(dr, dr + H, 0.0f);
        continue;
      }
      const auto [b, s] = (*w.pairs)[at];
      const int64_t len = w.lengths[b];
      const Raw* hp = state_before(y, h0, s, b, B, H, len, w.reverse);
      const Raw* dzp = dz + (position(s, len, w.reverse) * B + b) * H;
      for (int64_t i = 0; i < H; ++i) hr[i] = S::load(hp[i]);
      for (int64_t i = 0; i < H; ++i) dr[i] = S::load(dzp[i]);
    }
    for (int64_t i = 0; i < H; ++i)
      for (int64_t u = 0; u < kGroup; ++u) {
        w.h_t[i * kPairBlock + c + u] = h_rows[u * H + i];
        w.dz_t[i * kPairBlock + c + u] = dz_rows[u * H + i];
      }
  }
}

// Rows [r0, r1): every real entry's slot gets the block's sum over its 16 * NV pairs of
// h_before[col] * dz[row]: up to four vector partial sums of the ISA's width W, then lane_sum. The order is
// fixed for an ISA, whatever the number of threads.
template <int NV, int W, typename Index>
JAX_SPRNN_INLINE void block_products(const WeightGrad& w, int64_t r0, int64_t r1) {
  constexpr int L = W, P = 16 * NV / L;  // P vectors of L floats per block row
  using V = typename Tile<L>::Vec;
  const Rows& m = *w.rows;
  const Index* cols = m.col<Index>();
  for (int64_t r = r0; r < r1; ++r) {
    const float* dz = w.dz_t + r * kPairBlock;
    for (int64_t k = m.begin[r]; k < m.end[r]; ++k) {
      JAX_SPRNN_NO_LOOP_VECTORIZE();
      const float* h = w.h_t + int64_t(cols[k]) * kPairBlock;
      constexpr int C = P < 4 ? P : 4;  // independent partial sums
      V acc[C] = {}, hv, dv;
      for (int p = 0; p < P; p += C)
        for (int c = 0; c < C; ++c) {  // a constant count: unrolled, the sums stay in registers
          std::memcpy(&hv, h + (p + c) * L, sizeof(V));
          std::memcpy(&dv, dz + (p + c) * L, sizeof(V));
          acc[c] += hv * dv;
        }
      for (int c = 1; c < C; ++c) acc[0] += acc[c];
      float lanes[L];
      std::memcpy(lanes, &acc[0], sizeof(V));
      w.dvalues[m.slot[k]] += lane_sum<L>(lanes);
    }
  }
}

// ---- one copy of the hot loops per instruction set --------------------------------------------------

// Each ISA is a struct of entry points that force-inline the loops above under its target attribute.
#define JAX_SPRNN_ISA_ENTRY_POINTS(NAME, ATTRIBUTE, WIDTH)                                           \
  struct NAME {                                                                                      \
    template <int BT, typename Index>                                                                \
    ATTRIBUTE static void products(const Rows& m, int64_t r0, int64_t r1, const float* h,            \
                                   const int32_t* nonfinite, float* acc) {                           \
      tile_products<BT, WIDTH, Index>(m, r0, r1, h, nonfinite, acc);                                 \
    }                                                                                                \
    template <typename S, typename Cell>                                                             \
    ATTRIBUTE static bool forward(const Forward& f, int64_t s, int64_t t, int64_t r0, int64_t r1,    \
                                  const float* acc, float* z) {                                      \
      return forward_epilogue<S, Cell>(f, s, t, r0, r1, acc, z);                                     \
    }                                                                                                \
    template <typename S, int ACT>                                                                   \
    ATTRIBUTE static bool backward(const Backward& g, int64_t q, int64_t t, int64_t r0, int64_t r1, \
                                   const float* acc, float* z) {                                     \
      return backward_epilogue<S, ACT>(g, q, t, r0, r1, acc, z);                                     \
    }                                                                                                \
    template <typename S>                                                                            \
    ATTRIBUTE static void pack(const WeightGrad& w, int64_t block, int64_t c0, int64_t c1,           \
                               float* rows) {                                                        \
      pack_pairs<S>(w, block, c0, c1, rows);                                                         \
    }                                                                                                \
    template <int NV, typename Index>                                                                \
    ATTRIBUTE static void block_sums(const WeightGrad& w, int64_t r0, int64_t r1) {                  \
      block_products<NV, WIDTH, Index>(w, r0, r1);                                                   \
    }                                                                                                \
  };

JAX_SPRNN_ISA_ENTRY_POINTS(Baseline, , 4)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JAX_SPRNN_X86_VARIANTS 1
JAX_SPRNN_ISA_ENTRY_POINTS(Avx2, __attribute__((target("avx2,fma"))), 8)
JAX_SPRNN_ISA_ENTRY_POINTS(
    Avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512"))),
    16)
#endif
#undef JAX_SPRNN_ISA_ENTRY_POINTS

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest ISA this CPU runs; JAX_SPRNN_CPU_ISA=baseline|avx2 narrows it (tests use it to run
// every variant on one machine).
Isa cpu_isa() {
#if JAX_SPRNN_X86_VARIANTS
  static const Isa widest = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
  }();
  const char* env = std::getenv("JAX_SPRNN_CPU_ISA");
  const Isa asked = env == nullptr                      ? widest
                    : std::strcmp(env, "baseline") == 0 ? Isa::kBaseline
                    : std::strcmp(env, "avx2") == 0     ? Isa::kAvx2
                                                        : widest;
  return std::min(asked, widest);
#else
  return Isa::kBaseline;
#endif
}

template <int N>
using Int = std::integral_constant<int, N>;

// pick(isa) with the entry-point struct of this CPU's ISA.
template <typename Pick>
auto with_isa(Pick&& pick) {
#if JAX_SPRNN_X86_VARIANTS
  switch (cpu_isa()) {
    case Isa::kAvx512: return pick(Avx512{});
    case Isa::kAvx2: return pick(Avx2{});
    default: break;
  }
#endif
  return pick(Baseline{});
}

// The entry points one recurrence call uses, chosen once per call.
template <typename Epilogue>
struct RecurrenceKernels {
  void (*products)(const Rows&, int64_t, int64_t, const float*, const int32_t*, float*);
  Epilogue epilogue;
};

// The products for batch tiles of `tile` examples and the epilogue that epilogue_of(isa) names, for
// this CPU's ISA.
template <typename EpilogueOf>
auto recurrence_kernels(const Rows& rows, int64_t tile, EpilogueOf&& epilogue_of) {
  return with_isa([&](auto isa) {
    using I = decltype(isa);
    using Products = void (*)(const Rows&, int64_t, int64_t, const float*, const int32_t*, float*);
    auto products = [&](auto index) -> Products {
      using Index = decltype(index);
      return tile == 1   ? &I::template products<1, Index>
             : tile == 4 ? &I::template products<4, Index>
             : tile == 8 ? &I::template products<8, Index>
                         : &I::template products<16, Index>;
    };
    RecurrenceKernels<decltype(epilogue_of(isa))> k;
    k.products = with_index(rows, products);
    k.epilogue = epilogue_of(isa);
    return k;
  });
}

// pick(Int<A>{}) for the activation code `act`.
template <typename Pick>
auto with_activation(int64_t act, Pick&& pick) {
  return act == kTanh ? pick(Int<kTanh>{}) : act == kRelu ? pick(Int<kRelu>{}) : pick(Int<kIdentity>{});
}

// The forward recurrence's kernels: the simple cell with activation `act`, or the gated cell of
// `gates` gates.
template <typename S>
auto forward_kernels(const Rows& rows, int64_t tile, int64_t gates, int64_t act) {
  return recurrence_kernels(rows, tile, [&](auto isa) {
    using I = decltype(isa);
    if (gates == kLstm) return &I::template forward<S, LstmCell<S>>;
    if (gates == kGru) return &I::template forward<S, GruCell<S>>;
    return with_activation(act, [](auto a) {
      return &I::template forward<S, SimpleCell<S, decltype(a)::value>>;
    });
  });
}

template <typename S>
auto backward_kernels(const Rows& rows, int64_t tile, int64_t act) {
  return recurrence_kernels(rows, tile, [&](auto isa) {
    using I = decltype(isa);
    return with_activation(act, [](auto a) { return &I::template backward<S, decltype(a)::value>; });
  });
}

// count[j] = how many of h[0, H)[j] are Inf or NaN, for each example j of a [H][BT] tile.
inline void count_nonfinite(const float* h, int64_t H, int64_t BT, int32_t* count) {
  std::fill(count, count + BT, 0);
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < BT; ++j) count[j] += int32_t(not_finite(h[i * BT + j]));
}

// Stage q of a recurrence on units [i0, i1): the sparse product of their rows (every gate's) for
// every batch tile (skipped when `multiply` is false), then its epilogue; flags stage q + 1 when the
// new state is not all finite. In a flagged stage each thread counts a tile's non-finite values
// (O(H * BT), only then) for poison_row. acc: scratch for (i1 - i0) * stage_scratch(rec) floats.
template <typename R, typename Kernels>
void run_stage(const R& rec, const Kernels& k, int64_t q, bool multiply, int64_t i0, int64_t i1,
               float* acc) {
  const bool some_nonfinite = rec.nonfinite[q].load(std::memory_order_relaxed) != 0;
  const int64_t n = i1 - i0;
  int32_t count[16];  // BT <= 16 (tile_width)
  bool finite = true;
  for (int64_t t = 0; t < rec.tiles; ++t) {
    const float* h = rec.state[q & 1] + t * rec.H * rec.BT;
    if (multiply) {
      if (some_nonfinite) count_nonfinite(h, rec.H, rec.BT, count);
      for (int64_t g = 0; g < rec.gates; ++g)
        k.products(*rec.rows, g * rec.H + i0, g * rec.H + i1, h, some_nonfinite ? count : nullptr,
                   acc + g * n * rec.BT);
    }
    finite &= k.epilogue(rec, q, t, i0, i1, acc, acc + rec.gates * n * rec.BT);
  }
  if (!finite) rec.nonfinite[q + 1].store(1, std::memory_order_relaxed);
}

// ---- the drivers ------------------------------------------------------------------------------------

// The scratch of a stage per unit: the rows' sums of a batch tile, then the epilogue's (5 floats at
// most: GruCell).
inline int64_t stage_scratch(const Recurrence& r) { return r.gates * r.BT + 5; }

// How many threads a call may use: JAX_SPRNN_CPU_THREADS caps it (1: single-threaded).
int64_t max_threads(ffi::ThreadPool* pool) {
  int64_t n = cpu::pool_threads(pool);
  if (const char* env = std::getenv("JAX_SPRNN_CPU_THREADS")) n = std::min<int64_t>(n, std::max(1, std::atoi(env)));
  return n;
}

// Below this many multiply-adds per stage, handing part of a stage to another thread costs more
// than it saves.
constexpr int64_t kMinParallelWork = 1 << 14;

int64_t threads_for(ffi::ThreadPool* pool, int64_t work_per_stage) {
  return work_per_stage < kMinParallelWork ? 1 : max_threads(pool);
}

// A float32 buffer whose start is 64-byte aligned: a batch tile read at any column then stays within
// whole cache lines.
struct AlignedFloats {
  std::vector<float> storage;
  float* data = nullptr;
  explicit AlignedFloats(int64_t n) : storage(n + 16, 0.0f) {
    const auto at = reinterpret_cast<uintptr_t>(storage.data());
    data = storage.data() + ((64 - at % 64) % 64) / sizeof(float);
  }
};

// The tiled float32 state buffers and the per-stage non-finite flags of a recurrence.
struct RecurrenceBuffers {
  AlignedFloats state;
  std::unique_ptr<std::atomic<uint8_t>[]> nonfinite;

  RecurrenceBuffers(Recurrence& r, int64_t stages)
      : state(2 * r.tiles * r.H * r.BT), nonfinite(new std::atomic<uint8_t>[stages + 1]) {
    for (int64_t q = 0; q <= stages; ++q) nonfinite[q].store(0, std::memory_order_relaxed);
    r.state[0] = state.data;
    r.state[1] = state.data + r.tiles * r.H * r.BT;
    r.nonfinite = nonfinite.get();
  }
};

// The rows and the shape of a recurrence, and how many threads it runs on.
template <typename S>
void init_recurrence(Recurrence& r, Rows& rows, const int32_t* indices, const int32_t* lane_row,
                     const void* values, const Layout& lay, int64_t T, int64_t B,
                     const int32_t* lengths, bool reverse, ffi::ThreadPool* pool) {
  r.T = T, r.B = B, r.H = lay.hidden, r.BT = tile_width(B), r.tiles = (B + r.BT - 1) / r.BT;
  r.gates = lay.gates;
  r.lengths = lengths, r.reverse = reverse;
  r.threads = threads_for(pool, lay.num_lanes * lay.slots * r.tiles * r.BT + 8 * lay.rows() * B);
  build_rows<S>(rows, indices, lane_row, lay, values, pool, r.threads);
  r.rows = &rows;
}

// Runs `stages` stages of a recurrence (stage q multiplies unless q < skip_products), its units
// split over the threads.
template <typename R, typename Kernels>
void run_recurrence(const R& rec, const Kernels& k, int64_t stages, int64_t skip_products,
                    ffi::ThreadPool* pool) {
  const int64_t threads = rec.threads;
  const std::vector<int64_t> bounds =
      balanced_units(*rec.rows, rec.gates, threads, rec.tiles * rec.BT, 8 * rec.gates * rec.B);
  std::vector<std::vector<float>> scratch(threads, std::vector<float>(widest(bounds) * stage_scratch(rec)));
  auto stage = [&](int64_t q, int64_t c, int64_t thread) {
    run_stage(rec, k, q, q >= skip_products, bounds[c], bounds[c + 1], scratch[thread].data());
  };
  cpu::run_stages(pool, threads, stages, threads, stage);
}

// The operands and results of a forward recurrence (the simple cell's, or a gated cell's:
// Layout::gates); c0 and c_final are the LSTM's, hn_bias the GRU's.
struct ForwardCall {
  const void *x, *h0, *c0 = nullptr, *values;
  const int32_t *indices, *lane_row, *lengths;
  const float* hn_bias = nullptr;
  void *y, *h_final, *c_final = nullptr, *cells = nullptr;
  int64_t T, B, act = kTanh;
  bool reverse;
};

template <typename S>
void forward(const ForwardCall& call, const Layout& lay, ffi::ThreadPool* pool) {
  using Raw = typename S::Raw;
  const int64_t T = call.T, B = call.B;
  const RowsCache::Lease rows = RowsCache::instance().take();
  Forward f;
  init_recurrence<S>(f, *rows, call.indices, call.lane_row, call.values, lay, T, B, call.lengths,
                     call.reverse, pool);
  f.x = call.x, f.y = call.y, f.hn_bias = call.hn_bias, f.cells = call.cells;
  RecurrenceBuffers buffers(f, T);
  const int64_t H = f.H, BT = f.BT;
  const auto* h0 = static_cast<const Raw*>(call.h0);
  bool finite = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < H; ++i) {
      const float v = S::load(h0[b * H + i]);
      f.state[0][(b / BT) * H * BT + i * BT + b % BT] = v;
      finite &= std::isfinite(v);
    }
  if (!finite) f.nonfinite[0].store(1, std::memory_order_relaxed);
  std::vector<float> c;  // the LSTM's cell state, [B][H]
  if (lay.gates == kLstm) {
    const auto* c0 = static_cast<const Raw*>(call.c0);
    c.resize(B * H);
    for (int64_t e = 0; e < B * H; ++e) c[e] = S::load(c0[e]);
    f.c = c.data();
  }

  run_recurrence(f, forward_kernels<S>(*rows, BT, lay.gates, call.act), T, 0, pool);

  auto* hT = static_cast<Raw*>(call.h_final);
  const float* h = f.state[T & 1];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < H; ++i) hT[b * H + i] = S::store(h[(b / BT) * H * BT + i * BT + b % BT]);
  auto* cT = static_cast<Raw*>(call.c_final);
  for (size_t e = 0; e < c.size(); ++e) cT[e] = S::store(c[e]);
}

template <typename S>
void backward(const void* y, const void* h0, const void* values_t, const int32_t* indices_t,
              const int32_t* lane_row_t, const int32_t* lengths, const void* dy, const void* dhT_,
              void* dx, void* dh0_, int64_t T, int64_t B, const Layout& lay, int64_t act, bool reverse,
              ffi::ThreadPool* pool) {
  using Raw = typename S::Raw;
  const RowsCache::Lease rows = RowsCache::instance().take();
  Backward g;
  init_recurrence<S>(g, *rows, indices_t, lane_row_t, values_t, lay, T, B, lengths, reverse, pool);
  g.y = y, g.dy = dy, g.dx = dx;
  RecurrenceBuffers buffers(g, T + 1);
  const int64_t H = g.H;
  const auto* dhT = static_cast<const Raw*>(dhT_);
  std::vector<float> dh(B * H);
  for (int64_t e = 0; e < B * H; ++e) dh[e] = S::load(dhT[e]);
  g.dh = dh.data();

  // Stage 0 only computes dz of the last step from dh_final (nothing to multiply yet).
  run_recurrence(g, backward_kernels<S>(*rows, g.BT, act), T + 1, 1, pool);

  auto* dh0 = static_cast<Raw*>(dh0_);
  for (int64_t e = 0; e < B * H; ++e) dh0[e] = S::store(dh[e]);
}

// dvalues[g, slot] = sum over the examples b of group g and their active steps s of
// h_before[s, b, col(slot)] * dz[p(s), b, row(slot)]; padding slots stay exactly 0. The summation
// order is fixed (blocks of pairs in (b, s) order, a fixed tree inside a block), whatever the
// number of threads, so the result is bitwise reproducible.
template <typename S>
void weight_grad(const void* y, const void* h0, const void* dz, const int32_t* indices,
                 const int32_t* lane_row, const int32_t* lengths, float* dvalues, int64_t T, int64_t B,
                 int64_t groups, const Layout& lay, bool reverse, ffi::ThreadPool* pool) {
  const int64_t H = lay.hidden, n = lay.num_lanes * lay.slots, per_group = B / groups;
  std::fill(dvalues, dvalues + groups * n, 0.0f);
  const int64_t threads = threads_for(pool, n * std::min<int64_t>(kPairBlock, per_group * T));
  const RowsCache::Lease lease = RowsCache::instance().take();
  Rows& rows = *lease;
  build_rows<S>(rows, indices, lane_row, lay, nullptr, pool, threads);
  AlignedFloats h_t(H * kPairBlock), dz_t(H * kPairBlock);
  std::vector<std::pair<int32_t, int32_t>> pairs;
  WeightGrad w;
  w.rows = &rows;
  w.B = B, w.H = H, w.lengths = lengths, w.reverse = reverse, w.y = y, w.h0 = h0, w.dz = dz;
  w.pairs = &pairs, w.h_t = h_t.data, w.dz_t = dz_t.data;
  const auto pack = with_isa([](auto isa) { return &decltype(isa)::template pack<S>; });
  using BlockSums = void (*)(const WeightGrad&, int64_t, int64_t);
  const auto block_sums = with_isa([&](auto isa) {
    using I = decltype(isa);
    return with_index(rows, [](auto index) {
      using Index = decltype(index);
      return std::array<BlockSums, 4>{&I::template block_sums<1, Index>, &I::template block_sums<2, Index>,
                                      &I::template block_sums<4, Index>, &I::template block_sums<8, Index>};
    });
  });
  const std::vector<int64_t> bounds = balanced_units(rows, 1, threads, 1, 0);
  std::vector<std::vector<float>> scratch(threads, std::vector<float>(32 * H));

  for (int64_t group = 0; group < groups; ++group) {
    pairs.clear();
    for (int64_t b = group * per_group; b < (group + 1) * per_group; ++b)
      for (int32_t s = 0; s < lengths[b]; ++s) pairs.emplace_back(int32_t(b), s);
    if (pairs.empty()) continue;
    w.dvalues = dvalues + group * n;
    const int64_t blocks = (int64_t(pairs.size()) + kPairBlock - 1) / kPairBlock;
    // A block is 16 * 2^v pairs wide, the narrowest that holds its pairs (only the last one is
    // not full); the pack stage pads it with zeros.
    auto log2_vectors = [&](int64_t block) {
      const int64_t held = std::min<int64_t>(kPairBlock, int64_t(pairs.size()) - block * kPairBlock);
      int v = 0;
      while (16 << v < held) ++v;
      return v;
    };
    auto stage = [&](int64_t st, int64_t c, int64_t thread) {
      const int64_t block = st / 2;
      const int v = log2_vectors(block);
      if (st % 2 == 0) {  // pack: the block's columns in 16-wide groups, split over the threads
        const int64_t groups16 = int64_t(1) << v;
        pack(w, block, groups16 * c / threads * 16, groups16 * (c + 1) / threads * 16,
             scratch[thread].data());
      } else {
        block_sums[v](w, bounds[c], bounds[c + 1]);
      }
    };
    cpu::run_stages(pool, threads, 2 * blocks, threads, stage);
  }
}

// ---- the gated cells' backward recurrence (docs/gated.md) ---------------------------------------
//
// What jax_sprnn/gated_backward.py's scan computes in XLA, with the same rounding points: per step,
// from the last to the first, the cell's local derivative per unit gives the gate pre-activations'
// cotangents dx, the recurrent products' cotangents du (both written out: du feeds the weight
// gradient) and the carry's direct part; then the state's cotangent one step earlier is that part
// plus U^T du, the product over the transposed layout's rows (unit j's weights into every gate
// column), with du rounded to the storage type as the 16-bit product there reads it. The operands
// are in step order: example b runs steps [0, lengths[b]); past that its carry is held and its dx
// and du are 0. The two cotangents of h' (the carry's and dy's) meet in the storage type, as do the
// LSTM's two of c'.

struct GatedBackwardCall {
  const void *x, *h_before, *c_before, *dy, *dh_final, *dc_final, *values_t;  // storage type
  const float *u, *hn_bias;
  const int32_t *indices_t, *lane_row_t, *lengths;
  void *dx, *dh0, *dc0;  // storage type
  float* du;
  int64_t T, B;
};

// The cells' backward for units [i0, i0 + n) of one running example at one step, in loops over the
// units that vectorize (the activations are straight-line code). In: x and u (the step's [G*H] rows
// at unit i0), h and c of the state the step started from, dh (h' cotangent: the carry's and dy's,
// met in the storage type) and, for the LSTM, dc (c' cotangent; replaced by that of c). Out: dx
// and du (the step's [G*H] rows at unit i0) and `direct` (the part of dh of the state before that
// does not go through U: the GRU's dh * z, rounded; the LSTM has none). z: scratch for 5 n floats.
template <typename S>
JAX_SPRNN_INLINE void lstm_cells_backward(const typename S::Raw* x, const float* u, int64_t H, int64_t n,
                                          const typename S::Raw* c, const float* dh, float* dc,
                                          float* dx, float* du, float* z) {
  float *si = z, *sf = z + n, *tg = z + 2 * n, *so = z + 3 * n, *tc = z + 4 * n;
  for (int64_t k = 0; k < n; ++k) si[k] = sigmoid_f32(S::load(x[k]) + u[k]);
  for (int64_t k = 0; k < n; ++k) sf[k] = sigmoid_f32(S::load(x[H + k]) + u[H + k]);
  for (int64_t k = 0; k < n; ++k) tg[k] = tanh_f32(S::load(x[2 * H + k]) + u[2 * H + k]);
  for (int64_t k = 0; k < n; ++k) so[k] = sigmoid_f32(S::load(x[3 * H + k]) + u[3 * H + k]);
  for (int64_t k = 0; k < n; ++k) tc[k] = tanh_f32(S::load(S::store(sf[k] * S::load(c[k]) + si[k] * tg[k])));
  for (int64_t k = 0; k < n; ++k) {
    const float d = S::load(S::store(dc[k] + S::load(S::store(dh[k] * so[k] * (1.0f - tc[k] * tc[k])))));
    du[k] = d * tg[k] * (si[k] * (1.0f - si[k]));
    du[H + k] = d * S::load(c[k]) * (sf[k] * (1.0f - sf[k]));
    du[2 * H + k] = d * si[k] * (1.0f - tg[k] * tg[k]);
    du[3 * H + k] = dh[k] * tc[k] * (so[k] * (1.0f - so[k]));
    dc[k] = S::load(S::store(d * sf[k]));
  }
  for (int64_t k = 0; k < 4 * H; k += H)
    for (int64_t j = 0; j < n; ++j) dx[k + j] = du[k + j];
}

template <typename S>
JAX_SPRNN_INLINE void gru_cells_backward(const typename S::Raw* x, const float* u, int64_t H, int64_t n,
                                         const typename S::Raw* h, const float* hn_bias, const float* dh,
                                         float* direct, float* dx, float* du, float* z) {
  float *r = z, *zg = z + n, *a = z + 2 * n, *nn = z + 3 * n;
  for (int64_t k = 0; k < n; ++k) r[k] = sigmoid_f32(S::load(x[k]) + u[k]);
  for (int64_t k = 0; k < n; ++k) zg[k] = sigmoid_f32(S::load(x[H + k]) + u[H + k]);
  for (int64_t k = 0; k < n; ++k) a[k] = u[2 * H + k] + hn_bias[k];
  for (int64_t k = 0; k < n; ++k) nn[k] = tanh_f32(S::load(x[2 * H + k]) + r[k] * a[k]);
  for (int64_t k = 0; k < n; ++k) {
    const float dn = dh[k] * (1.0f - zg[k]) * (1.0f - nn[k] * nn[k]);
    dx[k] = dn * a[k] * (r[k] * (1.0f - r[k]));
    dx[H + k] = (dh[k] * S::load(h[k]) - dh[k] * nn[k]) * (zg[k] * (1.0f - zg[k]));
    dx[2 * H + k] = dn;
    du[k] = dx[k];
    du[H + k] = dx[H + k];
    du[2 * H + k] = dn * r[k];
    direct[k] = S::load(S::store(dh[k] * zg[k]));
  }
}

template <typename S>
void gated_backward(const GatedBackwardCall& call, const Layout& lay, ffi::ThreadPool* pool) {
  using Raw = typename S::Raw;
  const int64_t T = call.T, B = call.B, H = lay.hidden, G = lay.gates, W = G * H;
  const bool lstm = G == kLstm;
  const int64_t BT = tile_width(B), tiles = (B + BT - 1) / BT;
  const RowsCache::Lease lease = RowsCache::instance().take();
  Rows& rows = *lease;
  const int64_t threads = threads_for(pool, lay.num_lanes * lay.slots * tiles * BT + 16 * W * B);
  build_rows<S>(rows, call.indices_t, call.lane_row_t, lay, call.values_t, pool, threads);
  const auto products = recurrence_kernels(rows, BT, [](auto) { return 0; }).products;

  const auto* x = static_cast<const Raw*>(call.x);
  const auto* hb = static_cast<const Raw*>(call.h_before);
  const auto* cb = static_cast<const Raw*>(call.c_before);
  const auto* dy = static_cast<const Raw*>(call.dy);
  auto* dx = static_cast<Raw*>(call.dx);
  float* du = call.du;
  // The carries, rounded to the storage type: dh (and the LSTM's dc) of the state a step starts
  // from; `direct`: dh's part that does not go through U (the GRU's dh * z; 0 for the LSTM).
  std::vector<float> dh(B * H), dc(lstm ? B * H : 0), direct(B * H, 0.0f);
  for (int64_t e = 0; e < B * H; ++e) dh[e] = S::load(static_cast<const Raw*>(call.dh_final)[e]);
  for (int64_t e = 0; lstm && e < B * H; ++e) dc[e] = S::load(static_cast<const Raw*>(call.dc_final)[e]);
  AlignedFloats staged(tiles * W * BT);  // the step's du, [tiles][G*H][BT], what U^T multiplies
  std::atomic<uint8_t> nonfinite{0};     // some staged du of the step is Inf or NaN
  const std::vector<int64_t> bounds = balanced_units(rows, 1, threads, tiles * BT, 16 * G * B);
  // per thread: the products' sums ([units][BT]), or the cells' scratch (5 n + n + 2 G H floats)
  const int64_t widest_chunk = widest(bounds);
  std::vector<std::vector<float>> scratch(
      threads, std::vector<float>(std::max(widest_chunk * BT, 6 * widest_chunk + 2 * W)));

  // Stage 2k: the cells of step s = T-1-k on units [i0, i1); stage 2k+1: their rows of U^T du.
  auto stage = [&](int64_t q, int64_t c, int64_t thread) {
    const int64_t s = T - 1 - q / 2, i0 = bounds[c], i1 = bounds[c + 1];
    if (q % 2 == 0) {
      const int64_t n = i1 - i0;
      float* z = scratch[thread].data();  // 5 n floats of the cells, then dh, dx and du of the units
      float *dh_out = z + 5 * n, *dxs = dh_out + n, *dus = dxs + W;
      bool finite = true;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t at = s * B + b;
        float* tile = staged.data + (b / BT) * W * BT + b % BT;
        if (s < call.lengths[b]) {
          for (int64_t k = 0; k < n; ++k)
            dh_out[k] = S::load(S::store(dh[b * H + i0 + k] + S::load(dy[at * H + i0 + k])));
          if (lstm) {
            lstm_cells_backward<S>(x + at * W + i0, call.u + at * W + i0, H, n, cb + at * H + i0, dh_out,
                                   dc.data() + b * H + i0, dxs, dus, z);
          } else {
            gru_cells_backward<S>(x + at * W + i0, call.u + at * W + i0, H, n, hb + at * H + i0,
                                  call.hn_bias + i0, dh_out, direct.data() + b * H + i0, dxs, dus, z);
          }
        } else {  // past the example's end: no cotangent flows, the carry is held
          for (int64_t g = 0; g < G; ++g)
            for (int64_t k = 0; k < n; ++k) dxs[g * H + k] = dus[g * H + k] = 0.0f;
        }
        for (int64_t g = 0; g < G; ++g) {
          Raw* dxp = dx + at * W + g * H + i0;
          float* dup = du + at * W + g * H + i0;
          float* tp = tile + (g * H + i0) * BT;
          uint32_t bad = 0;
          for (int64_t k = 0; k < n; ++k) {
            dxp[k] = S::store(dxs[g * H + k]);
            dup[k] = dus[g * H + k];
            const float v = S::load(S::store(dus[g * H + k]));  // the 16-bit product reads du in D
            tp[k * BT] = v;
            bad |= not_finite(v);
          }
          finite &= bad == 0;
        }
      }
      if (!finite) nonfinite.store(1, std::memory_order_relaxed);
    } else {
      float* acc = scratch[thread].data();
      const bool some_nonfinite = nonfinite.load(std::memory_order_relaxed) != 0;
      int32_t count[16];  // BT <= 16
      for (int64_t t = 0; t < tiles; ++t) {
        const float* tile = staged.data + t * W * BT;
        if (some_nonfinite) count_nonfinite(tile, W, BT, count);
        products(rows, i0, i1, tile, some_nonfinite ? count : nullptr, acc);
        for (int64_t j = 0; j < BT && t * BT + j < B; ++j) {
          const int64_t b = t * BT + j;
          if (s >= call.lengths[b]) continue;  // the carry is held
          for (int64_t i = i0; i < i1; ++i)
            dh[b * H + i] = S::load(S::store(direct[b * H + i] + acc[(i - i0) * BT + j]));
        }
      }
    }
  };
  // (The nonfinite flag is per call, not per step: once set, later steps count too, which only
  // costs time.)
  cpu::run_stages(pool, threads, 2 * T, threads, stage);

  auto* dh0 = static_cast<Raw*>(call.dh0);
  for (int64_t e = 0; e < B * H; ++e) dh0[e] = S::store(dh[e]);
  auto* dc0 = static_cast<Raw*>(call.dc0);
  for (size_t e = 0; e < dc.size(); ++e) dc0[e] = S::store(dc[e]);
}

// ---- the handlers ------------------------------------------------------------------------------

// run(S{}) for the storage type `dt`, or the error that names the dtypes there are.
template <typename Run>
ffi::Error with_storage_type(const char* who, ffi::DataType dt, Run&& run) {
  switch (dt) {
    case ffi::F32: run(F32{}); break;
    case ffi::BF16: run(BF16{}); break;
    case ffi::F16: run(F16{}); break;
    default:
      return ffi::Error::InvalidArgument(std::string(who) + ": dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer values,
                       ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> lane_row,
                       ffi::Buffer<ffi::S32> lengths, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> h_final, int64_t activation, int64_t reverse,
                       int64_t slots_per_lane, int64_t warps_per_cta, int64_t reg_slots,
                       int64_t load_bytes, ffi::ThreadPool pool) {
  auto dims = x.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jax_sprnn_forward: x must be [T, B, H]");
  const int64_t T = dims[0], B = dims[1], H = dims[2];
  const auto dt = x.element_type();
  if (h0.element_type() != dt || values.element_type() != dt || y->element_type() != dt ||
      h_final->element_type() != dt)
    return ffi::Error::InvalidArgument("jax_sprnn_forward: x, h0, values and outputs must share a dtype");
  if (h0.element_count() != size_t(B * H) || lengths.element_count() != size_t(B))
    return ffi::Error::InvalidArgument("jax_sprnn_forward: h0 must be [B, H] and lengths [B]");
  Layout lay;
  if (auto e = check_packed("jax_sprnn_forward", H, 1, indices, lane_row, values.element_count(),
                            slots_per_lane, activation, lengths, B, T, &lay);
      e.failure())
    return e;
  ForwardCall call;
  call.x = x.untyped_data(), call.h0 = h0.untyped_data(), call.values = values.untyped_data();
  call.indices = indices.typed_data(), call.lane_row = lane_row.typed_data();
  call.lengths = lengths.typed_data();
  call.y = y->untyped_data(), call.h_final = h_final->untyped_data();
  call.T = T, call.B = B, call.act = activation, call.reverse = reverse != 0;
  return with_storage_type("jax_sprnn_forward", dt, [&](auto type) { forward<decltype(type)>(call, lay, &pool); });
}

// ---- the gated cells' forward handler (its operands' shapes and dtypes checked one by one) ----------

using Dims = ffi::AnyBuffer::Dimensions;

using ffi_checks::dtype_name;
using ffi_checks::shape_text;
using ffi_checks::checks_for;
using ffi_checks::GatedChecks;

ffi::Error GatedForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer h0, ffi::AnyBuffer c0, ffi::AnyBuffer values,
                            ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> lane_row,
                            ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::F32> hn_bias,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> h_final,
                            ffi::Result<ffi::AnyBuffer> c_final, ffi::Result<ffi::AnyBuffer> cells,
                            int64_t gates, int64_t reverse, int64_t slots_per_lane, int64_t warps_per_cta,
                            int64_t reg_slots, int64_t load_bytes, ffi::ThreadPool pool) {
  const char* who = "jax_sprnn_gated_forward";
  const bool lstm = gates == kLstm;
  const GatedChecks check = checks_for(who, gates);
  if (gates != kGru && gates != kLstm)
    return check.fail("gates must be 3 (GRU) or 4 (LSTM), got " + std::to_string(gates));
  const Dims dims = x.dimensions();
  if (dims.size() != 3 || dims[2] % gates != 0)
    return check.fail("x must be [T, B, G*H] with G = gates = " + std::to_string(gates) + ", got " +
                      shape_text(dims.begin(), dims.size()));
  const int64_t T = dims[0], B = dims[1], H = dims[2] / gates;
  for (auto e : {check.shape("h0", h0.dimensions(), {B, H}, "[B, H]"),
                 lstm ? check.shape("c0", c0.dimensions(), {B, H}, "[B, H]") : check.empty("c0", c0.dimensions()),
                 lstm ? check.empty("hn_bias", hn_bias.dimensions())
                      : check.shape("hn_bias", hn_bias.dimensions(), {H}, "float32 [H]"),
                 check.shape("lengths", lengths.dimensions(), {B}, "int32 [B]"),
                 check.shape("y", y->dimensions(), {T, B, H}, "[T, B, H]"),
                 check.shape("h_final", h_final->dimensions(), {B, H}, "[B, H]"),
                 lstm ? check.shape("c_final", c_final->dimensions(), {B, H}, "[B, H]")
                      : check.empty("c_final", c_final->dimensions()),
                 lstm ? check.shape_or_empty("cells", cells->dimensions(), {T, B, H}, "[T, B, H]")
                      : check.empty("cells", cells->dimensions())})
    if (e.failure()) return e;
  const auto dt = x.element_type();
  const std::pair<const char*, ffi::DataType> typed[] = {
      {"h0", h0.element_type()}, {"c0", c0.element_type()}, {"values", values.element_type()},
      {"y", y->element_type()}, {"h_final", h_final->element_type()}, {"c_final", c_final->element_type()},
      {"cells", cells->element_type()}};
  for (const auto& [name, type] : typed)
    if (type != dt)
      return check.fail(std::string(name) + " is " + dtype_name(type) + " but x is " + dtype_name(dt) +
                        ": x, h0, c0, values, y, h_final, c_final and cells must share one dtype");
  Layout lay;
  if (auto e = check_packed(who, H, gates, indices, lane_row, values.element_count(), slots_per_lane, kTanh,
                            lengths, B, T, &lay);
      e.failure())
    return e;
  ForwardCall call;
  call.x = x.untyped_data(), call.h0 = h0.untyped_data(), call.c0 = c0.untyped_data();
  call.values = values.untyped_data();
  call.indices = indices.typed_data(), call.lane_row = lane_row.typed_data();
  call.lengths = lengths.typed_data(), call.hn_bias = hn_bias.typed_data();
  call.y = y->untyped_data(), call.h_final = h_final->untyped_data(), call.c_final = c_final->untyped_data();
  call.cells = cells->element_count() != 0 ? cells->untyped_data() : nullptr;
  call.T = T, call.B = B, call.reverse = reverse != 0;
  return with_storage_type(who, dt, [&](auto type) { forward<decltype(type)>(call, lay, &pool); });
}

// The gated cells' backward recurrence (docs/format.md, "jax_sprnn_gated_backward"): operands in
// step order, the kernel's transposed layout.
ffi::Error GatedBackwardImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> u, ffi::AnyBuffer h_before,
                             ffi::AnyBuffer c_before, ffi::AnyBuffer dy, ffi::AnyBuffer dh_final,
                             ffi::AnyBuffer dc_final, ffi::Buffer<ffi::F32> hn_bias, ffi::AnyBuffer values_t,
                             ffi::Buffer<ffi::S32> indices_t, ffi::Buffer<ffi::S32> lane_row_t,
                             ffi::Buffer<ffi::S32> lengths, ffi::Result<ffi::AnyBuffer> dx,
                             ffi::Result<ffi::Buffer<ffi::F32>> du, ffi::Result<ffi::AnyBuffer> dh0,
                             ffi::Result<ffi::AnyBuffer> dc0, int64_t gates, int64_t slots_per_lane,
                             ffi::ThreadPool pool) {
  const char* who = "jax_sprnn_gated_backward";
  ffi_checks::Sizes sizes;
  if (auto e = ffi_checks::check_operands(who, gates, x, u, h_before, c_before, dy, dh_final,
                                                     dc_final, hn_bias, values_t, lengths, *dx, *du,
                                                     *dh0, *dc0, &sizes);
      e.failure())
    return e;
  const int64_t T = sizes.T, B = sizes.B, H = sizes.H;
  const bool lstm = gates == kLstm;
  const auto dt = x.element_type();
  Layout lay;
  if (auto e = check_packed(who, H, gates, indices_t, lane_row_t, values_t.element_count(), slots_per_lane,
                            kTanh, lengths, B, T, &lay, /*transposed=*/true);
      e.failure())
    return e;
  GatedBackwardCall call;
  call.x = x.untyped_data(), call.u = u.typed_data(), call.h_before = h_before.untyped_data();
  call.c_before = c_before.untyped_data(), call.dy = dy.untyped_data();
  call.dh_final = dh_final.untyped_data(), call.dc_final = dc_final.untyped_data();
  call.hn_bias = hn_bias.typed_data(), call.values_t = values_t.untyped_data();
  call.indices_t = indices_t.typed_data(), call.lane_row_t = lane_row_t.typed_data();
  call.lengths = lengths.typed_data();
  call.dx = dx->untyped_data(), call.du = du->typed_data(), call.dh0 = dh0->untyped_data();
  call.dc0 = dc0->untyped_data();
  call.T = T, call.B = B;
  return with_storage_type(who, dt, [&](auto type) { gated_backward<decltype(type)>(call, lay, &pool); });
}

ffi::Error BackwardImpl(ffi::AnyBuffer y, ffi::AnyBuffer h0, ffi::AnyBuffer values_t,
                        ffi::Buffer<ffi::S32> indices_t, ffi::Buffer<ffi::S32> lane_row_t,
                        ffi::Buffer<ffi::S32> lengths, ffi::AnyBuffer dy, ffi::AnyBuffer dh_final,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dh0,
                        int64_t activation, int64_t reverse, int64_t slots_per_lane,
                        int64_t warps_per_cta, int64_t reg_slots, int64_t load_bytes,
                        ffi::ThreadPool pool) {
  auto dims = y.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jax_sprnn_backward: y must be [T, B, H]");
  const int64_t T = dims[0], B = dims[1], H = dims[2];
  const auto dt = y.element_type();
  for (auto t : {h0.element_type(), values_t.element_type(), dy.element_type(),
                 dh_final.element_type(), dx->element_type(), dh0->element_type()})
    if (t != dt) return ffi::Error::InvalidArgument("jax_sprnn_backward: all float operands must share a dtype");
  if (dy.element_count() != y.element_count() || dh_final.element_count() != size_t(B * H) ||
      h0.element_count() != size_t(B * H) || lengths.element_count() != size_t(B))
    return ffi::Error::InvalidArgument("jax_sprnn_backward: dy must match y, h0/dh_final be [B, H], lengths [B]");
  Layout lay;
  if (auto e = check_packed("jax_sprnn_backward", H, 1, indices_t, lane_row_t, values_t.element_count(),
                            slots_per_lane, activation, lengths, B, T, &lay);
      e.failure())
    return e;
  return with_storage_type("jax_sprnn_backward", dt, [&](auto type) {
    backward<decltype(type)>(y.untyped_data(), h0.untyped_data(), values_t.untyped_data(),
                             indices_t.typed_data(), lane_row_t.typed_data(), lengths.typed_data(),
                             dy.untyped_data(), dh_final.untyped_data(), dx->untyped_data(),
                             dh0->untyped_data(), T, B, lay, activation, reverse != 0, &pool);
  });
}

ffi::Error WeightGradImpl(ffi::AnyBuffer y, ffi::AnyBuffer h0, ffi::AnyBuffer dz,
                          ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> lane_row,
                          ffi::Buffer<ffi::S32> lengths, ffi::Result<ffi::Buffer<ffi::F32>> dvalues,
                          int64_t groups, int64_t reverse, int64_t slots_per_lane,
                          ffi::ThreadPool pool) {
  auto dims = y.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: y must be [T, B, H]");
  const int64_t T = dims[0], B = dims[1], H = dims[2];
  const auto dt = y.element_type();
  if (h0.element_type() != dt || dz.element_type() != dt)
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: y, h0 and dz must share a dtype");
  if (groups <= 0 || B % groups != 0)
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: groups must divide the batch");
  if (dz.element_count() != y.element_count() || h0.element_count() != size_t(B * H) ||
      lengths.element_count() != size_t(B))
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: dz must match y, h0 be [B, H], lengths [B]");
  Layout lay;
  if (auto e = check_packed("jax_sprnn_weight_grad", H, 1, indices, lane_row, -1, slots_per_lane, kTanh,
                            lengths, B, T, &lay);
      e.failure())
    return e;
  if (dvalues->element_count() != size_t(groups) * indices.element_count())
    return ffi::Error::InvalidArgument("jax_sprnn_weight_grad: dvalues must be [groups, slots]");
  return with_storage_type("jax_sprnn_weight_grad", dt, [&](auto type) {
    weight_grad<decltype(type)>(y.untyped_data(), h0.untyped_data(), dz.untyped_data(),
                                indices.typed_data(), lane_row.typed_data(), lengths.typed_data(),
                                dvalues->typed_data(), T, B, groups, lay, reverse != 0, &pool);
  });
}

}  // namespace
}  // namespace jax_sprnn

namespace binds = jax_sprnn::bindings;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnForwardCpu, jax_sprnn::ForwardImpl,
                              binds::layout_attrs(binds::forward_operands(ffi::Ffi::Bind()))
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnBackwardCpu, jax_sprnn::BackwardImpl,
                              binds::layout_attrs(binds::backward_operands(ffi::Ffi::Bind()))
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnWeightGradCpu, jax_sprnn::WeightGradImpl,
                              binds::weight_grad_operands(ffi::Ffi::Bind())
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("reverse")
                                  .Attr<int64_t>("slots_per_lane")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnGatedForwardCpu, jax_sprnn::GatedForwardImpl,
                              binds::gated_attrs(binds::gated_forward_operands(ffi::Ffi::Bind()))
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSprnnGatedBackwardCpu, jax_sprnn::GatedBackwardImpl,
                              binds::gated_backward_operands(ffi::Ffi::Bind())
                                  .Attr<int64_t>("gates")
                                  .Attr<int64_t>("slots_per_lane")
                                  .Ctx<ffi::ThreadPool>());
