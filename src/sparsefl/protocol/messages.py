"""Every value that crosses between the server, the methods and the clients.

Nothing here holds a live object: payloads are bytes, states are dicts of tensors, the rest are
numbers and strings. So the same messages work in-process, in worker processes and on Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sparsefl.comm import Update
from sparsefl.config import LocalConfig
from sparsefl.masks import Mask

#: A model's tensors by ``state_dict`` name.
StateDict = dict[str, torch.Tensor]

#: Per-client state kept between rounds (masks, skeletons, scores, personal weights).
ClientState = dict[str, torch.Tensor]

#: Client-state key prefix of the masks a client shares with the server (from its setup
#: payload, :meth:`sparsefl.methods.Method.known_masks`); the runtime keeps them.
KNOWN = "known/"

#: Per-task settings the server chooses for one client (sent as Flower sends a ConfigRecord).
TaskConfig = dict[str, bool | int | float | str]


@dataclass(frozen=True)
class ServerState:
    """Everything the server knows between rounds (checkpointed every round).

    ``params`` is the global state_dict; ``mask`` the global mask if the method has one;
    ``extra`` holds method-owned tensors (server optimiser state, per-client skeletons, ...).
    """

    round: int
    params: StateDict
    mask: Mask | None = None
    extra: StateDict = field(default_factory=dict)


@dataclass(frozen=True)
class LocalContext:
    """What a client knows about its current round: who and when it is, the round's learning
    rate, the local-training settings, its sample count and the server's settings for its task."""

    client_id: int
    round: int
    lr: float
    seed: int
    local: LocalConfig
    num_examples: int
    config: Mapping[str, bool | int | float | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Received:
    """A client's decoded upload, as the server's aggregation sees it."""

    client_id: int
    update: Update
    num_examples: int


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not return a usable result this round, and why."""

    client_id: int
    reason: str


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
    ``lr`` is the round's learning rate (the schedule lives on the server); ``config`` the
    method's settings for this task (:meth:`sparsefl.methods.Method.task_config`). ``fault``
    names an injected fault the client must simulate (``crash``, ``nan``, ``corrupt``,
    ``straggler``; see :mod:`sparsefl.protocol.faults`), decided by the server so every engine
    injects the same.
    """

    round: int
    client_id: int
    payload: bytes
    lr: float
    setup: bytes | None = None
    fault: str | None = None
    config: TaskConfig = field(default_factory=dict)

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
