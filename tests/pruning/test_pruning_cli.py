"""``sparsefl prune`` run directly with an argparse Namespace, and through the command line: any
dataset a run takes, the saved weights and mask, and a run that starts from that mask."""

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
        config=None,
        overrides=[],
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
    assert args.func is run and args.keep_first and args.train_steps == 0
    assert args.model is None and args.data is None and args.seed is None  # the configuration's (cnn, digits, 0)


def test_prune_takes_any_dataset_a_run_takes_and_saves_the_weights(tmp_path):
    """``--set data.*`` reaches the dataset (an npz of 20 features: fc1 is 256x20); the pruned
    model is saved beside its mask, its removed weights zero."""
    import numpy as np
    from safetensors.torch import load_file

    from sparsefl.cli.main import main

    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    y = np.arange(200) % 4
    np.savez(npz, x_train=rng.normal(size=(200, 20)) + y[:, None], y_train=y, x_test=rng.normal(size=(40, 20)),
             y_test=np.arange(40) % 4)  # fmt: skip
    argv = ["prune", "--model", "mlp", "--set", 'data.name="npz"', "--set", f'data.dir="{npz}"', "--sparsity", "0.8"]
    assert main([*argv, "--train-steps", "3", "--out", str(tmp_path / "p")]) == 0
    report = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert report["data"] == "npz" and report["layers"]["fc1.weight"]["shape"] == [256, 20]
    mask = Mask.load(tmp_path / "p" / "mask.safetensors")
    weights = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert set(mask) < set(weights) and "fc1.bias" in weights
    for name, keep in mask.items():
        assert not weights[name][~keep].any() and weights[name][keep].ne(0).all()


def test_a_run_starts_from_the_pruned_mask(tmp_path):
    """``method.mask_file`` replaces the criterion: the run's mask is the pruned one, bit for bit,
    and its final weights are zero exactly where the mask removes them."""
    from safetensors.torch import load_file

    from sparsefl.cli.main import main

    assert main(["prune", "--criterion", "snip", "--sparsity", "0.9", "--out", str(tmp_path / "p")]) == 0
    pruned = Mask.load(tmp_path / "p" / "mask.safetensors")
    tiny = ["federation.rounds=2", "federation.num_clients=4", "federation.clients_per_round=2"]
    sets = [x for kv in [*tiny, "method.name=static_mask", f'method.mask_file="{tmp_path}/p/mask.safetensors"']
            for x in ("--set", kv)]  # fmt: skip
    assert main(["run", *sets, "--out", str(tmp_path / "r")]) == 0
    assert Mask.load(tmp_path / "r" / "mask.safetensors") == pruned
    final = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert all(not final[n][~m].any() for n, m in pruned.items())
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["density"] == pytest.approx(pruned.density(), abs=1e-3)
