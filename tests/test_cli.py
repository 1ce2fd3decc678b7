from __future__ import annotations

import json

from sparsefl.cli.main import main

TINY = [
    "--set",
    "federation.num_clients=6",
    "--set",
    "federation.clients_per_round=3",
    "--set",
    "federation.rounds=2",
    "--set",
    "data.min_samples=5",
]


def test_run_then_show(tmp_path, capsys):
    assert main(["run", *TINY, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "final_accuracy" in out and "model_sha256" in out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["rounds"] == 2
    assert main(["show", str(tmp_path / "r")]) == 0
    assert "finished" in capsys.readouterr().out


def test_bad_config_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["run", "--set", "data.alpha=-1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.alpha" in err and "> 0" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(
        ["run", "--set", "data.name='fashion-mnist'", "--set", f"data.dir='{tmp_path}'", "--out", str(tmp_path / "y")]
    )
    assert code == 2
    assert "fashion-mnist: missing" in capsys.readouterr().err


def test_list_and_keys(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("digits", "dirichlet", "resnet18", "fedavg"):
        assert word in out
    assert main(["list", "keys"]) == 0
    assert "federation.clients_per_round" in capsys.readouterr().out


def test_partition_table_and_png(tmp_path, capsys):
    png = tmp_path / "p.png"
    assert (
        main(
            [
                "partition",
                "--set",
                "federation.num_clients=5",
                "--set",
                "federation.clients_per_round=2",
                "--png",
                str(png),
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000
    assert "total" in capsys.readouterr().out


def test_show_on_a_non_run_folder(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
