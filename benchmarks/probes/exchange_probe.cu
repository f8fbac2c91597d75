// Exchange probe: what one timestep's state exchange costs on this GPU, for each exchange design
// the persistent kernel could use (issues 15 and 16). A standalone program, no JAX: it runs the
// kernel's protocol (16-bit value | 16-bit Lamport tag in one 4-byte word, double-buffered, no
// grid barrier) with no compute, so what it measures is the floor a real step cannot go below.
//
//   all          every CTA stages all of h from L2 (the kernel today): 8 16-byte vectors in
//                flight per thread, re-polling the pending ones at once.
//   all+sleep    the same, with __nanosleep between re-polls (less L2 traffic from spinning).
//   poll-one     a warp first waits (with back-off) on one vector of its chunk, then fetches all.
//   cluster-N    cluster-assisted: CTA r of a cluster of N stages 1/N of h from L2 and pushes it
//                into the shared memory of all N peers (DSMEM); one cluster barrier a step. L2
//                reads per step fall N-fold.
//   local-N      a layer inside one cluster of N CTAs (R independent replicas fill the GPU): the
//                state never leaves the cluster; DSMEM pushes and one cluster barrier a step.
//                N = 1 is a layer in one CTA (a __syncthreads a step).
//   mbar-N       local-N with no cluster barrier: each push is an st.async that completes its bytes
//                on the receiving CTA's mbarrier for that buffer, and a CTA waits on its own
//                mbarrier before reading the state (the design issue 16 points to, docs/design.md).
//   barrier      a bare grid-wide flag barrier, no data (the floor of any grid-wide design).
//   all-wide     as `all`, with 16-byte words of 7 values and one tag (one ld/st.b128 each):
//                87.5% payload instead of 50%. Relies on 16-byte single-copy atomicity of the
//                aligned .b128 accesses; the count check below would show a torn word as a
//                wrong value.
//
// Every mode checks its result (each word counts the steps) and reports a timeout, never hangs.
// Build and run: nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/exchange_probe exchange_probe.cu &&
//                /tmp/exchange_probe   (prints a table; --csv for machine-readable rows)
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace cg = cooperative_groups;

#define CHECK(x)                                                                         \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

enum Mode : int { kAll, kAllSleep, kPollOne, kClusterSplit, kClusterLocal, kBarrier, kAllWide, kClusterMbar };

struct Params {
  uint32_t* buf[2];  // exchange buffers of `words` words (global modes)
  uint32_t* err;     // 1: a wait timed out
  uint32_t* counter; // grid barrier counter
  uint32_t* out;     // per CTA: its first owned word's value after the last step
  int words, steps, mode, sleep_ns, cluster;
  unsigned long long timeout_ns;
};

