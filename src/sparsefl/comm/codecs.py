"""The registered codecs and the per-tensor encoder and decoder.

A codec is a *policy*: which mask layouts and which value format it may use. For each tensor
the encoder lists the encodings the policy allows, computes their exact sizes (without
building them) and writes the smallest; ties go to the first in a fixed order, so the same
input always gives the same bytes. Three mask modes cost nothing or nearly nothing and every
codec uses them when they apply: ``FULL`` (all sent), ``EMPTY`` (none sent) and ``KNOWN``
(the receiver already holds this exact mask; 4 bytes of CRC32 fingerprint are sent instead,
so a receiver whose copy differs gets a DecodeError rather than misplaced values).

Channel-structured masks (whole rows along dim 0 of a tensor with ndim >= 2 kept or dropped,
as FedSkel's skeleton filters, dynamic gating's used channels or pruned output channels send)
have the ``ROWS`` layout: only the per-row flags are sent, about ``C/8`` bytes for ``C`` rows
instead of about ``H(d)`` bits per coordinate. Every codec whose policy is "the mask in its
smallest layout" (the dense codecs for their ``sent`` mask, ``sign``, ``int8``, ``auto``) may
use it; ``bitmask``, ``coo`` and ``coo-rice`` stay the fixed-layout baselines their names say.

A tensor without a ``sent`` mask is dense. Dense codecs send it as is; every other codec also
considers sending only its nonzero coordinates with the *support* flag, which the receiver
decodes back to the same dense tensor, and uses that when it is smaller. Zeros come back as
+0.0: a -0.0 outside the support (``w * mask`` leaves one wherever a negative weight was
pruned) decodes as +0.0, which is equal as a number; every other value, NaN payloads
included, comes back bit for bit from the lossless codecs. This is what makes the downlink of a pruned model cheap.

Integer and bool tensors (e.g. BatchNorm's ``num_batches_tracked``) are always sent exactly,
as zigzag varints, whatever the codec; codecs choose the value format of floating tensors only.

Wire ids of the codecs are part of the format; never renumber them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from sparsefl.comm import values as V
from sparsefl.comm.entropy import (
    MAX_RICE_K,
    decode_varints,
    encode_varints,
    gaps_from_indices,
    indices_from_gaps,
    pack_bits,
    rice_best_k,
    rice_decode,
    rice_encode,
    rice_nbytes,
    unpack_bits,
    unzigzag_int,
    varint_sizes,
    zigzag_int,
)
from sparsefl.comm.format import (
    CODE_DTYPES,
    DTYPE_CODES,
    FLAG_DENSE_VALUES,
    FLAG_SUPPORT,
    MAX_NDIM,
    MAX_NUMEL,
    TENSOR_FIXED_BYTES,
    MaskMode,
    Reader,
    TensorHeader,
    VFmt,
    crc32,
    dtype_kind,
    read_header,
    varint,
)
from sparsefl.errors import DecodeError
from sparsefl.registry import CODECS

Tensor = torch.Tensor

#: Explicit mask layouts, in tie-breaking order. ``ROWS`` is last, so it wins only when strictly
#: smaller: a mask that another layout codes in as few bytes keeps its encoding without ROWS.
EXPLICIT = (MaskMode.BITMASK, MaskMode.RICE, MaskMode.RICE_INV, MaskMode.COO, MaskMode.ROWS)
_EXACT = {
    torch.float32: VFmt.F32,
    torch.float64: VFmt.F64,
    torch.float16: VFmt.F16,
    torch.bfloat16: VFmt.BF16,
}


class Codec:
    """Base class of the codecs; a codec is a policy over mask layouts and value formats.

    Attributes
    ----------
    name:
        The registry name (``comm.up`` / ``comm.down`` value).
    wire_id:
        The byte written in every tensor header.
    lossy:
        True when decoded floating values may differ from the sent ones.
    dense:
        True for dense codecs: one value per coordinate, the ``sent`` mask (if any) beside.
    layouts:
        The explicit mask layouts it may use (besides NONE, FULL, EMPTY and KNOWN); all of
        :data:`EXPLICIT`, ROWS included, unless the codec is defined by one layout.
    """

    name: ClassVar[str]
    wire_id: ClassVar[int]
    lossy: ClassVar[bool] = False
    dense: ClassVar[bool] = False
    layouts: ClassVar[tuple[MaskMode, ...]] = EXPLICIT
    fixed_format: ClassVar[VFmt | None] = None

    def formats(self, dtype: torch.dtype) -> tuple[VFmt, ...]:
        """Value formats it may use for a floating tensor of ``dtype``, in preference order."""
        assert self.fixed_format is not None
        return (self.fixed_format,)

    def encode(
        self,
        values: Tensor,
        sent: Tensor | None = None,
        *,
        known: Tensor | None = None,
        name: str = "tensor",
    ) -> bytes:
        """:func:`encode_tensor` with this codec."""
        return encode_tensor(values, sent, self, known=known, name=name)

    def __repr__(self) -> str:
        return f"<codec {self.name!r}>"


class Float32(Codec):
    """Dense float32: 4 bytes per coordinate (the uncompressed baseline), sent mask beside.

    Every coordinate's value is sent (unsent ones as 0, cast to float32: exact for float32,
    bfloat16 and float16 tensors); a tensor with a ``sent`` mask also carries the mask in its
    smallest lossless layout so the receiver knows what was sent.
    """

    name = "float32"
    wire_id = 1
    dense = True
    fixed_format = VFmt.F32


class Float16(Codec):
    """Dense float16 (lossy): 2 bytes per coordinate, round-to-nearest-even, sent mask beside.

    Relative error <= 2**-11 in the normal half range; a finite value beyond +-65504 raises
    ``ValueError`` rather than becoming infinite.
    """

    name = "float16"
    wire_id = 2
    dense = True
    lossy = True
    fixed_format = VFmt.F16


class BFloat16(Codec):
    """Dense bfloat16 (lossy): 2 bytes per coordinate, relative error <= 2**-8, mask beside."""

    name = "bfloat16"
    wire_id = 3
    dense = True
    lossy = True
    fixed_format = VFmt.BF16


class _Exact(Codec):
    """A codec that sends values in the tensor's own precision (lossless)."""

    def formats(self, dtype: torch.dtype) -> tuple[VFmt, ...]:
        return (_EXACT[dtype],)


