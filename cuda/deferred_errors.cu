// The deferred error reporting of the persistent kernels (see deferred_errors.h): the ring of
// pinned host words, one slot a call with a note of the call, their device views for the kernels'
// finish_call, and the module's pending_error() / initialize().
#include "deferred_errors.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_kernels.h"
#include "persistent.h"

namespace jax_sprnn::cuda {
namespace {

// A slot is reused kSlots calls later. An earlier call's error still unread by then is kept (moved
// to g_unreported), so nothing is lost; only a kernel still running kSlots calls after its launch
// could write into a reused slot and be reported under the newer call's note.
constexpr int kSlots = 1024;

struct Note {
  uint64_t number = 0;  // the call's number in this process, from 1
  char target[48] = {};
  ffi::DataType dtype = ffi::DataType::F32;
  int64_t T = 0, B = 0, H = 0;
  int cluster = 0;
};

struct Failed {
  uint32_t code;
  Note note;
};

std::mutex g_mutex;  // guards everything below
uint32_t* g_host = nullptr;    // host view of the kSlots words (pinned, mapped)
uint32_t* g_device = nullptr;  // device view
std::array<Note, kSlots> g_notes;
uint64_t g_calls = 0;               // calls that claimed a slot
std::vector<Failed> g_unreported;   // errors found in a slot at its reuse

// Allocates the words unless the calling thread is capturing `stream` (cudaHostAlloc may not be
// called during capture). Without them, errors still show as NaN outputs.
void ensure_slots(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_host != nullptr) return;
  if (stream != nullptr) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    if (status != cudaStreamCaptureStatusNone) return;
  }
  void* host = nullptr;
  if (cudaHostAlloc(&host, kSlots * sizeof(uint32_t), cudaHostAllocMapped | cudaHostAllocPortable) !=
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
  std::memset(host, 0, kSlots * sizeof(uint32_t));
  g_device = static_cast<uint32_t*>(device);
  g_host = static_cast<uint32_t*>(host);
}

uint32_t take_word(int slot) {  // (g_mutex held)
  return __atomic_exchange_n(g_host + slot, 0u, __ATOMIC_ACQ_REL);
}

// Every error the slots and g_unreported hold, oldest call first, and clears them.
std::vector<Failed> take_failed() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<Failed> out;
  out.swap(g_unreported);
  if (g_host == nullptr) return out;
  const int used = static_cast<int>(std::min<uint64_t>(g_calls, kSlots));
  for (int i = 0; i < used; ++i) {
    if (__atomic_load_n(g_host + i, __ATOMIC_ACQUIRE) == 0) continue;  // (the common case: a read)
    if (const uint32_t code = take_word(i)) out.push_back({code, g_notes[i]});
  }
  std::sort(out.begin(), out.end(), [](const Failed& a, const Failed& b) { return a.note.number < b.note.number; });
  return out;
}

std::string describe(const Note& n) {
  return "call #" + std::to_string(n.number) + " (" + n.target + ", " + dtype_name(n.dtype) +
         ", T=" + std::to_string(n.T) + ", B=" + std::to_string(n.B) + ", H=" + std::to_string(n.H) + ", " +
         (n.cluster > 0 ? "cluster mode, " + std::to_string(n.cluster) + " CTAs" : "grid mode") + ")";
}

std::string what_failed(uint32_t code) {
  std::string msg;
  if (code & kErrTimeout) {
    msg += "timed out waiting for another CTA's hidden state (spin bound exceeded: a CTA was not "
           "co-resident, or the packed layout leaves a row without a lane)";
  }
  if (code & kErrBadLayout) {
    msg += (code & kErrTimeout) ? " and " : "";
    msg += "found an invalid packed layout (an index or lane_row entry out of range, a row "
           "without exactly one run of lanes, or a tile layout's slot not holding its own column)";
  }
  return msg;
}

// One message for the earliest failed call, and how many more failed.
std::string failed_message(const std::vector<Failed>& failed) {
  const Failed& first = failed.front();
  std::string msg = "jax_sprnn: an earlier persistent kernel call, " + describe(first.note) + ", " +
                    what_failed(first.code) + "; its outputs were filled with NaN";
  if (failed.size() > 1) {
    msg += " (" + std::to_string(failed.size() - 1) + " later call" + (failed.size() > 2 ? "s" : "") +
           " failed too, the last " + describe(failed.back().note) + ")";
  }
  return msg + ". Set JAX_SPRNN_SYNC_ERRORS=1 to have each call report its own error (slower).";
}

bool sync_errors_requested() {
  const char* env = std::getenv("JAX_SPRNN_SYNC_ERRORS");
  return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
}

}  // namespace

ffi::Error take_deferred_error(cudaStream_t stream) {
  ensure_slots(stream);
  const std::vector<Failed> failed = take_failed();
  if (!failed.empty()) return ffi::Error::Internal(failed_message(failed));
  return ffi::Error::Success();
}

ErrorSlot claim_error_slot(const CallNote& call) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_host == nullptr) return {};
  const int slot = static_cast<int>(g_calls % kSlots);
  if (g_calls >= kSlots) {  // the slot's previous call: keep an error nobody has read yet
    if (const uint32_t code = take_word(slot)) g_unreported.push_back({code, g_notes[slot]});
  }
  Note& n = g_notes[slot];
  n.number = ++g_calls;
  std::strncpy(n.target, call.target, sizeof(n.target) - 1);
  n.target[sizeof(n.target) - 1] = '\0';
  n.dtype = call.dtype;
  n.T = call.T;
  n.B = call.B;
  n.H = call.H;
  n.cluster = call.cluster;
  return {g_device + slot, slot};
}

ffi::Error check_call_now(cudaStream_t stream, const ErrorSlot& slot) {
  if (slot.index < 0 || !sync_errors_requested()) return ffi::Error::Success();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    cudaGetLastError();
    return ffi::Error::Success();
  }
  if (status != cudaStreamCaptureStatusNone) return ffi::Error::Success();  // (no waiting in a capture)
  if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess)
    return cuda_error("cudaStreamSynchronize (JAX_SPRNN_SYNC_ERRORS)", e);
  Note note;
  uint32_t code;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    code = take_word(slot.index);
    note = g_notes[slot.index];
  }
  if (code == 0) return ffi::Error::Success();
  return ffi::Error::Internal("jax_sprnn: this persistent kernel call, " + describe(note) + ", " +
                              what_failed(code) + "; its outputs were filled with NaN");
}

std::string TakePendingError() {
  const std::vector<Failed> failed = take_failed();
  return failed.empty() ? std::string() : failed_message(failed);
}

void Initialize() { ensure_slots(nullptr); }

}  // namespace jax_sprnn::cuda
