"""sparsefl's plain messages as Flower records, and back.

The wire format of the adapter (content of a Flower ``Message`` of type ``train``):

instruction (ServerApp -> ClientApp)
    ``sparsefl.task`` (ConfigRecord): ``round``, ``client-id``, ``lr``, ``fault`` (``""`` = none),
    ``experiment`` (short config hash, see :func:`~sparsefl.apps.flower.options.experiment_sha`).
    ``sparsefl.config`` (ConfigRecord): the method's settings for this task, as they are.
    ``sparsefl.down`` (ArrayRecord): ``payload`` and, on a client's first participation,
    ``setup``; each one :class:`flwr.app.Array` of ``dtype="uint8"``, ``shape=(len,)``,
    ``stype="sparsefl/<codec>"`` whose ``data`` is exactly the bytes our codec produced.
reply (ClientApp -> ServerApp)
    ``sparsefl.up`` (ArrayRecord): ``payload``, the encoded update, tagged the same way.
    ``sparsefl.result`` (ConfigRecord): ``round``, ``client-id``, ``num-examples``, ``loss``,
    ``flops``, ``flops-dense``, ``seconds`` and ``metrics`` (the client's metrics as JSON, so
    their order and exact values survive).
    A client that fails replies with a Flower ``Error`` whose reason starts with ``sparsefl:``.

So the bytes Flower carries for an update are ``len(payload)`` plus the Array key:
``ArrayRecord.count_bytes()`` of a reply is ``len(payload) + len("payload")`` (Flower counts
data and keys), and the serialized objects add a fixed header per Array (dtype, shape, stype).
Payloads never pass through NumPy; a custom ``stype`` makes ``Array.numpy()`` refuse them.

Per-client state (masks, skeletons, scores) is kept as one ArrayRecord per client in the
node's ``context.state``, under ``sparsefl.client.<id>``; each tensor is stored raw
(``stype="sparsefl/torch"``, ``dtype`` the torch dtype name) so every dtype, bfloat16 and bool
included, comes back bit for bit.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from sparsefl.protocol.messages import ClientResult, ClientState, ClientTask

TASK = "sparsefl.task"
DOWN = "sparsefl.down"
UP = "sparsefl.up"
RESULT = "sparsefl.result"
CONFIG = "sparsefl.config"
STATE_PREFIX = "sparsefl.client."
STYPE_PREFIX = "sparsefl/"
TORCH_STYPE = "sparsefl/torch"
#: Reasons of the ``Error`` replies a sparsefl ClientApp sends start with this.
ERROR_PREFIX = "sparsefl: "


def bytes_array(data: bytes, codec: str) -> Array:
    """One encoded payload as a Flower Array, tagged with the codec that produced it."""
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE_PREFIX + codec, data=bytes(data))


def array_bytes(arr: Array, what: str) -> bytes:
    """The payload bytes of an Array made by :func:`bytes_array` (ValueError otherwise)."""
    if not arr.stype.startswith(STYPE_PREFIX) or arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
        raise ValueError(
            f"{what}: expected a sparsefl payload Array (uint8, stype sparsefl/<codec>), got "
            f"dtype={arr.dtype} shape={tuple(arr.shape)} stype={arr.stype}"
        )
    return bytes(arr.data)


def task_content(task: ClientTask, codec: str, experiment: str) -> RecordDict:
    """The content of the instruction for ``task``."""
    down = ArrayRecord()
    down["payload"] = bytes_array(task.payload, codec)
    if task.setup is not None:
        down["setup"] = bytes_array(task.setup, codec)
    meta = ConfigRecord(
        {
            "round": task.round,
            "client-id": task.client_id,
            "lr": float(task.lr),
            "fault": task.fault or "",
            "experiment": experiment,
        }
    )
    return RecordDict({TASK: meta, DOWN: down, CONFIG: ConfigRecord(dict(task.config))})


def task_from_content(content: RecordDict) -> tuple[ClientTask, str]:
    """The task and the experiment identity carried by an instruction."""
    meta = content.config_records[TASK]
    down = content.array_records[DOWN]
    setup = array_bytes(down["setup"], "setup") if "setup" in down else None
    fault = str(meta["fault"]) or None
    task = ClientTask(
        round=int(meta["round"]),  # type: ignore[arg-type]
        client_id=int(meta["client-id"]),  # type: ignore[arg-type]
        payload=array_bytes(down["payload"], "payload"),
        lr=float(meta["lr"]),  # type: ignore[arg-type]
        setup=setup,
        fault=fault,
        config=dict(content.config_records[CONFIG]) if CONFIG in content.config_records else {},
    )
    return task, str(meta["experiment"])


def result_content(result: ClientResult, codec: str) -> RecordDict:
    """The content of a successful reply (the client state stays on the node)."""
    up = ArrayRecord()
    up["payload"] = bytes_array(result.payload, codec)
    meta = ConfigRecord(
        {
            "round": result.round,
            "client-id": result.client_id,
            "num-examples": result.num_examples,
            "loss": float(result.loss),
            "flops": float(result.flops),
            "flops-dense": float(result.flops_dense),
            "seconds": float(result.seconds),
            "metrics": json.dumps(result.metrics),
        }
    )
    return RecordDict({UP: up, RESULT: meta})


def result_from_content(content: RecordDict) -> ClientResult:
    """The :class:`ClientResult` of a successful reply (``state`` empty: it lives on the node)."""
    meta = content.config_records[RESULT]
    metrics: dict[str, Any] = json.loads(str(meta["metrics"]))
    return ClientResult(
        round=int(meta["round"]),  # type: ignore[arg-type]
        client_id=int(meta["client-id"]),  # type: ignore[arg-type]
        payload=array_bytes(content.array_records[UP]["payload"], "payload"),
        num_examples=int(meta["num-examples"]),  # type: ignore[arg-type]
        loss=float(meta["loss"]),  # type: ignore[arg-type]
        flops=float(meta["flops"]),  # type: ignore[arg-type]
        flops_dense=float(meta["flops-dense"]),  # type: ignore[arg-type]
        seconds=float(meta["seconds"]),  # type: ignore[arg-type]
        metrics=metrics,
    )


# -- per-client state in context.state ----------------------------------------------------------------
def state_key(client_id: int) -> str:
    """The ``context.state`` key of one client's state."""
    return f"{STATE_PREFIX}{client_id}"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"client state: unknown torch dtype {name!r}")
    return dt


