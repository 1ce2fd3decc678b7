"""Divergence detection: a run whose training loss does not leave chance level is not learning.

A classifier that predicts the uniform distribution over ``C`` classes has a cross-entropy of
``ln C``; a training loss at or above it (within a tolerance) means the model has learnt nothing,
and a loss that stays there for several consecutive rounds almost always means a learning rate
that is too high (the updates overshoot and the loss settles at chance, or above it) or too low
(the weights barely move). The check is a pure function of the per-round training losses so the
runner can call it after every round and the tests can drive it with hand-made numbers; the
warning it returns goes into the round's ``metrics.jsonl`` record, the progress output and the
run summary, so that a diverged run is never mistaken for a slow one.

The rule: a round's training loss is the clients' losses weighted by their sample counts; the
run is *stalled* when the last ``rounds`` training losses are all ``>= (1 - tolerance) ln C``
(NaN counts as stalled) and fall by less than ``PROGRESS`` ln C across them. The warning is
raised on the round that completes the streak, once per streak.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Consecutive rounds at chance level before a warning.
STALL_ROUNDS = 5
#: How close to ``ln C`` (as a fraction of it) a loss counts as chance level.
STALL_TOLERANCE = 0.1
#: A fall of the loss across the streak of at least this fraction of ``ln C`` is progress.
PROGRESS = 0.02


def round_train_loss(clients: Sequence[Mapping[str, Any]]) -> float | None:
    """The round's training loss: the clients' ``loss`` weighted by ``num_examples`` (None when
    no client reported one)."""
    pairs = [(float(c["loss"]), float(c.get("num_examples") or 1)) for c in clients if c.get("loss") is not None]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    return sum(v * w for v, w in pairs) / total


def stalled(loss: float | None, num_classes: int, tolerance: float = STALL_TOLERANCE) -> bool:
    """Whether one round's training loss is at (or above) chance level, ``ln num_classes``."""
    if loss is None:
        return False
    return math.isnan(loss) or loss >= (1.0 - tolerance) * math.log(num_classes)


def _stuck(window: Sequence[float | None], num_classes: int, tolerance: float) -> bool:
    """Every loss of ``window`` at chance level, and no real progress across it: a run that
    starts slowly (or a method whose loss is not plain cross-entropy, such as distillation)
    falls by more than ``PROGRESS`` ln C over a few rounds and is learning."""
    if not all(stalled(v, num_classes, tolerance) for v in window):
        return False
    first, last = window[0], window[-1]
    if first is None or last is None or math.isnan(first) or math.isnan(last):
        return True
    return first - last < PROGRESS * math.log(num_classes)


def divergence_warning(
    losses: Sequence[float | None],
    num_classes: int,
    lr: float,
    *,
    rounds: int = STALL_ROUNDS,
    tolerance: float = STALL_TOLERANCE,
) -> str | None:
    """The warning for the last round of ``losses``, or None.

    Parameters
    ----------
    losses:
        The training loss of every round so far, round 1 first (None where unknown).
    num_classes:
        Classes of the task; chance level is ``ln num_classes``.
    lr:
        ``local.lr``, named in the warning as the likely cause.
    rounds, tolerance:
        A warning comes when the last ``rounds`` losses are ``>= (1 - tolerance) ln C`` and fall
        by less than ``PROGRESS`` ln C across them, on the round that completes such a streak
        (once per streak).
    """
    if num_classes < 2 or len(losses) < rounds:
        return None
    if not _stuck(losses[-rounds:], num_classes, tolerance):
        return None
    if len(losses) > rounds and _stuck(losses[-rounds - 1 : -1], num_classes, tolerance):
        return None  # the same streak was warned about a round ago
    last = losses[-rounds:]
    first = len(losses) - rounds + 1
    values = ", ".join("nan" if v is None or math.isnan(v) else f"{v:.2f}" for v in last)
    chance = math.log(num_classes)
    return (
        f"training loss has stayed at or above chance, ln({num_classes})={chance:.2f}, for {rounds} rounds "
        f"(rounds {first}-{len(losses)}: {values}): the learning rate (local.lr={lr:g}, "
        "or the method's own rate) is likely too high or too low"
    )
