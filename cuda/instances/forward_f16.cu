// The forward persistent kernels for f16: one translation unit per (direction, dtype), so that
// the build compiles them in parallel.
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
template PersistentKernelFn lookup_persistent_kernel<Direction::kForward, Dtype::kF16>(int, int, int, int, bool);
}  // namespace jax_sprnn::cuda
