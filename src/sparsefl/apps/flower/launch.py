"""Run an experiment on Flower on this machine: ``engine = "flower-sim"`` or ``"flower-local"``.

Both engines take the same path, the one a user takes on real devices:

1. export the experiment as a Flower app into a temporary folder (:mod:`.export`);
2. start a SuperLink on a free 127.0.0.1 port (insecure, runtime dependency installation
   disabled), plus, for ``flower-local``, N SuperNodes (``flower-supernode``, each with its own
   free ``--port``); for ``flower-sim`` the SuperLink runs with ``--simulation`` and Flower's Ray
   runtime simulates the N SuperNodes;
3. ``flwr run APP sparsefl --stream`` against it; the ServerApp (sparsefl's server loop) writes
   the run folder, and this process follows ``metrics.jsonl`` for progress;
4. stop every process it started, by PID, also on error, Ctrl-C or SIGTERM; if this process
   dies without stopping them (SIGKILL), a watchdog process does (below).

Why ``flwr run`` with our own SuperLink for the simulation, rather than
``flwr.simulation.run_simulation``: ``run_simulation`` is deprecated in flwr 1.41, ignores the
app's run config, and runs Ray and the ServerApp inside the calling process (a ``sparsefl run``
or a test process would become a Ray driver). ``flwr run`` against a SuperLink in simulation
mode is Flower's supported way, exercises the exported app exactly as users run it, keeps Ray
in child processes we can stop, and costs ~5 s more startup than ``run_simulation``. We do not
use Flower's managed local SuperLink (``address = ":local:"``): it listens on a fixed port
(39091) and outlives the command; ours gets a free port and dies with the run.

Process hygiene (docs/flower.md, section 5): our children share one process group, led by a
:class:`~sparsefl.orphans.Watchdog`, and carry ``SPARSEFL_FLOWER_SESSION=<random tag>``, which
the processes Flower and Ray detach from the group inherit. :meth:`LocalFederation.stop` stops
every process recorded with the tag, by PID; should this process die first, the watchdog kills
the group and every tagged process and removes the temporary folder. Nothing outside 127.0.0.1
is contacted (telemetry, update checks, Ray usage stats and dependency installation are off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sparsefl.apps.flower.export import export_app
from sparsefl.apps.flower.options import ERROR_MARK, RESULT_MARK, AppOptions, default_nodes
from sparsefl.config import ExperimentConfig
from sparsefl.errors import SparseflError
from sparsefl.orphans import Watchdog, alive, all_pids, has_env, in_group, proc_stat, with_descendants

SESSION_ENV = "SPARSEFL_FLOWER_SESSION"


class FlowerRunError(SparseflError):
    """The Flower federation could not be started, or the run did not finish."""


# -- helpers -----------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    """Path of a Flower executable: beside this Python (a venv's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FlowerRunError(
            f"'{name}' not found: the Flower engines need the extra sparsefl[flower] (pip install 'sparsefl[flower]')"
        )
    return found


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# -- the federation's processes ----------------------------------------------------------------------
class LocalFederation:
    """A SuperLink and N SuperNodes (or a simulation SuperLink) on 127.0.0.1, stopped by PID.

    Parameters
    ----------
    workdir:
        Folder for ``FLWR_HOME``, logs and Ray's temporary files.
    simulation:
        Start the SuperLink with ``--simulation`` and no SuperNodes.
    nodes:
        SuperNodes to start (Deployment), or simulated SuperNodes (simulation).
    """

    def __init__(self, workdir: str | Path, *, simulation: bool, nodes: int) -> None:
        self.workdir = Path(workdir)
        self.simulation = simulation
        self.nodes = nodes
        self.tag = secrets.token_hex(8)
        self.port = 0
        self.watchdog: Watchdog | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self.others: list[subprocess.Popen[bytes]] = []
        self.seen: dict[int, int] = {}  # pid -> start time of every process we own
        self._lock = threading.Lock()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(flower_bin("flower-superlink")).parent)
        no_proxy = ",".join(x for x in (env.get("NO_PROXY", ""), "127.0.0.1,localhost") if x)
        env.update(
            {
                "PATH": bin_dir + os.pathsep + env.get("PATH", ""),  # Flower starts flower-superexec & co by name
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # default 1 s; a local poll is cheap
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds to 127.0.0.1, as on a laptop
                "RAY_TMPDIR": str(self.workdir / "ray"),
                "NO_PROXY": no_proxy,
                "no_proxy": no_proxy,
                "PYTHONUNBUFFERED": "1",
                SESSION_ENV: self.tag,
            }
        )
        return env

    # -- bookkeeping --------------------------------------------------------------------------------
    def _leaders(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.superlink, *self.supernodes, *self.others] if p is not None]

    def scan(self) -> None:
        """Record every live process that carries our tag or descends from one we started."""
        tag = f"{SESSION_ENV}={self.tag}".encode()
        children: dict[int, list[int]] = {}
        stats: dict[int, tuple[int, int]] = {}
        for p in all_pids():
            st = proc_stat(p)
            if st is None:
                continue
            stats[p] = st
            children.setdefault(st[0], []).append(p)
        with self._lock:
            roots = [p.pid for p in self._leaders()] + list(self.seen)
            # a recorded PID counts only while it is the same process (PIDs get reused)
            live = [p for p in roots if p in stats and stats[p][1] == self.seen.get(p, stats[p][1])]
            found = with_descendants(live, children)
            found.update(p for p in stats if p not in found and has_env(p, tag))
            for p in found:
                self.seen[p] = stats[p][1]

    def _watch(self) -> None:
        while not self._stop_watch.wait(0.5):
            self.scan()

    def live_pids(self) -> list[int]:
        """Recorded processes that are still alive (same PID and start time)."""
        self.scan()
        with self._lock:
            return [p for p, start in self.seen.items() if alive(p, start)]

    def tagged_pids(self) -> list[int]:
        """Live processes carrying this federation's tag (for checks after :meth:`stop`)."""
        tag = f"{SESSION_ENV}={self.tag}".encode()
        return [p for p in all_pids() if p != os.getpid() and proc_stat(p) is not None and has_env(p, tag)]

    # -- start / stop -------------------------------------------------------------------------------
    def guard(self) -> None:
        """Start the watchdog (idempotent; :meth:`start` calls it): from now on, if this
        process dies before :meth:`stop`, every process of the federation is killed and the
        work folder removed."""
        if self.watchdog is None:
            self.watchdog = Watchdog(f"{SESSION_ENV}={self.tag}", remove=[self.workdir])

    def _popen(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        self.guard()
        assert self.watchdog is not None
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # the watchdog's group, not the terminal's: no Ctrl-C (we stop them ourselves,
                # in order), and one group to kill should this process die
                **in_group(self.watchdog.pid),
            )
        with self._lock:
            self.seen[proc.pid] = (proc_stat(proc.pid) or (0, 0))[1]
        return proc

    def start(self, timeout: float = 60.0) -> None:
        """Start the watchdog, the SuperLink (wait for its health check) and the SuperNodes."""
        self.guard()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "sparsefl"\n\n[superlink.sparsefl]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        self._watcher = threading.Thread(target=self._watch, name="sparsefl-flower-watch", daemon=True)
        self._watcher.start()
        cmd = [
            flower_bin("flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if self.simulation:
            cmd.append("--simulation")
        self.superlink = self._popen("superlink", cmd)
        self._wait_health(timeout)
        if not self.simulation:
            for i in range(self.nodes):
                self.supernodes.append(
                    self._popen(
                        f"supernode-{i}",
                        [
                            flower_bin("flower-supernode"),
                            "--insecure",
                            "--superlink",
                            f"127.0.0.1:{self.port}",
                            "--port",
                            str(free_port()),
                            "--node-config",
                            f"partition-id={i} num-partitions={self.nodes}",
                        ],
                    )
                )

    def _wait_health(self, timeout: float) -> None:
        assert self.superlink is not None
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise FlowerRunError(
                    f"flower-superlink exited with code {self.superlink.returncode}:\n"
                    + _tail(self.logs / "superlink.log")
                )
            with contextlib.suppress(OSError):
                with opener.open(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.2)
        raise FlowerRunError(
            f"flower-superlink not healthy within {timeout:g} s:\n" + _tail(self.logs / "superlink.log")
        )

    def run_cli(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``flwr <args>`` (output in ``logs/<name>.log``), tracked like the services."""
        proc = self._popen(name, [flower_bin("flwr"), *args])
        self.others.append(proc)
        return proc

    def stop(self, grace: float = 5.0, release: bool = True) -> None:
        """Stop every process this federation started or spawned, by PID; idempotent.

        SIGTERM to the ``flwr`` CLI, the SuperNodes, then the SuperLink (waiting up to ``grace``
        seconds for each group), then SIGTERM and SIGKILL to every recorded process left; then,
        with ``release``, the watchdog is released (the work folder stays: the caller decides;
        without ``release``, call :meth:`release` once it is dealt with).
        """
        self.scan()
        for group in (self.others, self.supernodes, [self.superlink] if self.superlink else []):
            for p in group:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            left = self.live_pids()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while left and time.monotonic() < deadline:
                for p in self._leaders():
                    p.poll()  # reap our direct children
                time.sleep(0.1)
                left = [pid for pid in left if alive(pid, self.seen.get(pid))]
        for p in self._leaders():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        if release:
            self.release()

    def release(self) -> None:
        """End the watchdog, leaving the work folder alone (after :meth:`stop`)."""
        if self.watchdog is not None:
            self.watchdog.release()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt while a federation runs, so the
    ``finally`` that stops it runs; only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- the entry point ---------------------------------------------------------------------------------
def run_on_flower(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    model: Any = None,
    force: bool = False,
    progress: Callable[[Any, dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
    nodes: int | None = None,
    reply_timeout: float = 0.0,
    reply_grace: float | None = None,
    trace: str | Path | None = None,
    timeout: float | None = None,
    monitor: Callable[[LocalFederation], None] | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` on Flower on this machine into the run folder ``out``; return the summary.

    The same contract as :func:`sparsefl.experiment.runner.run_experiment` (the ServerApp calls
    it): an existing folder with the same config resumes or reports the finished run.

    Parameters
    ----------
    cfg:
        The experiment; ``cfg.engine`` is ``"flower-sim"`` or ``"flower-local"``.
    out:
        The run folder.
    model:
        Not supported (a live module cannot be shipped to Flower nodes); must be None.
    force, progress, log:
        As for ``run_experiment``; ``progress`` follows ``metrics.jsonl``.
    nodes:
        SuperNodes (see :func:`~sparsefl.apps.flower.options.default_nodes`).
    reply_timeout, reply_grace:
        The ServerApp's wait for replies (see :mod:`~sparsefl.apps.flower.options`).
    trace:
        A JSONL file the ServerApp appends one line per message to (bytes Flower carried).
    timeout:
        Give up (and stop everything) after this many seconds; None = no limit.
    monitor:
        Called with the federation about every 0.2 s while the run goes (tests use it to kill
        a SuperNode mid-round).
    keep:
        Keep the temporary folder (app, ``FLWR_HOME``, logs) even on success (it is always kept
        when the run fails, and named in the error).

    Raises
    ------
    FlowerRunError
        Flower could not start, or the run failed; the message holds the log tail and the
        temporary folder (kept) with every log.
    """
    from sparsefl.experiment.runfolder import RunFolder
    from sparsefl.runtime.server import RoundRecord

    if cfg.engine not in ("flower-sim", "flower-local"):
        raise FlowerRunError(f"run_on_flower runs engine flower-sim or flower-local, not {cfg.engine!r}")
    if model is not None:
        raise FlowerRunError(
            "a custom model object cannot be shipped to Flower nodes; use a registered model (model.name) "
            "or engine=embedded"
        )
    flower_bin("flower-superlink")  # a clear error now if the sparsefl[flower] extra is missing
    out = Path(out).resolve()
    folder = RunFolder(out)
    with folder.lock():  # a busy folder is refused before anything starts; the ServerApp claims it
        if force:
            folder.reset()
        status = folder.check(cfg)
    if status == "finished":
        summary = folder.read_summary()
        assert summary is not None
        return {**summary, "status": "finished"}
    n = default_nodes(cfg, nodes)
    simulation = cfg.engine == "flower-sim"
    opts_kw: dict[str, Any] = {"reply_timeout": float(reply_timeout)}
    if reply_grace is not None:
        opts_kw["reply_grace"] = float(reply_grace)
    opts = AppOptions.for_experiment(
        cfg,
        out=str(out),
        nodes=n,
        node_wait=120.0,
        trace=str(Path(trace).resolve()) if trace else "",
        # the nodes run on this machine: their client states sit in the run folder, where a
        # resumed run (a new Flower run, with empty context.state) finds them
        client_states=str(out / "flower-clients"),
        **opts_kw,
    )
    opts.experiment()  # validate before anything starts

    workdir = Path(tempfile.mkdtemp(prefix="sparsefl-flower-"))
    fed = LocalFederation(workdir, simulation=simulation, nodes=n)
    seen_rounds = len(folder.read_metrics())
    tidy = True  # remove the temporary folder, except after a failure once Flower started (logs)
    flwr_log = fed.logs / "flwr-run.log"
    try:
        with _terminate_as_interrupt():
            fed.guard()  # from here on the folder goes, however this process ends
            app_dir = export_app(workdir / "app", opts)
            tidy = False
            fed.start()
            if log is not None:
                kind = "simulated SuperNodes (Ray)" if simulation else "SuperNodes"
                log(f"Flower: SuperLink on 127.0.0.1:{fed.port}, {n} {kind}; logs in {fed.logs}")
            args = ["run", str(app_dir), "sparsefl", "--stream"]
            if simulation:
                cpus = os.cpu_count() or 1
                per_client = min(cfg.local.threads, cpus)
                args += [
                    "--federation-config",
                    f"num-supernodes={n} client-resources-num-cpus={per_client} init-args-num-cpus={cpus}",
                ]
            run = fed.run_cli("flwr-run", args)
            t0 = time.monotonic()
            while run.poll() is None:
                if timeout is not None and time.monotonic() - t0 > timeout:
                    raise FlowerRunError(f"the Flower run did not finish within {timeout:g} s; logs in {fed.logs}")
                if monitor is not None:
                    monitor(fed)
                seen_rounds = _follow(folder, seen_rounds, progress, cfg, RoundRecord)
                time.sleep(0.2)
            _follow(folder, seen_rounds, progress, cfg, RoundRecord)
            text = flwr_log.read_text(errors="replace") if flwr_log.exists() else ""
            summary = folder.read_summary()
            if RESULT_MARK not in text or summary is None:
                err = _marked(text, ERROR_MARK)
                if err is not None:
                    where = f"{err['type']} in the Flower ServerApp; logs in {fed.logs}"
                    raise FlowerRunError(f"{err['message']} ({where})")
                raise FlowerRunError(
                    f"the Flower run failed (flwr run exit code {run.returncode}); logs in {fed.logs}:\n"
                    + _explain(text)
                )
            tidy = True
            return {**summary, "status": "completed"}
    except KeyboardInterrupt:
        tidy = True
        raise
    finally:
        fed.stop(release=False)
        if tidy and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        fed.release()


def _follow(folder: Any, seen: int, progress: Any, cfg: ExperimentConfig, record_cls: Any) -> int:
    """Report rounds that appeared in ``metrics.jsonl`` since ``seen``; return the new count."""
    records = folder.read_metrics()
    if progress is not None:
        names = {f.name for f in dataclasses.fields(record_cls)}
        for rec in records[seen:]:
            progress(record_cls(**{k: v for k, v in rec.items() if k in names}), {"rounds": cfg.federation.rounds})
    return max(seen, len(records))


def _explain(text: str) -> str:
    """The useful part of a failed run's log: the sparsefl/Python error lines, else the tail."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.search(r"(Error|Exception|error:)", ln)]
    return "\n".join((errs or lines)[-15:])


def _marked(text: str, mark: str) -> dict[str, Any] | None:
    """The JSON after the last ``mark`` in a ``flwr run --stream`` log (None if absent)."""
    for ln in reversed(text.splitlines()):
        i = ln.find(mark)
        if i >= 0:
            with contextlib.suppress(json.JSONDecodeError):
                return dict(json.loads(ln[i + len(mark) :].strip()))
    return None
