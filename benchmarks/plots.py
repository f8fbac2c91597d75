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