__device__ __forceinline__ void ld4(uint4& v, const uint32_t* p) {
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
}
__device__ __forceinline__ void st1(uint32_t* p, uint32_t a) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(a) : "memory");
}
__device__ __forceinline__ uint32_t ld1(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ bool tagged(const uint4& v, uint32_t tag) {
  return (v.x >> 16) == tag && (v.y >> 16) == tag && (v.z >> 16) == tag && (v.w >> 16) == tag;
}

// Bounded waiting: sticky once any thread anywhere timed out. Never an early return from the
// kernel (a CTA that left would strand its cluster peers at the next barrier): an aborted thread
// just stops waiting, so every loop still ends.
struct Spin {
  uint32_t* err;
  unsigned long long timeout_ns;
  bool aborted = false;
  __device__ bool give_up(unsigned long long& deadline) {
    const unsigned long long t = now_ns();
    if (deadline == 0) deadline = t + timeout_ns;
    else if (t > deadline) atomicOr(err, 1u);
    if (ld1(err) != 0) aborted = true;
    return aborted;
  }
};

// Stages vectors [v_begin, v_end) (4 words each) of `src` carrying `tag`, handing each to sink.
template <int U, class Sink>
__device__ __forceinline__ void stage(const uint32_t* __restrict__ src, int v_begin, int v_end,
                                      uint32_t tag, int sleep_ns, bool poll_one, Spin& spin,
                                      Sink sink) {
  const int lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
  constexpr int kChunk = 32 * U;
  for (int chunk = v_begin + (threadIdx.x >> 5) * kChunk; chunk < v_end && !spin.aborted;
       chunk += n_warps * kChunk) {
    const int base = chunk + lane;
    uint4 v[U];
    unsigned long long deadline = 0;
    if (poll_one) {  // lane 0 waits on the chunk's last vector, which its warp then needs anyway
      const int last = min(v_end, chunk + kChunk) - 1;
      if (lane == 0) {
        uint4 probe;
        for (uint32_t it = 1;; ++it) {
          ld4(probe, src + static_cast<size_t>(last) * 4);
          if (tagged(probe, tag)) break;
          if (it % 64 == 0 && spin.give_up(deadline)) break;
          if (sleep_ns) __nanosleep(sleep_ns);
        }
      }
      __syncwarp();
    }
    uint32_t pending = 0;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * 32 < v_end) {
        ld4(v[u], src + static_cast<size_t>(base + u * 32) * 4);
        pending |= 1u << u;
      }
    for (uint32_t it = 1;; ++it) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (((pending >> u) & 1u) && tagged(v[u], tag)) {
          sink(base + u * 32, v[u]);
          pending &= ~(1u << u);
        }
      if (pending == 0) break;
      if (it % 64 == 0 && spin.give_up(deadline)) break;
      if (sleep_ns) __nanosleep(sleep_ns);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if ((pending >> u) & 1u) ld4(v[u], src + static_cast<size_t>(base + u * 32) * 4);
    }
  }
}

__device__ __forceinline__ uint2 low_halves(const uint4& v) {  // 4 values as 4 uint16s
  return make_uint2((v.x & 0xffffu) | (v.y << 16), (v.z & 0xffffu) | (v.w << 16));
}

using u128 = unsigned __int128;
__device__ __forceinline__ u128 ld_wide(const u128* p) {
  u128 v;
  asm volatile("ld.relaxed.gpu.global.b128 %0, [%1];" : "=q"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ void st_wide(u128* p, u128 v) {
  asm volatile("st.relaxed.gpu.global.b128 [%0], %1;" ::"l"(p), "q"(v) : "memory");
}
constexpr int kWideValues = 7;  // 7 x 16-bit values + a 16-bit tag in the top bits

// Stages wide words [0, n_words) carrying `tag` into stage[7 * word + j] (values past `words` dropped).
template <int U>
__device__ __forceinline__ void stage_wide(const u128* __restrict__ src, int n_words, int words,
                                           uint32_t tag, uint16_t* stage, Spin& spin) {
  const int lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
  constexpr int kChunk = 32 * U;
  for (int chunk = (threadIdx.x >> 5) * kChunk; chunk < n_words && !spin.aborted;
       chunk += n_warps * kChunk) {
    const int base = chunk + lane;
    u128 v[U];
    uint32_t pending = 0;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (base + u * 32 < n_words) {
        v[u] = ld_wide(src + base + u * 32);
        pending |= 1u << u;
      }
    unsigned long long deadline = 0;
    for (uint32_t it = 1;; ++it) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (((pending >> u) & 1u) && static_cast<uint32_t>(v[u] >> 112) == tag) {
          const int first = (base + u * 32) * kWideValues;
#pragma unroll
          for (int j = 0; j < kWideValues; ++j)
            if (first + j < words) stage[first + j] = static_cast<uint16_t>(v[u] >> (16 * j));
          pending &= ~(1u << u);
        }
      if (pending == 0) break;
      if (it % 64 == 0 && spin.give_up(deadline)) break;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if ((pending >> u) & 1u) v[u] = ld_wide(src + base + u * 32);
    }
  }
}

// ---- mbar-N: transaction-counted pushes (sm_90) ----------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ uint32_t peer_addr(uint32_t addr, int rank) {  // the same place in a peer
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ void mbar_init(uint64_t* m) {  // one arrival (the owner's expect_tx)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(m)) : "memory");
}
// The owner's arrival for a phase: it completes once `bytes` more have landed (they may land first).
__device__ __forceinline__ void mbar_expect(uint64_t* m, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;"
               ::"r"(smem_addr(m)), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* m, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done) : "r"(smem_addr(m)), "r"(parity) : "memory");
  return done != 0;
}
// 8 bytes into a peer's shared memory, counted on that peer's mbarrier (release at cluster scope:
// this thread's earlier reads of the buffer the peer will next overwrite are ordered before it).
__device__ __forceinline__ void st_async8(uint32_t peer_dst, uint2 v, uint32_t peer_mbar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.u32 [%0], {%1, %2}, [%3];"
               ::"r"(peer_dst), "r"(v.x), "r"(v.y), "r"(peer_mbar) : "memory");
}

