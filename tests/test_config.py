from __future__ import annotations

import pytest

import sparsefl
from sparsefl.config import (
    ExperimentConfig,
    config_hash,
    describe_method,
    from_dict,
    load_config,
    parse_override,
    to_dict,
)
from sparsefl.errors import ConfigError
from sparsefl.registry import METHODS


def test_defaults_are_the_documented_default_experiment():
    cfg = load_config()
    assert cfg.data.name == "digits" and cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5
    assert cfg.federation.num_clients == 20 and cfg.federation.clients_per_round == 10
    assert cfg.federation.rounds == 30 and cfg.method.name == "fedavg" and cfg.model.name == "cnn"


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["data.alpha=0.1", "federation.rounds=7", "data.partition=iid", "local.lr_end=0.01"])
    assert cfg.data.alpha == 0.1 and isinstance(cfg.data.alpha, float)
    assert cfg.federation.rounds == 7 and cfg.data.partition == "iid" and cfg.local.lr_end == 0.01


def test_int_accepted_for_float_but_not_float_for_int():
    assert load_config(overrides=["local.lr=1"]).local.lr == 1.0
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(overrides=["federation.rounds=2.5"])


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("data.alpha=-1", "data.alpha", "> 0"),
        ("method.sparsity=1.0", "method.sparsity", "< 1"),
        ("data.partition=zipf", "data.partition", "dirichlet, iid, natural, shards"),
        ("model.name=alexnet", "model.name", "cnn"),
        ("method.name=nope", "method.name", "fedavg"),
        ("nosuch.key=1", "nosuch", "known keys"),
        ("data.nosuch=1", "data.nosuch", "known keys here: name"),
        ("federation.clients_per_round=21", "federation.clients_per_round", "at most federation.num_clients"),
        ("local.precision=fp8", "local.precision", "fp32, bf16"),
        ("seed=true", "seed", "an integer"),
        ("local.lr=nan", "local.lr", "finite"),
        ("local.lr=inf", "local.lr", "a finite number > 0"),
        ("local.weight_decay=inf", "local.weight_decay", "a finite number >= 0"),
        ("local.lr_end=inf", "local.lr_end", "finite"),
        ("data.alpha=inf", "data.alpha", "finite"),
        ("model.width=inf", "model.width", "finite"),
        ("local.lr=1e999", "local.lr", "finite"),  # TOML reads it as inf
        ("data.num_classes=-1", "data.num_classes", ">= 0"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert e.value.key == key
    assert allowed in str(e.value)
    assert "\n" not in str(e.value)


def test_fedavg_rejects_sparsity():
    with pytest.raises(ConfigError, match="method.sparsity"):
        load_config(overrides=["method.sparsity=0.5"])


def test_toml_file_and_override_precedence(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text("seed = 3\n[data]\nalpha = 0.3\n[federation]\nrounds = 4\n")
    cfg = load_config(p, ["federation.rounds=5"])
    assert cfg.seed == 3 and cfg.data.alpha == 0.3 and cfg.federation.rounds == 5


def test_missing_or_broken_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(bad)


def test_a_toml_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    latin = tmp_path / "latin1.toml"
    latin.write_bytes("# caf\xe9\nseed = 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8") as e:
        load_config(latin)
    assert e.value.key == "--config" and str(latin) in str(e.value) and "\n" not in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError):
        parse_override("noequals")
    with pytest.raises(ConfigError):
        parse_override("a..b=1")
    assert parse_override("x=[1.0, 0.5]") == ("x", [1.0, 0.5])
    assert parse_override("x=iid") == ("x", "iid")


def test_round_trip_and_hash_are_stable():
    cfg = load_config(overrides=["data.alpha=0.2"])
    again = from_dict(to_dict(cfg))
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(cfg) != config_hash(ExperimentConfig())
    # how a run executes is not what it computes: jobs=2 resumes a jobs=1 folder
    assert config_hash(load_config(overrides=["jobs=2"])) == config_hash(ExperimentConfig())


def test_config_is_frozen():
    cfg = load_config()
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


ZEROFL_TOML = '[method]\nname = "zerofl"\nsparsity = 0.9\nmask_ratio = 0.2\nupload = "topk_weights"\n'


def test_switching_method_ignores_the_other_methods_options_with_a_warning(tmp_path):
    p = tmp_path / "zerofl.toml"
    p.write_text(ZEROFL_TOML)
    assert load_config(p).method.mask_ratio == 0.2
    with pytest.warns(UserWarning, match=r"ignoring method\.mask_ratio, method\.upload: method 'static_mask'"):
        cfg = load_config(p, ["method.name=static_mask"])
    assert cfg.method.name == "static_mask" and cfg.method.sparsity == 0.9
    # a key that no method has is still a typo
    with pytest.raises(ConfigError, match="known keys here") as e, pytest.warns(UserWarning, match="mask_ratio"):
        load_config(p, ["method.name=static_mask", "method.mask_ration=0.1"])
    assert e.value.key == "method.mask_ration"


def test_describe_method_lists_each_methods_options():
    for name in METHODS.names():
        rows = describe_method(name)
        assert all(key.startswith("method.") and key != "method.name" for key, _, _ in rows)
        assert rows[0][0] == "method.sparsity" and all(help_ for _, _, help_ in rows)
    rows = {key: (default, help_) for key, default, help_ in describe_method("zerofl")}
    assert rows["method.mask_ratio"][0] == "0.1" and rows["method.sparsity"][0] == "0.9"
    with pytest.raises(ConfigError, match="method.name"):
        describe_method("nosuch")


def test_too_high_a_sparsity_names_the_sparsity_not_min_keep():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # 56 weights in 2 layers
    with pytest.raises(ConfigError) as e:
        sparsefl.prune(model, "global_magnitude", 0.9999999999)
    assert e.value.key == "sparsity" and "method.sparsity" in str(e.value) and "--sparsity" in str(e.value)
    assert "at most 0.96428571" in str(e.value)  # 54 of the 56 weights
    assert sparsefl.prune(model, "global_magnitude", 0.96428571).density() == pytest.approx(2 / 56)


@pytest.mark.parametrize(
    "override",
    [
        "model.width=1e300",
        "local.threads=100000",
        "federation.client_timeout=1e300",
        "local.lr=1e300",
        "local.weight_decay=1e300",
        "data.num_classes=1000000000000",
    ],
)
def test_finite_but_absurd_values_are_refused_with_their_key(override: str) -> None:
    """Values that would overflow a kernel, a clock or an allocation later name their key now."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(overrides=[override])
