"""Capacity: the largest layer the planner admits for the persistent kernel, per density and dtype.

    python benchmarks/capacity.py [--device-from-gpu]

Uses the planner's model of the H200 (or of the visible GPU): a layer is admitted when its
row-balanced pattern (``density * H`` nonzeros in every row) fits the register and shared-memory
tiers with one CTA per SM. Compared with two references, both from the register file
``R = SMs * registers per SM * 4 bytes``:

* the register file's physical limit for sparse weights: all of R holding (value, index) pairs and
  nothing else, ``H = sqrt(R / (pair bytes * density))``;
* the dense persistent limit: all of R holding dense fp16 weights, ``H = sqrt(R / 2)``. cuDNN's
  persistent algorithm reaches far less in practice: PyTorch only asks for it up to H=1024.
"""
import argparse
import math

import numpy as np

from jax_sprnn import planner

DTYPES = {"float16": np.float16, "bfloat16": np.float16, "float32": np.float32}  # 16-bit alike

#: the largest hidden size PyTorch asks cuDNN's persistent RNN algorithm for (RNN.cpp heuristics)
CUDNN_PERSISTENT_MAX_H = 1024
#: registers of one SM on every NVIDIA GPU since Kepler (used when no GPU can be asked)
REGS_PER_SM = 65536


def largest_hidden(density, dtype, device, step=128, top=32768, batch=None):
    """The largest multiple of ``step`` the planner admits (and, given ``batch``, whose shared
    memory also holds h for that many examples)."""
    best = 0
    for hidden in range(step, top + 1, step):
        nnz = max(1, int(round(density * hidden)))
        plan = planner.plan_layout(np.full(hidden, nnz), dtype, device)
        if plan.fits and (batch is None or planner.max_persistent_batch(plan, dtype, device) >= batch):
            best = hidden
    return best


def register_file_bytes(device, regs_per_sm=REGS_PER_SM):
    return device.sm_count * regs_per_sm * 4


def sparse_register_limit(regfile_bytes, density, dtype):
    """H whose nonzeros, as (value, index) pairs, fill the whole register file."""
    return int(math.sqrt(regfile_bytes / planner.bytes_per_slot(dtype) / density))


def dense_register_limit(regfile_bytes, weight_bytes=2):
    """H whose dense weights (fp16 by default) fill the whole register file."""
    return int(math.sqrt(regfile_bytes / weight_bytes))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device-from-gpu", action="store_true")
    args = p.parse_args()
    device = planner.H200
    if args.device_from_gpu:
        from jax_sprnn._native import current_device_spec
        device = current_device_spec()
    regfile_bytes = register_file_bytes(device)
    print(f"device model: {device.name}, {device.sm_count} SMs; dense fp16 register-file limit "
          f"H={dense_register_limit(regfile_bytes)}, "
          f"cuDNN persistent (PyTorch) H<={CUDNN_PERSISTENT_MAX_H}")
    print(f"{'density':>8} {'dtype':>9} {'largest H':>10} {'nonzeros':>10} {'reg-file limit H':>17}")
    for density in (0.05, 0.10, 0.20, 0.30):
        for name in ("float16", "float32"):
            dtype = DTYPES[name]
            h = largest_hidden(density, dtype, device)
            limit = sparse_register_limit(regfile_bytes, density, dtype)
            label = "fp16/bf16" if name == "float16" else name
            print(f"{density:>8.0%} {label:>9} {h:>10} {int(round(density * h)) * h:>10} {limit:>17}")


if __name__ == "__main__":
    main()
