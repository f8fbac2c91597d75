"""The results: one JSON of every number, and PNG plots drawn from it (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_training(path: Path, histories: dict[str, dict]) -> None:
    """Training loss and validation CER against step, one line per run; the pruned runs' density
    on a second axis."""
    plt = _pyplot()
    fig, (ax_loss, ax_cer) = plt.subplots(1, 2, figsize=(11, 4))
    density_ax = None
    for name, history in histories.items():
        train = history.get("train", [])
        if train:
            steps = [r["step"] for r in train]
            ax_loss.plot(steps, _smooth([r["loss"] for r in train]), label=name)
        valid = history.get("valid", [])
        if valid:
            ax_cer.plot([r["step"] for r in valid], [r["cer"] for r in valid], "o-", label=name)
        if train and min(r["density"] for r in train) < 1.0:
            density_ax = density_ax or ax_loss.twinx()
            density_ax.plot(steps, [r["density"] for r in train], "k:", lw=1,
                            label=f"{name} density")
    ax_loss.set(xlabel="step", ylabel="CTC loss per character (smoothed)", yscale="log",
                title="Training loss")
    ax_cer.set(xlabel="step", ylabel="validation CER (%)", title="Validation CER")
    if density_ax is not None:
        density_ax.set(ylabel="recurrent weight density", ylim=(0, 1.05))
        density_ax.legend(loc="upper center")
    ax_loss.legend(loc="upper right")
    ax_cer.legend()
    ax_cer.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cer_vs_density(path: Path, points: dict) -> None:
    """Test CER against density: the dense baseline, the gradually pruned model, and the dense
    model pruned in one shot without retraining."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = points.get("dense")
    if points.get("one_shot"):
        xs = sorted(points["one_shot"], key=float)
        ax.plot([float(x) for x in xs], [points["one_shot"][x] for x in xs], "s--",
                color="tab:gray", label="dense model, pruned once (no retraining)")
    if dense is not None:
        ax.plot([1.0], [dense], "o", color="tab:blue", ms=9, label="dense training")
        ax.axhline(1.2 * dense, color="tab:blue", ls=":", lw=1, label="1.2 x dense")
    if points.get("gradual"):
        for d, cer in points["gradual"].items():
            ax.plot([float(d)], [cer], "*", color="tab:red", ms=14,
                    label=f"gradual pruning (Zhu & Gupta) to {float(d):.0%}")
    ax.set(xscale="log", xlabel="recurrent weight density", ylabel="test CER (%)",
           title="CER against density")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(path: Path, latency: dict, title: str) -> None:
    """Recurrent layers' latency against density, sparse against the dense scan, one line per
    batch size (``latency``: ``{batch: {"dense_scan": ms, "sparse": {density: ms}}}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (batch, row) in enumerate(latency.items()):
        color = f"C{i}"
        pts = sorted((float(d), ms) for d, ms in row["sparse"].items() if ms is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=f"sparse_rnn, batch {batch}")
        if row.get("dense_scan") is not None:
            ax.axhline(row["dense_scan"], color=color, ls="--", lw=1,
                       label=f"dense lax.scan, batch {batch}")
    ax.set(xscale="log", yscale="log", xlabel="recurrent weight density",
           ylabel="ms per call", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else weight * acc + (1 - weight) * v
        out.append(acc)
    return out
