// The forward persistent kernels for bf16: one translation unit per (direction, dtype), so that
// the build compiles them in parallel.
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
template PersistentKernelFn lookup_persistent_kernel<Direction::kForward, Dtype::kBF16>(int, int, int, int, bool);
}  // namespace jax_sprnn::cuda