def state_to_record(state: ClientState) -> ArrayRecord:
    """A client state as an ArrayRecord of raw tensors (exact for every dtype)."""
    rec = ArrayRecord()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        rec[name] = Array(dtype=str(t.dtype), shape=tuple(int(s) for s in t.shape), stype=TORCH_STYPE, data=raw)
    return rec


def state_from_record(rec: ArrayRecord) -> ClientState:
    """The inverse of :func:`state_to_record` (fresh, writable tensors)."""
    out: ClientState = {}
    for name, arr in rec.items():
        if arr.stype != TORCH_STYPE:
            raise ValueError(f"client state {name!r}: stype {arr.stype!r}, expected {TORCH_STYPE!r}")
        dt = _dtype(arr.dtype)
        shape = tuple(arr.shape)
        if not arr.data:
            out[name] = torch.empty(shape, dtype=dt)
            continue
        flat = torch.frombuffer(bytearray(arr.data), dtype=torch.uint8).view(dt)
        out[name] = flat.reshape(shape).clone()
    return out


def load_state(state: RecordDict, client_id: int) -> ClientState:
    """Client ``client_id``'s state from a node's ``context.state`` (empty on first contact)."""
    key = state_key(client_id)
    if key not in state.array_records:
        return {}
    return state_from_record(state.array_records[key])


def save_state(state: RecordDict, client_id: int, client_state: ClientState) -> None:
    """Store client ``client_id``'s new state in a node's ``context.state``."""
    state[state_key(client_id)] = state_to_record(client_state)
