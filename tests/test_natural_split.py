"""Natural splits: client ids from an npz (``client_train``) or LEAF users become the partition,
each client holding exactly its samples; bad ids and bad folders are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsefl.cli.main import main
from sparsefl.config import DataConfig, load_config
from sparsefl.data import load_dataset, make_partition
from sparsefl.errors import DataError
from sparsefl.experiment.runner import build, run_experiment

RUN = ["federation.clients_per_round=2", "federation.rounds=2", "local.batch_size=8", "data.partition='natural'"]


def _ids(n: int = 60, k: int = 4) -> np.ndarray:
    """Uneven, interleaved client ids: client c holds every sample with ``i % (k + 1) in {c, ...}``."""
    return np.minimum(np.arange(n) % (k + 1), k - 1)


def _npz(path, ids, **extra):
    """60 training samples of 8x8 images in 3 classes, with the client ids ``ids``."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x_train, x_test = rng.random((60, 8, 8)), rng.random((9, 8, 8))
    np.savez(path, x_train=x_train, y_train=y, x_test=x_test, y_test=y[:9], client_train=ids, **extra)
    return path


def _cfg(data: list[str], num_clients: int, *more: str):
    return load_config(overrides=[*RUN, *data, f"federation.num_clients={num_clients}", *more])


def test_npz_client_ids_are_the_partition_and_the_run_trains(tmp_path):
    ids = _ids()
    cfg = _cfg(["data.name='npz'", f"data.dir='{_npz(tmp_path / 'n.npz', ids)}'"], 4)
    b = build(cfg)
    assert torch.equal(b.data.client_train, torch.from_numpy(ids))
    for k in range(4):
        assert np.array_equal(b.split.train[k], np.flatnonzero(ids == k))
    # a validation split is cut off each client's own samples
    cfg_val = _cfg(["data.name='npz'", f"data.dir='{tmp_path / 'n.npz'}'", "data.val_fraction=0.25"], 4)
    split = make_partition(load_dataset(cfg_val.data, 0), 4, cfg_val.data, 0)
    for k in range(4):
        assert np.array_equal(np.sort(np.concatenate([split.train[k], split.val[k]])), np.flatnonzero(ids == k))
        assert len(split.val[k]) > 0
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["rounds"] == 2 and 0 <= summary["final_accuracy"] <= 1


@pytest.mark.parametrize(
    "ids, num_clients, extra, match",
    [
        (_ids(), 5, {}, r"client ids 0..3, 4 clients; set federation.num_clients=4 \(it is 5\)"),
        (np.where(_ids() == 2, 3, _ids()), 4, {}, "client 2 of npz has no training samples"),
        (_ids() - 1, 4, {}, "client_train holds -1"),
        (_ids() + 0.5, 4, {}, "client_train holds non-integer values"),
        (_ids()[:-1], 4, {}, r"client_train has shape \(59,\); expected \(60,\)"),
        (_ids(), 4, {"client_test": np.zeros(9, int)}, "client_test is not supported"),
    ],
)
def test_bad_client_ids_are_one_line(tmp_path, ids, num_clients, extra, match):
    cfg = _cfg(["data.name='npz'", f"data.dir='{_npz(tmp_path / 'b.npz', ids, **extra)}'"], num_clients)
    with pytest.raises(DataError, match=match) as e:
        build(cfg)
    assert "\n" not in str(e.value)


def test_natural_needs_client_ids():
    with pytest.raises(DataError, match="needs per-sample client ids, which digits lacks"):
        build(_cfg([], 4))


def _leaf_file(path, users: dict[str, tuple[list, list]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "users": list(users),
                "num_samples": [len(y) for _, y in users.values()],
                "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
            }
        )
    )


def _user(rng, n: int) -> tuple[list, list]:
    return rng.random((n, 12)).round(3).tolist(), [i % 3 for i in range(n)]


