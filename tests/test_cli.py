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


# ------------------------------------------------------------------------------------------------
# --version, whole table cells, output paths
# ------------------------------------------------------------------------------------------------


def test_version(capsys):
    import pytest

    import sparsefl

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparsefl {sparsefl.__version__}"


SUITE = """
seeds = [0]
[base]
"federation.num_clients" = 4
"federation.clients_per_round" = 2
"federation.rounds" = 2
[[runs]]
label = "static-global_magnitude"
"method.name" = "static_mask"
"method.sparsity" = 0.9
"""


def _no_cut(out: str) -> None:
    assert "…" not in out
    assert not [ln for ln in out.splitlines() if ln != ln.rstrip()], "plain tables carry no trailing blanks"
    assert not set("┏┃━│└") & set(out), "no box off a terminal"


def test_tables_print_whole_cells_off_a_terminal(tmp_path, capsys):
    """Captured output is not a terminal: every table prints plain, whatever its width."""
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE)
    assert main(["bench", "--suite", str(suite), "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("static-global_magnitude "))
    assert "static_mask" in row and "dirichlet a=0.5" in row and "(0.089)" in row  # every column, whole
    header = next(ln for ln in out.splitlines() if ln.startswith("label "))
    assert header.split("  ")[-1].strip() == "tuned" and len(header) > 120
    _no_cut(out[out.index("label ") :])  # the table (the progress bar above it draws a line)

    assert main(["list", "keys"]) == 0
    out = capsys.readouterr().out
    from sparsefl.config import describe

    for key, _, meaning in describe():
        assert any(ln.startswith(key + " ") and ln.endswith(meaning) for ln in out.splitlines()), key
    _no_cut(out)

    assert main(["prune", "--model", "resnet8", "--sparsity", "0.5", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert any(ln.startswith("layers.1.0.shortcut.0.weight ") for ln in out.splitlines())
    _no_cut(out)


def test_a_narrow_terminal_folds_cells_and_drops_the_box():
    import io

    from rich.console import Console
    from rich.table import Table

    from sparsefl.cli.main import FullCells

    def table(label: str, columns: int) -> Table:
        t = Table(title="a title longer than the table itself")
        for c in range(columns):
            t.add_column(f"column {c}")
        t.add_row(label, *[str(c) for c in range(1, columns)])
        return t

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60, color_system=None)
    console.push_render_hook(FullCells(console, plain=False))
    console.print(table("static-global_magnitude", 2))  # fits: boxed as usual
    boxed = buf.getvalue()
    assert "┃" in boxed and "static-global_magnitude" in boxed
    buf.seek(0), buf.truncate()
    console.print(table("static-global_magnitude-with-a-very-long-name", 6))  # too wide even unboxed
    out = buf.getvalue()
    assert "…" not in out and "┃" not in out
    assert out.splitlines()[0] == "a title longer than the table itself"
    assert "".join(ln.split(" ")[0] for ln in out.splitlines()[2:]) == "static-global_magnitude-with-a-very-long-name"


def _out_cases(tmp_path):
    """(argv, the option named in the error) for every command writing a user-chosen output."""
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    suite = tmp_path / "s.toml"
    suite.write_text(SUITE)
    under = str(a_file / "sub" / "x")
    return [
        (["partition", "--png", str(a_dir)], "--png"),
        (["partition", "--png", under + ".png"], "--png"),
        (["prune", "--sparsity", "0.5", "--out", str(a_file)], "--out"),
        (["prune", "--sparsity", "0.5", "--out", under], "--out"),
        (["bench", "--suite", str(suite), "--out", str(a_file)], "--out"),
        (["bench", "--suite", str(suite), "--out", under], "--out"),
        (["flower", "export", str(a_file)], "DIR"),
        (["flower", "export", under], "DIR"),
    ]


def test_unusable_outputs_are_one_line_and_exit_code_2(tmp_path, capsys):
    """An existing file where a folder goes (an existing folder where a file goes), or a path
    under a file: one line naming the option, exit 2, nothing written."""
    for argv, flag in _out_cases(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"'{flag}'" in err and "Traceback" not in err, (argv, err)
        assert "existing file" in err or "existing folder" in err or "a-file is a file" in err, err
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file", "s.toml"]
    assert not list((tmp_path / "a-dir").iterdir())


def test_a_read_only_location_is_refused(tmp_path):
    import os

    import pytest

    from sparsefl.cli.main import check_output
    from sparsefl.errors import ConfigError

    if os.access("/proc/sys", os.W_OK):
        pytest.skip("no read-only location on this machine")
    with pytest.raises(ConfigError, match="not writable"):
        check_output("/proc/sys/sparsefl-out", "--out")
    assert check_output(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
