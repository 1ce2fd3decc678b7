"""The server round loop: the only one.

``sample -> per-client tasks -> engine runs clients -> decode -> aggregate -> evaluate -> record``.
The engine (embedded, worker processes, Flower) only executes client tasks; everything the
server decides happens here, so every engine gives the same result.

:meth:`Server.run_round` is :meth:`Server.train_round` (up to the new global model) then
:meth:`Server.evaluate_round`; the runner calls the two separately to evaluate round r in a
second thread while round r+1 trains.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sparsefl.comm import decode_update, encode_update
from sparsefl.config import ExperimentConfig
from sparsefl.errors import DecodeError, SparseflError
from sparsefl.masks import Mask
from sparsefl.methods.base import Method
from sparsefl.protocol.faults import draw_fault
from sparsefl.protocol.messages import ClientFailure, ClientResult, ClientTask, Received, ServerState
from sparsefl.protocol.sampling import round_lr, sample_clients
from sparsefl.runtime.client import param_spec, torch_threads
from sparsefl.runtime.evaluate import evaluate
from sparsefl.runtime.store import ClientStateStore

ResultCallback = Callable[[int, "ClientResult | ClientFailure"], None]


class Engine(Protocol):
    """Runs client tasks; returns one result or failure per task, in task order.

    An engine that can calls ``on_result(i, outcome)`` in the calling thread as soon as task
    ``i`` is done: the server decodes it then, in time it would otherwise spend waiting for
    other processes' clients. Tasks it does not report are decoded after ``run`` returns.
    """

    def run(
        self, tasks: Sequence[ClientTask], on_result: ResultCallback | None = None
    ) -> list[ClientResult | ClientFailure]: ...

    def close(self) -> None: ...


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
    client_seconds: float  # the clients' compute, summed
    round_seconds: float  # from sampling to the new global model (evaluation not included)
    lr: float
    eval_seconds: float = 0.0  # the global model's evaluation (overlaps the next round when pipelined)
    personal_accuracy: float | None = None
    val_accuracy: float | None = None  # the global model on the clients' pooled validation splits
    warning: str | None = None  # e.g. training loss stuck at chance (sparsefl.runtime.divergence)
    clients: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RoundFailed(SparseflError):
    """Too few clients succeeded, even after re-sampling the round."""


@dataclass
class Server:
    """Holds what the server loop needs: the method, the test set and the engine.

    The global model is evaluated on ``device`` (the test set moves there once); the server's
    state, aggregation and encoding stay on the CPU.
    """

    cfg: ExperimentConfig
    method: Method
    engine: Engine
    x_test: torch.Tensor
    y_test: torch.Tensor
    # client -> the version of the known masks its last setup payload carried
    setup_of: dict[int, str] = field(default_factory=dict)
    store: ClientStateStore = field(default_factory=ClientStateStore)  # what the engine keeps between rounds
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    x_val: torch.Tensor | None = None  # the clients' validation splits, pooled (data.val_fraction > 0)
    y_val: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._eval_model = self.method.new_model()
        if self.device.type != "cpu":
            self._eval_model.to(self.device)
            self.x_test, self.y_test = self.x_test.to(self.device), self.y_test.to(self.device)
            if self.x_val is not None and self.y_val is not None:
                self.x_val, self.y_val = self.x_val.to(self.device), self.y_val.to(self.device)
        self._spec = param_spec(self._eval_model)
        self._known: tuple[ServerState, dict[str, torch.Tensor], str] | None = None

    def checkpoint(self, state: ServerState) -> dict[str, Any]:
        """A copy of what the server loop knows after a round: the server state, the clients
        that have their setup payload and the in-memory client states (copied now: later rounds
        change tensors in place)."""
        server = {
            "round": state.round,
            "params": state.params,
            "mask": None if state.mask is None else state.mask.to_dict(),
            "extra": state.extra,
        }
        clients = {str(k): v for k, v in self.store.snapshot().items()}
        return _copied({"server": server, "setup_of": dict(self.setup_of), "clients": clients})

    def restore(self, ckpt: dict[str, Any] | None, initial: ServerState | None = None) -> ServerState:
        """Back to a :meth:`checkpoint` (client states included), or to ``initial`` for a run
        that starts afresh."""
        if ckpt is None:
            assert initial is not None
            self.setup_of = {}
            self.store.restore({}, 0)
            return initial
        state = state_of(ckpt)
        self.setup_of = {int(k): v for k, v in ckpt["setup_of"].items()}
        self.store.restore({int(k): v for k, v in ckpt["clients"].items()}, state.round)
        return state

    def make_tasks(self, state: ServerState, rnd: int, clients: list[int], attempt: int = 0) -> list[ClientTask]:
        """Encode each sampled client's downlink (the broadcast is encoded once per round), add
        the method's settings for its task and draw its injected fault, if any."""
        cfg = self.cfg
        lr = round_lr(cfg.local.lr, cfg.local.lr_end, rnd, cfg.federation.rounds)
        version = self.setup_version(state)
        setup = None
        if any(self.setup_of.get(c) != version for c in clients):  # a first or stale participation
            setup_update = self.method.setup_payload(state)
            setup = encode_update(setup_update, cfg.comm.down) if setup_update is not None else None
        known = self.known_masks(state)
        configs = self.method.task_config(state, clients)
        shared: bytes | None = None
        tasks = []
        for cid in clients:
            down = self.method.downlink(state, cid)
            if down is not None:
                payload = encode_update(down, cfg.comm.down, known=known)
            else:
                if shared is None:
                    shared = encode_update(self.method.broadcast(state), cfg.comm.down, known=known)
                payload = shared
            first = self.setup_of.get(cid) != version
            fault = draw_fault(cfg.faults, cfg.seed, rnd, attempt, cid)
            tasks.append(ClientTask(rnd, cid, payload, lr, setup if first else None, fault, dict(configs.get(cid, {}))))
        return tasks

    def known_masks(self, state: ServerState) -> dict[str, torch.Tensor]:
        """The masks every client of the round holds from its setup payload (later messages
        omit them); kept for the round's state, which every upload of the round is decoded
        against."""
        return self._known_of(state)[1]

    def setup_version(self, state: ServerState) -> str:
        """A digest of :meth:`known_masks`: a client whose last setup payload carried another
        version gets the setup payload again, so a method whose masks change (dynamic sparse
        training) pays for each change once per client, on the downlink."""
        return self._known_of(state)[2]

    def _known_of(self, state: ServerState) -> tuple[ServerState, dict[str, torch.Tensor], str]:
        if self._known is None or self._known[0] is not state:
            setup = self.method.setup_payload(state)
            known = {} if setup is None else self.method.known_masks(setup)
            digest = hashlib.sha256()
            for name in sorted(known):
                bits = known[name].detach().cpu().to(torch.bool).contiguous()
                digest.update(f"{name}{tuple(bits.shape)}".encode())
                digest.update(bits.numpy().tobytes())
            self._known = (state, known, digest.hexdigest()[:16])
        return self._known

    def decode(self, state: ServerState, result: ClientResult) -> Received:
        """Strictly decode one upload (DecodeError on anything malformed, NaN or Inf included)."""
        upd = decode_update(result.payload, self._spec, known=self.known_masks(state))
        return Received(result.client_id, upd, result.num_examples)

    def _screen(self, state: ServerState, task: ClientTask, out: ClientResult | ClientFailure) -> Received | str:
        """The decoded upload, or the reason the client is dropped this round."""
        if isinstance(out, ClientFailure):
            return out.reason
        # engines abandon a client at its deadline (a "timeout" failure); a client that finished
        # but reports more time (a simulated straggler, a Flower reply within the grace) is late too
        timeout = self.cfg.federation.client_timeout
        if timeout > 0 and out.seconds > timeout:
            return f"timeout: took {out.seconds:.1f} s > federation.client_timeout={timeout:g} s"
        try:
            return self.decode(state, out)
        except DecodeError as e:
            return f"decode: {e}"

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundRecord]:
        """:meth:`train_round` then :meth:`evaluate_round`: the complete round ``rnd``."""
        new_state, record = self.train_round(state, rnd)
        self.evaluate_round(new_state, record)
        return new_state, record

    def train_round(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundRecord]:
        """Run round ``rnd`` (1-based) from ``state`` up to the aggregation; re-sample when too
        few clients succeed. The record's evaluation fields stay empty until
        :meth:`evaluate_round`.

        The round runs with ``local.threads`` intra-op threads: in-process clients then
        need no switch (switching and waking a second OpenMP thread made a 70-sample gather 17x
        slower on a busy machine), and evaluation uses the same count on every engine.
        """
        with torch_threads(self.cfg.local.threads):
            return self._train_round(state, rnd)

    def evaluate_round(self, new_state: ServerState, record: RoundRecord) -> None:
        """Fill ``record``'s accuracy and loss on the test set (every ``eval_every`` rounds and
        after the last), and its ``val_accuracy`` on the pooled validation splits where there
        are any, with ``local.threads`` intra-op threads wherever it runs."""
        fed = self.cfg.federation
        t = time.perf_counter()
        if record.round % fed.eval_every == 0 or record.round == fed.rounds:
            with torch_threads(self.cfg.local.threads):
                params = self.method.eval_params(new_state)
                record.accuracy, record.loss = evaluate(self._eval_model, params, self.x_test, self.y_test)
                if self.x_val is not None and self.y_val is not None and len(self.y_val):
                    record.val_accuracy, _ = evaluate(self._eval_model, params, self.x_val, self.y_val)
        record.eval_seconds = time.perf_counter() - t

    def _train_round(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundRecord]:
        cfg = self.cfg
        fed = cfg.federation
        t0 = time.perf_counter()
        failures: list[dict[str, Any]] = []
        up = down = 0
        version = self.setup_version(state)
        for attempt in range(fed.max_round_retries + 1):
            clients = sample_clients(cfg.seed, rnd, fed.num_clients, fed.clients_per_round, attempt)
            tasks = self.make_tasks(state, rnd, clients, attempt)
            down += sum(t.downlink_bytes for t in tasks)
            screened: dict[int, Received | str] = {}

            def arrived(i: int, out: ClientResult | ClientFailure) -> None:
                screened[i] = self._screen(state, tasks[i], out)  # noqa: B023 - called within this attempt

            outcomes = self.engine.run(tasks, on_result=arrived)
            ok: list[tuple[ClientResult, Received]] = []
            for i, (task, out) in enumerate(zip(tasks, outcomes, strict=True)):
                if isinstance(out, ClientResult):
                    up += out.uplink_bytes
                    # the client stored its state, the setup's masks included, even if dropped now
                    self.setup_of[task.client_id] = version
                verdict = screened[i] if i in screened else self._screen(state, task, out)
                if isinstance(verdict, str):
                    failures.append(
                        {"client": task.client_id, "attempt": attempt, "reason": verdict, "injected": task.fault}
                    )
                    continue
                assert isinstance(out, ClientResult)
                ok.append((out, verdict))
            ok = self._reject_outliers(state, ok, attempt, failures)
            if len(ok) >= fed.min_clients:
                break
        else:
            raise RoundFailed(
                f"round {rnd}: fewer than federation.min_clients={fed.min_clients} clients succeeded "
                f"in {fed.max_round_retries + 1} attempts (last failures: "
                + "; ".join(f"client {f['client']}: {f['reason']}" for f in failures[-3:])
                + "); the run folder holds the last complete round: fix the cause and rerun to resume"
            )
        new_state = self.method.aggregate(state, [r for _, r in ok])
        results = [r for r, _ in ok]
        record = RoundRecord(
            round=rnd,
            accuracy=None,
            loss=None,
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

    def _reject_outliers(
        self, state: ServerState, ok: list[tuple[ClientResult, Received]], attempt: int, failures: list[dict[str, Any]]
    ) -> list[tuple[ClientResult, Received]]:
        """Robust aggregation: drop updates whose norm exceeds ``norm_reject_k`` x the median."""
        k = self.cfg.federation.norm_reject_k
        if k <= 0 or len(ok) < 3:
            return ok
        norms = [self.method.update_norm(state, r) for _, r in ok]
        med = (
            float(sorted(norms)[len(norms) // 2])
            if len(norms) % 2
            else float(sum(sorted(norms)[len(norms) // 2 - 1 : len(norms) // 2 + 1]) / 2)
        )
        kept = []
        for (res, rec), nrm in zip(ok, norms, strict=True):
            if med > 0 and nrm > k * med:
                failures.append(
                    {
                        "client": res.client_id,
                        "attempt": attempt,
                        "injected": None,
                        "reason": f"norm {nrm:.4g} > {k:g} x median {med:.4g} (federation.norm_reject_k)",
                    }
                )
            else:
                kept.append((res, rec))
        return kept


def state_of(ckpt: dict[str, Any]) -> ServerState:
    """The server state of a :meth:`Server.checkpoint`."""
    d = ckpt["server"]
    mask = None if d["mask"] is None else Mask(d["mask"])
    return ServerState(round=int(d["round"]), params=d["params"], mask=mask, extra=d["extra"])


def _copied(obj: Any) -> Any:
    """``obj`` with every dict and list copied and every tensor cloned (a snapshot)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v) for v in obj)
    return obj