def _leaf(root):
    rng = np.random.default_rng(1)
    train = {"f_b": _user(rng, 7), "f_a": _user(rng, 5), "f_c": _user(rng, 9)}
    _leaf_file(root / "train" / "part1.json", {"f_b": train["f_b"]})
    _leaf_file(root / "train" / "part0.json", {"f_c": train["f_c"], "f_a": train["f_a"]})
    _leaf_file(root / "test" / "all.json", {"f_a": _user(rng, 3), "f_z": _user(rng, 4)})
    return train


def test_leaf_users_in_sorted_order_are_the_clients(tmp_path):
    train = _leaf(tmp_path / "leaf")
    cfg = _cfg(["data.name='leaf'", f"data.dir='{tmp_path / 'leaf'}'", "model.name='mlp'"], 3)
    b = build(cfg)
    assert len(b.data.x_test) == 7 and b.data.num_classes == 3 and b.data.input_shape == (12,)
    for k, user in enumerate(sorted(train)):  # f_a, f_b, f_c
        x, y = train[user]
        idx = b.split.train[k]
        assert b.data.y_train[idx].tolist() == y
        assert torch.equal(
            (torch.tensor(x, dtype=torch.float64).float() - b.data.mean) / b.data.std, b.data.x_train[idx]
        )
    assert run_experiment(cfg, tmp_path / "run")["rounds"] == 2


def test_leaf_with_another_client_count_is_refused_in_one_line(tmp_path, capsys):
    _leaf(tmp_path / "leaf")
    code = main(
        ["run", "--set", "data.name='leaf'", "--set", f"data.dir='{tmp_path / 'leaf'}'", "--set", "model.name='mlp'"]
        + [a for s in RUN for a in ("--set", s)]
        + ["--set", "federation.num_clients=2", "--out", str(tmp_path / "x")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert "set federation.num_clients=3 (it is 2)" in err


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.update(num_samples=[1]), "num_samples says 1"),
        (lambda d: d.pop("user_data"), "lacks users, num_samples or user_data"),
        (lambda d: d["user_data"]["u"].update(x=["ab", "cd"]), "x must hold numbers"),
        (lambda d: d["user_data"]["u"].update(y=["a", "b"]), "y must hold integer labels"),
    ],
)
def test_malformed_leaf_files_are_one_line(tmp_path, mutate, match):
    _leaf_file(tmp_path / "train" / "a.json", {"u": ([[0.0], [1.0]], [0, 1])})
    _leaf_file(tmp_path / "test" / "a.json", {"u": ([[0.0], [1.0]], [0, 1])})
    d = json.loads((tmp_path / "train" / "a.json").read_text())
    mutate(d)
    (tmp_path / "train" / "a.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=match) as e:
        load_dataset(DataConfig(name="leaf", dir=str(tmp_path)), 0)
    assert "\n" not in str(e.value)


def test_leaf_folder_problems(tmp_path):
    with pytest.raises(DataError, match="no .json files in"):
        load_dataset(DataConfig(name="leaf", dir=str(tmp_path)), 0)
    _leaf_file(tmp_path / "train" / "a.json", {"u": ([[0.0], [1.0]], [0, 1])})
    _leaf_file(tmp_path / "train" / "b.json", {"u": ([[0.0], [1.0]], [0, 1])})
    _leaf_file(tmp_path / "test" / "a.json", {"u": ([[0.0], [1.0]], [0, 1])})
    with pytest.raises(DataError, match="user 'u' is in both"):
        load_dataset(DataConfig(name="leaf", dir=str(tmp_path)), 0)


def test_the_data_guide_runs(tmp_path, monkeypatch, capsys):
    import re
    import sys
    import types
    from pathlib import Path

    from sparsefl.registry import PARTITIONERS

    guide = Path(__file__).resolve().parents[1] / "docs" / "data.md"
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("data_guide")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    before = set(PARTITIONERS.names())
    try:
        for block in re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S):
            exec(compile(block, str(guide), "exec"), module.__dict__)  # noqa: S102 - the guide's own code
    finally:
        for name in set(PARTITIONERS.names()) - before:
            del PARTITIONERS._entries[name]
    assert float(capsys.readouterr().out.split()[0]) > 0.5
