"""A Flower node's client states on its own file system, so that a resumed run finds them.

Flower keeps ``context.state`` per node *and per run*, and resuming an interrupted sparsefl run
on Flower starts a new Flower run: without files, stateful methods (FedSkel's skeletons,
HideNseek's and static_mask's known masks, ...) would restart their clients' state there. With
``sparsefl-client-states`` set, these files are the clients' only store (``context.state`` is
not used).

Each state is written (atomically) as ``r<round>.run<flower run id>.safetensors`` in
``<folder>/<run key>/client-<id>/``, where the run key names the experiment and the run folder
the ServerApp writes (two runs of one config into two run folders keep apart). For a task of
round ``r`` in Flower run ``R`` a client's state is its newest file of a round before ``r``
(of run ``R`` first, among files of one round), or of round ``r`` written by run ``R`` (a round
re-sampled after too few successes gives a client its own state of that round's first attempt,
as the embedded engine does). Its files of round ``r`` or later written by another run were
written by a run that the resumed one now redoes from its checkpoint; they are deleted.

The server's durable checkpoint trails the round it trains by at most three rounds (the round
end being written while the next trains, and the previous checkpoint as the fallback when the
newest is damaged), so a client keeps its newest file of a round at most ``r -``
:data:`ROUNDS_BACK` and every later one; older files are deleted.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from sparsefl.protocol.messages import ClientState
from sparsefl.state import read_state_file, write_state_file

#: Rounds a node keeps each client's files for (see the module docstring).
ROUNDS_BACK = 4

_NAME = re.compile(r"r(\d+)\.run(\d+)\.safetensors")


def run_key(experiment: str, out: str) -> str:
    """The folder name of one run's states: the experiment and the ServerApp's run folder."""
    return f"{experiment}-{hashlib.sha256(out.encode()).hexdigest()[:8]}"


class NodeStates:
    """The client-state files of one run (:func:`run_key`) on one node's file system."""

    def __init__(self, folder: str | Path, key: str, run_id: int) -> None:
        self.folder = Path(folder) / key
        self.run_id = int(run_id)

    def _files(self, cid: int) -> list[tuple[int, int, Path]]:
        """Client ``cid``'s files as ``(round, run, path)``."""
        d = self.folder / f"client-{cid}"
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = _NAME.fullmatch(p.name)
            if m:
                out.append((int(m[1]), int(m[2]), p))
        return out

    def load(self, cid: int, rnd: int) -> ClientState:
        """Client ``cid``'s state for a task of round ``rnd`` in this run (empty on its first
        task); its files of a redone attempt are deleted."""
        usable = []
        for r, run, p in self._files(cid):
            if r < rnd or (r == rnd and run == self.run_id):
                usable.append((r, run == self.run_id, p))
            else:
                p.unlink(missing_ok=True)
        if not usable:
            return {}
        return read_state_file(max(usable)[2])

    def save(self, cid: int, rnd: int, state: ClientState) -> None:
        """Store client ``cid``'s state after its task of round ``rnd``; drop the files no
        checkpoint the server may resume from can need."""
        if not state and not self._files(cid):
            return  # a stateless method: nothing to keep
        d = self.folder / f"client-{cid}"
        d.mkdir(parents=True, exist_ok=True)
        write_state_file(d / f"r{rnd}.run{self.run_id}.safetensors", state)
        files = self._files(cid)
        old = [r for r, _, _ in files if r <= rnd - ROUNDS_BACK]
        if old:
            base = max(old)
            for r, _, p in files:
                if r < base:
                    p.unlink(missing_ok=True)