// A layer inside one cluster of N CTAs, exchanged by st.async and mbarriers: no cluster barrier
// between the first and the last step. Step s reads copy s&1 of the staged state and pushes copy
// (s+1)&1 into every peer; mbar[b] counts the bytes of copy b that the other peers push (this
// CTA's own words are plain stores, seen after its __syncthreads).
// Copy b is reused two steps later, and that is safe without a barrier: a peer writes step s+2's
// copy only after it received every word of step s+1, each of which its owner pushed after reading
// step s's copy. The last step pushes nothing, and a closing cluster barrier keeps every CTA
// resident until no peer can still write its shared memory.
__device__ uint32_t mbar_steps(const Params& p, uint16_t* stage_buf, int N, int own_begin,
                               int own_end, Spin& spin) {
  __shared__ uint64_t mbar[2];
  cg::cluster_group cluster = cg::this_cluster();
  const uint32_t bytes = static_cast<uint32_t>(p.words - (own_end - own_begin)) * 2u;
  const int me = static_cast<int>(cluster.block_rank());
  if (threadIdx.x == 0) {
    mbar_init(&mbar[0]);
    mbar_init(&mbar[1]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if (p.steps > 1) mbar_expect(&mbar[1], bytes);  // step 1's state, pushed at step 0
    if (p.steps > 2) mbar_expect(&mbar[0], bytes);  // step 2's
  }
  for (int i = threadIdx.x; i < p.words; i += blockDim.x) stage_buf[i] = 0;
  cluster.sync();  // every peer's mbarriers are armed before anyone pushes
  uint32_t last = 0;
  for (int s = 0; s < p.steps; ++s) {
    const uint16_t* cur = stage_buf + (s & 1) * p.words;
    if (s > 0) {
      uint64_t* m = &mbar[s & 1];
      const uint32_t parity = static_cast<uint32_t>((s - 1) >> 1) & 1u;  // copy (s&1)'s use number
      unsigned long long deadline = 0;
      for (uint32_t it = 1; !spin.aborted && !mbar_try_wait(m, parity); ++it)
        if (it % 64 == 0) spin.give_up(deadline);
      __syncthreads();  // (every thread has seen the phase complete before thread 0 re-arms it)
      if (threadIdx.x == 0 && s + 2 < p.steps) mbar_expect(m, bytes);  // for step s+2
    }
    const bool push = s + 1 < p.steps;
    uint16_t* next = stage_buf + ((s + 1) & 1) * p.words;
    const uint32_t next_mbar = smem_addr(&mbar[(s + 1) & 1]);
    for (int i = own_begin + 4 * static_cast<int>(threadIdx.x); i < own_end; i += 4 * blockDim.x) {
      const uint2 in = *reinterpret_cast<const uint2*>(cur + i);
      const uint32_t lo = ((in.x + 1u) & 0xffffu) | ((((in.x >> 16) + 1u) & 0xffffu) << 16);
      const uint32_t hi = ((in.y + 1u) & 0xffffu) | ((((in.y >> 16) + 1u) & 0xffffu) << 16);
      if (i == own_begin) last = lo & 0xffffu;
      if (push) {
        const uint32_t dst = smem_addr(next + i);
        *reinterpret_cast<uint2*>(next + i) = make_uint2(lo, hi);
        for (int r = 0; r < N; ++r)
          if (r != me) st_async8(peer_addr(dst, r), make_uint2(lo, hi), peer_addr(next_mbar, r));
      }
    }
  }
  cluster.sync();
  return last;
}

__global__ void __launch_bounds__(256, 1) exchange_kernel(const __grid_constant__ Params p) {
  extern __shared__ __align__(16) uint16_t stage_buf[];  // [2][words] uint16 values
  Spin spin{p.err, p.timeout_ns};
  const int G = gridDim.x;
  cg::cluster_group cluster = cg::this_cluster();
  const bool clustered = p.mode == kClusterSplit || p.mode == kClusterLocal || p.mode == kClusterMbar;
  const int N = clustered ? p.cluster : 1;
  const int rank = clustered ? static_cast<int>(cluster.block_rank()) : 0;

  // The words this CTA produces: the whole grid's share (global modes) or the cluster's.
  const bool local = p.mode == kClusterLocal || p.mode == kClusterMbar;
  const int owners = local ? N : G;
  const int me = local ? rank : static_cast<int>(blockIdx.x);
  const bool wide = p.mode == kAllWide;
  const int n_wide = (p.words + kWideValues - 1) / kWideValues;
  const int per = wide ? (n_wide + owners - 1) / owners * kWideValues : (p.words + owners - 1) / owners;
  const int own_begin = min(p.words, me * per), own_end = min(p.words, own_begin + per);
  uint32_t last = 0;
  // A CTA that publishes nothing must not read either: nothing would stop it from falling two
  // steps behind a buffer's reuse (the kernel's rule too). The cases below give every CTA words.
  if (!clustered && p.mode != kBarrier && own_begin >= own_end) {
    if (threadIdx.x == 0) p.out[blockIdx.x] = p.steps & 0xffff;
    return;
  }
  if (p.mode == kClusterMbar) {
    const uint32_t v = mbar_steps(p, stage_buf, N, own_begin, own_end, spin);
    if (threadIdx.x == 0) p.out[blockIdx.x] = own_begin < own_end ? v : p.steps & 0xffff;
    return;
  }

  for (int s = 0; s < p.steps; ++s) {
    uint16_t* cur = stage_buf + (s & 1) * p.words;
    if (p.mode == kBarrier) {
      __syncthreads();
      if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(p.counter) : "memory");
        unsigned long long deadline = 0;
        const uint32_t target = static_cast<uint32_t>(s + 1) * G;
        for (uint32_t it = 1; !spin.aborted; ++it) {
          uint32_t c;
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(c) : "l"(p.counter));
          if (c >= target) break;
          if (it % 64 == 0) spin.give_up(deadline);
        }
      }
      __syncthreads();
      continue;
    }
    if (s == 0) {
      for (int i = threadIdx.x; i < p.words; i += blockDim.x) cur[i] = 0;
      if (clustered) cluster.sync(); else __syncthreads();
    } else if (p.mode == kClusterLocal) {
      // The peers pushed step s-1's values into `cur` before the barrier that ended that step.
    } else {
      const uint32_t* src = p.buf[(s - 1) & 1];
      const uint32_t tag = static_cast<uint32_t>(s) & 0xffffu;
      const int n_vec = p.words / 4;
      if (wide) {
        stage_wide<8>(reinterpret_cast<const u128*>(src), n_wide, p.words, tag, cur, spin);
        __syncthreads();
      } else if (p.mode == kClusterSplit) {
        const int vper = (n_vec + N - 1) / N;
        const int vb = min(n_vec, rank * vper), ve = min(n_vec, vb + vper);
        stage<8>(src, vb, ve, tag, p.sleep_ns, false, spin, [&](int vi, const uint4& v) {
          const uint2 h = low_halves(v);
          for (int r = 0; r < N; ++r)
            *reinterpret_cast<uint2*>(cluster.map_shared_rank(cur, r) + vi * 4) = h;
        });
        cluster.sync();  // release/acquire at cluster scope: every peer's pushes are visible
      } else {
        stage<8>(src, 0, n_vec, tag, p.sleep_ns, p.mode == kPollOne, spin,
                 [&](int vi, const uint4& v) { *reinterpret_cast<uint2*>(cur + vi * 4) = low_halves(v); });
        __syncthreads();
      }
    }
    // "Compute": every owned word + 1, published with the tag of step s + 1.
    if (p.mode == kClusterLocal) {
      // 4 values (8 bytes) per push: own ranges are multiples of 4 words here (checked on the host).
      uint16_t* next = stage_buf + ((s + 1) & 1) * p.words;
      for (int i = own_begin + 4 * static_cast<int>(threadIdx.x); i < own_end; i += 4 * blockDim.x) {
        const uint2 in = *reinterpret_cast<const uint2*>(cur + i);
        const uint32_t lo = ((in.x + 1u) & 0xffffu) | ((((in.x >> 16) + 1u) & 0xffffu) << 16);
        const uint32_t hi = ((in.y + 1u) & 0xffffu) | ((((in.y >> 16) + 1u) & 0xffffu) << 16);
        if (i == own_begin) last = lo & 0xffffu;
        for (int r = 0; r < N; ++r)
          *reinterpret_cast<uint2*>(cluster.map_shared_rank(next, r) + i) = make_uint2(lo, hi);
      }
      if (N > 1) cluster.sync(); else __syncthreads();
    } else if (wide) {
      u128* dst = reinterpret_cast<u128*>(p.buf[s & 1]);
      const u128 tag = static_cast<u128>(static_cast<uint32_t>(s + 1) & 0xffffu) << 112;
      for (int wi = own_begin / kWideValues + static_cast<int>(threadIdx.x);
           wi * kWideValues < own_end; wi += blockDim.x) {
        u128 word = tag;
#pragma unroll
        for (int j = 0; j < kWideValues; ++j) {
          const int i = wi * kWideValues + j;
          const uint32_t v = i < p.words ? (cur[i] + 1u) & 0xffffu : 0u;
          if (i == own_begin) last = v;
          word |= static_cast<u128>(v) << (16 * j);
        }
        st_wide(dst + wi, word);
      }
    } else {
      uint32_t* dst = p.buf[s & 1];
      const uint32_t tag = static_cast<uint32_t>(s + 1) & 0xffffu;
      for (int i = own_begin + static_cast<int>(threadIdx.x); i < own_end; i += blockDim.x) {
        const uint32_t v = (cur[i] + 1u) & 0xffffu;
        if (i == own_begin) last = v;
        st1(dst + i, v | (tag << 16));
      }
    }
  }
  if (threadIdx.x == 0) p.out[blockIdx.x] = own_begin < own_end ? last : p.steps & 0xffff;
}

