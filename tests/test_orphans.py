"""A pool worker started with :func:`exit_with_parent` ends when its owner is SIGKILLed, whether
it was spawned (a child of the owner) or forked by a fork server (a child of the fork server)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sparsefl.orphans import alive

PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys, time
    from sparsefl.orphans import exit_with_parent

    def child(path, owner):
        exit_with_parent(owner, poll=0.1)
        open(path, "w").write("ready")
        time.sleep(120)

    if __name__ == "__main__":
        p = mp.get_context(sys.argv[2]).Process(target=child, args=(sys.argv[1], os.getpid()))
        p.start()
        print(p.pid, flush=True)
        time.sleep(120)
    """
)


@pytest.mark.parametrize("context", ["spawn", "forkserver", "fork"])
def test_worker_exits_when_its_owner_is_killed(tmp_path: Path, context: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    ready = tmp_path / "ready"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(script), str(ready), context]
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists() and alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        parent.kill()
