// Staged parallel loops for the CPU kernels on XLA's CPU thread pool (the FFI's ThreadPool context).
//
// A recurrence is a sequence of stages (one per time step) that must run in order; each stage is
// split into chunks (row ranges) that may run in parallel. Threads claim chunks stage by stage and
// wait for the previous stage to finish before running one. A thread moves to the next stage only
// once every chunk of its stage is claimed, so it only ever waits for chunks that running threads
// have claimed: nothing deadlocks when the pool runs fewer tasks at once than were scheduled, runs
// them late, or runs them on the caller's thread (the FFI allows all three). A task that starts
// after the work is done claims nothing and returns.
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
// pool), at most 64 (run_stages keeps a stage's claimed chunks in one 64-bit mask).
inline int64_t pool_threads(xla::ffi::ThreadPool* pool) {
  const int64_t n = pool == nullptr ? 1 : pool->num_threads();
  return n < 1 ? 1 : n > 64 ? 64 : n;
}

// Runs fn(stage, chunk, thread) for every stage in [0, stages) and chunk in [0, chunks <= 64), every
// chunk of a stage after all chunks of the stage before; `thread` in [0, threads) names the thread's
// scratch. threads <= 1 (or no pool) runs everything on the caller, in order.
//
// In each stage a thread takes its own chunk (thread % chunks) first, so that a chunk's rows, and
// their weights in that core's cache, stay with one thread from step to step; then any chunk left.
template <typename Fn>
void run_stages(xla::ffi::ThreadPool* pool, int64_t threads, int64_t stages, int64_t chunks, Fn& fn) {
  if (pool == nullptr || threads <= 1 || stages * chunks <= 1) {
    for (int64_t s = 0; s < stages; ++s)
      for (int64_t c = 0; c < chunks; ++c) fn(s, c, 0);
    return;
  }
  struct Progress {
    explicit Progress(int64_t stages) : taken(new std::atomic<uint64_t>[stages]) {
      for (int64_t s = 0; s < stages; ++s) taken[s].store(0, std::memory_order_relaxed);
    }
    std::atomic<int64_t> done{0};
    std::unique_ptr<std::atomic<uint64_t>[]> taken;  // per stage: the chunks claimed
  };
  // Shared with the pool tasks, which may outlive this call (they then claim nothing).
  auto progress = std::make_shared<Progress>(stages);
  const uint64_t all = chunks >= 64 ? ~uint64_t(0) : (uint64_t(1) << chunks) - 1;
  Fn* body = &fn;
  auto work = [progress, body, stages, chunks, all](int64_t thread) {
    for (int64_t s = 0; s < stages; ++s) {
      std::atomic<uint64_t>& taken = progress->taken[s];
      if (taken.load(std::memory_order_relaxed) == all) continue;
      // Every chunk before this stage is claimed, by a running thread: this wait ends.
      wait_until_at_least(progress->done, s * chunks);
      for (int64_t c = thread % chunks;;) {
        const uint64_t bit = uint64_t(1) << c;
        if ((taken.fetch_or(bit, std::memory_order_relaxed) & bit) == 0) {
          (*body)(s, c, thread);
          progress->done.fetch_add(1, std::memory_order_release);
        }
        const uint64_t left = all & ~taken.load(std::memory_order_relaxed);
        if (left == 0) break;
        c = __builtin_ctzll(left);
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool->Schedule([work, t] { work(t); });
  work(0);
  wait_until_at_least(progress->done, stages * chunks);
}

}  // namespace jax_sprnn::cpu