class Bitmask(_Exact):
    """Bitmask + float32 values: 1 bit per coordinate, 32 bits per sent value (lossless).

    Values travel in the tensor's own precision (float32 for float32 tensors, 16 bits for
    half-precision ones, 64 for float64), as for ``coo`` and ``coo-rice``.
    """

    name = "bitmask"
    wire_id = 4
    layouts = (MaskMode.BITMASK,)


class Coo(_Exact):
    """Coordinate list + float32 values: LEB128 varints of the index gaps (lossless).

    Byte-aligned and simple (one to five bytes per sent coordinate); the baseline that
    ``coo-rice`` improves on with entropy coding.
    """

    name = "coo"
    wire_id = 5
    layouts = (MaskMode.COO,)


class CooRice(_Exact):
    """Entropy-coded coordinate list + float32 values: Golomb-Rice index gaps (lossless).

    The Rice parameter is chosen per tensor to minimise the size; above density 1/2 the gaps
    between *unsent* coordinates are coded instead. A random mask of density d costs within
    about 1% of H(d) bits per coordinate (see :mod:`sparsefl.comm.entropy`).
    """

    name = "coo-rice"
    wire_id = 6
    layouts = (MaskMode.RICE, MaskMode.RICE_INV)


class Sign(Codec):
    """Sign bits: 1 bit per sent value, which must be exactly +1 or -1 (sign supermasks).

    The mask goes in its smallest layout, or not at all when the receiver knows it
    (``known``): then the update costs one bit per kept weight. A dense tensor of values in
    {-1, 0, +1} is sent as its nonzero support plus signs. Any other value raises ValueError.
    """

    name = "sign"
    wire_id = 7
    fixed_format = VFmt.SIGN


class Int8(Codec):
    """Int8 values with a per-tensor float32 scale (lossy), mask in its smallest layout.

    ``scale = max|x| / 127``, ``q = round(x / scale)``; the error is at most half a step,
    ``0.5 * scale`` (plus float32 rounding). Zeros of a dense tensor stay exact zeros (sent as
    its support when that is smaller). NaN or infinite values raise ValueError.
    """

    name = "int8"
    wire_id = 8
    lossy = True
    fixed_format = VFmt.I8


class Auto(Codec):
    """Smallest lossless encoding per tensor (the default).

    Tries every mask layout (none, bitmask, varint and Rice coordinate lists, row flags for a
    channel-structured mask, known) with the
    tensor's own precision (float32 for float32 tensors; a half-precision tensor stays half,
    which is exact) and, when every sent value is exactly +-1, sign bits. Never lossy.
    """

    name = "auto"
    wire_id = 9

    def formats(self, dtype: torch.dtype) -> tuple[VFmt, ...]:
        return (_EXACT[dtype], VFmt.SIGN)


_ALL: tuple[Codec, ...] = (Float32(), Float16(), BFloat16(), Bitmask(), Coo(), CooRice(), Sign(), Int8(), Auto())
for _c in _ALL:
    CODECS.register(_c.name)(_c)
BY_ID: dict[int, Codec] = {c.wire_id: c for c in _ALL}


def get_codec(codec: str | Codec) -> Codec:
    """The codec named ``codec`` (ConfigError listing the valid names if unknown)."""
    return codec if isinstance(codec, Codec) else CODECS.get(codec)


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


