"""The federated protocol: the values that cross between server and clients, and the pure
functions both sides agree on (aggregation rules, client sampling, the learning-rate schedule,
injected faults). Below the methods, above the building blocks."""

from sparsefl.protocol.messages import (
    ClientData,
    ClientFailure,
    ClientResult,
    ClientState,
    ClientTask,
    LocalContext,
    Received,
    ServerState,
    StateDict,
    TaskConfig,
)

__all__ = [
    "ClientData",
    "ClientFailure",
    "ClientResult",
    "ClientState",
    "ClientTask",
    "LocalContext",
    "Received",
    "ServerState",
    "StateDict",
    "TaskConfig",
]