struct Case {
  std::string name;
  Mode mode;
  int words, ctas, cluster, threads, sleep_ns;
};

struct Result {
  double us_per_step;
  bool ok;
  std::string note;
};

// One launch of `steps` steps; returns ms, or < 0 when the launch is not possible here.
static float launch(const Case& c, int steps, Params p, cudaStream_t st, std::string* note) {
  p.steps = steps;
  const size_t smem = std::max<size_t>(2ull * c.words * 2, 120 * 1024);  // one CTA per SM
  cudaFuncAttributes fa;  // (the dynamic share is what the static one, mbar-N's mbarriers, leaves)
  CHECK(cudaFuncGetAttributes(&fa, exchange_kernel));
  CHECK(cudaFuncSetAttribute(exchange_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(227 * 1024 - fa.sharedSizeBytes)));
  CHECK(cudaFuncSetAttribute(exchange_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(c.ctas);
  cfg.blockDim = dim3(c.threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attrs[2];
  int n = 0;
  const bool clustered = c.mode == kClusterSplit || c.mode == kClusterLocal || c.mode == kClusterMbar;
  if (clustered) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = c.cluster;
    attrs[n].val.clusterDim.y = 1;
    attrs[n].val.clusterDim.z = 1;
    ++n;
    cfg.attrs = attrs;
    cfg.numAttrs = n;
    int max_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&max_clusters, exchange_kernel, &cfg) != cudaSuccess ||
        max_clusters * c.cluster < c.ctas) {
      cudaGetLastError();
      *note = "only " + std::to_string(max_clusters) + " clusters of " + std::to_string(c.cluster) +
              " co-resident";
      return -1.0f;
    }
  } else {
    attrs[n].id = cudaLaunchAttributeCooperative;
    attrs[n].val.cooperative = 1;
    ++n;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  const size_t buf_bytes = std::max<size_t>(c.words * 4ull, (c.words + 6) / 7 * 16ull);
  CHECK(cudaMemsetAsync(p.buf[0], 0, buf_bytes, st));
  CHECK(cudaMemsetAsync(p.buf[1], 0, buf_bytes, st));
  CHECK(cudaMemsetAsync(p.counter, 0, 4, st));
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaEventRecord(a, st));
  cudaError_t e = cudaLaunchKernelEx(&cfg, exchange_kernel, p);
  if (e != cudaSuccess) {
    cudaGetLastError();
    *note = cudaGetErrorString(e);
    return -1.0f;
  }
  CHECK(cudaEventRecord(b, st));
  CHECK(cudaEventSynchronize(b));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms;
}

