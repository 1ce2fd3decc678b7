"""PNG plots of a run (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsefl.state import atomic_write_bytes


def _figure():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_run(folder: Path, records: list[dict[str, Any]]) -> None:
    """accuracy_vs_round.png and accuracy_vs_uplink.png from ``metrics.jsonl`` records."""
    plt = _figure()
    pts = [(r["round"], r["accuracy"]) for r in records if r["accuracy"] is not None]
    up, cum = [], 0
    for r in records:
        cum += r["uplink_bytes"]
        if r["accuracy"] is not None:
            up.append((cum / 1e6, r["accuracy"]))
    for name, data, xlabel in (
        ("accuracy_vs_round.png", pts, "round"),
        ("accuracy_vs_uplink.png", up, "cumulative uplink (MB)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.4))
        if data:
            xs, ys = zip(*data)
            ax.plot(xs, ys, marker="o", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("global test accuracy")
        ax.grid(alpha=0.3)
        _save(fig, folder / name)
        plt.close(fig)


def plot_partition(path: Path, hist: Any, title: str) -> None:
    """A stacked bar chart of per-client label counts (clients x classes)."""
    plt = _figure()
    import numpy as np

    hist = np.asarray(hist)
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(hist)), 3.4))
    bottom = np.zeros(len(hist))
    cmap = plt.get_cmap("tab20")
    for c in range(hist.shape[1]):
        ax.bar(np.arange(len(hist)), hist[:, c], bottom=bottom, color=cmap(c % 20), label=str(c), width=0.85)
        bottom += hist[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("training samples")
    ax.set_title(title)
    if hist.shape[1] <= 20:
        ax.legend(title="class", fontsize=6, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, path)
    plt.close(fig)