def _source(values: Tensor, what: str) -> np.ndarray:
    """The values as a flat numpy array (a view when possible); bfloat16 widens to float32."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{what}: values must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype not in DTYPE_CODES:
        raise ValueError(
            f"{what}: dtype {values.dtype} is not supported (supported: {', '.join(str(d) for d in DTYPE_CODES)})"
        )
    if values.dim() > MAX_NDIM or values.numel() > MAX_NUMEL:
        raise ValueError(f"{what}: shape {tuple(values.shape)} is too large for the format")
    t = values.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().view(np.uint16)
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return t.numpy()


def _mask_array(mask: Tensor, shape: torch.Size, what: str) -> np.ndarray:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{what} must be a bool tensor, got {got}")
    if mask.shape != shape:
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, values have {tuple(shape)}")
    return mask.detach().to("cpu").contiguous().reshape(-1).numpy()


def known_fingerprint(known: np.ndarray) -> bytes:
    """CRC32 of a known mask's packed bits: 4 bytes that let the receiver check its copy."""
    return crc32(np.packbits(known)).to_bytes(4, "little")


def _row_flags(m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The per-row flags of a flat mask of ``shape`` if it is constant along every dimension
    but dim 0 (``None`` otherwise, or when ROWS cannot apply: ndim < 2 or no coordinates)."""
    if len(shape) < 2 or m.size == 0:
        return None
    m2 = m.reshape(shape[0], -1)
    first = m2[:, 0]
    # a cheap rejection first: an unstructured mask almost always differs in the second column
    if m2.shape[1] > 1 and not np.array_equal(m2[:, 1], first):
        return None
    if not np.array_equal(m2, np.broadcast_to(first[:, None], m2.shape)):
        return None
    return first.copy()


class _MaskInfo:
    """A flat bool mask with lazily computed indices and gaps (shared by the size estimates).

    ``shape`` is the tensor's shape; it only matters to the ROWS layout.
    """

    def __init__(self, m: np.ndarray, shape: tuple[int, ...] = ()) -> None:
        self.m = m
        self.n = int(m.size)
        self.nnz = int(np.count_nonzero(m))
        self.shape = shape
        self._gaps: dict[bool, np.ndarray] = {}
        self._k: dict[bool, int] = {}
        self._rows: tuple[np.ndarray | None, int, int] | None = None

    def rows(self) -> tuple[np.ndarray | None, int, int]:
        """``(row flags or None, Rice parameter + 1 or 0 for packed bits, section bytes)``."""
        if self._rows is None:
            flags = _row_flags(self.m, self.shape)
            if flags is None:
                self._rows = (None, 0, 0)
            else:
                packed = (flags.size + 7) // 8
                g = gaps_from_indices(np.flatnonzero(flags))
                k = rice_best_k(g)
                rice = rice_nbytes(g, k)
                self._rows = (flags, k + 1, rice) if rice < packed else (flags, 0, packed)
        return self._rows

    def gaps(self, inverse: bool = False) -> np.ndarray:
        if inverse not in self._gaps:
            where = np.flatnonzero(~self.m if inverse else self.m)
            self._gaps[inverse] = gaps_from_indices(where)
        return self._gaps[inverse]

    def rice_k(self, inverse: bool = False) -> int:
        if inverse not in self._k:
            self._k[inverse] = rice_best_k(self.gaps(inverse))
        return self._k[inverse]

    def lower_bound(self, mode: MaskMode) -> int:
        """A cheap lower bound on the layout's size (every code takes at least a bit/byte)."""
        if mode == MaskMode.BITMASK:
            return (self.n + 7) // 8
        if mode == MaskMode.RICE:
            return (self.nnz + 7) // 8
        if mode == MaskMode.RICE_INV:
            return (self.n - self.nnz + 7) // 8
        if mode == MaskMode.ROWS:
            return 0
        return self.nnz

    def size(self, mode: MaskMode) -> int:
        if mode == MaskMode.BITMASK:
            return (self.n + 7) // 8
        if mode in (MaskMode.RICE, MaskMode.RICE_INV):
            inv = mode == MaskMode.RICE_INV
            return rice_nbytes(self.gaps(inv), self.rice_k(inv))
        if mode == MaskMode.ROWS:
            return self.rows()[2]
        return int(varint_sizes(self.gaps()).sum())

    def encode(self, mode: MaskMode) -> tuple[bytes, int]:
        """``(mask section, Rice parameter)`` of an explicit layout."""
        if mode == MaskMode.BITMASK:
            return pack_bits(self.m), 0
        if mode == MaskMode.COO:
            return encode_varints(self.gaps()), 0
        if mode == MaskMode.ROWS:
            flags, param, _ = self.rows()
            assert flags is not None
            if param == 0:
                return pack_bits(flags), 0
            return rice_encode(gaps_from_indices(np.flatnonzero(flags)), param - 1), param
        inv = mode == MaskMode.RICE_INV
        k = self.rice_k(inv)
        return rice_encode(self.gaps(inv), k), k


def _best_explicit(info: _MaskInfo, allowed: Sequence[MaskMode], bound: int | None) -> tuple[MaskMode, int] | None:
    """The smallest explicit layout in ``allowed`` (``None`` if none beats ``bound`` bytes).

    ROWS, when it applies, is sized first: it is tiny, so its size prunes the costlier
    estimates of the general layouts, which still win a tie (they come first in EXPLICIT).
    """
    rows: tuple[MaskMode, int] | None = None
    if MaskMode.ROWS in allowed and info.rows()[0] is not None:
        size = info.size(MaskMode.ROWS)
        if bound is None or size < bound:
            rows = (MaskMode.ROWS, size)
    best: tuple[MaskMode, int] | None = None
    for mode in EXPLICIT:
        if mode not in allowed or mode == MaskMode.ROWS:
            continue
        limit = best[1] if best else (rows[1] + 1 if rows else bound)
        if limit is not None and info.lower_bound(mode) >= limit:
            continue
        size = info.size(mode)
        if limit is None or size < limit:
            best = (mode, size)
    if rows is not None and (best is None or rows[1] < best[1]):
        best = rows
    return best


@dataclass(frozen=True)
class _Cand:
    """One candidate encoding: its mask mode, flags, value format and which values it sends."""

    mode: MaskMode
    flags: int
    vfmt: VFmt
    mask_nbytes: int
    values: str  # "all", "mask" (the mask's True entries), "known", or "dense" (zeros off-mask)


def _candidates(c: Codec, formats: tuple[VFmt, ...], info: _MaskInfo, sent: bool, kn: np.ndarray | None) -> list[_Cand]:
    """The encodings ``c`` allows for a tensor whose mask (sent, or nonzero support) is ``info``."""
    n = info.n
    flags = (FLAG_DENSE_VALUES if c.dense else 0) if sent else FLAG_SUPPORT
    sel = "dense" if c.dense else "mask"
    if info.nnz == n and sent:
        return [_Cand(MaskMode.FULL, flags, f, 0, "dense" if c.dense else "all") for f in formats]
    if info.nnz == 0:
        return [_Cand(MaskMode.EMPTY, flags, f, 0, sel) for f in formats]
    out: list[_Cand] = []
    bound = None
    if kn is not None:
        if sent and np.array_equal(kn, info.m):
            bound = 4  # an explicit layout must beat the 4-byte fingerprint
            out += [_Cand(MaskMode.KNOWN, flags, f, 4, sel) for f in formats]
        elif not sent and not np.any(info.m & ~kn):
            out += [_Cand(MaskMode.KNOWN, flags, f, 4, "known") for f in formats]
    best = _best_explicit(info, c.layouts, bound)
    if best is not None:
        out += [_Cand(best[0], flags, f, best[1], sel) for f in formats]
    return out


@functools.lru_cache(maxsize=4096)
def _dense_header(codec_id: int, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """The header of a dense record of ``shape`` in ``dtype``'s own precision, remembered."""
    n = math.prod(shape)
    size = n * _DENSE_SAME[dtype][1].itemsize
    return TensorHeader(codec_id, DTYPE_CODES[dtype], _EXACT[dtype], MaskMode.NONE, 0, 0, shape, n, 0, size).to_bytes()


@functools.lru_cache(maxsize=4096)
def _header_bytes(h: TensorHeader) -> bytes:
    """``h.to_bytes()``, remembered: a dense tensor's header is the same every round."""
    return h.to_bytes()


def encode_tensor(
    values: Tensor,
    sent: Tensor | None = None,
    codec: str | Codec = "auto",
    *,
    known: Tensor | None = None,
    name: str = "tensor",
) -> bytes:
    """Encode one tensor as a self-describing tensor record (no name, no CRC).

    Parameters
    ----------
    values:
        The tensor, full shape; coordinates outside ``sent`` are ignored.
    sent:
        Bool mask of the coordinates sent; ``None`` means all (a dense tensor).
    codec:
        A registered codec name or a :class:`Codec`.
    known:
        A bool mask the receiver already holds for this tensor. If it equals ``sent`` (or,
        for a dense tensor, covers its nonzeros), the mask is replaced by a 4-byte fingerprint.
    name:
        Used in error messages only.

    Returns
    -------
    bytes
        ``header | mask section | value section``; see :mod:`sparsefl.comm.format`.

    Raises
    ------
    ValueError
        When the codec cannot represent the tensor (e.g. ``sign`` on values other than +-1,
        ``float16`` on values beyond its range, ``int8`` on NaN) or the inputs are malformed.
    """
    return b"".join(encode_tensor_parts(values, sent, codec, known=known, name=name))


def encode_tensor_parts(
    values: Tensor,
    sent: Tensor | None = None,
    codec: str | Codec = "auto",
    *,
    known: Tensor | None = None,
    name: str = "tensor",
) -> list[bytes]:
    """:func:`encode_tensor` as ``[header, mask section, value section]`` (saves a copy)."""
    c = get_codec(codec)
    what = f"codec {c.name!r}, tensor {name!r}"
    arr = _source(values, what)
    n = arr.size
    m = None if sent is None else _mask_array(sent, values.shape, f"{what}: sent mask")
    kn = None if known is None else _mask_array(known, values.shape, f"{what}: known mask")
    formats = c.formats(values.dtype) if arr.dtype.kind == "f" else (VFmt.INT,)

    cands: list[_Cand] = []
    info: _MaskInfo | None = None
    if m is None:
        cands += [_Cand(MaskMode.NONE, 0, f, 0, "all") for f in formats]
        # the nonzero support (NaN counts as nonzero, -0.0 as zero), when it may be smaller
        if not c.dense and np.count_nonzero(arr) < n:
            info = _MaskInfo(arr != 0, tuple(values.shape))
            cands += _candidates(c, formats, info, False, kn)
    else:
        info = _MaskInfo(m, tuple(values.shape))
        cands += _candidates(c, formats, info, True, kn)

    gathered: dict[str, np.ndarray] = {}

    def vals_of(sel: str) -> np.ndarray:
        # each value set is gathered once and shared by the candidates that send it
        if sel not in gathered:
            if sel == "all":
                gathered[sel] = arr
            elif sel == "dense":
                assert info is not None
                gathered[sel] = np.where(info.m, arr, arr.dtype.type(0))
            else:
                assert info is not None or sel == "known"
                gathered[sel] = arr[kn if sel == "known" else info.m]  # type: ignore[union-attr]
        return gathered[sel]

    best_total, chosen, chosen_vals = -1, None, None
    if len(cands) == 1 and cands[0].vfmt != VFmt.SIGN:  # nothing to compare
        chosen, chosen_vals = cands[0], vals_of(cands[0].values)
    else:
        for cand in cands:
            vals = vals_of(cand.values)
            if cand.vfmt == VFmt.SIGN and not V.is_sign(vals):
                continue
            total = cand.mask_nbytes + V.nbytes(cand.vfmt, vals)
            if chosen is None or total < best_total:
                best_total, chosen, chosen_vals = total, cand, vals
    if chosen is None or chosen_vals is None:
        raise ValueError(f"{what}: sign encoding needs every sent value to be +1 or -1")

    if chosen.mode in (MaskMode.NONE, MaskMode.FULL, MaskMode.EMPTY):
        mask_bytes, k = b"", 0
    elif chosen.mode == MaskMode.KNOWN:
        assert kn is not None
        mask_bytes, k = known_fingerprint(kn), 0
    else:
        assert info is not None
        mask_bytes, k = info.encode(chosen.mode)
    value_bytes = V.encode(chosen.vfmt, chosen_vals, what)
    if chosen.mode == MaskMode.NONE:
        nnz = n
    elif chosen.mode == MaskMode.KNOWN and m is None:
        assert kn is not None
        nnz = int(np.count_nonzero(kn))
    else:
        assert info is not None
        nnz = info.nnz
    header = TensorHeader(
        codec=c.wire_id,
        dtype=DTYPE_CODES[values.dtype],
        vfmt=chosen.vfmt,
        mode=chosen.mode,
        flags=chosen.flags,
        param=k,
        shape=tuple(values.shape),
        nnz=nnz,
        mask_len=len(mask_bytes),
        value_len=len(value_bytes),
    )
    return [_header_bytes(header), mask_bytes, value_bytes]


def dense_record_parts(tensors: Sequence[Tensor | None], c: Codec) -> list[list[bytes | memoryview] | None]:
    """Per tensor sent without a mask through ``c`` (None: not such a tensor), the record parts
    :func:`encode_tensor_parts` gives it when that is a dense record in its own precision:
    every value nonzero where the codec could send the support instead, and not every value
    +-1 where it could send signs. Same-dtype tensors are concatenated once, checked for zeros
    in one pass and sent as views of that copy; a nonzero integer scalar (BatchNorm's step
    count) is one varint. None for the rest, to encode one by one. The per-tensor path takes
    a dozen Python-level steps and a few one-element array operations to decide each tensor.
    """
    out: list[list[bytes | memoryview] | None] = [None] * len(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    exact: dict[torch.dtype, bool] = {}  # (asked only for the dtypes present, as the per-tensor path asks)
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.device.type != "cpu":
            continue
        if t.dtype in _DENSE_SAME and t.dtype not in exact:
            fmts = c.formats(t.dtype)
            exact[t.dtype] = fmts[0] == _EXACT[t.dtype] and set(fmts) <= {fmts[0], VFmt.SIGN}
        if exact.get(t.dtype):
            if 0 < t.numel() <= MAX_NUMEL and t.dim() <= MAX_NDIM:
                groups.setdefault(t.dtype, []).append(i)
        elif t.dim() == 0 and t.dtype in DTYPE_CODES and not t.is_floating_point() and not t.is_complex():
            v = int(t)
            if v:  # (a zero may go as an empty support)
                value = varint(zigzag_int(v))
                h = TensorHeader(c.wire_id, DTYPE_CODES[t.dtype], VFmt.INT, MaskMode.NONE, 0, 0, (), 1, 0, len(value))
                out[i] = [_header_bytes(h), b"", value]
    for dtype, idx in groups.items():
        wire = _DENSE_SAME[dtype][1]
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).numpy()  # type: ignore[union-attr]
        data = flat.astype(wire, copy=False)
        all_nonzero = c.dense or np.count_nonzero(flat) == flat.size
        signs = VFmt.SIGN in c.formats(dtype)
        at = 0
        for i in idx:
            t = tensors[i]
            assert t is not None
            n = t.numel()
            a, at = at, at + n
            if not all_nonzero and np.count_nonzero(flat[a:at]) < n:
                continue  # its support may be smaller
            if signs and abs(float(flat[a])) == 1.0:
                continue  # it may be all signs
            out[i] = [_dense_header(c.wire_id, dtype, tuple(t.shape)), b"", memoryview(data[a:at]).cast("B")]
    return out


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


#: headers already read and checked against a (shape, dtype), by their bytes: a dense tensor's
#: header (and a FULL, EMPTY or KNOWN one) is the same every round, and comparing its bytes costs a
#: fraction of parsing and checking it again. Keyed by the 10 fixed bytes, shape and dtype;
#: the value is the whole header's bytes and its parsed fields.
_CHECKED: dict[tuple[bytes, tuple[int, ...], torch.dtype], tuple[bytes, TensorHeader]] = {}
_CONSTANT_MODES = frozenset((MaskMode.NONE, MaskMode.FULL, MaskMode.EMPTY, MaskMode.KNOWN))


def _read_checked_header(r: Reader, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> TensorHeader:
    """:func:`read_header` at ``r``, then every consistency rule between its fields and against
    the receiver's spec (:func:`_check_header_fields`); a header seen before is recognised by
    its bytes."""
    start = r.pos
    key = (bytes(r.data[start : start + TENSOR_FIXED_BYTES]), shape, dtype)
    hit = _CHECKED.get(key)
    if hit is not None and r.data[start : start + len(hit[0])] == hit[0]:
        r.pos = start + len(hit[0])
        return hit[1]
    h = read_header(r)
    _check_header_fields(h, shape, dtype, what)
    # sparse headers carry their nnz and section lengths, which change every round
    if h.mode in _CONSTANT_MODES and len(_CHECKED) < 4096:
        _CHECKED[key] = (bytes(r.data[start : r.pos]), h)
    return h


def _check_header_fields(h: TensorHeader, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> Codec:
    codec = BY_ID.get(h.codec)
    if codec is None:
        raise DecodeError(f"{what}: unknown codec id {h.codec}")
    if h.shape != shape:
        raise DecodeError(f"{what}: shape {h.shape} in the payload, the receiver expects {shape}")
    src = CODE_DTYPES[h.dtype]
    if dtype_kind(src) != dtype_kind(dtype):
        raise DecodeError(f"{what}: payload dtype {src} cannot be decoded into {dtype}")
    if dtype_kind(src) == "float":
        if h.vfmt not in codec.formats(src):
            raise DecodeError(f"{what}: codec {codec.name!r} does not write {h.vfmt.name} values")
    elif h.vfmt != VFmt.INT:
        raise DecodeError(f"{what}: {src} values must use the INT format, not {h.vfmt.name}")
    n = math.prod(shape)
    if h.nnz > n:
        raise DecodeError(f"{what}: nnz {h.nnz} exceeds the {n} coordinates of shape {shape}")
    mode = h.mode
    if mode == MaskMode.NONE:
        if h.flags:
            raise DecodeError(f"{what}: flags {h.flags} set without a mask")
        if h.nnz != n:
            raise DecodeError(f"{what}: dense tensor with nnz {h.nnz} != numel {n}")
    else:
        allowed = {MaskMode.FULL, MaskMode.EMPTY, MaskMode.KNOWN, *codec.layouts}
        if mode not in allowed:
            raise DecodeError(f"{what}: codec {codec.name!r} does not write mask mode {mode.name}")
        want = (FLAG_DENSE_VALUES,) if codec.dense else (0, FLAG_SUPPORT)
        if h.flags not in want or (h.flags & FLAG_SUPPORT and mode == MaskMode.FULL):
            raise DecodeError(f"{what}: flags {h.flags} invalid for codec {codec.name!r}, mask mode {mode.name}")
        if mode == MaskMode.FULL and h.nnz != n:
            raise DecodeError(f"{what}: FULL mask with nnz {h.nnz} != numel {n}")
        if mode == MaskMode.EMPTY and h.nnz != 0:
            raise DecodeError(f"{what}: EMPTY mask with nnz {h.nnz}")
    if mode in (MaskMode.RICE, MaskMode.RICE_INV):
        if h.param > MAX_RICE_K:
            raise DecodeError(f"{what}: Rice parameter {h.param} exceeds {MAX_RICE_K}")
    elif mode == MaskMode.ROWS:
        if len(shape) < 2 or n == 0:
            raise DecodeError(f"{what}: ROWS mask for shape {shape} (needs ndim >= 2 and coordinates)")
        row = n // shape[0]
        if h.nnz % row:
            raise DecodeError(f"{what}: ROWS mask with nnz {h.nnz}, not a multiple of the row size {row}")
        if h.param > MAX_RICE_K + 1:
            raise DecodeError(f"{what}: ROWS parameter {h.param} exceeds {MAX_RICE_K + 1}")
    elif h.param:
        raise DecodeError(f"{what}: parameter {h.param} set for mask mode {mode.name}")
    return codec


def _decode_mask(
    h: TensorHeader, buf: bytes, n: int, known: Tensor | None, what: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(mask, sorted indices of its True entries)``, either may be None when not needed."""
    mode = h.mode
    if mode in (MaskMode.NONE, MaskMode.FULL, MaskMode.EMPTY) and buf:
        raise DecodeError(f"{what}: {len(buf)} mask bytes for mask mode {mode.name}")
    if mode == MaskMode.NONE:
        return None, None
    if mode == MaskMode.FULL:
        return np.ones(n, bool), None
    if mode == MaskMode.EMPTY:
        return np.zeros(n, bool), np.zeros(0, np.int64)
    if mode == MaskMode.KNOWN:
        if known is None:
            raise DecodeError(f"{what}: the payload refers to a known mask the receiver lacks")
        if not isinstance(known, Tensor) or known.dtype != torch.bool or known.numel() != n:
            raise DecodeError(f"{what}: the receiver's known mask is not a bool tensor of {n}")
        km = known.detach().to("cpu").contiguous().reshape(-1).numpy()
        if buf != known_fingerprint(km):
            raise DecodeError(f"{what}: the receiver's known mask differs from the sender's")
        if int(np.count_nonzero(km)) != h.nnz:
            raise DecodeError(f"{what}: known mask has {np.count_nonzero(km)} entries, payload says {h.nnz}")
        return km.copy(), None
    if mode == MaskMode.BITMASK:
        m = unpack_bits(buf, n, what + " bitmask")
        if int(np.count_nonzero(m)) != h.nnz:
            raise DecodeError(f"{what}: bitmask has {np.count_nonzero(m)} entries, payload says {h.nnz}")
        return m, None
    if mode == MaskMode.ROWS:
        # _check_header_fields guarantees ndim >= 2, n > 0 and nnz = kept * row
        c = h.shape[0]
        row = n // c
        kept = h.nnz // row
        if h.param == 0:
            flags = unpack_bits(buf, c, what + " row flags")
            if int(np.count_nonzero(flags)) != kept:
                raise DecodeError(
                    f"{what}: row flags keep {np.count_nonzero(flags)} rows, payload says {kept} (nnz {h.nnz})"
                )
        else:
            g = rice_decode(buf, kept, h.param - 1, c, what + " Rice row gaps")
            flags = np.zeros(c, bool)
            flags[indices_from_gaps(g, c, what + " Rice row gaps")] = True
        return np.repeat(flags, row), None
    if mode == MaskMode.COO:
        g = decode_varints(buf, h.nnz, what + " coordinates")
        if g.size and int(g.max()) >= n:
            raise DecodeError(f"{what}: a coordinate gap exceeds the tensor size {n}")
        idx = indices_from_gaps(g.astype(np.int64), n, what + " coordinates")
        return None, idx
    inv = mode == MaskMode.RICE_INV
    count = n - h.nnz if inv else h.nnz
    g = rice_decode(buf, count, h.param, n, what + " Rice coordinates")
    idx = indices_from_gaps(g, n, what + " Rice coordinates")
    if not inv:
        return None, idx
    m = np.ones(n, bool)
    m[idx] = False
    return m, None


#: The numpy dtype a decoded tensor is assembled in (bfloat16: float32, converted at the end).
_NP_DTYPE = {
    torch.bool: np.dtype(bool),
    torch.uint8: np.dtype(np.uint8),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.float32),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


#: dtype -> (value format, wire dtype) of a dense record in the tensor's own precision (the
#: formats numpy reads as they are: not bfloat16)
_DENSE_SAME = {dtype: (fmt, V._NP[fmt]) for dtype, fmt in _EXACT.items() if fmt in V._NP}


def dense_wire(h: TensorHeader, n: int, dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of the value section when the (checked) header ``h`` is a dense record
    of ``n`` values in ``dtype``'s own precision, the common record, whose values are read as
    they are; else None (the general path, which also says what is wrong with a record that
    only looks like one)."""
    fast = _DENSE_SAME.get(dtype)
    if fast is None or h.mode != MaskMode.NONE or h.vfmt != fast[0]:
        return None
    wire = fast[1]
    return wire if h.mask_len == 0 and h.value_len == n * wire.itemsize else None


def _int_scalar(r: Reader, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor | None:
    """A dense one-value integer record (BatchNorm's step count, in every upload of a model
    with BatchNorm) read with Python ints when its value section is one well-formed varint in
    ``dtype``'s range, ``r`` then past it; else None, ``r`` unmoved, for the general path to
    read or reject. The general path's ten one-element array operations cost more than all
    the dense records of a CNN upload together."""
    if nbytes > r.remaining():
        return None
    v = Reader(r.data, r.pos, r.pos + nbytes)
    try:
        u = v.varint("value", (1 << 64) - 1)
    except DecodeError:
        return None
    x = unzigzag_int(u)
    lo, hi = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    if v.remaining() or not lo <= x <= hi:
        return None
    r.pos += nbytes
    return torch.tensor(x, dtype=dtype).reshape(shape)


def _all_finite(x: np.ndarray) -> bool:
    """True when no element is NaN or infinite (one vectorised pass; 4x faster than a float64
    sum over a float32 tensor)."""
    return bool(np.isfinite(x).all())


def _convert(vals: np.ndarray, dtype: torch.dtype, allow_nonfinite: bool, what: str) -> np.ndarray:
    """Payload values (float or int64) in the numpy dtype that assembles ``dtype``, checked."""
    target = _NP_DTYPE[dtype]
    if vals.dtype.kind == "i":
        if vals.size:
            lo, hi = (0, 1) if dtype == torch.bool else (np.iinfo(target).min, np.iinfo(target).max)
            if vals.min() < lo or vals.max() > hi:
                raise DecodeError(f"{what}: integer values out of the range of {dtype}")
        return vals.astype(target)
    if vals.dtype == target:
        out = vals.copy()  # (no conversion: nothing can overflow)
    else:
        with np.errstate(over="ignore"):
            out = vals.astype(target)
    if not allow_nonfinite and not _all_finite(out):
        raise DecodeError(f"{what}: NaN or infinite values (the receiver forbids them)")
    return out


def _bits_nonzero(x: np.ndarray) -> np.ndarray:
    """Element-wise "not +0": any set bit (so -0.0 and NaN count as nonzero)."""
    return (x.view(f"u{x.itemsize}") if x.dtype.kind == "f" else x) != 0


def decode_record(
    r: Reader,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    known: Tensor | None = None,
    allow_nonfinite: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Decode the tensor record at ``r`` into fresh tensors ``(values, sent or None)``.

    ``r.where`` names the tensor in error messages. Everything is validated before anything
    is returned; the reader ends just past the record. The tensors are assembled in numpy
    (single-threaded and predictable under load) and handed to torch without a copy.
    """
    what = r.where
    if dtype not in _NP_DTYPE:
        raise ValueError(f"{what}: the receiver's spec asks for {dtype}, which no codec carries")
    h = _read_checked_header(r, shape, dtype, what)
    n = math.prod(shape)
    wire = dense_wire(h, n, dtype)
    if wire is not None:
        # the common record (a dense tensor in its own precision): one copy and one check
        vals = np.frombuffer(r.view(h.value_len, "value section"), wire).astype(wire.newbyteorder("="))
        if allow_nonfinite or _all_finite(vals):
            return torch.from_numpy(vals.reshape(shape)), None
        raise DecodeError(f"{what}: NaN or infinite values (the receiver forbids them)")
    if h.vfmt == VFmt.INT and n == 1 and h.mode == MaskMode.NONE and h.mask_len == 0:
        scalar = _int_scalar(r, h.value_len, dtype, shape)
        if scalar is not None:
            return scalar, None
    mask_buf = r.take(h.mask_len, "mask section")
    value_buf = r.view(h.value_len, "value section")  # copied once, by _convert
    m, idx = _decode_mask(h, mask_buf, n, known, what)
    dense_values = h.mode == MaskMode.NONE or bool(h.flags & FLAG_DENSE_VALUES)
    if m is None and idx is not None and (dense_values or not h.flags & FLAG_SUPPORT):
        m = np.zeros(n, bool)  # needed to check the dense values, or to return as `sent`
        m[idx] = True
    count = n if dense_values else h.nnz
    raw = V.decode(h.vfmt, value_buf, count, what)
    if dense_values and m is not None and np.any(_bits_nonzero(raw) & ~m):
        # the encoder writes +0 at every unsent coordinate of a dense codec
        raise DecodeError(f"{what}: nonzero value at a coordinate the mask says is unsent")
    vals = _convert(raw, dtype, allow_nonfinite, what)
    if dense_values or count == n:
        out = vals if vals is not raw else vals.copy()
    else:
        out = np.zeros(n, _NP_DTYPE[dtype])
        out[idx if idx is not None else m] = vals
    t = torch.from_numpy(out)
    if dtype == torch.bfloat16:
        t = t.to(dtype)
        if not allow_nonfinite and not bool(torch.isfinite(t).all()):
            raise DecodeError(f"{what}: values overflow bfloat16 (the receiver forbids them)")
    sent = None
    if h.mode != MaskMode.NONE and not h.flags & FLAG_SUPPORT:
        assert m is not None
        sent = torch.from_numpy(m).reshape(shape)
    return t.reshape(shape), sent


def decode_tensor(
    data: bytes,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    known: Tensor | None = None,
    allow_nonfinite: bool = False,
    name: str = "tensor",
) -> tuple[Tensor, Tensor | None]:
    """Decode one record written by :func:`encode_tensor`; it must fill ``data`` exactly.

    Returns ``(values, sent)``: values of ``dtype`` with zeros at unsent coordinates, and the
    bool mask of sent coordinates (``None`` when the tensor was sent densely). A lone record
    has no checksum; messages from :func:`sparsefl.comm.encode_update` do.
    """
    r = Reader(bytes(data))
    r.where = f"tensor {name!r}"
    out = decode_record(r, tuple(int(s) for s in shape), dtype, known=known, allow_nonfinite=allow_nonfinite)
    if r.remaining():
        raise r.fail(f"{r.remaining()} bytes after the end of the record")
    return out
