"""Value formats: how the values of the coordinates that are sent become bytes and back.

The encoder works on a numpy array of the sender's values (float16, float32 or float64; a
bfloat16 tensor is widened to float32, which is exact). Lossless formats copy the bits; the
lossy ones state their error bound:

* ``F16``: round-to-nearest-even to IEEE half; relative error <= 2**-11 for
  ``6.1e-5 <= |x| <= 65504``, absolute <= 2**-25 below. A finite value beyond the half range
  cannot be represented and raises ``ValueError`` (it would become infinite).
* ``BF16``: round-to-nearest-even to bfloat16 (torch's conversion); relative error <= 2**-8.
* ``I8``: symmetric per-tensor quantisation, ``scale = max|x| / 127`` (stored as float32),
  ``q = round(x / scale)`` in [-127, 127], decoded as ``q * scale`` in float32. Error
  ``|x - q*scale| <= 0.5 * scale * (1 + 2**-15) + 2**-142`` (half a step, plus float32
  rounding of the product and of a subnormal scale). -128 is never written and is rejected.
* ``SIGN``: one bit per value; the values must all be exactly +1 or -1.

Integer and bool tensors always use ``INT`` (zigzag varints of int64), whatever the codec.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsefl.comm.entropy import (
    decode_varints,
    encode_varints,
    pack_bits,
    unpack_bits,
    unzigzag,
    varint_sizes,
    zigzag,
)
from sparsefl.comm.format import VFmt
from sparsefl.errors import DecodeError

#: Bytes per value of the fixed-width formats.
WIDTH = {VFmt.F32: 4, VFmt.F16: 2, VFmt.BF16: 2, VFmt.F64: 8}
_NP = {VFmt.F32: np.dtype("<f4"), VFmt.F16: np.dtype("<f2"), VFmt.F64: np.dtype("<f8")}
#: The smallest positive float32 (a subnormal), used when max|x|/127 underflows.
_TINY32 = np.float32(2.0**-149)
_MAX32 = float(np.finfo(np.float32).max)
#: Largest scale the encoder writes: 127 * scale stays finite in float32.
_MAX_SCALE = np.float32(_MAX32 / 127.0)


def is_sign(vals: np.ndarray) -> bool:
    """True when every element is exactly +1 or -1 (vacuously true when empty)."""
    if vals.size == 0:
        return True
    if abs(float(vals[0])) != 1.0:  # cheap rejection of ordinary updates
        return False
    return bool(np.all(np.abs(vals) == 1))


def nbytes(fmt: VFmt, vals: np.ndarray) -> int:
    """Length of the value section of ``vals`` in format ``fmt`` (without building it)."""
    c = int(vals.size)
    if fmt in WIDTH:
        return WIDTH[fmt] * c
    if fmt == VFmt.I8:
        return 4 + c if c else 0
    if fmt == VFmt.SIGN:
        return (c + 7) // 8
    return int(varint_sizes(zigzag(vals)).sum())


def _cast(vals: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    if vals.dtype == dtype:  # nothing to convert, nothing can overflow
        return vals
    with np.errstate(over="ignore", invalid="ignore"):
        out = vals.astype(dtype)
    bad = np.isfinite(vals) & ~np.isfinite(out)
    if bad.any():
        x = vals[np.flatnonzero(bad)[0]]
        raise ValueError(f"{what}: value {x!r} is out of range of {dtype} (it would overflow)")
    return out


def quantise_i8(vals: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """``(scale, q)`` of the ``I8`` format; raises ValueError on non-finite input."""
    v = vals.astype(np.float64, copy=False)
    if not np.isfinite(v).all():
        raise ValueError("int8 cannot represent NaN or infinite values")
    m = float(np.abs(v).max()) if v.size else 0.0
    if m > _MAX32:
        raise ValueError(f"int8: max |x| = {m!r} exceeds the float32 range")
    scale = np.float32(m / 127.0)
    if scale == 0 and m > 0:
        scale = _TINY32
    if scale == 0:
        return scale, np.zeros(v.shape, np.int8)
    q = np.clip(np.rint(v / np.float64(scale)), -127, 127).astype(np.int8)
    return scale, q


def _to_bf16_bits(vals: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns of ``vals``, rounded to nearest, ties to even (as torch does).

    float16/float32 input is rounded in numpy (float16 widens to float32 exactly): add
    ``0x7FFF`` plus the lowest kept bit, then drop the low 16 bits; NaNs keep their sign and
    top payload bits and are made quiet. float64 goes through torch, which rounds once.
    """
    if vals.dtype == np.float64:
        t = torch.from_numpy(np.ascontiguousarray(vals)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view("<u2")
    bits = vals.astype(np.float32, copy=False).view(np.uint32)
    if not (bits & 0xFFFF).any():  # already bfloat16 (e.g. a widened bfloat16 tensor)
        return (bits >> 16).astype("<u2")
    out = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
    nan = np.isnan(vals)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype("<u2")
    return out


def encode(fmt: VFmt, vals: np.ndarray, what: str) -> bytes:
    """The value section of ``vals`` (ValueError when ``fmt`` cannot represent them)."""
    if vals.size == 0:
        return b""
    if fmt in _NP:
        return _cast(vals, _NP[fmt], what).tobytes()
    if fmt == VFmt.BF16:
        out = _to_bf16_bits(vals)
        back = (out.astype(np.uint32) << 16).view(np.float32)
        bad = np.isfinite(vals) & ~np.isfinite(back)
        if bad.any():
            raise ValueError(f"{what}: value {vals[np.flatnonzero(bad)[0]]!r} overflows bfloat16")
        return out.tobytes()
    if fmt == VFmt.I8:
        scale, q = quantise_i8(vals)
        return scale.astype("<f4").tobytes() + q.tobytes()
    if fmt == VFmt.SIGN:
        if not is_sign(vals):
            raise ValueError(f"{what}: sign encoding needs every sent value to be +1 or -1")
        return pack_bits(vals > 0)
    return encode_varints(zigzag(vals))


def decode(fmt: VFmt, buf: bytes, count: int, what: str) -> np.ndarray:
    """``count`` values from a value section that must fill ``buf`` exactly.

    Returns float16/float32/float64 for the float formats and int64 for ``INT``.
    """
    if fmt in WIDTH:
        if len(buf) != WIDTH[fmt] * count:
            raise DecodeError(
                f"{what}: {len(buf)} value bytes, expected {WIDTH[fmt] * count} for {count} {fmt.name} values"
            )
        if fmt == VFmt.BF16:
            return (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(buf, _NP[fmt])
    if fmt == VFmt.I8:
        if count == 0:
            if buf:
                raise DecodeError(f"{what}: {len(buf)} value bytes for zero values")
            return np.zeros(0, np.float32)
        if len(buf) != 4 + count:
            raise DecodeError(f"{what}: {len(buf)} value bytes, expected {4 + count} for {count} int8 values")
        scale = np.frombuffer(buf, "<f4", count=1)[0]
        if not 0 <= scale <= _MAX_SCALE or np.signbit(scale):
            raise DecodeError(f"{what}: int8 scale {scale!r} is not in [0, {_MAX_SCALE!r}]")
        q = np.frombuffer(buf, np.int8, offset=4)
        if (q == -128).any():
            raise DecodeError(f"{what}: int8 value -128 (the format uses [-127, 127])")
        if scale == 0 and q.any():
            raise DecodeError(f"{what}: nonzero int8 values with a zero scale")
        return q.astype(np.float32) * scale
    if fmt == VFmt.SIGN:
        bits = unpack_bits(buf, count, what + " signs")
        return np.where(bits, np.float32(1), np.float32(-1))
    return unzigzag(decode_varints(buf, count, what + " integers"))
