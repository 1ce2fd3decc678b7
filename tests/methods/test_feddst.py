"""FedDST (method.name=feddst): options, the registry listing, the server's magnitude consensus
(hand-computed), a 5-round digits run at 90% sparsity (exact per-layer counts, accuracy, masks that
really change) and the downlink bytes of a mask change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.cli.main import main
from sparsefl.comm import encode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.masks import Mask
from sparsefl.methods.feddst import FedDST
from sparsefl.protocol.messages import ServerState
from sparsefl.pruning.dst import consensus_mask
from sparsefl.registry import METHODS

#: the default digits run, 5 rounds at 90% sparsity; 3 local epochs so 5 rounds learn
RUN = ["method.name=feddst", "method.sparsity=0.9", "federation.rounds=5", "local.epochs=3"]


@pytest.mark.parametrize(
    "bad",
    [
        "method.alpha=1.5",
        "method.alpha=0",
        "method.delta_r=0",
        "method.r_end=0",
        "method.mask_init=er",
        "method.sparsity=1",
    ],
)
def test_bad_options_are_one_config_error(bad):
    with pytest.raises(ConfigError):
        load_config(overrides=["method.name=feddst", bad])


@pytest.mark.parametrize(
    "overrides",
    [
        ["method.name=feddst", "method.delta_r=5"],  # r_end 0.5 of 10 rounds: round 5 is the end
        ["method.name=fedtiny", "method.adjust_every=8"],  # adjust_until 0.75: round 7
        ["method.name=fedrts", "method.adjust_every=7"],
        ["method.name=static_mask", "method.dst=rigl", "method.dst_every=9"],
        # round 1 is FedTiny's coarse-mask round, or the clients' scoring round: only round 2 is left
        ["federation.rounds=3", "method.name=fedtiny", "method.adjust_until=1.0", "method.adjust_every=3"],
        ["federation.rounds=3", "method.name=static_mask", "method.criterion=snip", "method.score_source=client"]
        + ["method.dst=rigl", "method.dst_until=1.0", "method.dst_every=3"],
        ["federation.rounds=5", "method.name=kd", "method.kd=none", "method.student.name=feddst"]
        + ["method.student.delta_r=3"],
    ],
)
def test_a_schedule_that_never_changes_the_mask_exits_2_naming_the_key(overrides, tmp_path, capsys):
    argv = [x for o in ["federation.rounds=10", *overrides] for x in ("--set", o)]
    assert main(["run", *argv, "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    err = capsys.readouterr().err.strip()
    key = overrides[-1].split("=")[0]
    assert len(err.splitlines()) == 1 and f"'{key}'" in err and "never changes" in err, err


def test_listed_by_the_cli_with_its_paper(capsys):
    assert "feddst" in METHODS.names()
    assert main(["list", "methods"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("feddst"))
    assert "Bibikar" in line


def test_consensus_keeps_the_largest_voted_magnitudes_then_votes_then_fallback():
    params = {"w": torch.tensor([0.5, -0.9, 0.0, 0.0, 0.2, 0.7])}
    votes = {"w": torch.tensor([1.0, 0.5, 0.25, 0.75, 0.0, 0.0])}
    fallback = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.3])}
    # 3 kept: the two nonzero voted (-0.9, 0.5), then the zero-valued one with more votes (index 3)
    assert consensus_mask(params, votes, {"w": 3}, fallback)["w"].tolist() == [1, 1, 0, 1, 0, 0]
    # 5 kept: every voted weight, then the fallback's larger magnitude (index 5) though 0.2 > 0
    assert consensus_mask(params, votes, {"w": 5}, fallback)["w"].tolist() == [1, 1, 1, 1, 0, 1]


def test_readjustment_rounds_follow_delta_r_and_the_cosine_schedule():
    cfg = load_config(overrides=[*RUN, "federation.rounds=20", "method.delta_r=4", "method.alpha=0.2"])
    m = build(cfg).method
    assert isinstance(m, FedDST) and m.r_end == 10
    fractions = {r: m._fraction(r) for r in range(1, 21)}
    assert {r for r, f in fractions.items() if f > 0} == {4, 8}
    assert fractions[4] == pytest.approx(0.1 * (1 + torch.cos(torch.tensor(0.4 * torch.pi)).item()))


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_five_rounds_at_90_percent_exact_density_learns_and_masks_change(tmp_path):
    cfg = load_config(overrides=[*RUN, "method.delta_r=2", "method.alpha=0.3", "method.r_end=1.0"])
    summary = run_experiment(cfg, tmp_path / "run")
    b = build(cfg)
    init = b.method.init_state(b.spec.build().state_dict()).mask
    final = Mask.load(tmp_path / "run" / "mask.safetensors")
    assert abs(summary["density"] - 0.1) < 0.01
    assert summary["final_accuracy"] > 0.5
    # the same number of weights per layer as the initial ERK mask, but not the same weights
    assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in init.items()}
    assert final != init


def test_a_mask_change_costs_its_encoding_on_the_downlink(tmp_path):
    # every client every round (setup payloads only in round 1); one readjustment, in round 2
    over = ["federation.num_clients=6", "federation.clients_per_round=6", "data.min_samples=5"]
    cfg = load_config(overrides=[*RUN, *over, "method.delta_r=2", "method.alpha=0.3", "method.r_end=0.6"])
    run_experiment(cfg, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    b = build(cfg)
    init = b.method.init_state(b.spec.build().state_dict()).mask
    final = Mask.load(tmp_path / "run" / "mask.safetensors")
    assert final != init
    # the mask changes once, at round 2: round 3 sends every client the new mask in a setup
    # payload; the broadcast itself carries fingerprints in every round
    setup = encode_update(
        b.method.setup_payload(ServerState(round=2, params=init.applied(b.spec.build().state_dict()), mask=final)),
        cfg.comm.down,
    )
    assert len(setup) > 100
    # (give or take the BatchNorm step counters, whose varints grow by a byte now and then)
    assert rows[2]["downlink_bytes"] - rows[1]["downlink_bytes"] == pytest.approx(6 * len(setup), abs=24)
    # no later change: rounds 4 and 5 cost what round 2 did
    assert rows[3]["downlink_bytes"] == pytest.approx(rows[1]["downlink_bytes"], abs=24)
    assert rows[4]["downlink_bytes"] == pytest.approx(rows[1]["downlink_bytes"], abs=24)


# -- static_mask's opt-in local DST (method.dst), aggregated as FedDST does ---------------------------

SMALL = ["federation.num_clients=6", "federation.clients_per_round=3", "federation.rounds=4", "data.min_samples=5"]


def test_static_mask_dst_needs_a_oneshot_uncompacted_mask():
    with pytest.raises(ConfigError, match="method.dst"):
        load_config(overrides=["method.name=static_mask", "method.dst=rigl", "method.schedule=gradual"])
    with pytest.raises(ConfigError):
        load_config(overrides=["method.name=static_mask", "method.dst=sgd"])


@pytest.mark.parametrize("dst", ["rigl", "set"])
def test_static_mask_dst_changes_the_mask_at_fixed_layer_counts_and_resumes_exactly(tmp_path, interrupted_run, dst):
    keys = ["method.sparsity=0.8", f"method.dst={dst}", "method.dst_every=1", "method.dst_fraction=0.3"]
    cfg = load_config(overrides=[*SMALL, "method.name=static_mask", *keys, "method.dst_until=1.0"])
    whole = run_experiment(cfg, tmp_path / "whole")
    b = build(cfg)
    init = b.method.init_state(b.spec.build().state_dict()).mask
    final = Mask.load(tmp_path / "whole" / "mask.safetensors")
    assert {n: int(m.sum()) for n, m in final.items()} == {n: int(m.sum()) for n, m in init.items()}
    assert final != init
    interrupted_run(cfg, tmp_path / "cut", at=3)
    assert run_experiment(cfg, tmp_path / "cut")["model_sha256"] == whole["model_sha256"]
