"""The run's SVG plots: well-formed, every point drawn, readable ticks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from sparsefl.experiment.plots import CHAR_PX, LABEL_GAP_PX, line_chart, log_ticks, nice_ticks, plot_run, thinned

NS = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    "lo,hi,want",
    [
        (1, 20, [0, 5, 10, 15, 20]),
        (0.093, 0.983, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (0.91, 0.97, [0.9, 0.92, 0.94, 0.96, 0.98]),
        (0.0, 4.27, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_nice_ticks_cover_the_range_in_round_steps(lo, hi, want):
    assert nice_ticks(lo, hi) == pytest.approx(want)


def test_a_single_value_still_gets_an_axis():
    t = nice_ticks(0.5, 0.5)
    assert t[0] < 0.5 < t[-1]


def test_line_chart_is_valid_svg_with_every_point_and_escaped_labels():
    pts = [(1, 0.41), (2, 0.72), (3, 0.9)]
    root = ET.fromstring(line_chart(pts, "uplink <MB>", "accuracy & more"))
    assert root.tag == NS + "svg"
    assert len(root.findall(NS + "circle")) == 3
    texts = [t.text for t in root.iter(NS + "text")]
    assert "uplink <MB>" in texts and "accuracy & more" in texts
    assert {"0.4", "0.9"} <= set(texts)  # y ticks in steps of 0.1
    ET.fromstring(line_chart([], "round", "accuracy"))  # an empty chart is still drawn


def test_plot_run_writes_both_curves(tmp_path):
    recs = [
        {"round": 1, "accuracy": 0.5, "uplink_bytes": 1_000_000},
        {"round": 2, "accuracy": None, "uplink_bytes": 1_000_000},
        {"round": 3, "accuracy": 0.8, "uplink_bytes": 1_000_000},
    ]
    plot_run(tmp_path, recs)
    for name in ("accuracy_vs_round.svg", "accuracy_vs_uplink.svg"):
        root = ET.parse(tmp_path / name).getroot()
        assert len(root.findall(NS + "circle")) == 2  # the evaluated rounds


def _x_tick_labels(root: ET.Element) -> list[str]:
    """The x-axis tick labels: the texts on the line just under the plot area."""
    h = int(root.get("height"))
    return [t.text for t in root.iter(NS + "text") if t.get("y") == str(h - 46 + 15)]


def test_run_charts_have_titles_and_whole_round_ticks(tmp_path):
    recs = [{"round": r, "accuracy": 0.3 * r, "uplink_bytes": 1_500_000} for r in (1, 2, 3)]
    plot_run(tmp_path, recs, label="fedavg on digits")
    root = ET.parse(tmp_path / "accuracy_vs_round.svg").getroot()
    assert root.find(NS + "title").text == "Test accuracy per round: fedavg on digits"
    assert "Test accuracy per round: fedavg on digits" in [t.text for t in root.iter(NS + "text")]
    assert _x_tick_labels(root) == ["1", "2", "3"]  # not 1.25, 1.5, 1.75
    up = ET.parse(tmp_path / "accuracy_vs_uplink.svg").getroot()
    assert up.find(NS + "title").text.startswith("Test accuracy against uplink")
    plot_run(tmp_path, recs[:1])
    assert _x_tick_labels(ET.parse(tmp_path / "accuracy_vs_round.svg").getroot()) == ["0", "1", "2"]


@pytest.mark.parametrize(
    "lo,hi,want",
    [(1, 3, [1, 2, 3]), (1, 2, [1, 2]), (1, 7, [0, 2, 4, 6, 8]), (1, 30, [0, 10, 20, 30]), (1, 1, [0, 1, 2])],
)
def test_integer_ticks_are_whole_numbers(lo, hi, want):
    assert nice_ticks(lo, hi, integer=True) == want


@pytest.mark.parametrize(
    "lo,hi,want",
    [
        (0.48, 64.09, [0.5, 1, 2, 5, 10, 20, 50]),  # hidenseek to fedavg uplink MB: 1-2-5
        (5.1, 7.2, [6, 7]),  # under a factor 2: plain steps inside the range
        (0.01, 1e5, [0.01, 1, 100, 1e4]),  # many decades: every other one
        (2, 900, [3, 10, 30, 100, 300]),  # 1-2-5 would be 8 ticks
    ],
)
def test_log_ticks(lo, hi, want):
    assert log_ticks(lo, hi) == pytest.approx(want)


def test_crowded_x_labels_are_thinned_apart():
    svg = ET.fromstring(line_chart([(10_000, 0.1), (90_000, 0.9)], "x", "y", w=200))
    xs = [float(t.get("x")) for t in svg.iter(NS + "text") if t.get("y") == str(340 - 46 + 15)]
    labels = _x_tick_labels(svg)
    assert len(labels) >= 2 and labels[0] == "0"
    widest = max(map(len, labels)) * CHAR_PX
    assert all(b - a >= widest + LABEL_GAP_PX for a, b in zip(xs, xs[1:]))
    assert thinned([0, 1, 2], ["0", "1", "2"], 400) == [0, 1, 2]


@pytest.mark.parametrize("lo,hi", [(0.48, 64.09), (5.1, 7.2), (2.0, 30.0), (61.0, 64.5), (0.01, 1e5)])
def test_report_log_axes_labels_do_not_overlap(lo, hi):
    """The benchmark report's log axes (accuracy against uplink or FLOPs, the Pareto plot), drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsefl.experiment.report import log_axis

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [lo, (lo * hi) ** 0.5, hi]
    ax.plot(xs, [0.1, 0.5, 0.9])
    log_axis(ax, xs)
    fig.canvas.draw()
    boxes = sorted(
        (t.get_window_extent() for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
         if t.get_text() and t.get_visible()), key=lambda b: b.x0,
    )  # fmt: skip
    plt.close(fig)
    assert len(boxes) >= 2
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))
