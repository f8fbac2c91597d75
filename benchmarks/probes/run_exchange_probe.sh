#!/usr/bin/env bash
# Build and run the exchange probe on a GPU machine; the table goes to stdout and $OUT (or ./out).
# Arguments go to the probe: [--csv] ['local-|mbar-'] (only the cases whose name holds one).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/probe_device.txt"
nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/exchange_probe exchange_probe.cu
timeout -k 5 300 /tmp/exchange_probe "$@" | tee "$OUT/exchange_probe.txt"
