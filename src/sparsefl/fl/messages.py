"""The plain values that cross between server and clients.

Nothing here holds a live object: payloads are bytes, state is a dict of tensors, the rest are
numbers. So the same messages work in-process, in worker processes and on Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Per-client state kept between rounds (masks, skeletons, scores, personal weights).
ClientState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientData:
    """One client's local data: training tensors and an optional validation split."""

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None


@dataclass(frozen=True)
class ClientTask:
    """What the server sends one client in one round.

    ``payload`` is the encoded downlink (its length is the downlink bytes); ``setup`` is a
    one-time payload (e.g. a shared mask) sent only on the client's first participation.
    ``lr`` is the round's learning rate (the schedule lives on the server). ``fault`` names an
    injected fault the client must simulate (``crash``, ``nan``, ``corrupt``, ``straggler``;
    see :mod:`sparsefl.fl.faults`), decided by the server so every engine injects the same.
    """

    round: int
    client_id: int
    payload: bytes
    lr: float
    setup: bytes | None = None
    fault: str | None = None

    @property
    def downlink_bytes(self) -> int:
        """Bytes this task costs on the downlink."""
        return len(self.payload) + (len(self.setup) if self.setup else 0)


@dataclass(frozen=True)
class ClientResult:
    """What one client returns: the encoded update and what it cost.

    ``flops`` and ``flops_dense`` are the client's local-training FLOPs (effective and dense,
    forward + backward, see :mod:`sparsefl.accounting`); ``seconds`` is its wall-clock time.
    """

    round: int
    client_id: int
    payload: bytes
    num_examples: int
    loss: float
    flops: float
    flops_dense: float
    seconds: float
    state: ClientState = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uplink_bytes(self) -> int:
        """Bytes this result costs on the uplink."""
        return len(self.payload)
