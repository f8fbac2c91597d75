#!/usr/bin/env bash
# Registers and local memory of chosen persistent-kernel variants, from ptxas (no GPU needed): a
# translation unit that instantiates only those variants, compiled for sm_90 in a minute or two
# instead of the five of a whole instance unit. For a kernel change's spills before a device run.
#   tools/variant_ptxas.sh "kForward __half 1 32 false 1" "kLstm __half 1 8 false 1" ...
#   (each: Direction, storage type, TILE, RS, WIDE, PP; TILES is false)
#   TREE=/path/to/other/checkout tools/variant_ptxas.sh ...   (the same variants of another tree)
# Prints one line per variant: its spec, registers, stack frame, spill stores and loads.
set -euo pipefail
[ $# -gt 0 ] || { sed -n '2,8p' "$0"; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
tree=$(cd "${TREE:-$here}" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" "$tree/jax_sprnn/_constants.py" --header "$work/jax_sprnn_constants.h"
ffi=$("$python" -c "import jax.ffi; print(jax.ffi.include_dir())")
{
  echo '#include "persistent_kernel.cuh"'
  echo 'namespace jax_sprnn::cuda {'
  for spec in "$@"; do
    read -r dir t tile rs wide pp <<< "$spec"
    echo "template __global__ void sprnn_persistent_kernel<PersistentConfig<Direction::$dir, $t, $tile, $rs, $wide, $pp, false>>(const __grid_constant__ PersistentParams);"
  done
  echo '}'
} > "$work/variants.cu"
nvcc -arch=sm_90 -O3 --expt-relaxed-constexpr -std=c++17 -I"$tree/cuda" -I"$work" -isystem "$ffi" \
  -Xptxas -v -c "$work/variants.cu" -o "$work/variants.o" 2> "$work/ptxas.txt" || { cat "$work/ptxas.txt"; exit 1; }
# ptxas names each entry, then its stack and spills, then its registers; the entries come in the
# mangled order of their configs, so each line is matched back to its spec by demangling.
demangle=$(command -v cu++filt || command -v c++filt)
"$demangle" < "$work/ptxas.txt" | awk '
  /Compiling entry function/ { match($0, /PersistentConfig<[^>]*>/); name = substr($0, RSTART + 17, RLENGTH - 18) }
  /bytes stack frame/ && name != "" { frame = $1; stores = $5; loads = $9 }
  /Used [0-9]+ registers/ && name != "" {
    match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
    printf "%-60s %4s regs  %4s B frame  %4s B spill stores  %4s B spill loads\n", name, regs, frame, stores, loads
    name = ""
  }'
