#!/usr/bin/env bash
# Keeps a reused build folder honest about its sources. A warm device machine keeps build/gpu
# between calls, but the checkout copied onto it may carry mtimes older than the objects built there
# from another source, and ninja would keep those (2026-12-07: an A/B's base ran its previous
# variant's objects). Run from the repository root:
#   tools/fresh_build_inputs.sh touch BUILD_DIR    before a build: touches every input whose content
#                                                  differs from the last recorded build's (all of
#                                                  them when BUILD_DIR has no record)
#   tools/fresh_build_inputs.sh record BUILD_DIR   after a successful build: records the inputs
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,10p' "$0"; exit 2; }
record="$2/.input_sums"
inputs() { find cuda jax_sprnn CMakeLists.txt pyproject.toml -type f -not -name '*.pyc' | LC_ALL=C sort; }
case "$1" in
  touch)
    [ -d "$2" ] || exit 0  # (a cold build compiles everything anyway)
    inputs | xargs -d '\n' sha256sum | LC_ALL=C sort \
      | LC_ALL=C comm -23 - <(LC_ALL=C sort "$record" 2> /dev/null || true) \
      | cut -c67- | xargs -r -d '\n' touch ;;
  record) inputs | xargs -d '\n' sha256sum > "$record" ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
