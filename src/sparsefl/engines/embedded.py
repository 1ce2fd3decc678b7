"""The embedded engine: clients run in this process, helped by ``jobs - 1`` worker processes.

Per-client state lives between rounds in a :class:`~sparsefl.runtime.ClientStateStore`; only
the sampled clients' models exist at any time. Results do not depend on ``jobs``: each
client's randomness is derived from (seed, client, round), and aggregation happens in client-id
order on the server.

With ``federation.client_timeout`` set, clients run only in worker processes (``max(jobs, 1)``
of them, :class:`DeadlineWorkers`), one task at a time each: a client still running at its
deadline is abandoned (its worker killed and replaced) and recorded as a ``timeout`` failure.

Workers ignore SIGINT: a Ctrl-C reaches the whole foreground process group, and this process
alone handles it (it stops the workers), so a worker prints no traceback of its own.
"""

from __future__ import annotations

import collections
import contextlib
import io
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_connections
from typing import Any

import torch

from sparsefl.data import ClientSplit
from sparsefl.methods.base import Method
from sparsefl.orphans import exit_with_parent
from sparsefl.protocol.messages import ClientFailure, ClientResult, ClientState, ClientTask
from sparsefl.runtime.batched import run_batched
from sparsefl.runtime.client import ClientDataSource, execute_task
from sparsefl.runtime.device import prepare_device, resolve_device
from sparsefl.runtime.server import ResultCallback
from sparsefl.runtime.store import ClientStateStore

# -- worker-process plumbing --------------------------------------------------------------------------
_W: dict[str, object] = {}


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while it starts worker processes (or the fork server, whose
    children inherit its mask): a Ctrl-C before a worker's initializer ignores SIGINT stays
    pending, and is then dropped. This process gets it once the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _ignore_sigint() -> None:
    """In a worker: leave Ctrl-C to the process that started it (a SIGINT pending since the
    fork is dropped)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _worker_init(
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    split: ClientSplit,
    owner: int,
    claims: Any,
    results: Any,
    device: str = "cpu",
    ordinal: Any = 1,
) -> None:
    _ignore_sigint()
    exit_with_parent(owner)
    # clients run with local.threads; setting it once here spares every task a switch (and a
    # wake-up of idle OpenMP threads) in run_client
    torch.set_num_threads(method.experiment.local.threads)
    here = resolve_device(device, _ordinal(ordinal))
    prepare_device(here)
    _W.update(
        method=method,
        data=ClientDataSource(x, y, split, here),
        claims=claims,
        results=results,
    )


def _ordinal(ordinal: Any) -> int:
    """This worker's number (the process that started the run is 0): given, or the next value
    of a counter the pool's workers share (:func:`sparsefl.runtime.device.assign_device` spreads
    the workers over the GPUs by it)."""
    if isinstance(ordinal, int):
        return ordinal
    with ordinal.get_lock():
        ordinal.value += 1
        return int(ordinal.value)


#: seconds this process waits for the task counter's lock before it checks that the workers
#: are alive (a worker that dies holding the lock never releases it)
LOCK_WAIT = 1.0

#: seconds to wait for an outcome the workers sent once their round has ended (it is in the
#: queue by then; only a message that did not unpickle can be missing)
RESULT_WAIT = 60.0


def _worker_ready() -> None:
    """A no-op task, submitted once per worker when the pool is made, so that the workers start
    (import and unpickle what they need) while this process runs the first rounds' clients."""


def forks(threads: int) -> bool:
    """Whether the first workers are forked from this process: on Linux, when clients run on
    one intra-op thread (and not on a CUDA device, which the callers check: a forked child
    cannot use CUDA once its parent has).

    A forked worker is ready in milliseconds, with the method and data as they are. GNU OpenMP
    cannot run a parallel region in a child forked after the parent used its thread pool (the
    child hangs; reproduced with 2 threads), but a one-thread worker never starts one, as with
    torch's DataLoader workers. Otherwise workers come from the fork server (:func:`_fork_server`).
    """
    return sys.platform == "linux" and threads == 1


