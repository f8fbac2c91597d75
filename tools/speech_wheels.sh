#!/usr/bin/env bash
# Wheels of the speech example's packages that the GPU machine (no internet) lacks, downloaded here
# into .whl/ (git-ignored): pass `carry: [".whl"]` to the device run, and tools/gpu_check.sh installs
# them before its modes. For CPython 3.12 on x86-64 Linux (PY_VERSION=3.11 for another).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q -d .whl --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform any soundfile jiwer tqdm matplotlib
# What the image has and its JAX was built against stays as it is (installed with --no-deps, a
# newer numpy would replace it).
rm -f .whl/numpy-* .whl/packaging-* .whl/typing_extensions-* .whl/tzdata-*
ls .whl
