"""PNG plots of the suites' rows (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import ran  # noqa: E402
from .problems import SHORT  # noqa: E402


def _label(row: dict) -> str:
    return row.get("label") or (f"H={row['hidden']} {row['density']:.0%} B={row['batch']} "
                                f"{SHORT[row['dtype']]}")


def per_step_bars(rows, path: Path, title: str) -> Path:
    """Grouped bars: µs per step of every peer that ran, one group per row."""
    rows = [r for r in rows if "peers" in r]
    names = list(dict.fromkeys(n for r in rows for n, res in r["peers"].items() if ran(res)))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j, r in enumerate(rows) if ran(r["peers"].get(name))]
        ys = [r["peers"][name]["us_per_step"] for r in rows if ran(r["peers"].get(name))]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([_label(r) for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs per step")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_speedup(rows, crossovers: dict, out_dir: Path) -> list[Path]:
    """Per dtype: a grid (batch x hidden) of our speedup over the best peer against density,
    colored by which peer was best, with the density where dense starts to win marked."""
    rows = [r for r in rows if "peers" in r]
    paths = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        hs = sorted({r["hidden"] for r in sub})
        bs = sorted({r["batch"] for r in sub})
        fig, axes = plt.subplots(len(bs), len(hs), squeeze=False, sharex=True,
                                 figsize=(max(5.0, 3.2 * len(hs)), 1.0 + max(3.0, 2.6 * len(bs))))
        peers = sorted({r["best_peer"] for r in sub if r.get("best_peer")})
        colors = {p: f"C{i}" for i, p in enumerate(peers)}
        for (i, b), (j, h) in ((ib, jh) for ib in enumerate(bs) for jh in enumerate(hs)):
            ax = axes[i][j]
            cell = sorted((r for r in sub if r["hidden"] == h and r["batch"] == b),
                          key=lambda r: r["density"])
            pts = [(r["density"], r["speedup_vs_best"], r["best_peer"]) for r in cell
                   if r.get("speedup_vs_best")]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.6", lw=1)
                for d, s, peer in pts:
                    ax.scatter(d, s, color=colors[peer], s=18, zorder=3)
            for r in cell:  # densities where ours did not run: marked at the bottom
                if not r.get("speedup_vs_best"):
                    ax.annotate("x", (r["density"], 0.02), xycoords=("data", "axes fraction"),
                                ha="center", color="red")
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
            cross = crossovers.get(f"{dtype}/{h}/{b}")
            if cross is not None:
                ax.axvline(cross, color="red", lw=1, ls="--")
                ax.text(cross, 1.0, f" peers win\n from {cross:.2f}", fontsize=7, color="red")
            ax.set_yscale("log")
            ax.set_title(f"H={h} B={b}", fontsize=9)
            if i == len(bs) - 1:
                ax.set_xlabel("density")
            if j == 0:
                ax.set_ylabel("speedup over best peer")
        handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f"best: {p}")
                   for p, c in colors.items()]
        if handles:
            fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
        fig.suptitle(f"Our speedup over the best peer, {dtype} (x: ours did not run)", fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = Path(out_dir) / f"sweep_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def capacity(rows, limits: dict, path: Path) -> Path:
    """Largest persistent H against density, with the register-file and dense limits."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, dtype in enumerate(dict.fromkeys(r["dtype"] for r in rows)):
        sub = sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["density"])
        ds = [r["density"] for r in sub]
        ax.plot(ds, [r["largest_hidden"] for r in sub], "o-", color=f"C{i}",
                label=f"largest persistent H, {dtype}")
        ax.plot(ds, [r["register_limit_hidden"] for r in sub], "--", color=f"C{i}",
                label=f"register file full of pairs, {dtype}")
    ax.axhline(limits["dense_register_limit_hidden"], color="k", ls="-.",
               label="dense fp16 weights filling the register file")
    ax.axhline(limits["cudnn_persistent_max_hidden"], color="0.5", ls=":",
               label="cuDNN persistent (PyTorch's limit)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("density")
    ax.set_ylabel("hidden size H")
    ax.set_title(f"Persistent capacity on {limits['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kernel_time(runs: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """The persistent kernel's device time per step (tools/kernel_time.py rows) against the batch:
    one panel per layer (cell, H), one line per run and layout, so that runs of two builds of one
    layout compare point by point."""
    fig = kernel_time_figure(runs, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kernel_time_figure(runs: dict[str, list[dict]], title: str = ""):
    layers = sorted({(r["cell"], r["hidden"]) for rows in runs.values() for r in rows},
                    key=lambda c: (c[1], c[0]))
    cols = min(3, max(1, len(layers)))
    n_rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(n_rows, cols, squeeze=False, figsize=(4.6 * cols, 3.4 * n_rows))
    for ax, (cell, hidden) in zip(axes.flat, layers):
        for i, (run, rows) in enumerate(runs.items()):
            layouts: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                if (r["cell"], r["hidden"]) == (cell, hidden):
                    name = f"{r['exchange']} {r['ctas']}x{r['warps_per_cta']} K{r['K']}"
                    layouts.setdefault(name, []).append((r["batch"], r["us_per_step"]))
            for j, (name, pts) in enumerate(sorted(layouts.items())):
                pts.sort()
                ax.plot([b for b, _ in pts], [us for _, us in pts], "os^vD"[j % 5] + "-",
                        color=f"C{i}", label=f"{run}: {name}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("µs per step (kernel time)")
        ax.set_title(f"{cell} H={hidden}", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    """``python -m benchmarks.plots kernel-time OUT.png RUN.json [RUN.json ...]``: the kernel-time
    runs' steps against the batch (each run named by its file)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="plot", required=True)
    kt = sub.add_parser("kernel-time", help="tools/kernel_time.py JSON runs")
    kt.add_argument("out", type=Path)
    kt.add_argument("runs", type=Path, nargs="+")
    kt.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = {p.stem.removeprefix("kernel_time_"): json.loads(p.read_text()) for p in args.runs}
    print(kernel_time(runs, args.out, args.title))


if __name__ == "__main__":
    main()
