// The LSTM backward persistent kernels for bf16: one translation unit per (recurrence, dtype), so
// that the build compiles them in parallel.
#include "persistent_kernel.cuh"

namespace jax_sprnn::cuda {
template PersistentKernelFn lookup_persistent_kernel<Direction::kLstmBackward, Dtype::kBF16>(int, int, int, int, bool);
}  // namespace jax_sprnn::cuda
