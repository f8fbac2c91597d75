// XLA FFI handlers of the CPU kernels (docs/format.md gives their operands and meaning).
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnBackwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnWeightGradCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnGatedForwardCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxSprnnGatedBackwardCpu);
