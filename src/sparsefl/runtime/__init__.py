"""The client and server runtime: one client's round and the one local training loop
(:mod:`.client`), the client-state store (:mod:`.store`) and the one server round loop
(:mod:`.server`). Engines only carry tasks between the two."""

from sparsefl.runtime.client import ClientDataSource, execute_task, iter_batches, run_client, train_local, train_step
from sparsefl.runtime.server import Engine, RoundFailed, RoundRecord, Server
from sparsefl.runtime.store import ClientStateStore

__all__ = [
    "ClientDataSource",
    "ClientStateStore",
    "Engine",
    "RoundFailed",
    "RoundRecord",
    "Server",
    "execute_task",
    "iter_batches",
    "run_client",
    "train_local",
    "train_step",
]
