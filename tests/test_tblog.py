"""The optional TensorBoard log (``sparsefl[tensorboard]``): each round's scalars, read back."""

from __future__ import annotations

import sys

import pytest

from sparsefl.errors import ConfigError
from sparsefl.experiment.tblog import TensorBoardLog, require_tensorboard, write_tensorboard

RECORDS = [
    {"round": 1, "accuracy": None, "loss": None, "uplink_bytes": 100, "lr": 0.05, "clients": [], "failures": []},
    {"round": 2, "accuracy": 0.5, "loss": 1.5, "uplink_bytes": 120, "lr": 0.05, "clients": [], "failures": [{}]},
    {"round": 3, "accuracy": 0.75, "val_accuracy": 0.7, "loss": 0.9, "uplink_bytes": 90, "lr": 0.04, "clients": []},
]


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_round_is_logged_and_a_resume_replaces_later_rounds(tmp_path):
    pytest.importorskip("tensorboard")
    assert write_tensorboard(tmp_path, RECORDS) == tmp_path / "tensorboard"
    got = _scalars(tmp_path)
    assert got["accuracy"] == [(2, 0.5), (3, 0.75)]  # round 1 was not evaluated
    assert got["uplink_bytes"] == [(1, 100.0), (2, 120.0), (3, 90.0)]
    assert got["failures"] == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert got["val_accuracy"] == [(3, pytest.approx(0.7))]  # the tuning split, where there is one
    # a run resumed after round 2 redoes round 3: the log shows the new value only
    tb = TensorBoardLog(tmp_path, first_round=3)
    tb.log({**RECORDS[2], "accuracy": 0.8})
    tb.close()
    assert _scalars(tmp_path)["accuracy"] == [(2, 0.5), (3, pytest.approx(0.8))]


def test_without_tensorboard_the_key_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match="log.tensorboard.*sparsefl\\[tensorboard\\]"):
        require_tensorboard()
