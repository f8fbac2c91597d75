// The CPU module: hands the CPU handlers to Python as capsules for jax.ffi.register_ffi_target,
// and exports the shared constants it was built with (always built, so CI checks them).
#include <nanobind/nanobind.h>

#include "constants_export.h"
#include "cpu_kernels.h"

namespace nb = nanobind;

namespace {
template <typename Fn>
nb::capsule capsule_of(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

NB_MODULE(_sprnn_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    namespace c = jax_sprnn::constants;
    d[c::kForwardTarget] = capsule_of(JaxSprnnForwardCpu);
    d[c::kBackwardTarget] = capsule_of(JaxSprnnBackwardCpu);
    d[c::kWeightGradTarget] = capsule_of(JaxSprnnWeightGradCpu);
    d[c::kGatedForwardTarget] = capsule_of(JaxSprnnGatedForwardCpu);
    d[c::kGatedBackwardTarget] = capsule_of(JaxSprnnGatedBackwardCpu);
    return d;
  });
  m.def("constants", &jax_sprnn::exported_constants,
        "The values and formulas of jax_sprnn/_constants.py this module was built with.");
}
