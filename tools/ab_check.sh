#!/usr/bin/env bash
# A same-run A/B of a source change on the GPU: the tree with AB_PATCH reverse-applied (the
# baseline, "base"), then the tree as it is ("new"), each built and run by tools/gpu_check.sh, so
# that both sides see the same machine, clocks and neighbours. A patch of the change:
#   git diff main -- cuda/ > ab/change.patch   (keep it untracked; it travels with the checkout)
# Usage:
#   AB_PATCH=ab/change.patch BASE_MODES=suite NEW_MODES=tests,suite SUITE=sweep \
#     SUITE_ARGS_sweep="--hidden 1024 --batch 4" tools/ab_check.sh [pytest args for NEW_MODES' tests]
#   (BASE_MODES=kerneltime NEW_MODES=kerneltime KT_CASES_FILE=...: kernel time, both sides)
# Logs: $OUT/base and $OUT/new (each as tools/gpu_check.sh leaves them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
: "${AB_PATCH:?AB_PATCH must name a patch of the change (git diff), relative to the repository root}"
if ! patch -R -p1 --dry-run -s < "$AB_PATCH" > /dev/null; then
  echo "ab_check: $AB_PATCH does not reverse-apply to this tree"; exit 2
fi
patch -R -p1 -s < "$AB_PATCH"
trap 'patch -p1 -s -N < "$AB_PATCH" > /dev/null 2>&1 || true' EXIT  # leave the tree as it was
echo "==== base (the tree without $AB_PATCH)"
# (BASE_TEST_ARGS: pytest arguments for the base side's tests, word-split; none by default)
OUT="$OUT/base" bash tools/gpu_check.sh "${BASE_MODES:-suite}" ${BASE_TEST_ARGS:-}
patch -p1 -s < "$AB_PATCH"
trap - EXIT
echo "==== new (the tree as it is)"
OUT="$OUT/new" bash tools/gpu_check.sh "${NEW_MODES:-suite}" "$@"
# A device run returns a few files only: the two sides' logs as one archive.
(cd "$OUT" && tar czf ab_logs.tar.gz base new && rm -rf base new)
