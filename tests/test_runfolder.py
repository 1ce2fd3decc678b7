"""Run-folder integrity (one writer, checkpoints and metrics that belong to the run, nothing
written before the run can start, one-line errors for damaged files) and models you can reload
(``sparsefl.load_run``, ``sparsefl export``)."""

from __future__ import annotations

import errno
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from torch import nn

import sparsefl
from sparsefl import state as state_module
from sparsefl.cli.main import main
from sparsefl.config import load_config
from sparsefl.errors import ConfigError, DataError, RunFolderError
from sparsefl.experiment.artifacts import export_onnx, export_safetensors, read_sparse_safetensors
from sparsefl.experiment.runfolder import LOCK, RunFolder
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.masks import Mask
from sparsefl.runtime.server import Server

TINY = ["federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=2"]
VOLATILE = ("seconds", "clients")


def _metrics(folder):
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(w in k for w in VOLATILE)} for r in rows]


def _cli(capsys, *argv):
    """``sparsefl ARGV`` in this process: (exit code, stderr lines)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _run_args(out, *overrides):
    args = ["run", "--out", out]
    for o in [*TINY, *overrides]:
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_experiment(load_config(overrides=TINY), out)
    return out


# -- one writer ---------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(overrides=[*TINY, "federation.rounds=3"])
    in_round_1, go_on = threading.Event(), threading.Event()
    result: dict = {}

    def hold(record, meta):
        in_round_1.set()
        go_on.wait(60)

    first = threading.Thread(target=lambda: result.update(run_experiment(cfg, out, progress=hold)))
    first.start()
    try:
        assert in_round_1.wait(60)
        code, err = _cli(capsys, *_run_args(out, "federation.rounds=3"))
        with pytest.raises(RunFolderError, match="in use by another sparsefl run"):
            run_experiment(cfg, out)
    finally:
        go_on.set()
        first.join(60)
    assert code == 2 and len(err) == 1 and str(out) in err[0] and "in use by another sparsefl run" in err[0]
    assert result["status"] == "completed" and result["rounds"] == 3
    assert [r["round"] for r in _metrics(out)] == [1, 2, 3]
    assert not (out / LOCK).exists()  # removed by its holder on leaving


# -- checkpoints and metrics that belong to the run ---------------------------------------------


def test_checkpoints_of_another_configuration_are_not_resumed(tmp_path, interrupted_run):
    cfg = load_config(overrides=[*TINY, "federation.rounds=3"])
    other = load_config(overrides=[*TINY, "federation.rounds=3", "seed=1"])
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=3)
    interrupted_run(other, tmp_path / "other", at=3)
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl"):  # a seed=1 run's files
        shutil.copy(tmp_path / "other" / name, tmp_path / "cut" / name)
    logs: list[str] = []
    resumed = run_experiment(cfg, tmp_path / "cut", log=logs.append)
    assert sum("belongs to another configuration" in m for m in logs) == 2
    assert any("starting again from round 1" in m for m in logs)
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")


def test_an_edited_metrics_line_falls_back_to_the_checkpoint_whose_lines_are_intact(tmp_path, interrupted_run):
    """The checkpoint of round 3 covers lines 1-3 by their SHA-256; line 3 edited (valid JSON,
    a better accuracy) no longer matches it, so the run resumes from round 2's checkpoint and
    the summary counts the recomputed round 3, not the edited one."""
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=4)
    m = tmp_path / "cut" / "metrics.jsonl"
    lines = m.read_text().splitlines(keepends=True)
    edited = {**json.loads(lines[2]), "accuracy": 0.999, "uplink_bytes": 1}
    m.write_text("".join(lines[:2]) + json.dumps(edited) + "\n")
    logs: list[str] = []
    resumed = run_experiment(cfg, tmp_path / "cut", log=logs.append)
    assert any("rounds 1-3 differ from what the checkpoint of round 3 recorded" in x for x in logs)
    assert any("after round 2" in x for x in logs)
    assert resumed["model_sha256"] == whole["model_sha256"]
    for key in ("best_accuracy", "final_accuracy", "uplink_bytes_total"):
        assert resumed[key] == whole[key], key
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")


# -- nothing written before the run can start ----------------------------------------------------


class Flat(nn.Module):
    """A user module for 8x8 digits: flatten, one hidden layer."""

    def __init__(self, inputs: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class Other(Flat):
    """Another class with the same parameters."""


def test_a_run_that_fails_before_round_1_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "new" / "run"
    cfg = load_config(overrides=TINY)
    with pytest.raises(DataError):
        run_experiment(load_config(overrides=[*TINY, "data.name=npz", f"data.dir={tmp_path / 'none.npz'}"]), out)
    with pytest.raises(ConfigError, match=r"config key 'model': got 'Flat'.*inputs of shape \(N, 1, 8, 8\)"):
        run_experiment(cfg, out, model=Flat(inputs=784))
    assert not (tmp_path / "new").exists()  # not even the folders

    real = Server.train_round

    def fails_in_round_1(self, state, rnd):
        raise RuntimeError("a client bug")

    out.mkdir(parents=True)
    monkeypatch.setattr(Server, "train_round", fails_in_round_1)
    with pytest.raises(RuntimeError, match="a client bug"):
        run_experiment(cfg, out)
    assert sorted(p.name for p in out.iterdir()) == []  # the folder was there before: kept, empty
    monkeypatch.setattr(Server, "train_round", real)
    # the corrected command is not refused as "a different configuration"
    assert run_experiment(load_config(overrides=[*TINY, "seed=3"]), out)["status"] == "completed"


# -- one line for damaged files and unusable paths -----------------------------------------------


@pytest.mark.parametrize("content", [b"null", b"[]", b"\xff\xfe{"], ids=["null", "list", "not-utf8"])
def test_a_damaged_config_json_is_one_line(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_bytes(content)
    for argv in (_run_args(out), ["show", out]):
        code, err = _cli(capsys, *argv)
        assert code == 2 and len(err) == 1 and f"{out / 'config.json'} is damaged" in err[0], argv
    assert (out / "config.json").read_bytes() == content


def test_damaged_summary_and_metrics_are_one_line(tmp_path, capsys, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    summary = out / "summary.json"
    summary.write_bytes(summary.read_bytes()[:40])
    for argv in (_run_args(out), ["show", out]):
        code, err = _cli(capsys, *argv)
        assert code == 2 and len(err) == 1 and f"{summary} is damaged" in err[0], argv
    shutil.copy(finished / "summary.json", summary)
    m = out / "metrics.jsonl"
    m.write_text(m.read_text().splitlines(keepends=True)[0] + "[1,2,3]\n")
    code, err = _cli(capsys, "show", out)
    assert code == 2 and len(err) == 1 and f"{m} line 2 is not a round record" in err[0]


@pytest.mark.parametrize("info", ["{}", '{"input_shape": "abc", "num_classes": 10, "input_transform": null}'])
def test_exporting_a_run_with_a_damaged_model_json_is_one_line(tmp_path, capsys, finished, info):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "model.json").write_text(info)
    code, err = _cli(capsys, "export", out, "--format", "safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 2 and len(err) == 1 and "model.json is damaged" in err[0]
    assert not (tmp_path / "m.safetensors").exists()


def test_a_flower_run_into_a_busy_folder_is_refused_before_anything_starts(tmp_path, finished):
    """``--force`` on Flower resets the folder only under its lock: a folder another run holds
    keeps every file."""
    pytest.importorskip("flwr")
    from sparsefl.apps.flower import run_on_flower

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = sorted(p.name for p in out.iterdir())
    with RunFolder(out).lock():
        with pytest.raises(RunFolderError, match="in use by another sparsefl run"):
            run_on_flower(load_config(overrides=[*TINY, "engine=flower-local"]), out, force=True)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [n for n in before if n != ".lock"]


def test_out_on_a_file_or_under_one_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out, why in ((f, "the path is a file"), (f / "run", f"the path is under the file {f}")):
        code, err = _cli(capsys, *_run_args(out))
        assert code == 2 and len(err) == 1 and f"run folder {out}: {why}" in err[0]
    assert f.read_text() == "x"


def test_no_space_left_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    """The disk fills up while round 2's checkpoint is written (its first bytes are out)."""
    out = tmp_path / "run"
    real = state_module._failpoint
    writes = []

    def disk_full(name, f, data):
        writes.append(name)
        if name == "checkpoint.pt" and writes.count(name) == 2:
            f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(name, f, data)

    monkeypatch.setattr(state_module, "_failpoint", disk_full)
    code, err = _cli(capsys, *_run_args(out))
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    assert not list(out.glob(".*.tmp-*")) and (out / "checkpoint.prev.pt").exists()  # round 1: the fallback
    monkeypatch.setattr(state_module, "_failpoint", real)
    assert _cli(capsys, *_run_args(out))[0] == 0
    assert [r["round"] for r in _metrics(out)] == [1, 2]


