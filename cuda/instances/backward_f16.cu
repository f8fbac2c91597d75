// The backward persistent kernels for f16: one translation unit per (direction, dtype), so that
// the build compiles them in parallel; this one's groups compile in two (persistent_kernel.cuh:
// JAX_SPRNN_SECOND_UNIT_GROUPS, the others in backward_f16_b.cu).
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
JAX_SPRNN_SECOND_UNIT_GROUPS(JAX_SPRNN_EXTERN_GROUP, Direction::kBackward, Dtype::kF16)
template PersistentKernelFn lookup_persistent_kernel<Direction::kBackward, Dtype::kF16>(int, int, int, int, bool);
}  // namespace jax_sprnn::cuda
