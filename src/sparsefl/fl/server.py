"""The server round loop: the only one.

``sample -> per-client tasks -> engine runs clients -> decode -> aggregate -> evaluate -> record``.
The engine (embedded, worker processes, Flower) only executes client tasks; everything the
server decides happens here, so every engine gives the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sparsefl.comm import Update, decode_update, encode_update
from sparsefl.config import ExperimentConfig
from sparsefl.errors import DecodeError, SparseflError
from sparsefl.fl.client import param_spec
from sparsefl.fl.evaluate import evaluate
from sparsefl.fl.messages import ClientResult, ClientTask
from sparsefl.fl.sampling import round_lr, sample_clients
from sparsefl.methods.base import Method, Received, ServerState


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not return a usable result this round, and why."""

    client_id: int
    reason: str


class Engine(Protocol):
    """Runs client tasks; returns one result or failure per task, in task order."""

    def run(self, tasks: Sequence[ClientTask]) -> list[ClientResult | ClientFailure]: ...


@dataclass
class RoundRecord:
    """One line of ``metrics.jsonl``."""

    round: int
    accuracy: float | None
    loss: float | None
    uplink_bytes: int
    downlink_bytes: int
    train_flops: float
    train_flops_dense: float
    client_seconds: float
    round_seconds: float
    lr: float
    personal_accuracy: float | None = None
    clients: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RoundFailed(SparseflError):
    """Too few clients succeeded, even after re-sampling the round."""


@dataclass
class Server:
    """Holds what the server loop needs: the method, the test set and the engine."""

    cfg: ExperimentConfig
    method: Method
    engine: Engine
    x_test: torch.Tensor
    y_test: torch.Tensor
    initialised: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._eval_model = self.method.new_model()
        self._spec = param_spec(self._eval_model)

    def make_tasks(self, state: ServerState, rnd: int, clients: list[int]) -> list[ClientTask]:
        """Encode each sampled client's downlink (an object shared by all clients is encoded once)."""
        cfg = self.cfg
        lr = round_lr(cfg.local.lr, cfg.local.lr_end, rnd, cfg.federation.rounds)
        cache: dict[int, bytes] = {}
        setup_update = self.method.setup_payload(state)
        setup = encode_update(setup_update, cfg.comm.down) if setup_update is not None else None
        tasks = []
        for cid in clients:
            down: Update = self.method.downlink(state, cid)
            key = id(down)
            if key not in cache:
                cache[key] = encode_update(down, cfg.comm.down, known=self.method.known_masks(state))
            first = cid not in self.initialised
            tasks.append(ClientTask(rnd, cid, cache[key], lr, setup if first else None))
        return tasks

    def decode(self, state: ServerState, result: ClientResult) -> Received:
        """Strictly decode one upload (DecodeError on anything malformed)."""
        upd = decode_update(result.payload, self._spec, known=self.method.known_masks(state))
        return Received(result.client_id, upd, result.num_examples)

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundRecord]:
        """Run round ``rnd`` (1-based) from ``state``; re-sample when too few clients succeed."""
        cfg = self.cfg
        fed = cfg.federation
        t0 = time.perf_counter()
        failures: list[dict[str, Any]] = []
        up = down = 0
        for attempt in range(fed.max_round_retries + 1):
            clients = sample_clients(cfg.seed, rnd, fed.num_clients, fed.clients_per_round, attempt)
            tasks = self.make_tasks(state, rnd, clients)
            down += sum(t.downlink_bytes for t in tasks)
            outcomes = self.engine.run(tasks)
            ok: list[tuple[ClientResult, Received]] = []
            for out in outcomes:
                if isinstance(out, ClientFailure):
                    failures.append({"client": out.client_id, "attempt": attempt, "reason": out.reason})
                    continue
                up += out.uplink_bytes
                try:
                    ok.append((out, self.decode(state, out)))
                except DecodeError as e:
                    failures.append({"client": out.client_id, "attempt": attempt, "reason": f"decode: {e}"})
            for task in tasks:
                self.initialised.add(task.client_id)
            if len(ok) >= fed.min_clients:
                break
        else:
            raise RoundFailed(
                f"round {rnd}: fewer than federation.min_clients={fed.min_clients} clients succeeded "
                f"after {fed.max_round_retries + 1} attempts; failures: {failures[-3:]}"
            )
        new_state = self.method.aggregate(state, [r for _, r in ok])
        acc = loss = None
        if rnd % fed.eval_every == 0 or rnd == fed.rounds:
            acc, loss = evaluate(self._eval_model, self.method.eval_params(new_state), self.x_test, self.y_test)
        results = [r for r, _ in ok]
        record = RoundRecord(
            round=rnd,
            accuracy=acc,
            loss=loss,
            uplink_bytes=up,
            downlink_bytes=down,
            train_flops=sum(r.flops for r in results),
            train_flops_dense=sum(r.flops_dense for r in results),
            client_seconds=sum(r.seconds for r in results),
            round_seconds=time.perf_counter() - t0,
            lr=tasks[0].lr,
            clients=[
                {
                    "id": r.client_id,
                    "num_examples": r.num_examples,
                    "loss": r.loss,
                    "uplink_bytes": r.uplink_bytes,
                    "train_flops": r.flops,
                    "seconds": r.seconds,
                    **r.metrics,
                }
                for r in results
            ],
            failures=failures,
        )
        vals = [r.metrics["val_accuracy"] for r in results if "val_accuracy" in r.metrics]
        record.personal_accuracy = sum(vals) / len(vals) if vals else None
        return new_state, record


RoundCallback = Callable[[ServerState, RoundRecord], None]