# -- models you can reload -----------------------------------------------------------------------


def test_load_run_reproduces_the_final_accuracy_on_raw_test_data(tmp_path):
    """The default experiment for 3 rounds: its model, on the raw digits (pixels / 16, as the
    loader reads them) through the recorded transform, scores summary.json's final_accuracy."""
    from sparsefl.data.datasets import _digits_arrays, _holdout

    cfg = load_config(overrides=["federation.rounds=3"])
    summary = run_experiment(cfg, tmp_path / "run")
    run = sparsefl.load_run(tmp_path / "run")
    x, y = _digits_arrays()
    _, _, x_test, y_test = _holdout(x, y, cfg.data.test_fraction, cfg.seed)
    inputs = run.transform(torch.from_numpy(x_test))
    data = build(cfg).data
    assert torch.equal(inputs, data.x_test)  # the very tensors the run evaluated on
    with torch.no_grad():
        correct = int((run.model(inputs).argmax(1) == torch.from_numpy(y_test)).sum())
    assert correct / len(y_test) == summary["final_accuracy"]
    assert run.mask == Mask.load(tmp_path / "run" / "mask.safetensors") and not run.model.training


def test_a_user_module_is_recorded_and_reloaded_from_an_npz(tmp_path):
    """An npz of raw 0..16 pixels and a user module: load_run with a module of that class scores
    the final accuracy on the file's own x_test; another module is refused, finished or not."""
    from sklearn.datasets import load_digits

    d = load_digits()
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=d.images[:1400], y_train=d.target[:1400], x_test=d.images[1400:], y_test=d.target[1400:])
    cfg = load_config(overrides=[*TINY, "data.name=npz", f"data.dir={npz}"])
    out = tmp_path / "run"
    summary = run_experiment(cfg, out, model=Flat())
    assert json.loads((out / "config.json").read_text())["_model"]["class"].endswith("test_runfolder.Flat")
    run = sparsefl.load_run(out, model=Flat(seed=5))
    with torch.no_grad():
        pred = run.model(run.transform(torch.from_numpy(d.images[1400:]))).argmax(1)
    assert int((pred == torch.from_numpy(d.target[1400:])).sum()) / len(pred) == summary["final_accuracy"]
    assert run_experiment(cfg, out, model=Flat())["status"] == "finished"
    for module in (Flat(seed=1), Other(), None):
        with pytest.raises(RunFolderError, match="holds a run of the user module"):
            run_experiment(cfg, out, model=module)
    with pytest.raises(RunFolderError, match="pass one as load_run"):
        sparsefl.load_run(out)
    with pytest.raises(RunFolderError, match="not .*Other"):
        sparsefl.load_run(out, model=Other())


