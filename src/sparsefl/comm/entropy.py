"""Vectorised bit-level coders for masks and indices: bitmasks, LEB128 varints, Golomb-Rice gaps.

Why Golomb-Rice. A random mask of density ``d`` has geometrically distributed gaps between
kept positions, ``P(g) = d (1-d)^g``, and Golomb codes are the optimal prefix codes for
geometric sources (Gallager & Van Voorhis, 1975). Restricting the parameter to a power of two
``2**k`` (Rice, 1979) keeps every remainder a fixed k-bit field. With the best k per tensor,
the expected cost per gap against the entropy ``H(d)/d`` is (computed from the geometric law,
and matched by ``benchmarks/codec.py``)::

    d        0.5   0.4   0.3   0.2   0.1   0.05  0.03  0.01  0.001
    excess   0.0%  3.0%  0.8%  2.3%  1.4%  1.0%  1.7%  0.4%  0.8%   of the mask's H(d) bits

which is at most 0.3% of the bound ``32 d + H(d)`` of a float32 update. True Golomb codes
(any m, truncated-binary remainders) would save at most 1.6% of the mask bits (0.2% of the
update) at the price of variable-width remainders; an arithmetic coder would save the rest
at the price of a per-symbol loop. Rice needs no per-symbol loop: the code splits into
fixed-width remainders and a unary stream, both of which numpy packs and unpacks in bulk.

A Rice section stores the remainders and the unary quotients as two separate streams
(:func:`rice_encode` gives the layout, ``docs/wire-format.md`` the sections that use it).

Gaps are ``g[0] = idx[0]``, ``g[i] = idx[i] - idx[i-1] - 1``: every non-negative gap sequence
is a strictly increasing index list, so "indices not increasing" cannot be expressed, and
"index out of range" is checked once, on the last index.

Every decoder here raises :class:`~sparsefl.errors.DecodeError` on malformed input (wrong
length, nonzero padding, a count that does not match, a value out of range) and never reads
past the bytes it was given.
"""

from __future__ import annotations

import math

import numpy as np

from sparsefl.comm.format import varint
from sparsefl.errors import DecodeError

#: Largest Rice parameter; gaps are below 2**31, so larger k never helps.
MAX_RICE_K = 31


def binary_entropy(d: float) -> float:
    """``H(d) = -d log2 d - (1-d) log2 (1-d)`` in bits (0 at d in {0, 1})."""
    if d <= 0.0 or d >= 1.0:
        return 0.0
    return -(d * math.log2(d) + (1.0 - d) * math.log2(1.0 - d))


# --------------------------------------------------------------------------------------------
# bitmasks
# --------------------------------------------------------------------------------------------


def pack_bits(bits: np.ndarray) -> bytes:
    """Pack a bool array MSB-first into ``ceil(len/8)`` bytes with zero padding."""
    return np.packbits(bits.astype(bool, copy=False)).tobytes()


