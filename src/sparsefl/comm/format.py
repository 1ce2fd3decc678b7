"""The wire format: container, per-tensor header, field codes and a bounds-checked reader.

Everything that crosses a link is one *message*: ``magic | version | count | (name record |
tensor record) per tensor | crc32``. A tensor record is a header (codec, dtype, value format,
mask mode, flags, codec parameter, shape, nnz and the byte lengths of its two sections), then
its mask section and its value section. ``docs/wire-format.md`` gives every field's bytes and
every code's meaning; the codes themselves are :class:`MaskMode`, :class:`VFmt` and
:data:`DTYPE_CODES`.

The format's rules:

* All integers are little-endian; varints are unsigned LEB128, accepted only in their
  canonical (shortest) form, and names are sorted and distinct, so an update has exactly one
  encoding and a duplicated name is a decode error.
* The CRC32 trailer turns any corruption of up to 32 consecutive bits (and all but 2**-32 of
  the rest) into a :class:`DecodeError` before any field is interpreted; the structural checks
  behind it still reject every inconsistent message on their own (``benchmarks/codec_fuzz.py``
  re-seals mutated messages to prove it).
* Every length is explicit, so a record can be skipped without decoding it
  (:func:`sparsefl.comm.describe` does) and over-long or truncated sections are detected exactly.
* Version 1 grows only by new codes (such as mask mode ROWS), never by a new meaning of an old
  one: a reader that lacks a code rejects it as a DecodeError and never misreads it.
"""

from __future__ import annotations

import functools
import zlib
from enum import IntEnum
from typing import NamedTuple

import torch

from sparsefl.errors import DecodeError

MAGIC = b"SFLW"
CONTAINER_VERSION = 1
TENSOR_MAGIC = b"ST"
TENSOR_VERSION = 1
#: Largest tensor (in coordinates) the format carries; bounds every index and count so that
#: the decoder's integer arithmetic cannot overflow int64.
MAX_NUMEL = 2**31 - 1
#: Most dimensions a tensor may have.
MAX_NDIM = 32
#: Longest tensor name in UTF-8 bytes.
MAX_NAME_BYTES = 4096
#: Size of the container's fixed parts: magic, version (the count varint comes on top) and CRC.
CONTAINER_FIXED_BYTES = len(MAGIC) + 1 + 4
#: Size of the tensor header's fixed part (magic .. ndim).
TENSOR_FIXED_BYTES = 10


class MaskMode(IntEnum):
    """How the mask section encodes which coordinates carry a value."""

    NONE = 0  #: no mask: every coordinate carries a value (a dense tensor)
    FULL = 1  #: a mask that is all True; zero bytes
    EMPTY = 2  #: a mask that is all False; zero bytes
    KNOWN = 3  #: the receiver's ``known`` mask; 4 bytes: CRC32 of its packed bits
    BITMASK = 4  #: one bit per coordinate, MSB first, zero padding
    COO = 5  #: LEB128 varints of index gaps (index - previous index - 1)
    RICE = 6  #: Golomb-Rice-coded gaps of the True positions
    RICE_INV = 7  #: Golomb-Rice-coded gaps of the False positions (density above 1/2)
    ROWS = 8  #: flags of whole rows along dim 0 (packed bits, or Rice gaps when param > 0)


class VFmt(IntEnum):
    """How the value section encodes the values."""

    F32 = 1  #: IEEE float32, 4 bytes each
    F16 = 2  #: IEEE float16, 2 bytes each
    BF16 = 3  #: bfloat16 (upper half of a float32), 2 bytes each
    F64 = 4  #: IEEE float64, 8 bytes each
    I8 = 5  #: float32 scale, then one int8 in [-127, 127] each; value = q * scale
    SIGN = 6  #: one bit each, MSB first, zero padding: 1 -> +1, 0 -> -1
    INT = 7  #: zigzag LEB128 varints of int64 (integer and bool tensors, exact)


FLAG_SUPPORT = 1
FLAG_DENSE_VALUES = 2
FLAGS_ALL = FLAG_SUPPORT | FLAG_DENSE_VALUES

#: Wire codes of the tensor dtypes; never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bool: 1,
    torch.uint8: 2,
    torch.int8: 3,
    torch.int16: 4,
    torch.int32: 5,
    torch.int64: 6,
    torch.float16: 7,
    torch.bfloat16: 8,
    torch.float32: 9,
    torch.float64: 10,
}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


