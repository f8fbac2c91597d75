// The forward persistent kernels for f32: one translation unit per (direction, dtype), so that
// the build compiles them in parallel.
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
template PersistentKernelFn lookup_persistent_kernel<Direction::kForward, Dtype::kF32>(int, int, int, int, bool);
}  // namespace jax_sprnn::cuda
