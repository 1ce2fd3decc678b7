"""Typed, frozen experiment configuration: TOML file + dotted ``--set`` overrides + validation.

The configuration is a tree of frozen dataclasses. Each field's type is enforced and its range
or allowed names come from the field's metadata (``ge``, ``gt``, ``le``, ``lt``) or from a
``Literal`` type or a registry. The ``method`` section is polymorphic: ``method.name`` selects a
registered method whose own config dataclass (a subclass of :class:`MethodConfig`) validates the
rest of the section; options of another method (left over from switching ``method.name``) are
ignored with a warning. Every problem raises :class:`~sparsefl.errors.ConfigError` naming the
dotted key, the value and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import tomllib

from sparsefl.errors import ConfigError
from sparsefl.registry import CODECS, DATASETS, METHODS, MODELS, PARTITIONERS, Registry


def opt(default: Any, help: str = "", **rules: Any) -> Any:
    """A dataclass field with a default, a help text and validation rules.

    Rules: ``ge``, ``gt``, ``le``, ``lt`` (numeric bounds, applied to every element of a tuple),
    ``registry`` (a Registry whose names are the allowed values), ``allow_inf`` (a float option
    is finite unless this is true; NaN is never allowed).
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata={"help": help, **rules})


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split among clients."""

    name: str = opt("digits", "dataset", registry=DATASETS)
    partition: str = opt("dirichlet", "how samples are split among clients", registry=PARTITIONERS)
    alpha: float = opt(0.5, "Dirichlet concentration (smaller = more skewed)", gt=0)
    min_samples: int = opt(10, "Dirichlet: resample until every client has at least this many", ge=1)
    shards_per_client: int = opt(2, "shards: label-sorted shards per client", ge=1)
    dir: str | None = opt(None, "folder holding the dataset files (fashion-mnist, cifar, npz)")
    val_fraction: float = opt(0.0, "fraction of each client's data kept as its validation split", ge=0, lt=1)
    test_fraction: float = opt(
        0.2, "held-out test fraction for datasets without a test split (digits, synthetic)", gt=0, lt=1
    )
    partition_seed: int | None = opt(None, "seed of the partition (default: the run seed)")
    num_classes: int = opt(
        0, "classes of npz/leaf data (0 = inferred: training labels exactly 0..C-1, C <= 100,000)", ge=0, le=10**7
    )
    max_pixels: int = opt(1 << 20, "npz/leaf: the most values one input sample may hold (C x H x W or D)", ge=1)


@dataclass(frozen=True)
class ModelConfig:
    """Which network; input shape and class count come from the data."""

    name: str = opt("cnn", "model architecture", registry=MODELS)
    width: float = opt(1.0, "channel-width multiplier", gt=0, le=16)


@dataclass(frozen=True)
class FederationConfig:
    """The server round loop."""

    num_clients: int = opt(20, "clients in the federation", ge=1)
    clients_per_round: int = opt(10, "clients sampled each round", ge=1)
    rounds: int = opt(30, "communication rounds", ge=1)
    eval_every: int = opt(1, "evaluate the global model every k rounds (and after the last)", ge=1)
    client_state: Literal["memory", "disk"] = opt("memory", "where per-client state lives between rounds")
    min_clients: int = opt(1, "a round needs at least this many successful clients", ge=1)
    client_timeout: float = opt(
        0.0,
        "seconds a client may run before it is abandoned (0 = no limit; > 0: clients run in worker processes)",
        ge=0,
        le=86400 * 365,
    )
    max_round_retries: int = opt(3, "re-samples of a round that had too few successful clients", ge=0)
    norm_reject_k: float = opt(
        0.0, "robust aggregation: drop updates whose norm exceeds k x the round's median (0 = off)", ge=0
    )
    executor: Literal["auto", "sequential", "batched"] = opt(
        "auto",
        "how a process trains its clients: one after another (sequential), all of a round at once "
        "(batched; numerics differ slightly), or auto (batched on a GPU where the method can, else sequential)",
    )


@dataclass(frozen=True)
class LocalConfig:
    """The one local training loop (SGD)."""

    epochs: int = opt(1, "local epochs per round (ignored when steps > 0)", ge=1)
    steps: int = opt(0, "local SGD steps per round (0 = use epochs)", ge=0)
    batch_size: int = opt(32, "local mini-batch size", ge=1)
    lr: float = opt(0.05, "local learning rate (at round 1)", gt=0, le=1e6)
    lr_end: float | None = opt(
        None, "learning rate at the last round; exponential decay (None = constant)", gt=0, le=1e6
    )
    momentum: float = opt(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = opt(5e-4, "SGD weight decay", ge=0, le=1e6)
    clip_norm: float = opt(
        0.0,
        "max-norm gradient clipping over every parameter the step optimises, after the method's "
        "gradient hooks (0 = off)",
        ge=0,
        le=1e6,
    )
    precision: Literal["fp32", "bf16"] = opt("fp32", "local training precision (bf16 = autocast)")
    threads: int = opt(
        1,
        "intra-op CPU threads per client's training; floating-point results depend on it, so it is "
        "part of the experiment (the same value gives the same bits with any federation engine or jobs)",
        ge=1,
        le=4096,
    )


@dataclass(frozen=True)
class CommConfig:
    """Codecs for each link; every payload is encoded and its length is what is counted."""

    up: str = opt("auto", "uplink codec", registry=CODECS)
    down: str = opt("auto", "downlink codec", registry=CODECS)


@dataclass(frozen=True)
class FaultsConfig:
    """Seeded fault injection, for tests and robustness studies (every probability per client-round)."""

    crash_prob: float = opt(0.0, "probability a client raises instead of training", ge=0, le=1)
    nan_prob: float = opt(0.0, "probability a client's update carries NaN", ge=0, le=1)
    corrupt_prob: float = opt(0.0, "probability a client's payload has flipped bytes", ge=0, le=1)
    straggler_prob: float = opt(0.0, "probability a client is a straggler", ge=0, le=1)
    straggler_seconds: float = opt(
        3600.0, "simulated extra seconds a straggler takes (dropped if over federation.client_timeout)", ge=0
    )

    def __post_init__(self) -> None:
        total = self.crash_prob + self.nan_prob + self.corrupt_prob + self.straggler_prob
        if total > 1:
            raise ConfigError("faults", total, "crash_prob + nan_prob + corrupt_prob + straggler_prob <= 1")


@dataclass(frozen=True)
class LogConfig:
    """Optional logs beside metrics.jsonl; they change nothing a run computes."""

    tensorboard: bool = opt(False, "also write a TensorBoard log to <run folder>/tensorboard (the tensorboard extra)")


@dataclass(frozen=True)
class MethodConfig:
    """Options every method has. Methods subclass this with their own fields."""

    name: str = opt("fedavg", "federated method", registry=METHODS)
    sparsity: float = opt(0.0, "fraction of prunable weights removed", ge=0, lt=1)


#: The values ``device`` accepts (whether the machine has that device is checked when a run starts).
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment, fully resolved."""

    seed: int = opt(0, "master seed; every random draw derives from it")
    engine: Literal["embedded", "flower-sim", "flower-local"] = opt("embedded", "where clients run")
    jobs: int = opt(1, "processes training clients (embedded engine): this one plus jobs - 1 workers", ge=1)
    device: str = opt(
        "auto",
        "where clients train and the model is evaluated: auto (the first CUDA device if torch sees one, "
        "else the CPU), cpu, cuda or cuda:N",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError("device", self.device, "auto, cpu, cuda or cuda:N (N = a CUDA device index)")
        f = self.federation
        if f.clients_per_round > f.num_clients:
            raise ConfigError(
                "federation.clients_per_round",
                f.clients_per_round,
                f"at most federation.num_clients ({f.num_clients})",
            )
        if f.min_clients > f.clients_per_round:
            raise ConfigError(
                "federation.min_clients",
                f.min_clients,
                f"at most federation.clients_per_round ({f.clients_per_round})",
            )


# --------------------------------------------------------------------------------------------------
# Building and validating
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or unset)"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(key, value, _type_name(tp))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, value, _type_name(tp))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, _type_name(tp))
        (inner, *_) = typing.get_args(tp)
        return tuple(_coerce(key, v, inner) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_rules(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    reg: Registry[Any] | None = meta.get("registry")
    if reg is not None and value not in reg:
        raise ConfigError(key, value, "one of: " + ", ".join(reg.names()))
    values = value if isinstance(value, tuple) else (value,)
    bounds = []
    for op, fn, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if op in meta:
            bounds.append((fn, meta[op], word))
    limits = " and ".join(f"{w} {b}" for _, b, w in bounds)
    finite = not meta.get("allow_inf", False)
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            # inf would pass an upper-unbounded check and fail much later, blaming the clients
            if v != v or (finite and not math.isfinite(v)):
                kind = "a finite number" if finite else "a number other than NaN"
                raise ConfigError(key, value, f"{kind} {limits}".rstrip())
            if not all(fn(v, b) for fn, b, _ in bounds):
                raise ConfigError(key, value, f"a number {limits}")


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested mapping, validating every key.

    The ``method`` section is resolved through the method registry: its ``name`` picks the
    config class that validates the remaining keys.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "<root>", data, "a table of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(prefix + unknown[0], data[unknown[0]], "known keys here: " + ", ".join(fields))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sub = data.get(name, {})
            if tp is MethodConfig or (isinstance(tp, type) and issubclass(tp, MethodConfig)):
                tp = method_config_class(sub.get("name", MethodConfig.name) if isinstance(sub, Mapping) else None)
                sub = _without_other_methods_options(sub, tp, key + ".")
            kwargs[name] = build(tp, sub, key + ".")
            continue
        if name not in data:
            continue
        value = _coerce(key, data[name], tp)
        _check_rules(key, value, f.metadata)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a section's own __post_init__ check
        raise ConfigError(prefix.rstrip(".") or "<root>", data, str(e)) from None


def _without_other_methods_options(
    section: Mapping[str, Any], cls: type[MethodConfig], prefix: str
) -> Mapping[str, Any]:
    """The method section less the options ``cls`` lacks but another registered method has.

    They are left over from switching ``method.name`` (a TOML file written for one method, run
    with ``--set method.name=...``), so they are ignored with a warning; a key that no method
    has is kept, and refused as unknown.
    """
    own = {f.name for f in dataclasses.fields(cls)}
    owners: dict[str, list[str]] = {}
    for entry in METHODS:
        for f in dataclasses.fields(entry.config_cls or MethodConfig):
            owners.setdefault(f.name, []).append(entry.name)
    other = [k for k in section if k not in own and k in owners]
    if not other:
        return section
    keys = ", ".join(prefix + k for k in other)
    methods = ", ".join(sorted({m for k in other for m in owners[k]}))
    name = section.get("name", MethodConfig.name)
    warnings.warn(f"ignoring {keys}: method {name!r} has no such option (methods that have: {methods})", stacklevel=2)
    return {k: v for k, v in section.items() if k not in other}


def method_config_class(name: Any) -> type[MethodConfig]:
    """The config dataclass registered for method ``name`` (ConfigError if unknown)."""
    if not isinstance(name, str):
        raise ConfigError("method.name", name, "one of: " + ", ".join(METHODS.names()))
    entry = METHODS.entry(name)
    return entry.config_cls or MethodConfig


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as TOML, else taken as a string."""
    if "=" not in item:
        raise ConfigError(item, None, "an override of the form key=value (e.g. data.alpha=0.1)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(item, None, "a dotted key such as federation.rounds")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def merge_override(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key = "a.b.c"``, creating tables as needed."""
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), nxt, "a table (it has sub-keys)")
        node = nxt
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """Read a TOML file (optional), apply ``key=value`` overrides, validate, return the config."""
    tree: dict[str, Any] = json.loads(json.dumps(dict(base))) if base else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", str(p), "an existing TOML file")
        try:
            file_tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError("--config", str(p), f"a readable TOML file ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError("--config", str(p), "a TOML file in UTF-8 (TOML files are UTF-8 text)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", str(p), f"valid TOML ({e})") from None
        for k, v in flatten(file_tree).items():
            merge_override(tree, k, v)
    for item in overrides:
        k, v = parse_override(item)
        merge_override(tree, k, v)
    return build(ExperimentConfig, tree)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config tree as dotted keys (``{"data": {"dir": ...}}`` -> ``{"data.dir": ...}``)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (tuples as lists), ready for JSON or TOML."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(tree: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild (and re-validate) a config from :func:`to_dict` output."""
    return build(ExperimentConfig, tree)


#: Keys that choose how a run executes, not what it computes: left out of a run's identity, so a
#: run started with one value resumes with another. ``jobs`` and ``log`` give the same bits with
#: every value; ``device`` gives the same bits on the same kind of device (the summary records it).
#: ``federation.executor`` stays in the identity, but ``auto`` resolves by device: a run resumed on
#: another kind of device may continue with the other executor (the summary records which ran).
EXECUTION_KEYS = ("jobs", "log", "device")


def config_hash(cfg: ExperimentConfig) -> str:
    """SHA-256 of the canonical JSON of the resolved config without :data:`EXECUTION_KEYS`:
    the identity of a run."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every key of ``cls``; used by ``sparsefl list``."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))  # type: ignore[arg-type]
        else:
            rows.append((prefix + f.name, repr(f.default), f.metadata.get("help", "")))
    return rows


def describe_method(name: str) -> list[tuple[str, str, str]]:
    """(key, default, help) for every option of method ``name`` (``method.<key>``, less ``name``),
    found through :data:`~sparsefl.registry.METHODS`; used by ``sparsefl list keys``."""
    return [row for row in describe(method_config_class(name), "method.") if row[0] != "method.name"]
