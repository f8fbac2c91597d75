// The second translation unit of the forward persistent kernels for bf16 (forward_bf16.cu): the groups
// JAX_SPRNN_SECOND_UNIT_GROUPS names (persistent_kernel.cuh).
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
JAX_SPRNN_SECOND_UNIT_GROUPS(JAX_SPRNN_INSTANTIATE_GROUP, Direction::kForward, Dtype::kBF16)
}  // namespace jax_sprnn::cuda
