"""Plots: a run's accuracy curves as SVG (no dependency); partition histograms as PNG
(matplotlib, Agg backend, no display needed); tick choices shared with the benchmark report.

Every chart has a title; a round axis has integer ticks only; tick labels are thinned until
they cannot overlap (:func:`line_chart`), and log axes get 1-2-5 ticks (:func:`log_ticks`)
instead of matplotlib's minor-tick labels, which collide on a short range.
"""

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


def plot_run(folder: Path, records: list[dict[str, Any]], label: str = "") -> None:
    """accuracy_vs_round.svg and accuracy_vs_uplink.svg from ``metrics.jsonl`` records; the
    titles name ``label`` (default: the folder's name).

    Written as SVG by :func:`line_chart`, without matplotlib: importing it and drawing two PNGs
    costs about 1.2 s, a quarter of the default run.
    """
    label = label or Path(folder).name
    pts = [(r["round"], r["accuracy"]) for r in records if r["accuracy"] is not None]
    up, cum = [], 0
    for r in records:
        cum += r["uplink_bytes"]
        if r["accuracy"] is not None:
            up.append((cum / 1e6, r["accuracy"]))
    for name, data, xlabel, title, integer_x in (
        ("accuracy_vs_round.svg", pts, "round", "Test accuracy per round", True),
        ("accuracy_vs_uplink.svg", up, "cumulative uplink (MB)", "Test accuracy against uplink", False),
    ):
        title = f"{title}: {label}" if label else title
        svg = line_chart(data, xlabel, "global test accuracy", title=title, integer_x=integer_x)
        atomic_write_bytes(folder / name, svg.encode())


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> list[float]:
    """About ``target`` round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi];
    with ``integer``, whole-number steps only (a round axis has no round 1.5)."""
    if not hi > lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    steps = [m * mag for m in (1, 2, 2.5, 5, 10)]
    if integer:
        steps = [st for st in steps if st >= 1 and float(st).is_integer()] or [1.0]
    step = next((st for st in steps if st >= raw), steps[-1])
    first = math.floor(lo / step) * step
    n = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(n + 1)]


def log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Tick values for a log axis over [lo, hi] (0 < lo <= hi): 1-2-5, 1-3 or 1 per decade,
    or every k-th power of ten, the densest with at most ``most`` ticks inside the range; a
    range too short for two of them gets :func:`nice_ticks` inside it."""
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in mults if lo <= m * 10.0**k <= hi]
        if len(ticks) < 2:
            inside = [t for t in nice_ticks(lo, hi, 3) if lo <= t <= hi]
            return inside if len(inside) >= 2 else ticks or [lo]
        if len(ticks) <= most:
            return [float(f"{t:.12g}") for t in ticks]
    step = math.ceil((k1 - k0 + 1) / most)
    return [10.0**k for k in range(k0, k1 + 1, step) if lo <= 10.0**k <= hi]


def tick_label(v: float) -> str:
    """A log-axis tick label: 0.5, 20, 1000, 1e+06."""
    return f"{v:g}"


def _label(v: float, step: float) -> str:
    """``v`` with as many decimals as the tick step has (0.025 -> 3, 2.5 -> 1, 5 -> 0)."""
    decimals = len(f"{step:.10f}".rstrip("0").split(".")[1])
    return f"{v:.{decimals}f}"


#: Estimated width of one character of the 11 px labels, and the least gap between two labels.
CHAR_PX, LABEL_GAP_PX = 7.0, 8.0


def thinned(ticks: list[float], labels: list[str], span_px: float) -> list[int]:
    """Indexes of the ticks to label: every k-th, the smallest k at which no two labels (of
    :data:`CHAR_PX` per character) come closer than :data:`LABEL_GAP_PX` on ``span_px`` pixels."""
    if len(ticks) < 2:
        return list(range(len(ticks)))
    widest = max(len(lab) for lab in labels) * CHAR_PX
    spacing = span_px / (len(ticks) - 1)
    k = 1
    while k < len(ticks) - 1 and k * spacing < widest + LABEL_GAP_PX:
        k += 1
    return list(range(0, len(ticks), k))


def line_chart(
    points: list[tuple[float, float]],
    xlabel: str,
    ylabel: str,
    w: int = 520,
    h: int = 340,
    title: str = "",
    integer_x: bool = False,
) -> str:
    """A self-contained SVG line chart (title, markers, grid, ticks, axis labels) of ``points``;
    ``integer_x``: whole-number x ticks only (rounds)."""
    left, right, top, bottom = 62, 16, 36 if title else 14, 46
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    xt, yt = nice_ticks(min(xs), max(xs), integer=integer_x), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def sy(v: float) -> float:
        return h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
    ]
    if title:
        out.append(f"<title>{escape(title)}</title>")
    out.append(f'<rect width="{w}" height="{h}" fill="white"/>')
    if title:
        bold = 'font-size="13" font-weight="bold"'
        out.append(f'<text x="{w / 2:.1f}" y="22" text-anchor="middle" {bold}>{escape(title)}</text>')
    xlabels = [_label(v, xt[1] - xt[0]) for v in xt]
    shown = set(thinned(xt, xlabels, w - left - right))
    for i, v in enumerate(xt):
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#ddd"/>')
        if i in shown:
            out.append(f'<text x="{x:.1f}" y="{h - bottom + 15}" text-anchor="middle">{xlabels[i]}</text>')
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
