"""Per-client state between rounds: in memory (checkpointed with the server) or one file per
client and round on disk."""

from __future__ import annotations

from pathlib import Path

from sparsefl.protocol.messages import ClientState
from sparsefl.state import read_state_file, write_state_file


class ClientStateStore:
    """Per-client state between rounds: a dict in memory, or safetensors files in a folder.

    On disk every state is written as ``client-<id>.r<round>.safetensors`` (atomically), so a
    crash mid-round never overwrites the state a checkpoint refers to: resuming from round r
    uses, for each client, its newest file of a round <= r and discards later ones.
    In memory, the states travel inside the checkpoint (:meth:`snapshot` / :meth:`restore`).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._mem: dict[int, ClientState] = {}
        self._version: dict[int, int] = {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: int, rnd: int) -> Path:
        assert self.folder is not None
        return self.folder / f"client-{cid}.r{rnd}.safetensors"

    def get(self, cid: int) -> ClientState:
        if self.folder is None:
            return dict(self._mem.get(cid, {}))
        if cid not in self._version:
            return {}
        return read_state_file(self._path(cid, self._version[cid]))

    def put(self, cid: int, state: ClientState, rnd: int) -> None:
        if self.folder is None:
            self._mem[cid] = dict(state)
            return
        write_state_file(self._path(cid, rnd), state)
        self._version[cid] = rnd

    def versions(self) -> dict[int, int]:
        """Each client's newest state file's round now (for :meth:`commit`)."""
        return dict(self._version)

    def commit(self, rnd: int, versions: dict[int, int]) -> None:
        """A checkpoint of round ``rnd`` is durable: drop each client's files of rounds up to
        ``rnd`` older than its round in ``versions``. The runner passes :meth:`versions` of the
        end of round ``rnd - 1``, so the files the previous checkpoint (the fallback) needs
        stay, and so do newer files the next round may be writing meanwhile."""
        if self.folder is None:
            return
        for p in self.folder.glob("client-*.r*.safetensors"):
            cid, r = _parse(p.name)
            if r < versions.get(cid, -1) and r <= rnd:
                p.unlink(missing_ok=True)

    def snapshot(self) -> dict[int, ClientState]:
        """All in-memory states (for checkpoints); empty when states live on disk."""
        return {c: dict(s) for c, s in self._mem.items()}

    def restore(self, states: dict[int, ClientState], upto_round: int) -> None:
        """Back to the state of the checkpoint of round ``upto_round``."""
        if self.folder is None:
            self._mem = {c: dict(s) for c, s in states.items()}
            return
        self._version = {}
        for p in sorted(self.folder.glob("client-*.r*.safetensors")):
            cid, r = _parse(p.name)
            if r > upto_round:
                p.unlink(missing_ok=True)  # written by a round that never completed
            elif r > self._version.get(cid, -1):
                self._version[cid] = r


def _parse(name: str) -> tuple[int, int]:
    stem = name[len("client-") : -len(".safetensors")]
    cid, r = stem.split(".r")
    return int(cid), int(r)
