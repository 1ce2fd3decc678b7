"""Single-run outputs of the report module: metrics.csv, and run folders side by side
(``sparsefl show A B``)."""

from __future__ import annotations

import csv
import io
import shutil

import pytest

from sparsefl.config import load_config
from sparsefl.errors import RunFolderError
from sparsefl.experiment.report import compare_rows, compare_runs, metrics_csv, write_metrics_csv
from sparsefl.experiment.runfolder import RunFolder
from sparsefl.experiment.runner import run_experiment

TINY = ["federation.rounds=2", "federation.num_clients=4", "federation.clients_per_round=2"]


def test_metrics_csv_one_flat_row_per_round(tmp_path):
    records = [
        {"round": 1, "accuracy": None, "loss": None, "uplink_bytes": 10, "lr": 0.05,
         "clients": [{"id": 0}, {"id": 3}], "failures": []},
        {"round": 2, "accuracy": 0.5, "loss": 1.25, "uplink_bytes": 12, "lr": 0.05,
         "clients": [{"id": 1}], "failures": [{"client": 2, "kind": "crash"}]},
    ]  # fmt: skip
    write_metrics_csv(tmp_path / "metrics.csv", records)
    text = (tmp_path / "metrics.csv").read_text()
    assert text == metrics_csv(records)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["round", "accuracy", "loss", "uplink_bytes", "lr", "num_clients", "num_failures"]
    assert rows[0]["accuracy"] == "" and rows[0]["num_clients"] == "2"
    assert rows[1] == {"round": "2", "accuracy": "0.5", "loss": "1.25", "uplink_bytes": "12", "lr": "0.05",
                       "num_clients": "1", "num_failures": "1"}  # fmt: skip


def test_runs_side_by_side(tmp_path):
    a, b = tmp_path / "fedavg", tmp_path / "static"
    run_experiment(load_config(overrides=TINY), a)
    run_experiment(load_config(overrides=[*TINY, "method.name=static_mask", "method.sparsity=0.8"]), b)
    records = RunFolder(a).read_metrics()
    assert len(list(csv.DictReader(io.StringIO(metrics_csv(records))))) == 2  # a real run's records
    running = tmp_path / "running"
    shutil.copytree(a, running)
    (running / "summary.json").unlink()  # as while it runs
    head, rows = compare_rows([a, b, running])
    assert head == ["", str(a), str(b), str(running)]
    by = {r[0]: r[1:] for r in rows}
    assert by["method.name"] == ["fedavg", "static_mask", "fedavg"]
    assert by["method.sparsity"] == ["0.0", "0.8", "0.0"]
    assert by["method.criterion"] == ["-", "global_magnitude", "-"]  # an option only one method has
    assert "local.lr" not in by  # the same everywhere: not shown
    assert by["status"][:2] == ["finished", "finished"] and by["status"][2].startswith("running or interrupted")
    assert by["final accuracy"][0] == by["final accuracy"][2] != "-"  # from metrics.jsonl while running
    assert by["uplink MB"][0] == by["uplink MB"][2] and float(by["uplink MB"][1]) < float(by["uplink MB"][0])
    assert by["wall s"][2] == "-" and len(by["model_sha256"][0]) == 64
    table = compare_runs([a, b])
    assert len(table.columns) == 3 and table.row_count == len(compare_rows([a, b])[1])
    with pytest.raises(RunFolderError, match="not a run folder"):
        compare_rows([a, tmp_path])
