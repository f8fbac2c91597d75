// The forward persistent kernels for bf16: one translation unit per (direction, dtype), so that
// the build compiles them in parallel; this one's groups compile in two (persistent_kernel.cuh:
// JAX_SPRNN_SECOND_UNIT_GROUPS, the others in forward_bf16_b.cu).
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
JAX_SPRNN_SECOND_UNIT_GROUPS(JAX_SPRNN_EXTERN_GROUP, Direction::kForward, Dtype::kBF16)
template PersistentKernelFn lookup_persistent_kernel<Direction::kForward, Dtype::kBF16>(int, int, int, int, bool);
}  // namespace jax_sprnn::cuda
