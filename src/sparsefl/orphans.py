"""Worker processes that do not outlive their parent.

A ``ProcessPoolExecutor`` worker keeps running its task when the parent is killed (SIGTERM,
SIGKILL, a closed terminal): measured here, a killed ``sparsefl bench --jobs 2`` left both
workers training for minutes, competing with whatever ran next. :func:`exit_with_parent`, run
in each worker's initializer, watches the parent process id from a daemon thread and exits the
worker as soon as the parent is gone (it is re-parented, so ``getppid`` changes).
"""

from __future__ import annotations

import os
import threading
import time

#: seconds between checks of the parent process
POLL_SECONDS = 1.0


def exit_with_parent(poll: float = POLL_SECONDS) -> None:
    """Start a daemon thread that ends this process (exit code 1) once its parent has died."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="sparsefl-exit-with-parent", daemon=True).start()


__all__ = ["exit_with_parent"]
