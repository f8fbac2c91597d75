"""Capacity: the largest layer the planner admits for the persistent kernel, per density and dtype.

    python benchmarks/capacity.py [--device-from-gpu]

Uses the planner's model of the H200 (or of the visible GPU): a layer is admitted when its
row-balanced pattern (``density * H`` nonzeros in every row) fits the register and shared-memory
tiers with one CTA per SM. Compared with two references: the register file's physical limit (all
registers of all SMs holding 4-byte (value, index) pairs, nothing else) and the dense persistent
limit (cuDNN's persistent algorithm, about H=1024 in fp16 per DESIGN.md).
"""
import argparse
import math

import numpy as np

from jax_sprnn import planner

DTYPES = {"float16": np.float16, "bfloat16": np.float16, "float32": np.float32}  # 16-bit alike


def largest_hidden(density, dtype, device, step=128, top=32768):
    best = 0
    for hidden in range(step, top + 1, step):
        nnz = max(1, int(round(density * hidden)))
        if planner.plan_layout(np.full(hidden, nnz), dtype, device).fits:
            best = hidden
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device-from-gpu", action="store_true")
    args = p.parse_args()
    device = planner.H200
    if args.device_from_gpu:
        from jax_sprnn._native import current_device_spec
        device = current_device_spec()
    regfile_bytes = device.sm_count * 65536 * 4
    print(f"device model: {device.name}, {device.sm_count} SMs")
    print(f"{'density':>8} {'dtype':>9} {'largest H':>10} {'nonzeros':>10} {'reg-file limit H':>17}")
    for density in (0.05, 0.10, 0.20, 0.30):
        for name in ("float16", "float32"):
            dtype = DTYPES[name]
            h = largest_hidden(density, dtype, device)
            pair = planner.bytes_per_slot(dtype)
            limit = int(math.sqrt(regfile_bytes / pair / density))
            label = "fp16/bf16" if name == "float16" else name
            print(f"{density:>8.0%} {label:>9} {h:>10} {int(round(density * h)) * h:>10} {limit:>17}")


if __name__ == "__main__":
    main()
