// _sprnn_cuda: hands the CUDA XLA FFI handlers to Python as capsules (the production targets, and
// apart from them the test and benchmark ones), gives the planner the device and kernel facts it
// needs (see cuda_kernels.h), and exports the shared constants it was built with.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "constants_export.h"
#include "cuda_kernels.h"

namespace nb = nanobind;
namespace c = jax_sprnn::constants;
namespace sc = jax_sprnn::cuda;

namespace {

// FFI target name -> handler capsule, for jax.ffi.register_ffi_target.
nb::dict capsules(std::initializer_list<std::pair<const char*, XLA_FFI_Handler*>> handlers) {
  nb::dict d;
  for (const auto& [name, fn] : handlers) d[name] = nb::capsule(reinterpret_cast<void*>(fn));
  return d;
}

void check(const std::string& error) {
  if (!error.empty()) throw std::runtime_error(error);
}

nb::tuple to_tuple(const std::vector<int>& v) {
  nb::list l;
  for (int x : v) l.append(x);
  return nb::tuple(l);
}

}  // namespace

NB_MODULE(_sprnn_cuda, m) {
  m.doc() = "jax_sprnn CUDA kernels: XLA FFI handlers and device/kernel queries";

  m.def(
      "registrations",
      []() {
        return capsules({{c::kForwardTarget, JaxSprnnForwardCuda},
                         {c::kBackwardTarget, JaxSprnnBackwardCuda},
                         {c::kWeightGradTarget, JaxSprnnWeightGradCuda},
                         {c::kGatedForwardTarget, JaxSprnnGatedForwardCuda},
                         {c::kGatedBackwardTarget, JaxSprnnGatedBackwardCuda}});
      },
      "FFI target name -> handler capsule, for jax.ffi.register_ffi_target(..., platform='CUDA').");

  m.def(
      "testing_registrations",
      []() {
        return capsules({{c::kForwardHookedTarget, JaxSprnnForwardHookedCuda},
                         {c::kBackwardHookedTarget, JaxSprnnBackwardHookedCuda},
                         {c::kGatedForwardHookedTarget, JaxSprnnGatedForwardHookedCuda},
                         {c::kGatedBackwardHookedTarget, JaxSprnnGatedBackwardHookedCuda},
                         {c::kSyncFloorTarget, JaxSprnnSyncFloorCuda}});
      },
      "The test and benchmark targets, like registrations(): the recurrences with their test "
      "hooks as attributes, and the synchronization floor.");

  m.def(
      "cuda_architectures",
      []() {
        nb::dict d;
        d["cmake"] = JAX_SPRNN_CUDA_ARCHITECTURES;
        d["sass"] = JAX_SPRNN_CUDA_SASS;
        d["ptx"] = JAX_SPRNN_CUDA_PTX;
        return d;
      },
      "The architectures the kernels were compiled for: 'cmake' (CMAKE_CUDA_ARCHITECTURES, "
      "comma-separated), 'sass' (the sm_N with machine code) and 'ptx' (the compute_N with PTX the "
      "driver can JIT-compile for newer GPUs), each comma-separated, e.g. '80,86,89,90,100'.");

  m.def("constants", &jax_sprnn::exported_constants,
        "The values and formulas of jax_sprnn/_constants.py this module was built with.");

  m.def(
      "initialize", []() { sc::Initialize(); },
      "Allocates the pinned error word (best effort). Call it once the framework has set up CUDA, "
      "outside any CUDA-graph capture, e.g. when a kernel call is lowered; importing the package "
      "touches no CUDA state.");

  m.def(
      "device_properties",
      [](int device) {
        sc::DeviceProperties p;
        check(sc::GetDeviceProperties(device, &p));
        nb::dict d;
        d["name"] = p.name;
        d["compute_capability"] = nb::make_tuple(p.major, p.minor);
        d["sm_count"] = p.sm_count;
        d["regs_per_sm"] = p.regs_per_sm;
        d["regs_per_block"] = p.regs_per_block;
        d["smem_per_sm"] = p.smem_per_sm;
        d["smem_per_block_optin"] = p.smem_per_block_optin;
        d["max_threads_per_sm"] = p.max_threads_per_sm;
        d["max_threads_per_block"] = p.max_threads_per_block;
        d["cooperative_launch"] = p.cooperative_launch;
        d["cluster_launch"] = p.cluster_launch;
        d["l2_bytes"] = p.l2_bytes;
        return d;
      },
      nb::arg("device") = 0, "Facts about one CUDA device (cudaGetDeviceProperties).");

  m.def(
      "supported_reg_slots",
      [](const std::string& dtype, int gates) {
        std::vector<int> v = sc::SupportedRegSlots(dtype, gates);
        if (v.empty())
          throw nb::value_error(("unknown dtype '" + dtype + "' or gates " + std::to_string(gates) +
                                 " (1, 3 or 4)").c_str());
        return to_tuple(v);
      },
      nb::arg("dtype") = "", nb::arg("gates") = 1,
      "Register-tier sizes (reg_slots) instantiated for dtype ('float32', 'float16', 'bfloat16'); "
      "without a dtype, those instantiated for every dtype. gates: 1 (the simple cell), 3 (GRU) or "
      "4 (LSTM).");

  m.def(
      "kernel_attributes",
      [](const std::string& dtype, int tile, int reg_slots, int device, int threads, bool backward,
         int gates, int planes_per_pass, bool tiles) {
        sc::KernelAttributes a;
        check(sc::GetKernelAttributes(dtype, tile, reg_slots, device, threads, backward, gates,
                                      planes_per_pass, tiles, &a));
        nb::dict d;
        d["num_regs"] = a.num_regs;
        d["local_bytes"] = a.local_bytes;
        d["max_threads_per_block"] = a.max_threads_per_block;
        d["static_smem_bytes"] = a.static_smem_bytes;
        return d;
      },
      nb::arg("dtype"), nb::arg("tile"), nb::arg("reg_slots"), nb::arg("device") = 0,
      nb::arg("threads") = 0, nb::arg("backward") = false, nb::arg("gates") = 1,
      nb::arg("planes_per_pass") = 1, nb::arg("tiles") = false,
      "cudaFuncGetAttributes of one persistent-kernel instantiation (the forward recurrence, "
      "the backward one with backward=True, or the GRU's / LSTM's forward with gates=3 / 4); "
      "tile = load_bytes / 4; planes_per_pass=2: the variant that calls of two batch planes or "
      "more launch (tile 4 only); tiles=True: the tensor-core variant of a tile layout (16-bit "
      "forward recurrences, tile 4, reg_slots in TILE_REG_SLOTS_16 / _GATED_16). A "
      "(dtype, tile, reg_slots) may have two variants with different launch bounds: `threads` "
      "picks the one a CTA of that size runs; 0 gives the one with the largest "
      "max_threads_per_block.");

  m.def("pending_error", []() { return sc::TakePendingError(); },
        "The deferred errors of earlier persistent-kernel calls ('' if none), naming the earliest "
        "failed call, cleared on read. Synchronize the device first: the kernels report them "
        "asynchronously.");
}
