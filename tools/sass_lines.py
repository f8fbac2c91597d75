"""A persistent kernel's SASS instructions by source line of its body, counted once each (static),
and what a change moved: a device-free first look at a kernel edit before any profile.

    # one instantiation, with lines (about 2 s; -lineinfo as the package builds):
    printf '#include "persistent_kernel.cuh"\nnamespace jax_sprnn::cuda {\ntemplate __global__ void
      sprnn_persistent_kernel<PersistentConfig<Direction::kForward, __half, 1, 8, false, 1>>(
      const __grid_constant__ PersistentParams);\n}\n' > one.cu
    nvcc -arch=sm_90 -O3 -lineinfo --expt-relaxed-constexpr -std=c++17 -cubin -Icuda \
        -I<dir of jax_sprnn_constants.h> -o new.cubin one.cu
    nvdisasm -c -gi new.cubin > new.sass       # (nvdisasm: the nvidia-cuda-nvdisasm wheel has it)
    python3 tools/sass_lines.py new.sass --against old.sass

Each instruction counts toward the innermost line of ``persistent_body`` it was inlined into (as
``tools/ncu_lines.py`` attributes a profile). Static counts weigh a cold path like a hot one, and
say nothing of latency: the phase loop's lines are where to look, and a profile decides. Lines are
numbers: compare builds whose body keeps its line numbers, or read the totals, when an edit moves
lines.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

from ncu_lines import KERNEL_SOURCE, body_lines, kernel_sass


def kernels(sass_path: str) -> list[str]:
    """The persistent kernels (mangled names) in a SASS listing."""
    text = open(sass_path).read()
    return [m.group(1) for m in re.finditer(r"^\.text\.(\S+):", text, re.M)
            if "sprnn_persistent_kernel" in m.group(1)]


def pick(sass_path: str, key: str | None) -> str:
    """The one persistent kernel of the listing whose mangled name contains ``key`` (any, where
    the listing has one)."""
    found = [k for k in kernels(sass_path) if key is None or key in k]
    if len(found) != 1:
        sys.exit(f"{sass_path}: {len(found)} persistent kernels match {key!r} (--kernel picks one "
                 f"by a part of its mangled name, e.g. 'Li1ELi8ELb0ELi1EE')")
    return found[0]


def count_by_line(sass_path: str, symbol: str, body: str) -> collections.Counter:
    """Instructions per innermost body line (-1: outside the body)."""
    body_file, span = body.split(":")
    first, last = (int(v) for v in span.split("-"))
    counts = collections.Counter()
    for chain, _ in kernel_sass(sass_path, symbol).values():
        in_body = [ln for f, ln in chain if f == body_file and first <= ln <= last]
        counts[in_body[0] if in_body else -1] += 1
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sass", help="nvdisasm -c -gi output")
    parser.add_argument("--against", help="another build's listing: print the change per line")
    parser.add_argument("--kernel", help="a part of the kernel's mangled name (where the listing "
                                         "has several persistent kernels)")
    parser.add_argument("--body", default=None,
                        help="FILE:FIRST-LAST of the kernel's body (default: persistent_body in "
                             "this checkout's cuda/persistent_kernel.cuh)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    body = args.body or body_lines(KERNEL_SOURCE)
    new = count_by_line(args.sass, pick(args.sass, args.kernel), body)
    print(f"{sum(new.values())} instructions, {sum(n for ln, n in new.items() if ln >= 0)} in the "
          f"body ({body})")
    if args.against is None:
        for line, n in new.most_common(args.top):
            print(f"  {line:6d} {n:6d}")
        return
    old = count_by_line(args.against, pick(args.against, args.kernel), body)
    print(f"against {sum(old.values())} in {args.against}: {sum(new.values()) - sum(old.values()):+d}")
    changed = {ln: new[ln] - old[ln] for ln in set(new) | set(old) if new[ln] != old[ln]}
    for line, delta in sorted(changed.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"  {line:6d} {old[line]:6d} -> {new[line]:6d} ({delta:+d})")


if __name__ == "__main__":
    main()
