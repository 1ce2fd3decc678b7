"""An optional TensorBoard log of a run (``log.tensorboard = true``; the ``tensorboard`` extra).

Each round's scalars from its ``metrics.jsonl`` record go to ``<run folder>/tensorboard``, one
tag per field, at the round as the step; ``tensorboard --logdir runs`` then shows every run.
The log only mirrors metrics.jsonl, which stays the record: a resumed run opens the log at its
first new round (``purge_step``), so TensorBoard hides what an interrupted attempt had logged
past the checkpoint. ``torch.utils.tensorboard`` is imported only when a log is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsefl.errors import ConfigError

#: Record fields logged, each as its own tag.
SCALARS = (
    "accuracy",
    "loss",
    "personal_accuracy",
    "val_accuracy",
    "uplink_bytes",
    "downlink_bytes",
    "train_flops",
    "train_flops_dense",
    "client_seconds",
    "round_seconds",
    "eval_seconds",
    "lr",
)


def require_tensorboard() -> None:
    """Raise ConfigError unless ``torch.utils.tensorboard`` imports (so a run asking for a log
    can be refused before it starts)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "log.tensorboard", True, "false, or true with the tensorboard package: pip install 'sparsefl[tensorboard]'"
        ) from None


class TensorBoardLog:
    """The TensorBoard event log of one run folder, opened at round ``first_round``."""

    def __init__(self, folder: str | Path, first_round: int = 1) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(folder) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.path), purge_step=first_round)

    def log(self, record: dict[str, Any]) -> None:
        """One round's scalars (fields that are unset that round, e.g. no evaluation, are skipped)."""
        for key in SCALARS:
            value = record.get(key)
            if value is not None:
                self._writer.add_scalar(key, float(value), global_step=int(record["round"]))
        self._writer.add_scalar("failures", float(len(record.get("failures", []))), global_step=int(record["round"]))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def write_tensorboard(folder: str | Path, records: list[dict[str, Any]]) -> Path:
    """Log ``records`` (a whole run's, from round 1) in one go; returns the log folder."""
    tb = TensorBoardLog(folder, first_round=1)
    try:
        for r in records:
            tb.log(r)
    finally:
        tb.close()
    return tb.path
