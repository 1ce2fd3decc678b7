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


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc: existence is all we can tell


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


__all__ = ["alive", "exit_with_parent"]
