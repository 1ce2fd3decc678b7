"""A Flower node's client states on its own file system, so that a resumed run finds them.

Flower keeps ``context.state`` per node *and per run*, and resuming an interrupted sparsefl run
on Flower starts a new Flower run: without files, stateful methods (FedSkel's skeletons,
HideNseek's and static_mask's known masks, ...) would restart their clients' state there.

Each state is written (atomically) as ``client-<id>.r<round>.run<flower run id>.safetensors``
in ``<folder>/<experiment sha>/``. For a task of round ``r`` in Flower run ``R`` a client's
state is its newest file of a round before ``r``, or of round ``r`` written by run ``R`` (a
round re-sampled after too few successes gives a client its own state of that round's first
attempt, as the embedded engine does). Its files of round ``r`` or later written by another run
were written by a run that the resumed one now redoes from its checkpoint; they are deleted.

The server's durable checkpoint trails the round it trains by at most three rounds (the round
end being written while the next trains, and the previous checkpoint as the fallback when the
newest is damaged), so a client keeps its newest file of a round at most ``r -``
:data:`ROUNDS_BACK` and every later one; older files are deleted.
"""

from __future__ import annotations

import re
from pathlib import Path

from sparsefl.fl.messages import ClientState
from sparsefl.state import atomic_write_bytes

#: Rounds a node keeps each client's files for (see the module docstring).
ROUNDS_BACK = 4

_NAME = re.compile(r"client-(\d+)\.r(\d+)\.run(\d+)\.safetensors")


class NodeStates:
    """The client-state files of one experiment on one node's file system."""

    def __init__(self, folder: str | Path, experiment: str, run_id: int) -> None:
        self.folder = Path(folder) / experiment
        self.run_id = int(run_id)

    def _files(self, cid: int) -> list[tuple[int, int, Path]]:
        """Client ``cid``'s files as ``(round, run, path)``."""
        out = []
        for p in self.folder.glob(f"client-{cid}.r*.run*.safetensors"):
            m = _NAME.fullmatch(p.name)
            if m and int(m[1]) == cid:
                out.append((int(m[2]), int(m[3]), p))
        return out

    def load(self, cid: int, rnd: int) -> ClientState:
        """Client ``cid``'s state for a task of round ``rnd`` in this run (empty on its first
        task); its files of a redone attempt are deleted."""
        usable = []
        for r, run, p in self._files(cid):
            if r < rnd or (r == rnd and run == self.run_id):
                usable.append((r, p))
            else:
                p.unlink(missing_ok=True)
        if not usable:
            return {}
        from safetensors.torch import load_file

        return load_file(str(max(usable)[1]))

    def save(self, cid: int, rnd: int, state: ClientState) -> None:
        """Store client ``cid``'s state after its task of round ``rnd``; drop the files no
        checkpoint the server may resume from can need."""
        from safetensors.torch import save

        if not state and not self._files(cid):
            return  # a stateless method: nothing to keep
        self.folder.mkdir(parents=True, exist_ok=True)
        data = save({k: v.contiguous() for k, v in state.items()})
        atomic_write_bytes(self.folder / f"client-{cid}.r{rnd}.run{self.run_id}.safetensors", data)
        files = self._files(cid)
        old = [r for r, _, _ in files if r <= rnd - ROUNDS_BACK]
        if old:
            base = max(old)
            for r, _, p in files:
                if r < base:
                    p.unlink(missing_ok=True)
