// The second translation unit of the backward persistent kernels for bf16 (backward_bf16.cu): the groups
// JAX_SPRNN_SECOND_UNIT_GROUPS names (persistent_kernel.cuh).
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
JAX_SPRNN_SECOND_UNIT_GROUPS(JAX_SPRNN_INSTANTIATE_GROUP, Direction::kBackward, Dtype::kBF16)
}  // namespace jax_sprnn::cuda
