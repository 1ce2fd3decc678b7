"""Plots: a run's accuracy curves as SVG (no dependency); partition histograms as PNG
(matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

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
    """accuracy_vs_round.svg and accuracy_vs_uplink.svg from ``metrics.jsonl`` records.

    Written as SVG by :func:`line_chart`, without matplotlib: importing it and drawing two PNGs
    costs about 1.2 s, a quarter of the default run.
    """
    pts = [(r["round"], r["accuracy"]) for r in records if r["accuracy"] is not None]
    up, cum = [], 0
    for r in records:
        cum += r["uplink_bytes"]
        if r["accuracy"] is not None:
            up.append((cum / 1e6, r["accuracy"]))
    for name, data, xlabel in (
        ("accuracy_vs_round.svg", pts, "round"),
        ("accuracy_vs_uplink.svg", up, "cumulative uplink (MB)"),
    ):
        atomic_write_bytes(folder / name, line_chart(data, xlabel, "global test accuracy").encode())


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    n = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(n + 1)]


def _label(v: float, step: float) -> str:
    """``v`` with as many decimals as the tick step has (0.025 -> 3, 2.5 -> 1, 5 -> 0)."""
    decimals = len(f"{step:.10f}".rstrip("0").split(".")[1])
    return f"{v:.{decimals}f}"


def line_chart(points: list[tuple[float, float]], xlabel: str, ylabel: str, w: int = 520, h: int = 340) -> str:
    """A self-contained SVG line chart (markers, grid, ticks, axis labels) of ``points``."""
    left, right, top, bottom = 62, 16, 14, 46
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def sy(v: float) -> float:
        return h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
    ]
    for v in xt:
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{h - bottom + 15}" text-anchor="middle">{_label(v, xt[1] - xt[0])}</text>')
    for v in yt:
        y = sy(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(v, yt[1] - yt[0])}</text>')
    out.append(
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" fill="none" stroke="#333"/>'
    )
    if points:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="#1f77b4"/>' for x, y in points]
    out.append(f'<text x="{(left + w - right) / 2:.1f}" y="{h - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    mid = (top + h - bottom) / 2
    out.append(
        f'<text x="16" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 16 {mid:.1f})">{escape(ylabel)}</text>'
    )
    out.append("</svg>\n")
    return "\n".join(out)


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
