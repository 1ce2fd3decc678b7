"""Codecs: every update and model that crosses a link is encoded; its length is what is counted.

An :class:`Update` (tensors plus, per tensor, the mask of coordinates actually sent) becomes
one message with :func:`encode_update` and comes back with :func:`decode_update`, which
validates everything against the receiver's expectations before returning fresh tensors.
The registered codecs (``sparsefl list codecs``; config keys ``comm.up`` and ``comm.down``):

========== ==================================================================== =========
name       per tensor                                                           lossless
========== ==================================================================== =========
float32    every coordinate as float32 (the baseline); sent mask beside         yes*
float16    every coordinate as float16; sent mask beside                        no
bfloat16   every coordinate as bfloat16; sent mask beside                       no
bitmask    1 bit per coordinate + sent values (float32)                         yes
coo        LEB128 varint index gaps + sent values (float32)                     yes
coo-rice   Golomb-Rice index gaps (near H(d) bits) + sent values (float32)      yes
sign       mask in its smallest layout + 1 sign bit per sent value (+-1 only)   yes
int8       mask in its smallest layout + int8 values with a per-tensor scale    no
auto       the smallest of the lossless encodings above, per tensor (default)   yes
========== ==================================================================== =========

\\* exact for float32, float16 and bfloat16 tensors; float64 is rounded to float32. The
sparse codecs and ``auto`` send values in the tensor's own precision: "float32" above is
the precision of a float32 tensor (a float16 tensor's values take 16 bits, a float64's 64).

A tensor without a ``sent`` mask is dense; every codec but the three dense ones may send it
as its nonzero support (a pruned model on the downlink) and the receiver gets the same dense
tensor back, with any -0.0 off the support as +0.0. Integer and bool tensors always travel
exactly. Masks the receiver already holds (``known``) are replaced by a 4-byte fingerprint.
A channel-structured mask (whole rows along dim 0 of a tensor with ndim >= 2, as FedSkel,
dynamic gating and channel pruning send) travels as its row flags, about one bit per row
(mask mode ``rows``), in every codec above but ``bitmask``, ``coo`` and ``coo-rice``.

The byte layout is documented in :mod:`sparsefl.comm.format`, the mask coders in
:mod:`sparsefl.comm.entropy`, the value formats and their error bounds in
:mod:`sparsefl.comm.values`, the codec policies in :mod:`sparsefl.comm.codecs`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sparsefl.comm.codecs import (
    BY_ID,
    Codec,
    decode_record,
    decode_tensor,
    encode_tensor,
    encode_tensor_parts,
    get_codec,
)
from sparsefl.comm.format import (
    CODE_DTYPES,
    CONTAINER_FIXED_BYTES,
    MaskMode,
    VFmt,
    container_header,
    name_record,
    open_container,
    read_header,
    read_name,
    varint_len,
)
from sparsefl.errors import DecodeError
from sparsefl.registry import CODECS

Tensor = torch.Tensor
Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Update:
    """A set of tensors to send.

    ``values[name]`` has the tensor's full shape; ``sent[name]`` is the bool mask of the
    coordinates actually sent (a name absent from ``sent`` means every coordinate: a dense
    tensor). Unsent coordinates of ``values`` are ignored by the encoder and decode as zeros.
    """

    values: dict[str, Tensor]
    sent: dict[str, Tensor] = field(default_factory=dict)


def encode_update(update: Update, codec: str | Codec, *, known: Mapping[str, Tensor] | None = None) -> bytes:
    """Encode a whole update as one message; ``len()`` of the result is the bytes on the wire.

    Parameters
    ----------
    update:
        The tensors and their sent masks.
    codec:
        A registered codec name applied to every tensor, or ``"auto"`` (smallest lossless
        encoding per tensor). Lossy codecs are used only when named here.
    known:
        Masks the receiver already holds, by name. A tensor whose sent mask equals
        ``known[name]`` is sent without its mask (4 bytes of fingerprint instead); the receiver
        must pass the same ``known`` to :func:`decode_update`.

    Returns
    -------
    bytes
        ``container header | (name record | tensor record) per tensor, by name | CRC32``.
        Its length is exactly ``CONTAINER_FIXED_BYTES + varint_len(count)`` plus, per tensor,
        ``varint_len(len(name)) + len(name) + len(encode_tensor(...))`` (names in UTF-8).

    Raises
    ------
    ValueError
        A malformed update (a mask for an absent tensor, a non-bool mask, a shape mismatch)
        or a codec that cannot represent a tensor (the message names both).
    """
    c = get_codec(codec)
    extra = [n for n in update.sent if n not in update.values]
    if extra:
        raise ValueError(f"update has sent masks for tensors it does not contain: {extra}")
    known = known or {}
    names = sorted(update.values)
    parts = [container_header(len(names))]
    for name in names:
        parts.append(name_record(name))
        parts += encode_tensor_parts(update.values[name], update.sent.get(name), c, known=known.get(name), name=name)
    crc = 0
    for p in parts:  # the CRC of the concatenation, without building it twice
        crc = zlib.crc32(p, crc)
    parts.append(crc.to_bytes(4, "little"))
    return b"".join(parts)


def decode_update(
    data: bytes,
    spec: Spec,
    *,
    known: Mapping[str, Tensor] | None = None,
    allow_nonfinite: bool = False,
) -> Update:
    """Decode and validate a message from :func:`encode_update`.

    Parameters
    ----------
    data:
        The message.
    spec:
        What the receiver expects: ``name -> (shape, dtype)``. Every tensor in the message must
        be named here with this exact shape; values come back in this dtype (floating values
        convert between floating dtypes, integers between integer dtypes, range-checked).
        Names of the spec absent from the message are allowed (a partial update).
    known:
        The masks the receiver shares with the sender (see :func:`encode_update`).
    allow_nonfinite:
        Accept NaN and infinite values (rejected by default).

    Returns
    -------
    Update
        Fresh tensors; ``sent`` holds a mask for every tensor not sent densely.

    Raises
    ------
    DecodeError
        On anything malformed or unexpected: wrong magic, version or checksum, truncation or
        trailing bytes, unknown or duplicate names, a shape or dtype the spec does not allow,
        inconsistent counts, out-of-range indices, a known mask the receiver lacks or holds
        differently, non-finite values. Nothing is returned unless everything decoded.
    """
    r, count = open_container(data)
    known = known or {}
    values: dict[str, Tensor] = {}
    sent: dict[str, Tensor] = {}
    prev: str | None = None
    for i in range(count):
        r.where = f"tensor #{i}"
        name = read_name(r)
        r.where = f"tensor {name!r}"
        if prev is not None and name <= prev:
            raise r.fail("tensor names are duplicated or out of order")
        prev = name
        if name not in spec:
            raise r.fail("not a tensor the receiver expects")
        shape, dtype = spec[name]
        v, m = decode_record(
            r, tuple(int(s) for s in shape), dtype, known=known.get(name), allow_nonfinite=allow_nonfinite
        )
        values[name] = v
        if m is not None:
            sent[name] = m
    if r.remaining():
        r.where = "message"
        raise r.fail(f"{r.remaining()} bytes after the last tensor record")
    return Update(values, sent)


@dataclass(frozen=True)
class TensorInfo:
    """Where the bytes of one tensor went (from :func:`describe`).

    ``name_nbytes + header_nbytes + mask_nbytes + value_nbytes`` is the tensor's share of
    the message; the rest is the container (:data:`CONTAINER_FIXED_BYTES` + count varint).
    """

    name: str
    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    mask_mode: str
    value_format: str
    nnz: int
    name_nbytes: int
    header_nbytes: int
    mask_nbytes: int
    value_nbytes: int

    @property
    def nbytes(self) -> int:
        """All bytes of this tensor in the message."""
        return self.name_nbytes + self.header_nbytes + self.mask_nbytes + self.value_nbytes


def describe(data: bytes) -> list[TensorInfo]:
    """The byte breakdown of a message without decoding its values (checksum still checked).

    Useful to report mask bytes and value bytes separately; raises DecodeError like
    :func:`decode_update` on a malformed container or header.
    """
    r, count = open_container(data)
    out = []
    for i in range(count):
        r.where = f"tensor #{i}"
        start = r.pos
        name = read_name(r)
        mid = r.pos
        h = read_header(r)
        hdr = r.pos - mid
        r.take(h.mask_len, "mask section")
        r.take(h.value_len, "value section")
        codec = BY_ID.get(h.codec)
        out.append(
            TensorInfo(
                name=name,
                codec=codec.name if codec else f"#{h.codec}",
                dtype=CODE_DTYPES[h.dtype],
                shape=h.shape,
                mask_mode=MaskMode(h.mode).name.lower(),
                value_format=VFmt(h.vfmt).name.lower(),
                nnz=h.nnz,
                name_nbytes=mid - start,
                header_nbytes=hdr,
                mask_nbytes=h.mask_len,
                value_nbytes=h.value_len,
            )
        )
    if r.remaining():
        raise DecodeError(f"{r.remaining()} bytes after the last tensor record")
    return out


def update_nbytes(update: Update, codec: str | Codec, *, known: Mapping[str, Tensor] | None = None) -> int:
    """Bytes on the wire of ``update`` with ``codec``: ``len(encode_update(...))``."""
    return len(encode_update(update, codec, known=known))


def container_nbytes(count: int) -> int:
    """Bytes of a message that are not in any tensor's share: magic, version, count, CRC."""
    return CONTAINER_FIXED_BYTES + varint_len(count)


def spec_of(tensors: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The decode spec ``name -> (shape, dtype)`` matching a state dict or update values."""
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def codec_names() -> list[str]:
    """Names of the registered codecs."""
    return CODECS.names()


__all__ = [
    "Codec",
    "TensorInfo",
    "Update",
    "codec_names",
    "container_nbytes",
    "decode_tensor",
    "decode_update",
    "describe",
    "encode_tensor",
    "encode_update",
    "get_codec",
    "spec_of",
    "update_nbytes",
]
