"""Worker processes that do not outlive the process that started them.

A ``ProcessPoolExecutor`` worker keeps running its task when the parent is killed (SIGTERM,
SIGKILL, a closed terminal): measured here, a killed ``sparsefl bench --jobs 2`` left both
workers training for minutes, competing with whatever ran next. :func:`exit_with_parent`, run
in each worker's initializer, watches the owner process from a daemon thread and exits the
worker as soon as the owner is gone.

The owner is named by its pid: a worker forked by a fork server is the fork server's child, not
the owner's, so ``getppid`` would not change when the owner dies (and the fork server stays up
while its children hold its pipe).

A tree of processes that detach themselves (new sessions, daemons: Flower's federation) needs
more: :class:`Watchdog` is a separate small process that, once its owner is gone, kills every
process carrying an environment tag or in its process group, with their descendants, and
removes the owner's temporary folders. It learns of the owner's end from the pipe the owner
holds (closed by the kernel however the owner dies) and, as a fallback, by polling its pid.
This module imports only the standard library: the watchdog runs it as a script
(``python -I orphans.py``) and starts in ~50 ms.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: seconds between checks of the owner process
POLL_SECONDS = 1.0


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, ...) of a
    live, non-zombie process; None when it has exited or there is no ``/proc``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    return None if rest[0] in ("Z", "X") else rest


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live, non-zombie process from ``/proc``;
    None when it has exited or there is no ``/proc``."""
    rest = _stat_fields(pid)
    return None if rest is None else (int(rest[1]), int(rest[19]))


def all_pids() -> list[int]:
    """Every process id in ``/proc`` (Linux)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def has_env(pid: int, entry: bytes) -> bool:
    """Whether process ``pid``'s environment holds ``entry`` (``b"NAME=value"``)."""
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def with_descendants(roots: Iterable[int], children: Mapping[int, list[int]]) -> set[int]:
    """``roots`` and every process below them, given each parent's children."""
    found = set(roots)
    todo = list(found)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def descendants(pid: int) -> list[int]:
    """PIDs of the live descendants of ``pid``."""
    children: dict[int, list[int]] = {}
    for p in all_pids():
        st = proc_stat(p)
        if st is not None:
            children.setdefault(st[0], []).append(p)
    return sorted(with_descendants([pid], children) - {pid})


def alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has exited); with ``start``
    (clock ticks, :func:`proc_stat`), whether it is still the process that started then."""
    if Path("/proc/self/stat").exists():
        st = proc_stat(pid)
        return st is not None and (start is None or st[1] == start)
    try:  # no /proc: existence is all we can tell
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with_parent(owner: int | None = None, poll: float = POLL_SECONDS) -> None:
    """Start a daemon thread that ends this process (exit code 1) once ``owner`` has exited
    (default: the current parent process)."""
    pid = os.getppid() if owner is None else owner

    def watch() -> None:
        while True:
            time.sleep(poll)
            if not alive(pid):
                os._exit(1)

    threading.Thread(target=watch, name="sparsefl-exit-with-parent", daemon=True).start()


# -- a process tree that dies with its owner ---------------------------------------------------------
def tree(entry: bytes, group: int | None = None) -> set[int]:
    """Live processes whose environment holds ``entry`` or that are in process group
    ``group``, with all their descendants; never this process."""
    stats = {p: st for p in all_pids() if (st := _stat_fields(p)) is not None}
    children: dict[int, list[int]] = {}
    for p, st in stats.items():
        children.setdefault(int(st[1]), []).append(p)
    roots = [p for p, st in stats.items() if (group is not None and int(st[2]) == group) or has_env(p, entry)]
    found = with_descendants(roots, children)
    found.discard(os.getpid())
    return found


def kill_tree(entry: bytes, group: int | None = None, timeout: float = 10.0) -> None:
    """SIGKILL :func:`tree` until it is empty twice in a row (a process may be forking a
    child as we look), or for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        found = tree(entry, group)
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        quiet = 0 if found else quiet + 1
        time.sleep(0.05)


def in_group(pgid: int) -> dict[str, Any]:
    """``subprocess.Popen`` arguments that start the child in process group ``pgid`` (0: a new
    group led by the child); Python 3.10 has no ``process_group`` argument."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    return {"preexec_fn": lambda: os.setpgid(0, pgid)}


class Watchdog:
    """A process that kills a process tree and removes folders when this process dies.

    The tree: every process whose environment holds ``entry`` (``"NAME=value"``, inherited by
    descendants that keep their environment) or that is in the watchdog's process group (start
    children with ``process_group=watchdog.pid``), and their descendants. :meth:`release` ends
    the watchdog without touching anything (call it after stopping the tree yourself); if this
    process ends or drops the watchdog first, the tree is killed and ``remove`` deleted.
    """

    def __init__(self, entry: str, remove: Sequence[str | Path] = ()) -> None:
        me = proc_stat(os.getpid())
        cmd = [sys.executable, "-I", __file__, str(os.getpid()), str(me[1] if me else 0), entry]
        self.proc = subprocess.Popen(
            [*cmd, *map(str, remove)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **in_group(0),  # the tree's process group, away from the terminal's Ctrl-C
        )
        self.pid = self.proc.pid

    def release(self, timeout: float = 5.0) -> None:
        """End the watchdog and leave the tree and the folders alone; idempotent."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.write(b"done\n")
                stdin.close()
            except OSError:  # it has exited already
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _watch(owner: int, start: int, entry: bytes, remove: list[str]) -> None:
    """The watchdog process: wait for ``done`` (return) or for the owner's end (kill the tree,
    remove the folders)."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # only the owner's end stops it
        signal.signal(sig, signal.SIG_IGN)
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_SECONDS)
        if ready:
            line = sys.stdin.buffer.readline()
            if line.strip() == b"done":
                return
            if not line:  # the owner's end of the pipe is closed: it is gone
                break
        elif not alive(owner, start or None):
            break
    kill_tree(entry, group=os.getpid())
    for folder in remove:
        shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "Watchdog",
    "alive",
    "all_pids",
    "descendants",
    "exit_with_parent",
    "has_env",
    "in_group",
    "kill_tree",
    "proc_stat",
    "tree",
]

if __name__ == "__main__":
    _watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4:])