static Result run_case(const Case& c) {
  Params p = {};
  const size_t buf_bytes = std::max<size_t>(c.words * 4ull, (c.words + 6) / 7 * 16ull);
  CHECK(cudaMalloc(&p.buf[0], buf_bytes));
  CHECK(cudaMalloc(&p.buf[1], buf_bytes));
  CHECK(cudaMalloc(&p.err, 4));
  CHECK(cudaMalloc(&p.counter, 4));
  CHECK(cudaMalloc(&p.out, c.ctas * 4ull));
  CHECK(cudaMemset(p.err, 0, 4));
  p.words = c.words;
  p.mode = c.mode;
  p.sleep_ns = c.sleep_ns;
  p.cluster = c.cluster;
  p.timeout_ns = 2'000'000'000ull;
  cudaStream_t st;
  CHECK(cudaStreamCreate(&st));
  Result r{0.0, true, ""};
  const int short_steps = 200, long_steps = 2200;  // the slope between them is the step
  std::vector<double> slopes;
  for (int rep = 0; rep < 7 && r.ok; ++rep) {
    const float t0 = launch(c, short_steps, p, st, &r.note);
    const float t1 = launch(c, long_steps, p, st, &r.note);
    if (t0 < 0 || t1 < 0) {
      r.ok = false;
      break;
    }
    std::vector<uint32_t> out(c.ctas);
    uint32_t err = 0;
    CHECK(cudaMemcpy(out.data(), p.out, c.ctas * 4ull, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(&err, p.err, 4, cudaMemcpyDeviceToHost));
    for (uint32_t v : out)
      if (c.mode != kBarrier && v != (long_steps & 0xffff)) {
        r.ok = false;
        r.note = "WRONG: a word holds " + std::to_string(v) + " after " + std::to_string(long_steps) + " steps";
      }
    if (err) {
      r.ok = false;
      r.note = "TIMEOUT";
    }
    if (rep > 0) slopes.push_back((t1 - t0) * 1000.0 / (long_steps - short_steps));  // rep 0: warm-up
  }
  if (!slopes.empty()) {
    std::sort(slopes.begin(), slopes.end());
    r.us_per_step = slopes[slopes.size() / 2];
  }
  cudaFree(p.buf[0]);
  cudaFree(p.buf[1]);
  cudaFree(p.err);
  cudaFree(p.counter);
  cudaFree(p.out);
  cudaStreamDestroy(st);
  return r;
}

static bool matches(const std::string& name, const std::string& alternatives) {
  size_t start = 0;
  while (start <= alternatives.size()) {
    const size_t bar = std::min(alternatives.find('|', start), alternatives.size());
    if (name.find(alternatives.substr(start, bar - start)) != std::string::npos) return true;
    start = bar + 1;
  }
  return false;
}

int main(int argc, char** argv) {
  // [--csv] [a|b|...]: only the cases whose name holds one of these substrings (all without).
  bool csv = false;
  const char* only = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--csv") == 0) csv = true;
    else only = argv[i];
  }
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int G = 128;  // the grid of the persistent kernel's large layouts
  std::vector<Case> cases;
  struct Shape { int H, B; };
  for (Shape s : {Shape{2304, 1}, Shape{2304, 4}, Shape{2304, 16}, Shape{1024, 8}, Shape{1024, 32}}) {
    const int w = s.H * s.B;
    const std::string tag = "H=" + std::to_string(s.H) + " B=" + std::to_string(s.B);
    cases.push_back({tag + " barrier", kBarrier, w, G, 1, 256, 0});
    cases.push_back({tag + " all", kAll, w, G, 1, 256, 0});
    cases.push_back({tag + " all+sleep64", kAllSleep, w, G, 1, 256, 64});
    cases.push_back({tag + " all+sleep256", kAllSleep, w, G, 1, 256, 256});
    cases.push_back({tag + " poll-one", kPollOne, w, G, 1, 256, 64});
    cases.push_back({tag + " all-wide", kAllWide, w, G, 1, 256, 0});
    cases.push_back({tag + " cluster-4", kClusterSplit, w, G, 4, 256, 0});
    cases.push_back({tag + " cluster-8", kClusterSplit, w, 120, 8, 256, 0});
    cases.push_back({tag + " cluster-16", kClusterSplit, w, 112, 16, 256, 0});
  }
  // Layers inside one cluster: R replicas of N CTAs (batch replicas, or other recurrences).
  for (Shape s : {Shape{256, 1}, Shape{256, 8}, Shape{512, 8}, Shape{1024, 8}, Shape{1024, 32}}) {
    const int w = s.H * s.B;
    const std::string tag = "H=" + std::to_string(s.H) + " B=" + std::to_string(s.B);
    for (int n : {1, 2, 4, 8, 16}) {
      if (2 * w * 2 > 227 * 1024) continue;
      // Several replicas, as in a real launch (at most 7 clusters of 16 fit on the H200).
      const int ctas = n * (n == 16 ? 6 : std::max(1, std::min(8, 128 / n)));
      if (w % (4 * n) != 0) continue;  // the pushes move 4 values at a time
      cases.push_back({tag + " local-" + std::to_string(n), kClusterLocal, w, ctas, n, 256, 0});
      if (n > 1) cases.push_back({tag + " mbar-" + std::to_string(n), kClusterMbar, w, ctas, n, 256, 0});
    }
  }
  if (csv) std::printf("case,us_per_step,ok,note\n");
  else std::printf("%-28s %10s  %s\n", "case", "us/step", "note");
  for (const Case& c : cases) {
    if (only != nullptr && !matches(c.name, only)) continue;
    const Result r = run_case(c);
    if (csv) std::printf("%s,%.3f,%d,%s\n", c.name.c_str(), r.us_per_step, r.ok, r.note.c_str());
    else std::printf("%-28s %10.3f  %s\n", c.name.c_str(), r.ok ? r.us_per_step : -1.0, r.note.c_str());
    std::fflush(stdout);
  }
  return 0;
}
