"""Figures written as PNG files (Agg, no display needed); every file is written atomically."""

from __future__ import annotations

import os

import numpy as np


def _ticks(n: int, max_labels: int = 32) -> np.ndarray:
    """Tick positions that stay readable: every index up to `max_labels`, then every k-th."""
    return np.arange(0, n, max(1, -(-n // max_labels)))


def plot_head_scores(scores: np.ndarray, selected: list[tuple[int, int]], path: str | os.PathLike,
                     title: str | None = None) -> None:
    """Heatmap of ALPS scores (layers on y, heads on x) with the selected heads boxed."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from p2d.io import atomic_path

    scores = np.asarray(scores, dtype=np.float64)
    L, H = scores.shape
    fig = Figure(figsize=(min(16.0, 2.5 + 0.4 * H), min(16.0, 1.5 + 0.25 * L)), dpi=120)
    ax = fig.add_subplot()
    image = ax.imshow(scores, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="ALPS score")
    for layer, head in selected:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xticks(_ticks(H))
    ax.set_yticks(_ticks(L))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"ALPS head scores ({len(selected)} of {L * H} heads selected, boxed)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_aer(report: dict, path: str | os.PathLike) -> None:
    """Two stacked bars: P2D's stages (proxy, localize, mine, train) against the full-training reference."""
    from matplotlib.figure import Figure

    from p2d.io import atomic_path

    fig = Figure(figsize=(7.0, 3.2), dpi=120)
    ax = fig.add_subplot()
    left = 0.0
    colors = ("#8da0cb", "#66c2a5", "#fc8d62", "#e78ac3")
    for (name, stage), color in zip(report["stages"].items(), colors):
        ax.barh("P2D", stage["seconds"], left=left, color=color, label=f"{name} {stage['seconds']:.0f}s")
        left += stage["seconds"]
    ref = report["reference"]
    ax.barh("full data,\nfull params", ref["seconds"], color="#b3b3b3", label=f"reference {ref['seconds']:.0f}s")
    ax.set_xlabel("wall-clock seconds")
    ax.set_title(f"AER {report['aer']:.3f}  (speedup {report['speedup']:.1f}x; reference {ref['method']})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_losses(log: list[dict], path: str | os.PathLike, title: str = "training loss") -> None:
    """Loss per optimizer step (from train_log.jsonl), with the learning rate on a second axis."""
    from matplotlib.figure import Figure

    from p2d.io import atomic_path

    fig = Figure(figsize=(6.0, 3.0), dpi=120)
    ax = fig.add_subplot()
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["loss"] for r in log], color="#1f77b4", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response loss (nats/token)")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in log], color="#ff7f0e", linewidth=0.8, alpha=0.6)
    lr.set_ylabel("learning rate", color="#ff7f0e")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
