"""Contract tests run over the whole method registry: every method is deterministic and resumes
from a crash to exactly the bits of an uninterrupted run (client state included)."""

from __future__ import annotations

import json

import pytest

from sparsefl.config import load_config
from sparsefl.experiment.runner import run_experiment
from sparsefl.registry import METHODS

TINY = [
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=4",
    "data.min_samples=5",
]

#: the smallest valid setting of each method (a method missing here runs with its defaults)
SETTINGS = {
    "zerofl": ["method.sparsity=0.8"],
    "static_mask": ["method.sparsity=0.8"],
    "hidenseek": ["method.sparsity=0.8", "method.synflow_iterations=5"],
    "fedmask": ["method.sparsity=0.8", "method.synflow_iterations=5"],
    "fedpm": ["method.sparsity=0.8", "method.synflow_iterations=5"],
    "dynamic": ["method.density=0.5"],
    "fedtiny": ["method.sparsity=0.8", "method.adjust_every=1", "method.adjust_until=1.0"],
    "fedrts": ["method.sparsity=0.8", "method.adjust_every=3", "method.adjust_until=1.0"],
    "feddst": ["method.sparsity=0.8", "method.delta_r=1", "method.alpha=0.2", "method.r_end=1.0"],
    "prunefl": ["method.interval=2", "method.sparsity=0.5"],
    "kd": ["method.kd=logit", "method.student.name=static_mask", "method.student.sparsity=0.8"],
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_experiment(load_config(overrides=[*TINY, "federation.rounds=1"]), out)
    return out / "model.safetensors"


def _overrides(name: str, teacher) -> list[str]:  # type: ignore[no-untyped-def]
    extra = list(SETTINGS.get(name, []))
    if name == "kd":
        extra.append(f"method.kd_teacher='{teacher}'")
    return [*TINY, f"method.name={name}", *extra]


def _metrics(folder):  # type: ignore[no-untyped-def]
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k and k != "clients"} for r in rows]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_is_deterministic_and_resumes_exactly(name, tmp_path, interrupted_run, teacher):
    cfg = load_config(overrides=_overrides(name, teacher))
    whole = run_experiment(cfg, tmp_path / "whole")
    again = run_experiment(cfg, tmp_path / "again")
    assert whole["model_sha256"] == again["model_sha256"]

    interrupted_run(cfg, tmp_path / "cut", at=3)
    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")
    assert whole["uplink_bytes_total"] > 0 and whole["final_accuracy"] is not None
