// Staged parallel loops for the CPU kernels on XLA's CPU thread pool (the FFI's ThreadPool context).
//
// A recurrence is a sequence of stages (one per time step) that must run in order; each stage is
// split into chunks (row ranges) that may run in parallel. Threads claim chunks from one counter in
// stage order and wait for the previous stage to finish before running a chunk. A thread only ever
// waits for chunks that running threads have already claimed, so nothing deadlocks when the pool runs
// fewer tasks at once than were scheduled, runs them late, or runs them on the caller's thread (the
// FFI allows all three). A task that starts after the work is done claims nothing and returns.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jax_sprnn::cpu {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins briefly (a stage is microseconds long), then yields: the machine may have fewer free cores
// than the pool has threads.
inline void wait_until_at_least(const std::atomic<int64_t>& counter, int64_t target) {
  for (int spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < 256) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

// The threads a call may use: the caller plus pool tasks, one per pool thread in all (1 without a
// pool).
inline int64_t pool_threads(xla::ffi::ThreadPool* pool) {
  const int64_t n = pool == nullptr ? 1 : pool->num_threads();
  return n < 1 ? 1 : n;
}

// Runs fn(stage, chunk, thread) for every stage in [0, stages) and chunk in [0, chunks), every chunk
// of a stage after all chunks of the stage before; `thread` in [0, threads) names the thread's
// scratch. threads <= 1 (or no pool) runs everything on the caller, in order.
template <typename Fn>
void run_stages(xla::ffi::ThreadPool* pool, int64_t threads, int64_t stages, int64_t chunks, Fn& fn) {
  const int64_t total = stages * chunks;
  if (pool == nullptr || threads <= 1 || total <= 1) {
    for (int64_t s = 0; s < stages; ++s)
      for (int64_t c = 0; c < chunks; ++c) fn(s, c, 0);
    return;
  }
  struct Progress {
    std::atomic<int64_t> claimed{0}, done{0};
  };
  // Shared with the pool tasks, which may outlive this call (they then claim nothing).
  auto progress = std::make_shared<Progress>();
  Fn* body = &fn;
  auto work = [progress, body, total, chunks](int64_t thread) {
    for (;;) {
      const int64_t c = progress->claimed.fetch_add(1, std::memory_order_relaxed);
      if (c >= total) return;
      const int64_t stage = c / chunks;
      wait_until_at_least(progress->done, stage * chunks);
      (*body)(stage, c % chunks, thread);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool->Schedule([work, t] { work(t); });
  work(0);
  wait_until_at_least(progress->done, total);
}

}  // namespace jax_sprnn::cpu
