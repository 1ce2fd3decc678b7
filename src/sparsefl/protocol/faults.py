"""Seeded fault injection: the server decides, the client runtime simulates.

Each sampled client in each round attempt draws at most one fault from a generator derived
from ``(seed, "faults", round, attempt, client)``, so the same configuration injects the same
faults on every engine and on resume. The client runtime then:

* ``crash``: raises :class:`InjectedFault` before training;
* ``nan``: trains, then poisons its update with NaN (the server's strict decoder rejects it);
* ``corrupt``: trains, then flips bytes of its encoded payload (the decoder rejects it);
* ``straggler``: trains, and reports ``faults.straggler_seconds`` more time; the server drops
  it when that exceeds ``federation.client_timeout`` (simulated, so runs stay deterministic).
"""

from __future__ import annotations

import torch

from sparsefl.config import FaultsConfig
from sparsefl.errors import SparseflError
from sparsefl.rng import np_rng

KINDS = ("crash", "nan", "corrupt", "straggler")


class InjectedFault(SparseflError):
    """A fault injected on purpose (``faults.crash_prob``)."""


def draw_fault(cfg: FaultsConfig, seed: int, rnd: int, attempt: int, client_id: int) -> str | None:
    """The fault (or None) for one client in one round attempt."""
    probs = (cfg.crash_prob, cfg.nan_prob, cfg.corrupt_prob, cfg.straggler_prob)
    if not any(probs):
        return None
    u = np_rng(seed, "faults", rnd, attempt, client_id).random()
    acc = 0.0
    for kind, p in zip(KINDS, probs):
        acc += p
        if u < acc:
            return kind
    return None


def poison(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``values`` with the first element of the first float tensor set to NaN."""
    out = dict(values)
    for name, t in values.items():
        if t.is_floating_point() and t.numel():
            t = t.detach().clone()
            t.view(-1)[0] = float("nan")
            out[name] = t
            break
    return out


def corrupt(payload: bytes, seed: int, rnd: int, client_id: int) -> bytes:
    """``payload`` with a few bytes flipped at seeded positions (header included)."""
    if not payload:
        return b"\xff"
    rng = np_rng(seed, "corrupt", rnd, client_id)
    b = bytearray(payload)
    for pos in rng.integers(0, len(b), size=min(8, len(b))):
        b[int(pos)] ^= 0xFF
    return bytes(b)
