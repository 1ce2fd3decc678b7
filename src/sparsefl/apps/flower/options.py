"""What a sparsefl Flower app reads from Flower's run config, and the Flower-only knobs.

A sparsefl experiment travels to the ServerApp and to every ClientApp inside Flower's run
config (``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, overridable with
``flwr run --run-config``). Flower's run config holds only scalars (bool, int, float, str) and
no ``None`` or lists, while sparsefl configs have both (``local.lr_end = None``,
``method.tiers = [...]``), so the resolved config is shipped whole as one JSON string; a
second key takes sparsefl-style ``key=value`` overrides, so a deployed app can be tuned
without re-exporting it. The keys (all optional except ``sparsefl-config``):

=========================== ========================================================================
key                         meaning
=========================== ========================================================================
``sparsefl-config``         the experiment: JSON of :func:`sparsefl.config.to_dict`
``sparsefl-set``            extra overrides, ``"federation.rounds=5 local.lr=0.1"`` (shell quoting)
``sparsefl-out``            the run folder the ServerApp writes (relative to its working directory)
``sparsefl-nodes``          SuperNodes to wait for before round 1 (the client -> node map uses them)
``sparsefl-node-wait``      seconds to wait for them (default 300)
``sparsefl-reply-timeout``  seconds to wait for one wave of replies; 0 = automatic (``reply_wait``)
``sparsefl-reply-grace``    automatic wait = ``federation.client_timeout`` + this (default 30 s)
``sparsefl-poll``           seconds between reply polls of the ServerApp (default 0.2)
``sparsefl-trace``          a JSONL file the ServerApp appends one line per message to ("" = off)
``sparsefl-client-states``  a folder where each node keeps its clients' states, files per client
                            and round ("" = off: ``context.state``, lost on resume)
=========================== ========================================================================

The number of nodes has no config key; :func:`default_nodes` takes it from a function
argument, the environment variable ``SPARSEFL_FLOWER_NODES`` or a default. This module does
not import Flower.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sparsefl.config import ExperimentConfig, config_hash, load_config, to_dict
from sparsefl.errors import ConfigError

#: Seconds to wait for one wave of replies when ``federation.client_timeout`` is 0.
DEFAULT_REPLY_TIMEOUT = 3600.0
#: Added to ``federation.client_timeout`` for the automatic reply wait.
DEFAULT_REPLY_GRACE = 30.0
#: Seconds the ServerApp waits for the expected SuperNodes to connect.
DEFAULT_NODE_WAIT = 300.0
#: Environment variable naming the number of Flower nodes (the config has no key for it).
NODES_ENV = "SPARSEFL_FLOWER_NODES"

PREFIX = "sparsefl-"


@dataclass(frozen=True)
class AppOptions:
    """The sparsefl keys of one Flower run config, parsed.

    Attributes
    ----------
    config_json:
        The experiment as JSON (:func:`sparsefl.config.to_dict` output).
    overrides:
        Extra ``key=value`` overrides applied on top (``sparsefl-set``), whitespace separated.
    out:
        The run folder the ServerApp writes.
    nodes:
        How many SuperNodes the ServerApp waits for before round 1 (at least 1).
    node_wait:
        Seconds it waits for them.
    reply_timeout:
        Seconds to wait for one wave of replies; 0 = automatic (:meth:`reply_wait`).
    reply_grace:
        Added to ``federation.client_timeout`` for the automatic wait.
    poll:
        Seconds between reply polls.
    trace:
        A JSONL file for one line per message (``""`` = none).
    client_states:
        A folder (on each node's file system) for the clients' states, so that a resumed run,
        which is a new Flower run with an empty ``context.state``, finds them
        (:mod:`sparsefl.apps.flower.client_app`); ``""`` = none.
    """

    config_json: str
    overrides: str = ""
    out: str = "runs/flower"
    nodes: int = 1
    node_wait: float = DEFAULT_NODE_WAIT
    reply_timeout: float = 0.0
    reply_grace: float = DEFAULT_REPLY_GRACE
    poll: float = 0.2
    trace: str = ""
    client_states: str = ""

    def experiment(self) -> ExperimentConfig:
        """The experiment config: the JSON, then the overrides, validated."""
        try:
            base = json.loads(self.config_json)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{PREFIX}config", self.config_json[:60], f"JSON of a sparsefl config ({e})") from None
        return load_config(None, shlex.split(self.overrides), base=base)

    def reply_wait(self, cfg: ExperimentConfig) -> float:
        """Seconds to wait for one wave of replies.

        ``sparsefl-reply-timeout`` when it is set (> 0). Otherwise, automatically:
        ``federation.client_timeout + sparsefl-reply-grace`` when ``federation.client_timeout >
        0`` (the grace covers what Flower adds to a client's own time: ClientApp process start,
        polling), else :data:`DEFAULT_REPLY_TIMEOUT` (one hour). A SuperNode that dies is
        reported sooner by Flower itself: the SuperLink answers its pending messages with a
        *node unavailable* error once the node misses its heartbeats (at most 2 x 30 s in Flower
        1.41).
        """
        if self.reply_timeout > 0:
            return self.reply_timeout
        if cfg.federation.client_timeout > 0:
            return cfg.federation.client_timeout + self.reply_grace
        return DEFAULT_REPLY_TIMEOUT

    def to_run_config(self) -> dict[str, Any]:
        """The keys as they appear in ``[tool.flwr.app.config]``."""
        return {
            f"{PREFIX}config": self.config_json,
            f"{PREFIX}set": self.overrides,
            f"{PREFIX}out": self.out,
            f"{PREFIX}nodes": self.nodes,
            f"{PREFIX}node-wait": float(self.node_wait),
            f"{PREFIX}reply-timeout": float(self.reply_timeout),
            f"{PREFIX}reply-grace": float(self.reply_grace),
            f"{PREFIX}poll": float(self.poll),
            f"{PREFIX}trace": self.trace,
            f"{PREFIX}client-states": self.client_states,
        }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppOptions:
        """Parse Flower's ``context.run_config`` (validated; unknown ``sparsefl-*`` keys refused)."""
        if f"{PREFIX}config" not in run_config:
            raise ConfigError(
                f"{PREFIX}config",
                None,
                "the experiment as JSON in the run config (write the app with sparsefl flower export)",
            )
        known = set(cls(config_json="").to_run_config())
        unknown = sorted(k for k in run_config if k.startswith(PREFIX) and k not in known)
        if unknown:
            raise ConfigError(unknown[0], run_config[unknown[0]], "known keys: " + ", ".join(sorted(known)))

        def get(key: str, kind: type, default: Any) -> Any:
            v = run_config.get(PREFIX + key, default)
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or isinstance(v, bool) != (kind is bool):
                raise ConfigError(PREFIX + key, v, f"a {kind.__name__}")
            return v

        opts = cls(
            config_json=get("config", str, ""),
            overrides=get("set", str, ""),
            out=get("out", str, cls.out),
            nodes=get("nodes", int, cls.nodes),
            node_wait=get("node-wait", float, cls.node_wait),
            reply_timeout=get("reply-timeout", float, cls.reply_timeout),
            reply_grace=get("reply-grace", float, cls.reply_grace),
            poll=get("poll", float, cls.poll),
            trace=get("trace", str, cls.trace),
            client_states=get("client-states", str, cls.client_states),
        )
        if opts.nodes < 1:
            raise ConfigError(f"{PREFIX}nodes", opts.nodes, "an integer >= 1")
        for key, v in (("node-wait", opts.node_wait), ("reply-grace", opts.reply_grace), ("poll", opts.poll)):
            if not v > 0:
                raise ConfigError(PREFIX + key, v, "a number > 0")
        if opts.reply_timeout < 0:
            raise ConfigError(f"{PREFIX}reply-timeout", opts.reply_timeout, "a number >= 0 (0 = automatic)")
        return opts

    @classmethod
    def for_experiment(cls, cfg: ExperimentConfig, **kw: Any) -> AppOptions:
        """Options carrying ``cfg`` (other fields from ``kw``)."""
        return cls(config_json=json.dumps(to_dict(cfg), sort_keys=True), **kw)


def default_nodes(cfg: ExperimentConfig, nodes: int | None = None) -> int:
    """How many Flower nodes run the clients.

    ``nodes`` if given, else ``cfg.engine_nodes`` when the config has that key and it is > 0,
    else the environment variable ``SPARSEFL_FLOWER_NODES``, else: for ``flower-sim`` one
    simulated SuperNode per client (nodes cost nothing there; only Ray actors, bounded by the
    CPUs, run them), for ``flower-local`` ``min(clients_per_round, CPU count)`` real SuperNodes
    (each is a few processes; more than the CPUs only adds contention). Results never depend on
    it: a client's update depends only on its task, its data and its own state.
    """
    if nodes is None:
        nodes = int(getattr(cfg, "engine_nodes", 0) or 0) or None
    if nodes is None and os.environ.get(NODES_ENV):
        raw = os.environ[NODES_ENV]
        try:
            nodes = int(raw)
        except ValueError:
            raise ConfigError(NODES_ENV, raw, "an integer >= 1") from None
    if nodes is None:
        fed = cfg.federation
        if cfg.engine == "flower-sim":
            nodes = fed.num_clients
        else:
            nodes = max(1, min(fed.clients_per_round, os.cpu_count() or 1))
    if nodes < 1:
        raise ConfigError("nodes", nodes, "an integer >= 1")
    return nodes


def experiment_sha(cfg: ExperimentConfig) -> str:
    """Short identity of a resolved config: a ClientApp refuses tasks of a different one."""
    return config_hash(cfg)[:16]


#: Marker of the ServerApp's log line carrying the run's summary (the launcher looks for it).
RESULT_MARK = "sparsefl-result "
#: Marker of the ServerApp's log line carrying a sparsefl error that ended the run.
ERROR_MARK = "sparsefl-error "