def dtype_kind(dtype: torch.dtype) -> str:
    """``"float"``, ``"int"`` or ``"bool"``: dtypes convert only within one kind on decode."""
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    """Canonical unsigned LEB128 encoding of ``value`` (>= 0)."""
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_len(value: int) -> int:
    """Length in bytes of :func:`varint` of ``value``."""
    return max(1, (int(value).bit_length() + 6) // 7)


class TensorHeader(NamedTuple):
    """The fields of one tensor record's header (layout: ``docs/wire-format.md``).

    A named tuple, not a frozen dataclass: one is built per decoded tensor, and a dataclass's
    construction would cost a third of the header parse."""

    codec: int
    dtype: int
    vfmt: VFmt
    mode: MaskMode
    flags: int
    param: int
    shape: tuple[int, ...]
    nnz: int
    mask_len: int
    value_len: int

    def to_bytes(self) -> bytes:
        """The header as written on the wire."""
        fixed = TENSOR_MAGIC + bytes(
            [
                TENSOR_VERSION,
                self.codec,
                self.dtype,
                int(self.vfmt),
                int(self.mode),
                self.flags,
                self.param,
                len(self.shape),
            ]
        )
        rest = b"".join(varint(d) for d in self.shape)
        return fixed + rest + varint(self.nnz) + varint(self.mask_len) + varint(self.value_len)

    def nbytes(self) -> int:
        """Length of :meth:`to_bytes` without building it."""
        return (
            TENSOR_FIXED_BYTES
            + sum(varint_len(d) for d in self.shape)
            + varint_len(self.nnz)
            + varint_len(self.mask_len)
            + varint_len(self.value_len)
        )


def container_header(count: int) -> bytes:
    """Magic, version and tensor count: the first bytes of every message."""
    return MAGIC + bytes([CONTAINER_VERSION]) + varint(count)


@functools.lru_cache(maxsize=4096)
def name_record(name: str) -> bytes:
    """``name_len varint | UTF-8 name``; raises ValueError for a name the format cannot carry.
    Remembered: a model's names are the same in every message."""
    if not isinstance(name, str):
        raise ValueError(f"tensor names must be str, got {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"tensor name {name!r} is not valid UTF-8 text: {e}") from None
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return varint(len(raw)) + raw


try:  # zlib-ng's CRC-32 (a dependency; the same checksum): about 15x faster than zlib's
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - without it, zlib's
    _crc32 = zlib.crc32


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The CRC-32 of ``data`` (zlib's checksum, ``zlib.crc32``), continuing from ``value``.

    Computed by zlib-ng when it is installed: 4 us against zlib's 55 us for a 210 kB message,
    which saves about 0.1 ms of every message a round encodes or decodes in the default run."""
    return _crc32(data, value)


def seal(body: bytes) -> bytes:
    """Append the CRC32 trailer to a message body."""
    return body + crc32(body).to_bytes(4, "little")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class Reader:
    """A cursor over ``data[pos:end]`` whose every read is bounds-checked.

    Each read names the field it is for, so that a truncated or malformed payload raises a
    :class:`DecodeError` saying where it broke ("truncated in tensor 'fc.weight' shape[1]").
    """

    __slots__ = ("data", "pos", "end", "where")

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.pos = pos
        self.end = len(data) if end is None else end
        self.where = "message"

    def fail(self, what: str) -> DecodeError:
        """A DecodeError about ``what``, located at the current position."""
        return DecodeError(f"{self.where}: {what} (at byte {self.pos})")

    def u8(self, field: str) -> int:
        """One byte."""
        if self.pos >= self.end:
            raise self.fail(f"truncated: missing {field}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int, field: str) -> bytes:
        """The next ``n`` bytes (as ``bytes``)."""
        if n > self.end - self.pos:
            raise self.fail(f"truncated: {field} needs {n} bytes, only {self.end - self.pos} remain")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def view(self, n: int, field: str) -> memoryview:
        """The next ``n`` bytes without copying them (valid while the message is)."""
        if n > self.end - self.pos:
            raise self.fail(f"truncated: {field} needs {n} bytes, only {self.end - self.pos} remain")
        out = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self, field: str, limit: int) -> int:
        """One canonical LEB128 varint no larger than ``limit``."""
        pos = self.pos
        if pos < self.end:  # fast path: most varints are one byte
            b = self.data[pos]
            if b < 0x80 and b <= limit:
                self.pos = pos + 1
                return b
        value = 0
        shift = 0
        max_bytes = varint_len(limit)
        for i in range(max_bytes):
            b = self.u8(field)
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise self.fail(f"{field} is not canonically encoded (trailing zero byte)")
                if value > limit:
                    raise self.fail(f"{field} = {value} exceeds the limit {limit}")
                return value
        raise self.fail(f"{field} is longer than {max_bytes} bytes (limit {limit})")

    def remaining(self) -> int:
        """Bytes left before ``end``."""
        return self.end - self.pos


def open_container(data: bytes | bytearray | memoryview) -> tuple[Reader, int]:
    """Check magic, version and CRC of a message; return a reader positioned at the first
    record (bounded before the CRC trailer) and the tensor count."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"a message is bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < CONTAINER_FIXED_BYTES + 1:
        raise DecodeError(
            f"message of {len(data)} bytes is shorter than the smallest valid message "
            f"({CONTAINER_FIXED_BYTES + 1} bytes)"
        )
    if data[:4] != MAGIC:
        raise DecodeError(f"wrong magic {data[:4]!r} (expected {MAGIC!r}): not a sparsefl message")
    if data[4] != CONTAINER_VERSION:
        raise DecodeError(f"unsupported message version {data[4]} (this build reads version {CONTAINER_VERSION})")
    stored = int.from_bytes(data[-4:], "little")
    crc = crc32(memoryview(data)[:-4])  # no copy of the body
    if stored != crc:
        raise DecodeError(
            f"checksum mismatch (stored {stored:#010x}, computed "
            f"{crc:#010x}): the message was corrupted, truncated or extended"
        )
    r = Reader(data, 5, len(data) - 4)
    count = r.varint("tensor count", MAX_NUMEL)
    return r, count


def read_name(r: Reader) -> str:
    """One name record."""
    n = r.varint("name length", MAX_NAME_BYTES)
    raw = r.take(n, "name")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise r.fail(f"tensor name is not valid UTF-8 ({e.reason})") from None


_VFMTS = frozenset(int(v) for v in VFmt)
_MODES = frozenset(int(m) for m in MaskMode)
#: the field a header truncated after ``i`` of its fixed bytes misses
_FIXED_FIELDS = ("tensor magic",) * 2 + ("tensor version", "codec id", "dtype code", "value format", "mask mode")
_FIXED_FIELDS += ("flags", "codec parameter", "ndim")


def read_header(r: Reader) -> TensorHeader:
    """Parse one tensor header, checking every code is known (not yet its consistency)."""
    left = r.end - r.pos
    if left < TENSOR_FIXED_BYTES:
        r.pos = r.end
        raise r.fail(f"truncated: missing {_FIXED_FIELDS[left]}")
    fixed = r.data[r.pos : r.pos + TENSOR_FIXED_BYTES]  # one slice for the 10 fixed bytes
    magic, version, codec, dtype, vfmt, mode, flags, param, ndim = fixed[:2], *fixed[2:]
    if magic != TENSOR_MAGIC:
        raise r.fail(f"wrong tensor magic {bytes(magic)!r} (expected {TENSOR_MAGIC!r})")
    if version != TENSOR_VERSION:
        raise r.fail(f"unsupported tensor version {version} (this build reads {TENSOR_VERSION})")
    if dtype not in CODE_DTYPES:
        raise r.fail(f"unknown dtype code {dtype}")
    if vfmt not in _VFMTS:
        raise r.fail(f"unknown value format {vfmt}")
    if mode not in _MODES:
        raise r.fail(f"unknown mask mode {mode}")
    if flags & ~FLAGS_ALL:
        raise r.fail(f"unknown flag bits {flags:#04x}")
    if ndim > MAX_NDIM:
        raise r.fail(f"ndim {ndim} exceeds {MAX_NDIM}")
    r.pos += TENSOR_FIXED_BYTES
    shape = tuple(r.varint(f"shape[{i}]", MAX_NUMEL) for i in range(ndim))
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_NUMEL:
            raise r.fail(f"shape {shape} has more than {MAX_NUMEL} elements")
    nnz = r.varint("nnz", MAX_NUMEL)
    mask_len = r.varint("mask length", 1 << 40)
    value_len = r.varint("value length", 1 << 40)
    return TensorHeader(codec, dtype, VFmt(vfmt), MaskMode(mode), flags, param, shape, nnz, mask_len, value_len)


def field_spans(data: bytes) -> list[tuple[str, int, int]]:
    """``(field, start, end)`` byte spans of every header field of a valid message.

    For diagnostics (a hex dump that names the bytes) and for fuzzing header fields. Header
    fields are ``"<name>.<field>"`` (``magic``, ``version``, ``codec``, ``dtype``, ``vfmt``,
    ``mode``, ``flags``, ``param``, ``ndim``, ``shape[i]``, ``nnz``, ``mask_len``,
    ``value_len``); the sections are ``"<name>.mask_section"`` / ``"<name>.value_section"``
    and are skipped, not decoded.
    """
    r, count = open_container(data)
    spans = [("magic", 0, 4), ("version", 4, 5), ("count", 5, r.pos)]
    for _ in range(count):
        s = r.pos
        name = read_name(r)
        spans.append(("name", s, r.pos))
        s = r.pos
        r.take(2, "tensor magic")
        spans.append((f"{name}.magic", s, s + 2))
        labels = ["version", "codec", "dtype", "vfmt", "mode", "flags", "param", "ndim"]
        for i, lab in enumerate(labels):
            spans.append((f"{name}.{lab}", s + 2 + i, s + 3 + i))
        r.pos = s
        h = read_header(r)
        p = s + TENSOR_FIXED_BYTES
        for i, d in enumerate(h.shape):
            spans.append((f"{name}.shape[{i}]", p, p + varint_len(d)))
            p += varint_len(d)
        for lab, v in (("nnz", h.nnz), ("mask_len", h.mask_len), ("value_len", h.value_len)):
            spans.append((f"{name}.{lab}", p, p + varint_len(v)))
            p += varint_len(v)
        spans.append((f"{name}.mask_section", p, p + h.mask_len))
        spans.append((f"{name}.value_section", p + h.mask_len, p + h.mask_len + h.value_len))
        r.pos = p + h.mask_len + h.value_len
    spans.append(("crc32", len(data) - 4, len(data)))
    return spans
