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

from sparsefl.orphans import alive, kill_tree, tree

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


WATCHED = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from sparsefl.orphans import Watchdog, in_group

    entry, folder, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    dog = Watchdog(entry, remove=[folder])
    env = {**os.environ, entry.split("=")[0]: entry.split("=")[1]}
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    # a grandchild in a session of its own, found by its tag; a plain child in the group
    spawner = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:], start_new_session=True); time.sleep(120)"
    kids = [
        subprocess.Popen([sys.executable, "-c", spawner, *sleeper], env=env, start_new_session=True),
        subprocess.Popen(sleeper, **in_group(dog.pid)),
    ]
    time.sleep(0.5)  # the grandchild starts
    if mode == "release":
        dog.release()
    print(dog.pid, *[k.pid for k in kids], flush=True)
    time.sleep(120)
    """
)


def _start_watched(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, list[int], bytes, Path]:
    script = tmp_path / "owner.py"
    script.write_text(WATCHED)
    folder = tmp_path / "work"
    folder.mkdir()
    entry = f"SPARSEFL_TEST_TREE={os.getpid()}-{mode}"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    owner = subprocess.Popen(
        [sys.executable, str(script), entry, str(folder), mode], stdout=subprocess.PIPE, text=True, env=env
    )
    assert owner.stdout is not None
    pids = [int(x) for x in owner.stdout.readline().split()]
    return owner, pids, entry.encode(), folder


def test_watchdog_kills_the_tree_and_removes_folders_when_its_owner_is_killed(tmp_path: Path) -> None:
    """The tree: a child in the watchdog's process group, and a tagged child and grandchild
    that each started a session of their own (as Flower's SuperExec does)."""
    owner, (dog, *kids), entry, folder = _start_watched(tmp_path, "kill")
    try:
        tree_before = tree(entry, dog)
        assert set(kids) <= tree_before and len(tree_before) >= 3  # the grandchild too
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 10
        while (tree(entry, dog) or alive(dog) or folder.exists()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not tree(entry, dog) and not alive(dog) and not folder.exists()
    finally:
        owner.kill()
        kill_tree(entry)


def test_a_released_watchdog_leaves_the_tree_alone(tmp_path: Path) -> None:
    owner, (dog, *kids), entry, folder = _start_watched(tmp_path, "release")
    try:
        assert not alive(dog)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        time.sleep(0.5)
        assert all(alive(k) for k in kids) and folder.exists()
    finally:
        owner.kill()
        kill_tree(entry, group=dog)
        assert not tree(entry, dog)
