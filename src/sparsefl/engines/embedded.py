"""The embedded engine: clients run in this process, or in worker processes with ``jobs > 1``.

Per-client state lives between rounds in memory or on disk (one safetensors file per client);
only the sampled clients' models exist at any time. Results do not depend on ``jobs``: each
client's randomness is derived from (seed, client, round), and aggregation happens in client-id
order on the server.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from sparsefl.data import ClientSplit
from sparsefl.fl.client import run_client
from sparsefl.fl.messages import ClientData, ClientResult, ClientState, ClientTask
from sparsefl.fl.server import ClientFailure
from sparsefl.methods.base import Method
from sparsefl.orphans import exit_with_parent


class ClientStateStore:
    """Per-client state between rounds: a dict in memory, or safetensors files in a folder.

    On disk every state is written as ``client-<id>.r<round>.safetensors`` (atomically), so a
    crash mid-round never overwrites the state a checkpoint refers to: resuming from round r
    uses, for each client, its newest file of a round <= r and discards later ones.
    In memory, the states travel inside the checkpoint (:meth:`snapshot` / :meth:`restore`).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._mem: dict[int, ClientState] = {}
        self._version: dict[int, int] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: int, rnd: int) -> Path:
        assert self.folder is not None
        return self.folder / f"client-{cid}.r{rnd}.safetensors"

    def get(self, cid: int) -> ClientState:
        if self.folder is None:
            return dict(self._mem.get(cid, {}))
        if cid not in self._version:
            return {}
        from safetensors.torch import load_file

        return load_file(str(self._path(cid, self._version[cid])))

    def put(self, cid: int, state: ClientState, rnd: int) -> None:
        if self.folder is None:
            self._mem[cid] = dict(state)
            return
        from safetensors.torch import save

        from sparsefl.state import atomic_write_bytes

        atomic_write_bytes(self._path(cid, rnd), save({k: v.contiguous() for k, v in state.items()}))
        self._version[cid] = rnd

    def commit(self, rnd: int) -> None:
        """A checkpoint of round ``rnd`` is durable: drop older files of the clients it covers."""
        if self.folder is None:
            return
        for p in self.folder.glob("client-*.r*.safetensors"):
            cid, r = _parse(p.name)
            if r < self._version.get(cid, -1) and r <= rnd:
                p.unlink(missing_ok=True)

    def snapshot(self) -> dict[int, ClientState]:
        """All in-memory states (for checkpoints); empty when states live on disk."""
        return {c: dict(s) for c, s in self._mem.items()}

    def restore(self, states: dict[int, ClientState], upto_round: int) -> None:
        """Back to the state of the checkpoint of round ``upto_round``."""
        if self.folder is None:
            self._mem = {c: dict(s) for c, s in states.items()}
            return
        self._version = {}
        for p in sorted(self.folder.glob("client-*.r*.safetensors")):
            cid, r = _parse(p.name)
            if r > upto_round:
                p.unlink(missing_ok=True)  # written by a round that never completed
            elif r > self._version.get(cid, -1):
                self._version[cid] = r


def _parse(name: str) -> tuple[int, int]:
    stem = name[len("client-") : -len(".safetensors")]
    cid, r = stem.split(".r")
    return int(cid), int(r)


# -- worker-process plumbing --------------------------------------------------------------------------
_W: dict[str, object] = {}


def _worker_init(
    method: Method, x: torch.Tensor, y: torch.Tensor, split: ClientSplit, comm_up: str, seed: int, owner: int
) -> None:
    exit_with_parent(owner)
    _W.update(method=method, x=x, y=y, split=split, comm_up=comm_up, seed=seed)


def _client_data(x: torch.Tensor, y: torch.Tensor, split: ClientSplit, cid: int) -> ClientData:
    idx = torch.from_numpy(split.train[cid])
    vidx = torch.from_numpy(split.val[cid])
    return ClientData(x[idx], y[idx], x[vidx], y[vidx])


