"""benchmarks/gpu.py --quick: every section, with positive timings, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _positive(row: dict, *keys: str) -> None:
    for k in keys:
        assert isinstance(row[k], float) and row[k] > 0, (k, row)


def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["device_name"] and res["quick"] is True
    assert f"sparsefl on cpu ({res['device_name']})" in proc.stdout
    assert [r["model"] for r in res["vs_plain"]] == ["cnn", "resnet20", "resnet18"]
    for row in res["vs_plain"]:
        _positive(row, "sparsefl_round_s", "plain_round_s", "ratio")
        assert row["sparsefl_peak_mb"] is None and row["plain_peak_mb"] is None  # n/a on the CPU
    assert {r["model"] for r in res["batched"]} == {"cnn", "resnet8", "resnet20"}
    for row in res["batched"]:
        if "skipped" in row:
            assert isinstance(row["skipped"], str) and row["skipped"]
        else:
            _positive(row, "sequential_round_s", "batched_round_s", "speedup")
    fm = res["fmnist"]
    _positive(fm, "seconds_per_round", "projected_500_rounds_s", "wall_s")
    assert fm["projected_500_rounds_s"] == 500 * fm["seconds_per_round"]
    assert fm["executor"] in ("sequential", "batched") and fm["rounds"] >= 2
    det = res["determinism"]
    assert det["same"] is True and det["sha_first"] == det["sha_second"] and det["rounds"] == 3
