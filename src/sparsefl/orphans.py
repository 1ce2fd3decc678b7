"""Worker processes that do not outlive the process that started them.

A ``ProcessPoolExecutor`` worker keeps running its task when the parent is killed (SIGTERM,
SIGKILL, a closed terminal): measured here, a killed ``sparsefl bench --jobs 2`` left both
workers training for minutes, competing with whatever ran next. :func:`exit_with_parent`, run
in each worker's initializer, watches the owner process from a daemon thread and exits the
worker as soon as the owner is gone.

The owner is named by its pid: a worker forked by a fork server is the fork server's child, not
the owner's, so ``getppid`` would not change when the owner dies (and the fork server stays up
while its children hold its pipe).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

#: seconds between checks of the owner process
POLL_SECONDS = 1.0


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live, non-zombie process from ``/proc``;
    None when it has exited or there is no ``/proc``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[1]), int(rest[19])


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


__all__ = ["alive", "exit_with_parent", "proc_stat"]
