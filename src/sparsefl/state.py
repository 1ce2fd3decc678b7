"""Plain state-dict helpers: canonical hashing, copying and atomic file writes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """A detached CPU copy of a state dict."""
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict in a canonical byte order.

    Names are sorted; for each tensor the hash takes its name, dtype, shape and its values as
    contiguous little-endian bytes. Two state dicts hash equal exactly when they hold the same
    names with bit-identical values.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    The bytes go to a temporary file in the same folder, are fsync'ed, and the file is renamed
    over ``path``; the folder is fsync'ed so the rename itself is durable.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _failpoint(path.name, f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (a full disk, an interrupt) leaves no temporary file
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def durable_append(path: str | Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync it (and the folder, when the file is new).

    A crash can leave a torn tail; readers of append-only logs must ignore an unterminated last
    record (the run folder's ``metrics.jsonl`` does, and resume truncates it to its checkpoint).
    """
    path = Path(path)
    new = not path.exists()
    with open(path, "ab") as f:
        _failpoint(path.name, f, data)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if new:
        _fsync_dir(path.parent)


_WRITES: dict[str, int] = {}


def _failpoint(name: str, f, data: bytes) -> None:  # type: ignore[no-untyped-def]
    """Test hook for crash safety: with ``SPARSEFL_KILL_DURING_WRITE=<file name>:<n>`` in the
    environment, the n-th atomic write (or append) of that file writes half its bytes, syncs
    them, and the process SIGKILLs itself, i.e. dies in the middle of the write."""
    spec = os.environ.get("SPARSEFL_KILL_DURING_WRITE")
    if not spec:
        return
    target, _, n = spec.rpartition(":")
    if target != name:
        return
    _WRITES[name] = _WRITES.get(name, 0) + 1
    if str(_WRITES[name]) == n:
        import signal

        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_state_file(path: str | Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict (a client's state) as safetensors, atomically. The tensors are written
    from contiguous copies, so keys that share one tensor are stored too (safetensors refuses
    tensors that share memory)."""
    from safetensors.torch import save

    copies = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    atomic_write_bytes(path, save(copies))


def read_state_file(path: str | Path) -> StateDict:
    """The state dict :func:`write_state_file` wrote."""
    from safetensors.torch import load_file

    return load_file(str(path))