def _fork_server() -> mp.context.BaseContext:
    """Workers forked from a fork server that imported torch and sparsefl once (1-2 s here)
    and never runs torch code; each spawned worker would import torch itself."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sparsefl.engines.embedded"])
    return ctx


def start_fork_server(threads: int, cuda: bool = False) -> None:
    """Start the worker fork server now (it imports torch and sparsefl in the background), so
    the first round's workers need not wait for it; a no-op when workers will be forked from
    this process (:func:`forks`) or when it already runs."""
    if cuda or not forks(threads):
        _ensure_fork_server()


def _ensure_fork_server() -> None:
    """Start the fork server if it is not running (it imports in the background)."""
    _fork_server()
    from multiprocessing import forkserver, resource_tracker

    resource_tracker.ensure_running()  # first: starting it unblocks SIGINT in this thread
    with _sigint_blocked():
        forkserver.ensure_running()


def _claim(claims: Any, key: int, n: int, timeout: float | None = None) -> int | None:
    """The next unclaimed position of round ``key``'s task list (shared by every process), or
    None when none is left or the counter belongs to another round (``claims`` holds the round's
    key and the next position). With ``timeout``, :class:`TimeoutError` when the lock is not
    free by then (its holder may have died)."""
    lock = claims.get_lock()
    if not lock.acquire(timeout=-1 if timeout is None else timeout):
        raise TimeoutError
    try:
        return _next(claims.get_obj(), key, n)
    finally:
        lock.release()


def _next(counter: Any, key: int, n: int) -> int | None:
    """:func:`_claim` on the raw ``(round key, next)`` pair, without the lock (indexing the
    synchronized array itself would take it)."""
    if counter[0] != key or counter[1] >= n:
        return None
    k = int(counter[1])
    counter[1] = k + 1
    return k


def _worker_round(key: int, tasks: Sequence[ClientTask], states: Sequence[ClientState]) -> None:
    """A worker's part of a round: claim the next task, run it, send its outcome back at once
    (``(key, position, outcome)`` on the results queue), until none is left. An outcome that
    cannot be sent is replaced by a failure that can."""
    claims, results = _W["claims"], _W["results"]
    while (k := _claim(claims, key, len(tasks))) is not None:
        task = tasks[k]
        out = execute_task(_W["method"], _W["data"], task, states[k])  # type: ignore[arg-type]
        try:
            results.put((key, k, out))  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - pickling failed before anything was written
            reason = f"result could not be sent: {type(e).__name__}: {e}"
            results.put((key, k, ClientFailure(task.client_id, reason)))  # type: ignore[attr-defined]


def _forward_results(results: Any, sink: queue.SimpleQueue) -> None:
    """This process's reader of the workers' results queue (a thread): every item goes to
    ``sink``. It ends when every writer has closed the queue (the workers have exited and
    :meth:`EmbeddedEngine._stop_pool` closed this process's end)."""
    while True:
        try:
            item = results.get()
        except (EOFError, OSError):  # closed
            return
        except Exception:  # noqa: BLE001 - a message that does not unpickle: its task is lost
            continue  # (the round then waits RESULT_WAIT for it, and records a failure)
        sink.put(("result", item))


def share_tensors(obj: object) -> None:
    """Move every tensor reachable from ``obj`` into shared memory, in this thread.

    Pickling a tensor for a worker process moves its storage into shared memory and frees the
    old buffer; done by the pool's starting thread, that raced with this thread reading the
    same tensors (a segfault, reproduced). After this call the move is a no-op.
    """

    class _Walk(pickle.Pickler):
        def persistent_id(self, o: object) -> int | None:
            if isinstance(o, torch.Tensor):
                o.share_memory_()
                return 0  # the pickle is thrown away: only the side effect matters
            return None

    _Walk(io.BytesIO()).dump(obj)


# -- clients that can be abandoned (federation.client_timeout) -----------------------------------------
#: seconds a new worker may take to start (fork, unpickle the data) before the workers count as
#: unable to start here
START_WAIT = 120.0


class WorkersUnavailable(RuntimeError):
    """Worker processes cannot start here (e.g. a method that cannot be pickled)."""


def _deadline_worker(
    conn: Any,
    method: Method,
    x: torch.Tensor,
    y: torch.Tensor,
    split: ClientSplit,
    owner: int,
    device: str = "cpu",
    ordinal: int = 0,
) -> None:
    """The loop of a :class:`DeadlineWorkers` process: say ``ready``, then run each
    ``(position, task, state)`` it receives and send back ``(position, outcome)``, until it
    receives None."""
    _worker_init(method, x, y, split, owner, None, None, device, ordinal)
    _warm_up(method, _W["data"].x.device)  # type: ignore[attr-defined]
    conn.send("ready")
    while (item := conn.recv()) is not None:
        k, task, state = item
        out = execute_task(_W["method"], _W["data"], task, state)  # type: ignore[arg-type]
        try:
            conn.send((k, out))
        except Exception as e:  # noqa: BLE001 - pickling failed before anything was written
            conn.send((k, ClientFailure(task.client_id, f"result could not be sent: {type(e).__name__}: {e}")))


def _warm_up(method: Method, device: torch.device | None = None) -> None:
    """One forward and backward pass of a throwaway model on zeros: a new process's first
    pass (kernel setup, allocations) must not count against its first client's deadline."""
    device = device or torch.device("cpu")
    try:
        with torch.random.fork_rng(devices=[]):  # the process's random state stays as it was
            model = method.new_model().to(device)
            model(torch.zeros(2, *method.spec.input_shape, device=device)).sum().backward()
    except Exception:  # noqa: BLE001 - best effort: a method whose model needs more just starts cold
        pass


@dataclass
class _Slot:
    """A worker of :class:`DeadlineWorkers`: its process, this process's end of its pipe, when
    it started, and the task it runs (position in the round's list) since when."""

    proc: Any
    conn: Any
    born: float
    ready: bool = False
    task: int | None = None
    since: float = 0.0


class DeadlineWorkers:
    """``count`` worker processes that run one client task each at a time, so that a client
    past its deadline can be abandoned: its worker is killed (SIGKILL) and a new one started.

    This process only hands out tasks and collects outcomes (a client running here could not be
    abandoned). The first workers are forked from this process where :func:`forks` allows (the
    first round: no other thread runs torch code yet); later ones come from the fork server.
    A task goes to a worker only once the worker is ready, so a client's time never includes a
    worker's start.
    """

    def __init__(
        self,
        method: Method,
        x: torch.Tensor,
        y: torch.Tensor,
        split: ClientSplit,
        count: int,
        device: str = "cpu",
        cuda: bool = False,
    ) -> None:
        self.method = method
        self.args = (method, x, y, split, os.getpid(), device)
        self.count = count
        self.slots: list[_Slot] = []
        self.ran = 0  # tasks whose outcome a worker sent back
        self._fork = not cuda and forks(method.experiment.local.threads)  # until the first workers are made
        self._shared = False

    def _spawn(self, ordinal: int) -> _Slot:
        """A new worker for slot ``ordinal`` (which sets its device)."""
        fork = self._fork
        try:
            if not fork and not self._shared:  # pickled for the fork server: tensors go by shared memory
                share_tensors(self.args)
                self._shared = True
            ctx = mp.get_context("fork") if fork else _fork_server()
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_deadline_worker, args=(there, *self.args, ordinal), name="sparsefl-worker", daemon=True
            )
            with _sigint_blocked(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
                proc.start()
        except Exception as e:  # noqa: BLE001 - reported by the engine, which runs clients here instead
            raise WorkersUnavailable(f"{type(e).__name__}: {e}") from e
        there.close()  # the worker's end: closed here, so its death reads as the end of the pipe
        return _Slot(proc, here, time.monotonic())

    @staticmethod
    def _kill(slot: _Slot) -> None:
        slot.proc.kill()
        slot.proc.join(5)
        slot.conn.close()

    def run(
        self,
        tasks: Sequence[ClientTask],
        states: Sequence[ClientState],
        order: Sequence[int],
        timeout: float,
        outs: list[ClientResult | ClientFailure | None],
        report: Callable[[int, ClientResult | ClientFailure], ClientResult | ClientFailure],
    ) -> None:
        """Run the tasks, starting them in ``order``; ``outs[k] = report(k, outcome)`` as each
        ends. A task still running ``timeout`` seconds after it was handed out becomes a
        ``timeout`` failure, and a task whose worker died a ``worker process died`` failure.
        :class:`WorkersUnavailable` when a worker cannot start (``outs`` holds what ended)."""
        if not self.slots:
            for i in range(self.count):
                self.slots.append(self._spawn(i))
            self._fork = False
            # replacements come from the fork server: started now, it is ready (torch imported)
            # long before a first deadline passes
            try:
                _ensure_fork_server()
            except Exception as e:  # noqa: BLE001 - no fork server: no replacements
                raise WorkersUnavailable(f"the fork server did not start: {type(e).__name__}: {e}") from e
        todo = collections.deque(order)
        late = f"timeout: still running after federation.client_timeout={timeout:g} s (abandoned)"
        while todo or any(s.task is not None for s in self.slots):
            now = time.monotonic()
            for i, s in enumerate(self.slots):
                if s.ready and s.task is None and todo:
                    k = todo.popleft()
                    try:
                        s.conn.send((k, tasks[k], states[k]))
                    except OSError:  # the worker has died: the task waits for the next one
                        todo.appendleft(k)
                        self._kill(s)
                        self.slots[i] = self._spawn(i)
                        continue
                    s.task, s.since = k, now
            waits = [s.since + timeout - now for s in self.slots if s.task is not None]
            waits += [s.born + START_WAIT - now for s in self.slots if not s.ready]
            ready = wait_connections([s.conn for s in self.slots], timeout=max(0.0, min(waits, default=0.0)))
            for conn in ready:
                i = next(j for j, s in enumerate(self.slots) if s.conn is conn)
                s = self.slots[i]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # the worker died
                    if not s.ready:
                        raise WorkersUnavailable("a worker process exited while starting") from None
                    self._kill(s)
                    if s.task is not None:
                        outs[s.task] = report(s.task, ClientFailure(tasks[s.task].client_id, "worker process died"))
                    self.slots[i] = self._spawn(i)
                    continue
                except Exception as e:  # noqa: BLE001 - an outcome that does not unpickle
                    k, s.task = s.task, None
                    if k is not None:
                        why = f"result could not be received: {type(e).__name__}: {e}"
                        outs[k] = report(k, ClientFailure(tasks[k].client_id, why))
                    continue
                if msg == "ready":
                    s.ready = True
                elif msg[0] == s.task:
                    k, s.task = s.task, None
                    self.ran += 1
                    outs[k] = report(k, msg[1])
            now = time.monotonic()
            for i, s in enumerate(self.slots):
                if s.task is not None and now - s.since >= timeout:
                    # recorded before the replacement starts: should it fail, the clients left
                    # run in this process, and this one must not be among them
                    self._kill(s)
                    outs[s.task] = report(s.task, ClientFailure(tasks[s.task].client_id, late))
                    self.slots[i] = self._spawn(i)
                elif not s.ready and now - s.born >= START_WAIT:
                    raise WorkersUnavailable(f"a worker process did not start within {START_WAIT:g} s")

    def close(self) -> None:
        """Stop the workers: idle ones exit, busy or starting ones are killed."""
        for s in self.slots:
            try:
                if s.ready and s.task is None:
                    s.conn.send(None)
                else:
                    s.proc.kill()
            except OSError:  # it has exited (or was killed) already
                pass
        for s in self.slots:
            s.proc.join(5)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join()
            s.conn.close()
        self.slots = []


class EmbeddedEngine:
    """Runs client tasks in this process, helped by ``jobs - 1`` worker processes.

    With ``jobs > 1`` this process computes clients too. The round's tasks start largest first
    (by the client's training samples, which set its local steps), each process taking the next
    one whenever it is free: the small ones fill the gaps at the end, so no core waits long on
    the others. The workers start at the first round: forked from this process where
    :func:`forks` allows (milliseconds), else from the fork server in the background (a fresh
    process needs 1-2 s to import torch; until they are up, every task runs here). Where a
    client runs never changes its result.

    ``device`` is the ``device`` option: each process resolves it for itself
    (:func:`~sparsefl.runtime.device.resolve_device`, this process as worker 0) and moves its
    copy of the training set there once. With ``executor="batched"`` this process trains each
    round's clients together (:mod:`sparsefl.runtime.batched`), and no worker process starts.
    """

    def __init__(
        self,
        method: Method,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        split: ClientSplit,
        jobs: int = 1,
        store: ClientStateStore | None = None,
        device: str = "cpu",
        executor: str = "sequential",
    ) -> None:
        self.method = method
        self.x, self.y, self.split = x_train, y_train, split
        self.device_option = device
        self.device = resolve_device(device)
        prepare_device(self.device)
        self.cuda = self.device.type == "cuda"  # workers then come from the fork server, never a fork
        self.data = ClientDataSource(x_train, y_train, split, self.device)
        self.executor = executor
        self.jobs = jobs
        self.store = store or ClientStateStore()
        self.ran_in_workers = 0  # tasks the worker processes ran (for tests and benchmarks)
        self._pool: ProcessPoolExecutor | None = None
        self._warmup: list[Future[None]] = []
        self._starting: Future[None] | None = None  # done once the pool is made (or failed to be)
        self._starts = 0
        self._start_error: str | None = None
        self._closed = False
        # the pool's shared task counter, its results queue, and this process's side of it
        self._claims: Any = None
        self._results: Any = None
        self._sink: queue.SimpleQueue | None = None
        self._reader: threading.Thread | None = None
        self._round_key = 0
        # federation.client_timeout: clients run in workers that can be abandoned
        self.timeout = method.experiment.federation.client_timeout
        self._deadline: DeadlineWorkers | None = None
        self._deadline_failed = False

    def run(
        self, tasks: Sequence[ClientTask], on_result: ResultCallback | None = None
    ) -> list[ClientResult | ClientFailure]:
        states = [self.store.get(t.client_id) for t in tasks]
        errors: list[BaseException] = []

        def report(i: int, out: ClientResult | ClientFailure) -> ClientResult | ClientFailure:
            if isinstance(out, ClientResult):
                self.store.put(out.client_id, out.state, out.round)
            if on_result is not None and not errors:
                try:
                    on_result(i, out)
                except Exception as e:  # noqa: BLE001 - raised below, once every task is back
                    errors.append(e)
            return out

        if self.executor == "batched":
            outs = run_batched(self.method, self.data, list(tasks), states)
            outs = [report(i, out) for i, out in enumerate(outs)]
        elif self.timeout > 0 and not self._closed and not self._deadline_failed:
            outs = self._run_with_deadline(tasks, states, report)
        elif self._ready_pool() is not None:
            outs = self._run_shared(tasks, states, report)
        else:
            # reported once every client ran: there is no other process to wait for, and the
            # server's decoding then runs warm, upload after upload
            outs = [self._run_here(t, s) for t, s in zip(tasks, states)]
            outs = [report(i, out) for i, out in enumerate(outs)]
        if errors:
            raise errors[0]
        return outs

    def _run_here(self, task: ClientTask, state: ClientState) -> ClientResult | ClientFailure:
        return execute_task(self.method, self.data, task, state)

    def _run_with_deadline(
        self,
        tasks: Sequence[ClientTask],
        states: list[ClientState],
        report: Callable[[int, ClientResult | ClientFailure], ClientResult | ClientFailure],
    ) -> list[ClientResult | ClientFailure]:
        """The tasks in :class:`DeadlineWorkers` (``max(jobs, 1)`` of them), largest first. If
        workers cannot start here, a warning, and from then on clients run in this process
        (their time is then checked only once they finish, by the server)."""
        if self._deadline is None:
            self._deadline = DeadlineWorkers(
                self.method, self.x, self.y, self.split, max(1, self.jobs), self.device_option, self.cuda
            )
        outs: list[ClientResult | ClientFailure | None] = [None] * len(tasks)
        ran = self._deadline.ran
        try:
            self._deadline.run(tasks, states, self._largest_first(tasks), self.timeout, outs, report)
        except WorkersUnavailable as e:
            msg = (
                f"federation.client_timeout: worker processes could not start ({e}); clients run in this "
                "process, and a client's time is checked only once it has finished"
            )
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self._deadline_failed = True
        finally:
            self.ran_in_workers += self._deadline.ran - ran
        if self._deadline_failed:
            self._deadline.close()
            self._deadline = None
            for i, out in enumerate(outs):
                if out is None:
                    outs[i] = report(i, self._run_here(tasks[i], states[i]))
        return outs  # type: ignore[return-value]

    def _run_shared(
        self,
        tasks: Sequence[ClientTask],
        states: list[ClientState],
        report: Callable[[int, ClientResult | ClientFailure], ClientResult | ClientFailure],
    ) -> list[ClientResult | ClientFailure]:
        """The tasks run largest first (:meth:`_largest_first`), each process taking the next
        one whenever it is free: longest-processing-time-first list scheduling.

        Every worker gets the round's whole task list once (:func:`_worker_round`); the next
        task is claimed from a counter in shared memory, by a worker or by this process,
        so a worker that finishes a task starts the next one at once, with no hand-off through
        this process. Outcomes come back through a queue whose
        reader thread passes them to this thread, which reports them between its own clients.
        When a worker dies, the pool breaks: the tasks the workers had claimed and not sent
        back fail (``worker process died``), this process runs the rest of the round, and the
        pool is restarted for the next one."""
        pool, claims, sink = self._pool, self._claims, self._sink
        assert pool is not None and claims is not None and sink is not None
        self._round_key += 1
        key = self._round_key
        order = list(self._largest_first(tasks))
        n = len(order)
        outs: list[ClientResult | ClientFailure | None] = [None] * n
        ordered = ([tasks[i] for i in order], [states[i] for i in order])
        # the pool's thread pickles the list, and pickling moves tensors into shared memory:
        # moved here first, not while this thread trains with the same client states
        share_tensors(ordered)
        counter = claims.get_obj()
        with claims.get_lock():
            counter[0], counter[1] = key, 0
        pending: set[Future[None]] = set()
        refused = False
        for _ in range(self.jobs - 1):
            try:
                f = pool.submit(_worker_round, key, *ordered)
            except Exception:  # noqa: BLE001 - broken or shut down: the tasks run here
                refused = True
                break
            pending.add(f)
            f.add_done_callback(lambda f: sink.put(("done", f)))
        errors: list[BaseException] = []
        alone = [False]  # the workers are gone: this process claims without the lock

        def take(item: tuple) -> None:
            if item[0] == "done":
                pending.discard(item[1])
                e = item[1].exception()
                if e is not None:
                    errors.append(e)
                return
            rkey, k, out = item[1]
            if rkey != key or outs[order[k]] is not None:  # a round that has ended
                return
            self.ran_in_workers += 1
            outs[order[k]] = report(order[k], out)

        def died() -> bool:
            return any(isinstance(e, BrokenProcessPool) for e in errors)

        def claim_here() -> int | None:
            """The next position for this process. A worker that died holding the counter's
            lock never releases it: once the pool is broken, the workers are shut down and
            this process claims alone."""
            while not alone[0]:
                try:
                    return _claim(claims, key, n, timeout=LOCK_WAIT)
                except TimeoutError:
                    while not sink.empty():
                        take(sink.get())
                    if died():
                        pool.shutdown(wait=True, cancel_futures=True)
                        alone[0] = True
            return _next(counter, key, n)

        try:
            while (k := claim_here()) is not None:
                outs[order[k]] = report(order[k], self._run_here(tasks[order[k]], states[order[k]]))
                while not sink.empty():
                    take(sink.get())
            # every task is claimed: wait for the workers' outcomes, and for their round to end
            # (a round job that started late claims nothing: the counter holds this round's key)
            while pending or (not errors and any(o is None for o in outs)):
                try:  # once the workers' round has ended, every outcome is in the queue already
                    take(sink.get(timeout=None if pending else RESULT_WAIT))
                except queue.Empty:
                    errors.append(RuntimeError(f"no result from the worker after {RESULT_WAIT:g} s"))
        except BaseException:
            # interrupted: the workers stop after their current task (without the lock if a
            # dead worker holds it)
            lock = claims.get_lock()
            got = lock.acquire(timeout=LOCK_WAIT)
            counter[1] = n
            if got:
                lock.release()
            raise
        while not sink.empty():
            take(sink.get())
        if errors:
            why = "worker process died" if died() else f"worker raised {type(errors[0]).__name__}: {errors[0]}"
            for k in range(n):
                if outs[order[k]] is None:
                    outs[order[k]] = report(order[k], ClientFailure(tasks[order[k]].client_id, why))
        if errors or refused:  # restarted for the next round
            self._stop_pool()
        assert all(o is not None for o in outs)
        return outs  # type: ignore[return-value]

    def _largest_first(self, tasks: Sequence[ClientTask]) -> collections.deque[int]:
        """Task indices by the client's training samples, largest first (ties in task order).

        A client's time grows with its local steps, and with ``local.epochs`` those follow its
        samples (a Dirichlet split makes them differ by up to 9x). Starting the big ones first
        leaves only small ones for the end of the round (longest-processing-time-first)."""
        size = [len(self.split.train[t.client_id]) for t in tasks]
        return collections.deque(sorted(range(len(tasks)), key=lambda i: -size[i]))

    def _start_pool(self) -> None:
        """Make the pool. The workers get the method and data as they are now (after the
        server's ``init_state``).

        The first time, where :func:`forks` allows, the workers are forked right here: this
        must be a moment when no other thread of this process runs torch code (the runner's
        server thread starts after the first round; other threads, such as a progress bar's,
        hold no lock a worker needs). Otherwise (and when a pool is restarted
        after a worker died) they come from the fork server, in a background thread: starting
        one blocks until the server has imported torch, and this process has clients to run
        meanwhile.
        """
        fork = not self.cuda and forks(self.method.experiment.local.threads) and self._starts == 0
        self._starts += 1
        initargs: tuple | None = (self.method, self.x, self.y, self.split, os.getpid())
        if not fork:  # a forked worker shares this memory as it is; others get pickled tensors
            try:
                share_tensors(initargs)
            except Exception as e:  # noqa: BLE001 - e.g. a method that cannot be pickled: no workers
                self._start_error = f"{type(e).__name__}: {e}"
                initargs = None
        ctx = mp.get_context("fork") if fork else _fork_server()
        if initargs is not None:
            try:  # shared with the workers when they are made (initargs), never pickled otherwise
                self._claims, self._results = ctx.Array("i", 2), ctx.SimpleQueue()  # (round key, next)
                ordinals = ctx.Value("i", 0)  # the workers number themselves 1, 2, ... (this process is 0)
            except Exception as e:  # noqa: BLE001 - e.g. no POSIX semaphores here: no workers
                self._start_error = f"{type(e).__name__}: {e}"
                initargs = None
            else:
                self._sink = queue.SimpleQueue()
                self._reader = threading.Thread(
                    target=_forward_results, args=(self._results, self._sink), name="sparsefl-results", daemon=True
                )
                self._reader.start()
                initargs = (*initargs, self._claims, self._results, self.device_option, ordinals)
        starting: Future[None] = Future()
        self._starting = starting

        def start() -> None:
            pool = None
            try:
                if initargs is None:
                    return
                pool = ProcessPoolExecutor(
                    max_workers=self.jobs - 1, mp_context=ctx, initializer=_worker_init, initargs=initargs
                )
                # one no-op per worker: they start (import, unpickle) while this process runs
                # clients; forked workers are forked by the first submit, here
                with _sigint_blocked(), warnings.catch_warnings() if fork else contextlib.nullcontext():
                    if fork:  # Python >= 3.12 warns on any fork with threads
                        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
                    self._warmup = [pool.submit(_worker_ready) for _ in range(self.jobs - 1)]
                self._pool = pool
            except Exception as e:  # noqa: BLE001 - reported by _ready_pool, which carries on without workers
                self._start_error = f"{type(e).__name__}: {e}"
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
            finally:
                starting.set_result(None)

        if fork:
            start()
            wait(self._warmup, timeout=30)  # milliseconds, normally; the first round can use them
        else:
            threading.Thread(target=start, name="sparsefl-pool-start", daemon=True).start()

    def _ready_pool(self) -> ProcessPoolExecutor | None:
        """The pool once its warm-up tasks ran (started at the first call and again after a
        worker died); None before, and for good if the workers cannot start (this process then
        runs every client) or after :meth:`close`."""
        starting = self._started()
        if starting is None or not starting.done() or not all(f.done() for f in self._warmup):
            return None
        failed = [f.exception() for f in self._warmup if f.exception() is not None]
        if self._pool is None or failed:
            why = self._start_error or (f"{type(failed[0]).__name__}: {failed[0]}" if failed else "unknown")
            msg = f"jobs={self.jobs}: worker processes could not start ({why}); every client runs in this process"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self._stop_pool()
            self.jobs = 1
            return None
        return self._pool

    def wait_ready(self) -> bool:
        """Start the workers if needed and block until they are up (tests and benchmarks);
        False when there are none."""
        starting = self._started()
        if starting is None:
            return False
        starting.result()
        wait(self._warmup)
        return self._ready_pool() is not None

    def _started(self) -> Future[None] | None:
        """The pool's start (begun now if it was not), or None without workers."""
        if self.jobs == 1 or self._closed:
            return None
        if self._starting is None:
            self._start_pool()
        return self._starting

    def _stop_pool(self) -> None:
        if self._starting is not None:
            self._starting.result()
            self._starting = None
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        self._warmup = []
        if self._results is not None:
            # the workers have exited: with this process's end closed too, the reader thread
            # sees the end of the queue and stops
            self._results._writer.close()
            if self._reader is not None:
                self._reader.join(timeout=5)
            if self._reader is None or not self._reader.is_alive():
                self._results._reader.close()
        self._claims = self._results = self._sink = self._reader = None

    def close(self) -> None:
        """Shut the workers down; later rounds (if any) run in this process."""
        self._closed = True
        self._stop_pool()
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None