def unpack_bits(buf: bytes, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`pack_bits`: exactly ``ceil(count/8)`` bytes, zero padding required."""
    need = (count + 7) // 8
    if len(buf) != need:
        raise DecodeError(f"{what}: {len(buf)} bytes, expected {need} for {count} bits")
    a = np.frombuffer(buf, np.uint8)
    if count % 8 and a[-1] & ((1 << (8 - count % 8)) - 1):
        raise DecodeError(f"{what}: nonzero padding bits")
    return np.unpackbits(a, count=count).view(bool)


# --------------------------------------------------------------------------------------------
# LEB128 varints (unsigned, 64-bit)
# --------------------------------------------------------------------------------------------

_THRESHOLDS = [np.uint64(1) << np.uint64(7 * j) for j in range(1, 10)]


def varint_sizes(x: np.ndarray) -> np.ndarray:
    """Bytes taken by the canonical LEB128 encoding of each element of uint64 array ``x``."""
    x = x.astype(np.uint64, copy=False)
    sizes = np.ones(x.shape, np.int64)
    for t in _THRESHOLDS:
        ge = x >= t
        if not ge.any():
            break
        sizes += ge
    return sizes


def encode_varints(x: np.ndarray) -> bytes:
    """Concatenated canonical LEB128 encodings of uint64 array ``x``."""
    x = x.astype(np.uint64, copy=False)
    if x.size == 0:
        return b""
    if x.size == 1:  # one integer (a scalar tensor, such as BatchNorm's step count): no arrays
        return varint(int(x[0]))
    sizes = varint_sizes(x)
    starts = np.cumsum(sizes) - sizes
    out = np.empty(int(sizes.sum()), np.uint8)
    for j in range(int(sizes.max())):
        sel = np.flatnonzero(sizes > j) if j else slice(None)
        group = ((x[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = (sizes[sel] > j + 1).astype(np.uint8) << np.uint8(7)
        out[starts[sel] + j] = group | more
    return out.tobytes()


def decode_varints(buf: bytes, count: int, what: str) -> np.ndarray:
    """Exactly ``count`` canonical LEB128 varints filling ``buf``; returns uint64."""
    b = np.frombuffer(buf, np.uint8)
    if count == 0:
        if b.size:
            raise DecodeError(f"{what}: {b.size} bytes for zero values")
        return np.zeros(0, np.uint64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or ends[-1] != b.size - 1:
        raise DecodeError(
            f"{what}: {b.size} bytes hold {ends.size} complete varints"
            f"{'' if ends.size and ends[-1] == b.size - 1 else ' and a truncated one'}, "
            f"expected {count}"
        )
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lens = ends - starts + 1
    maxlen = int(lens.max())
    if maxlen > 10:
        raise DecodeError(f"{what}: a varint longer than 10 bytes")
    if maxlen > 1 and np.any((lens > 1) & (b[ends] == 0)):
        raise DecodeError(f"{what}: a varint is not canonically encoded (trailing zero byte)")
    if maxlen == 10 and np.any((lens == 10) & (b[ends] > 1)):
        raise DecodeError(f"{what}: a varint exceeds 64 bits")
    out = (b[starts] & 0x7F).astype(np.uint64)
    for j in range(1, maxlen):
        sel = np.flatnonzero(lens > j)
        out[sel] |= (b[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


def zigzag(x: np.ndarray) -> np.ndarray:
    """Map int64 to uint64 so that small magnitudes get small codes: 0,-1,1,-2 -> 0,1,2,3."""
    x = x.astype(np.int64, copy=False)
    return ((x << np.int64(1)) ^ (x >> np.int64(63))).view(np.uint64)


def unzigzag(u: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag`."""
    u = u.astype(np.uint64, copy=False)
    return ((u >> np.uint64(1)) ^ (np.uint64(0) - (u & np.uint64(1)))).view(np.int64)


def zigzag_int(v: int) -> int:
    """:func:`zigzag` of one int64 as a Python int (for scalars: no arrays)."""
    return (v << 1) ^ (v >> 63)


def unzigzag_int(u: int) -> int:
    """:func:`unzigzag` of one uint64 as a Python int."""
    return (u >> 1) ^ -(u & 1)


# --------------------------------------------------------------------------------------------
# gaps
# --------------------------------------------------------------------------------------------


def gaps_from_indices(idx: np.ndarray) -> np.ndarray:
    """Gaps of a strictly increasing index array: ``idx[0]``, then ``idx[i] - idx[i-1] - 1``."""
    g = np.diff(idx.astype(np.int64, copy=False), prepend=np.int64(-1))
    g -= 1
    return g


def indices_from_gaps(g: np.ndarray, numel: int, what: str) -> np.ndarray:
    """Inverse of :func:`gaps_from_indices`, checking every index is below ``numel``.

    ``g`` must be non-negative and each gap below ``numel`` (the callers check while decoding),
    so the cumulative sum stays below ``numel**2 < 2**62``.
    """
    idx = np.cumsum(g.astype(np.int64, copy=False) + 1)
    idx -= 1
    if idx.size and idx[-1] >= numel:
        raise DecodeError(f"{what}: index {int(idx[-1])} out of range for {numel} coordinates")
    return idx


# --------------------------------------------------------------------------------------------
# Golomb-Rice
# --------------------------------------------------------------------------------------------


def rice_nbytes(g: np.ndarray, k: int) -> int:
    """Bytes of the Rice section of gaps ``g`` with parameter ``k``."""
    c = int(g.size)
    if c == 0:
        return 0
    unary_bits = int((g >> k).sum()) + c
    return (c * k + 7) // 8 + (unary_bits + 7) // 8


def _rice_bits(g: np.ndarray, k: int) -> int:
    """Bits of the Rice code of gaps ``g`` with parameter ``k``, before byte padding."""
    return int(g.size) * (k + 1) + int((g >> k).sum())


def rice_best_k(g: np.ndarray) -> int:
    """The Rice parameter that minimises the section size of ``g`` in bytes (smallest k on a tie).

    The bit count ``c (k + 1) + sum(g >> k)`` is convex in ``k`` (its decrements
    ``sum(ceil((g >> k) / 2)) - c`` never increase), so a local search from the estimate
    ``log2(mean gap)`` finds its minimum in two or three evaluations. The byte size is that
    count padded in two streams, between ``bits / 8`` and ``bits / 8 + 2``, so only the ``k``
    whose bit count is within 16 of the minimum can win in bytes; they form an interval
    around the minimum, which is scanned.
    """
    if g.size == 0:
        return 0
    mean = float(g.mean())
    k = min(MAX_RICE_K, max(0, int(math.log2(mean + 1.0)) - 1))
    best = _rice_bits(g, k)
    for step in (1, -1):
        while 0 <= k + step <= MAX_RICE_K:
            bits = _rice_bits(g, k + step)
            if bits >= best:
                break
            k, best = k + step, bits
    lo = k
    while lo > 0 and _rice_bits(g, lo - 1) <= best + 16:
        lo -= 1
    hi = k
    while hi < MAX_RICE_K and _rice_bits(g, hi + 1) <= best + 16:
        hi += 1
    sizes = [rice_nbytes(g, j) for j in range(lo, hi + 1)]
    return lo + sizes.index(min(sizes))


def rice_encode(g: np.ndarray, k: int) -> bytes:
    """The Rice section (remainders, then unary quotients) of non-negative gaps ``g``.

    Layout for ``c`` gaps and parameter ``k``::

        remainders  ceil(c*k/8) bytes: the low k bits of every gap, MSB first, zero padding
        unary       for each gap, (g >> k) zero bits then a one bit; zero padding to a byte

    Splitting the two streams (rather than interleaving them per codeword, as textbook Rice
    does) costs the same number of bits up to one byte of padding and lets the decoder find
    every codeword boundary at once: the boundaries are exactly the one bits of the unary stream.
    """
    c = int(g.size)
    if c == 0:
        return b""
    g = g.astype(np.int64, copy=False)
    parts = []
    if k:
        r = g & ((1 << k) - 1)
        bits = np.empty((c, k), np.uint8)
        for j in range(k):
            bits[:, j] = (r >> (k - 1 - j)) & 1
        parts.append(np.packbits(bits.ravel()).tobytes())
    ones = np.cumsum((g >> k) + 1)
    ones -= 1
    unary = np.zeros(int(ones[-1]) + 1, bool)
    unary[ones] = True
    parts.append(np.packbits(unary).tobytes())
    return b"".join(parts)


def rice_decode(buf: bytes, count: int, k: int, numel: int, what: str) -> np.ndarray:
    """``count`` gaps from a Rice section that must fill ``buf`` exactly; each gap < ``numel``."""
    if count == 0:
        if buf:
            raise DecodeError(f"{what}: {len(buf)} bytes for zero gaps")
        return np.zeros(0, np.int64)
    rem_len = (count * k + 7) // 8
    if len(buf) < rem_len + 1:
        raise DecodeError(f"{what}: {len(buf)} bytes cannot hold {count} Rice codes with k={k}")
    unary = np.frombuffer(buf, np.uint8, offset=rem_len)
    ones = np.flatnonzero(np.unpackbits(unary))
    if ones.size != count:
        raise DecodeError(f"{what}: unary stream holds {ones.size} codes, expected {count}")
    if unary.size != int(ones[-1]) // 8 + 1:
        raise DecodeError(
            f"{what}: unary stream has {unary.size - int(ones[-1]) // 8 - 1} extra bytes after its last code"
        )
    q = np.diff(ones, prepend=np.int64(-1))
    q -= 1
    if int(q.max()) > (numel - 1) >> k:
        raise DecodeError(f"{what}: a gap exceeds the tensor size {numel}")
    g = q << k
    if k:
        bits = unpack_bits(buf[:rem_len], count * k, what + " remainders").reshape(count, k)
        r = np.zeros(count, np.int64)
        for j in range(k):
            r <<= 1
            r |= bits[:, j]
        g |= r
        if int(g.max()) >= numel:
            raise DecodeError(f"{what}: a gap exceeds the tensor size {numel}")
    return g
