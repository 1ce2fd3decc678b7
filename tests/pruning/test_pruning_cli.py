"""``sparsefl prune`` run directly with an argparse Namespace."""

from __future__ import annotations

import argparse
import io
import json

import pytest
from rich.console import Console

from sparsefl.cli.prune import register, run
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask


def _args(tmp_path, **kw):
    base = dict(
        model="cnn",
        data="digits",
        criterion="global_magnitude",
        sparsity=0.9,
        train_steps=0,
        prune_after_training=False,
        seed=0,
        keep_first=False,
        keep_last=False,
        opt=[],
        out=str(tmp_path / "out"),
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_prune_cnn_on_digits(tmp_path):
    console = Console(record=True, width=120)
    args = _args(tmp_path, criterion="snip", train_steps=15)
    assert run(args, console) == 0
    out = tmp_path / "out"
    report = json.loads((out / "prune.json").read_text())
    mask = Mask.load(out / "mask.safetensors")
    assert report["criterion"] == "snip" and report["sparsity"] == 0.9
    assert report["density"] == pytest.approx(mask.density())
    assert abs(mask.num_kept() - round(0.1 * mask.numel())) <= 1
    assert set(report["layers"]) == set(mask)
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert (out / "layer_density.png").stat().st_size > 1000
    text = console.export_text()
    assert "conv1.weight" in text and "global" in text


def test_prune_after_training_with_options(tmp_path):
    args = _args(
        tmp_path,
        criterion="synflow",
        train_steps=5,
        prune_after_training=True,
        keep_last=True,
        opt=["iterations=3"],
    )
    assert run(args, Console(file=open("/dev/null", "w"))) == 0  # noqa: SIM115
    report = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert "fc2.weight" not in report["layers"]
    assert report["dense_test_accuracy"] is not None
    assert report["options"] == {"iterations": 3, "keep_last": True}


def test_bad_input_raises_config_errors(tmp_path):
    console = Console(file=io.StringIO())
    with pytest.raises(ConfigError, match="criterion"):
        run(_args(tmp_path, criterion="nope"), console)
    with pytest.raises(ConfigError, match="--model"):
        run(_args(tmp_path, model="alexnet"), console)
    with pytest.raises(ConfigError, match="sparsity"):
        run(_args(tmp_path, sparsity=1.2), console)
    with pytest.raises(ConfigError, match="train-steps"):
        run(_args(tmp_path, train_steps=-1), console)


def test_register_adds_the_subcommand(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        ["prune", "--sparsity", "0.5", "--out", str(tmp_path), "--criterion", "magnitude", "--keep-first"]
    )
    assert args.func is run and args.keep_first and args.model == "cnn" and args.train_steps == 0