def test_exports_reload_to_the_final_weights(tmp_path, capsys):
    import onnx
    import onnxruntime

    out = tmp_path / "run"
    cfg = load_config(overrides=[*TINY, "method.name=static_mask", "method.sparsity=0.8"])
    run_experiment(cfg, out)
    code, _ = _cli(capsys, "export", out, "--format", "safetensors", "--out", tmp_path / "m.safetensors")
    assert code == 0
    weights, stats = read_sparse_safetensors(tmp_path / "m.safetensors")
    run = sparsefl.load_run(out)
    want = run.mask.applied(run.model.state_dict())
    assert weights.keys() == want.keys() and all(torch.equal(weights[k], want[k]) for k in want)
    assert torch.equal(stats["mean"], run.transform.mean) and torch.equal(stats["std"], run.transform.std)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    thinned = [n for n, m in run.mask.items() if not bool(m.all())]
    assert thinned and all(f"{n}:indices" in stored and n not in stored for n in thinned)
    assert (tmp_path / "m.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size

    export_onnx(run, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.index("Sub") < ops.index("Div") < ops.index("Conv")  # the normalisation comes first
    x = torch.rand(5, 1, 8, 8)
    got = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, run.model(run.transform(x)).numpy(), atol=1e-5)
    with pytest.raises(RunFolderError, match="is a folder"):
        export_safetensors(out, tmp_path)


def test_a_changed_input_file_is_never_resumed_or_reported(tmp_path):
    """The contents of the files a config names (here a mask) are part of the run: replacing
    the file between two runs into one folder is refused, not answered with the old run."""
    masks = {}
    for sparsity in (0.9, 0.5):
        cfg = load_config(overrides=[*TINY, "method.name=static_mask", f"method.sparsity={sparsity}"])
        run_experiment(cfg, tmp_path / f"src{sparsity}")
        masks[sparsity] = (tmp_path / f"src{sparsity}" / "mask.safetensors").read_bytes()
    mask_file = tmp_path / "mask.safetensors"
    mask_file.write_bytes(masks[0.9])
    cfg = load_config(overrides=[*TINY, "method.name=static_mask", f"method.mask_file={mask_file}"])
    first = run_experiment(cfg, tmp_path / "run")
    assert run_experiment(cfg, tmp_path / "run")["status"] == "finished"
    mask_file.write_bytes(masks[0.5])
    with pytest.raises(RunFolderError, match="input file method.mask_file has changed"):
        run_experiment(cfg, tmp_path / "run")
    again = run_experiment(cfg, tmp_path / "run", force=True)
    assert again["density"] > first["density"]
