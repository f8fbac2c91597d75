#!/usr/bin/env bash
# A same-run A/B of a source change on the GPU: the tree with AB_PATCH reverse-applied (the
# baseline, "base"), then the tree as it is ("new"), each built and run by tools/gpu_check.sh, so
# that both sides see the same machine, clocks and neighbours. A patch of the change:
#   git diff main -- cuda/ > ab/change.patch   (keep it untracked; it travels with the checkout)
# Usage:
#   AB_PATCH=ab/change.patch BASE_MODES=suite NEW_MODES=tests,suite SUITE=sweep \
#     SUITE_ARGS_sweep="--hidden 1024 --batch 4" tools/ab_check.sh [pytest args for NEW_MODES' tests]
#   (BASE_MODES=kerneltime NEW_MODES=kerneltime KT_CASES_FILE=...: kernel time, both sides)
# Several variants in one call: the tree as it is is the base, and each patch of AB_VARIANTS
# (space-separated, each against the tree) is applied alone, built and run in turn with
# VARIANT_MODES (default kerneltime); the last variant also runs NEW_MODES' extra modes, e.g. tests:
#   AB_VARIANTS="ab/a.patch ab/b.patch" BASE_MODES=kerneltime NEW_MODES=kerneltime,tests \
#     KT_CASES_FILE=... tools/ab_check.sh [pytest args for the last variant's tests]
# At the end, the kernel-time table of the base against each variant (tools/ab_table.py). Logs:
# $OUT/base.tar.gz and $OUT/new.tar.gz (each side's folder as tools/gpu_check.sh leaves it); with
# AB_VARIANTS, $OUT/base.tar.gz and $OUT/<patch name without .patch>.tar.gz. Each side is archived
# as soon as it ends (a device run returns a few files only, and one cut off at its time limit
# returns the sides it finished). KERNEL_DTYPES=f16 (tools/gpu_check.sh) shortens every side's
# build where only f16 kernel times are wanted.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
# Both forms are one run: the base (the tree, with AB_PATCH reverse-applied), then each variant
# applied alone, built and run, and reverted; AB_PATCH is the one variant "new", re-applied at the end.
if [ -n "${AB_VARIANTS:-}" ]; then
  read -ra variants <<< "$AB_VARIANTS"
  default_modes=kerneltime
  base_label="the tree as it is"
else
  : "${AB_PATCH:?AB_PATCH (or AB_VARIANTS) must name a patch of the change (git diff), relative to the repository root}"
  if ! patch -R -p1 --dry-run -s < "$AB_PATCH" > /dev/null; then
    echo "ab_check: $AB_PATCH does not reverse-apply to this tree"; exit 2
  fi
  patch -R -p1 -s < "$AB_PATCH"
  trap 'patch -p1 -s -N < "$AB_PATCH" > /dev/null 2>&1 || true' EXIT  # leave the tree as it was
  variants=("$AB_PATCH")
  default_modes=suite
  base_label="the tree without $AB_PATCH"
fi
for v in "${variants[@]}"; do  # (all checked before the first build)
  if ! patch -p1 --dry-run -s < "$v" > /dev/null; then echo "ab_check: $v does not apply to the base"; exit 2; fi
done
# Each side runs in a scratch folder and lands in $OUT as one archive when it ends.
sides=$(mktemp -d)
archive_side() { (cd "$sides" && tar czf "$OUT/$1.tar.gz" "$1"); }
mkdir -p "$OUT"
echo "==== base ($base_label)"
# (BASE_TEST_ARGS: pytest arguments for the base side's tests, word-split; none by default)
OUT="$sides/base" bash tools/gpu_check.sh "${BASE_MODES:-$default_modes}" ${BASE_TEST_ARGS:-}
archive_side base
names=(base)
for i in "${!variants[@]}"; do
  v=${variants[$i]}
  name=$(basename "$v" .patch)
  if [ -z "${AB_VARIANTS:-}" ]; then name=new; fi
  names+=("$name")
  modes=${VARIANT_MODES:-$default_modes}
  if [ "$i" -eq $(( ${#variants[@]} - 1 )) ]; then modes=${NEW_MODES:-$modes}; fi
  patch -p1 -s < "$v"
  if [ -n "${AB_VARIANTS:-}" ]; then  # (leave the tree as it was, even if stopped)
    trap 'patch -R -p1 -s < "'"$v"'" > /dev/null 2>&1 || true' EXIT
  else
    trap - EXIT  # (AB_PATCH: the tree as it was is the tree with it)
  fi
  echo "==== $name (the base with $v)"
  OUT="$sides/$name" bash tools/gpu_check.sh "$modes" "$@"
  archive_side "$name"
  if [ -n "${AB_VARIANTS:-}" ]; then patch -R -p1 -s < "$v"; trap - EXIT; fi
done
# The kernel-time table, the base against each variant (tools/ab_table.py), where the base has one.
if [ -f "$sides/base/kernel_time.json" ]; then
  echo "==== kernel time: the base against each variant"
  python3 tools/ab_table.py "$sides/base/kernel_time.json" \
    $(for n in "${names[@]:1}"; do echo "$sides/$n/kernel_time.json"; done) | tee "$OUT/ab_table.txt" || true
fi
rm -rf "$sides"
