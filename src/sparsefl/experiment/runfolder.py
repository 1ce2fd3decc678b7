"""The run folder: a contract other tools and our benchmarks read.

``config.json`` (resolved config), ``metrics.jsonl`` (one object per round), ``summary.json``,
``model.safetensors`` and ``mask.safetensors`` (final global model and its mask),
``checkpoint.pt`` (+ ``checkpoint.prev.pt``) for resuming, and SVG plots. Every file is written
atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sparsefl.config import ExperimentConfig, config_hash, to_dict
from sparsefl.errors import RunFolderError
from sparsefl.state import atomic_write_bytes, atomic_write_text, durable_append

CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint.prev.pt"
_MAGIC = b"SFLCKPT1"


class RunFolder:
    """Reads and writes one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- config ownership -------------------------------------------------------------------------
    def claim(self, cfg: ExperimentConfig) -> str:
        """Create the folder for ``cfg`` or check that it already belongs to ``cfg``.

        Returns ``"new"``, ``"resume"`` (a checkpoint exists) or ``"finished"``. A folder that
        holds a different configuration is refused.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp-*"):  # left by a write that was killed midway
            stale.unlink(missing_ok=True)
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            try:
                old = json.loads(cfg_file.read_text())
            except json.JSONDecodeError:
                raise RunFolderError(
                    f"{cfg_file} is not valid JSON; remove the folder or choose another --out"
                ) from None
            if old.get("_config_hash") != config_hash(cfg):
                raise RunFolderError(
                    f"{self.path} holds a run with a different configuration; "
                    "choose another --out, or pass --force to overwrite it"
                )
            if (self.path / "summary.json").exists():
                return "finished"
            has_ckpt = any((self.path / n).exists() for n in (CHECKPOINT, PREV_CHECKPOINT))
            return "resume" if has_ckpt else "new"
        atomic_write_text(cfg_file, json.dumps({**to_dict(cfg), "_config_hash": config_hash(cfg)}, indent=2))
        return "new"

    def reset(self) -> None:
        """Remove a previous run's files (``--force``)."""
        for name in (
            "config.json",
            "metrics.jsonl",
            "summary.json",
            CHECKPOINT,
            PREV_CHECKPOINT,
            "model.safetensors",
            "mask.safetensors",
            "accuracy_vs_round.svg",
            "accuracy_vs_uplink.svg",
            "accuracy_vs_round.png",  # plots of runs written by versions that drew PNG
            "accuracy_vs_uplink.png",
        ):
            (self.path / name).unlink(missing_ok=True)
        for states in ("clients", "flower-clients"):
            shutil.rmtree(self.path / states, ignore_errors=True)

    # -- metrics ----------------------------------------------------------------------------------
    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` with exactly ``records`` (atomic): at the start of a run, or
        of a resume (dropping rounds written after the checkpoint it resumes from)."""
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's line to ``metrics.jsonl`` (fsync'ed before the round's checkpoint).

        Appended, not rewritten: rewriting the whole file every round costs O(rounds) per round,
        9 ms at round 20 of the default run and 42 ms at round 200.
        """
        durable_append(self.path / "metrics.jsonl", (json.dumps(record) + "\n").encode())

    def read_metrics(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Every complete line of ``metrics.jsonl``, or the first ``limit`` (a torn last line,
        from a crash or a write in progress, is left out; lines past ``limit`` are not parsed)."""
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        text = p.read_text()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        lines = [line for line in text.splitlines() if line.strip()]
        return [json.loads(line) for line in lines[:limit]]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))

    def read_summary(self) -> dict[str, Any] | None:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.exists() else None

    def read_config(self) -> dict[str, Any] | None:
        p = self.path / "config.json"
        return json.loads(p.read_text()) if p.exists() else None

    # -- checkpoints ------------------------------------------------------------------------------
    def write_checkpoint(self, data: bytes) -> None:
        """Atomically write checkpoint bytes (:func:`checkpoint_bytes`), keeping the previous
        checkpoint as a fallback."""
        cur = self.path / CHECKPOINT
        if cur.exists():
            cur.replace(self.path / PREV_CHECKPOINT)
        atomic_write_bytes(cur, data)

    def _read_checkpoint(self, path: Path) -> dict[str, Any] | None:
        if not path.exists():
            return None
        raw = path.read_bytes()
        if len(raw) < 40 or raw[:8] != _MAGIC or hashlib.sha256(raw[40:]).digest() != raw[8:40]:
            return None
        return torch.load(io.BytesIO(raw[40:]), weights_only=True)

    def good_checkpoints(self) -> Iterator[dict[str, Any]]:
        """The checkpoints whose hash verifies, newest first (each read when reached)."""
        for name in (CHECKPOINT, PREV_CHECKPOINT):
            ck = self._read_checkpoint(self.path / name)
            if ck is not None:
                yield ck

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint whose hash verifies (the previous one if the newest is damaged)."""
        return next(self.good_checkpoints(), None)

    def damaged_checkpoints(self) -> list[str]:
        """Names of checkpoint files present whose hash does not verify."""
        return [
            n
            for n in (CHECKPOINT, PREV_CHECKPOINT)
            if (self.path / n).exists() and self._read_checkpoint(self.path / n) is None
        ]


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """A checkpoint file's content: 8-byte magic, 32-byte SHA-256 of the body, body
    (``torch.save`` of ``payload``). Serialising is separate from writing so that the writing can
    happen later, in another thread, while the tensors move on."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    return _MAGIC + hashlib.sha256(body).digest() + body