def execute_task(
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    split: ClientSplit,
    comm_up: str,
    seed: int,
    task: ClientTask,
    state: ClientState,
) -> ClientResult | ClientFailure:
    """Run one client task on its share of the training data; any exception becomes a
    :class:`ClientFailure` with the error's last line (shared by every engine's client side)."""
    try:
        return run_client(task, method, _client_data(x, y, split, task.client_id), state, comm_up, seed)
    except Exception as e:  # noqa: BLE001 - a failing client must not stop the federation
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return ClientFailure(task.client_id, f"raised {tb}")


def _worker_ready() -> None:
    """A no-op task: submitted once per worker when the pool is made, so the workers start (and
    import and unpickle what they need) while the server prepares its first round."""


def _pool_context() -> mp.context.BaseContext:
    """Worker processes come from a fork server that has imported torch and sparsefl once.

    Each spawned worker would import torch itself (1-2 s here, on the critical path of the first
    round). A plain fork is not safe once the parent's OpenMP threads exist, so workers are
    forked from the fork server, which never runs torch code.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sparsefl.engines.embedded"])
    return ctx


def start_fork_server() -> None:
    """Start the worker fork server now (it imports torch and sparsefl in the background), so
    the first round's workers need not wait for it; a no-op when it already runs."""
    _pool_context()
    from multiprocessing import forkserver

    forkserver.ensure_running()


def _worker_run(task: ClientTask, state: ClientState) -> ClientResult | ClientFailure:
    return execute_task(_W["method"], _W["x"], _W["y"], _W["split"], _W["comm_up"], _W["seed"], task, state)  # type: ignore[arg-type]


class EmbeddedEngine:
    """Runs client tasks in-process (``jobs == 1``) or in a pool of worker processes."""

    def __init__(
        self,
        method: Method,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        split: ClientSplit,
        comm_up: str,
        seed: int,
        jobs: int = 1,
        store: ClientStateStore | None = None,
    ) -> None:
        self.method = method
        self.x, self.y, self.split = x_train, y_train, split
        self.comm_up, self.seed = comm_up, seed
        self.jobs = jobs
        self.store = store or ClientStateStore()
        self._pool: ProcessPoolExecutor | None = None
        if jobs > 1:
            self._get_pool()

    def run(self, tasks: Sequence[ClientTask]) -> list[ClientResult | ClientFailure]:
        states = [self.store.get(t.client_id) for t in tasks]
        if self.jobs == 1:
            outs = [
                execute_task(self.method, self.x, self.y, self.split, self.comm_up, self.seed, t, s)
                for t, s in zip(tasks, states)
            ]
        else:
            outs = self._run_pool(tasks, states)
        for o in outs:
            if isinstance(o, ClientResult):
                self.store.put(o.client_id, o.state, o.round)
        return outs

    def _run_pool(self, tasks: Sequence[ClientTask], states: list[ClientState]) -> list[ClientResult | ClientFailure]:
        """Run tasks in the worker pool; a worker that dies fails only its own tasks (the pool
        is rebuilt for the next round)."""
        futures = None
        for _ in range(2):  # a pool broken before the round (e.g. a worker died starting) is rebuilt once
            pool = self._get_pool()
            try:
                futures = [pool.submit(_worker_run, t, s) for t, s in zip(tasks, states)]
                break
            except BrokenProcessPool:
                self.close()
        if futures is None:
            return [ClientFailure(t.client_id, "worker processes could not be started") for t in tasks]
        outs: list[ClientResult | ClientFailure] = []
        broken = False
        for t, f in zip(tasks, futures):
            try:
                outs.append(f.result())
            except BrokenProcessPool:
                broken = True
                outs.append(ClientFailure(t.client_id, "worker process died"))
        if broken:
            self.close()
        return outs

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=_pool_context(),
                initializer=_worker_init,
                initargs=(self.method, self.x, self.y, self.split, self.comm_up, self.seed, os.getpid()),
            )
            for _ in range(self.jobs):
                self._pool.submit(_worker_ready)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
