"""The run's SVG plots: well-formed, every point drawn, readable ticks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from sparsefl.experiment.plots import line_chart, nice_ticks, plot_run

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
