"""Codecs: every update and model that crosses a link is encoded; its length is what is counted.

Interim version (a dense container over numpy's npz); the full codec layer replaces this
module's internals while keeping the public API below.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from sparsefl.errors import DecodeError
from sparsefl.registry import CODECS


@dataclass(frozen=True)
class Update:
    """A set of tensors to send: ``values[name]`` has the tensor's full shape; ``sent[name]`` is
    the bool mask of coordinates actually sent (absent = every coordinate). Unsent coordinates
    of ``values`` are ignored by the encoder and decode as zeros."""

    values: dict[str, torch.Tensor]
    sent: dict[str, torch.Tensor] = field(default_factory=dict)


@CODECS.register("float32")
class _Float32:
    """Dense float32 values (interim container)."""


@CODECS.register("auto")
class _Auto:
    """The smallest lossless encoding per tensor (interim: dense float32)."""


def encode_update(update: Update, codec: str, *, known: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Encode a whole update as one payload."""
    buf = io.BytesIO()
    arrays = {}
    for k, v in update.values.items():
        arrays[k] = v.detach().numpy()
        if k in update.sent:
            arrays["__sent__" + k] = update.sent[k].numpy()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_update(
    data: bytes,
    spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    known: Mapping[str, torch.Tensor] | None = None,
    allow_nonfinite: bool = False,
) -> Update:
    """Decode and validate a payload against the receiver's ``spec``."""
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        values = {k: torch.from_numpy(z[k].copy()) for k in z.files if not k.startswith("__sent__")}
        sent = {k[8:]: torch.from_numpy(z[k].copy()) for k in z.files if k.startswith("__sent__")}
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"malformed payload: {e}") from None
    for k, v in values.items():
        if k not in spec or tuple(v.shape) != tuple(spec[k][0]):
            raise DecodeError(f"unexpected tensor {k!r} of shape {tuple(v.shape)}")
        if v.is_floating_point() and not allow_nonfinite and not bool(torch.isfinite(v).all()):
            raise DecodeError(f"tensor {k!r} holds NaN or Inf")
    return Update(values, sent)
