"""The bit-level coders: exact inverses, strict on malformed input, near-entropy sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefl.comm.entropy import (
    binary_entropy,
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
    unzigzag,
    unzigzag_int,
    varint_sizes,
    zigzag,
    zigzag_int,
)
from sparsefl.comm.format import Reader, varint, varint_len
from sparsefl.errors import DecodeError

u64 = st.integers(0, 2**64 - 1)


@given(st.lists(u64, max_size=50))
def test_varints_round_trip_and_match_the_scalar_encoder(xs: list[int]) -> None:
    x = np.array(xs, dtype=np.uint64)
    data = encode_varints(x)
    assert data == b"".join(varint(v) for v in xs)
    assert varint_sizes(x).tolist() == [varint_len(v) for v in xs]
    assert decode_varints(data, len(xs), "t").tolist() == xs


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30))
def test_zigzag_is_a_bijection(xs: list[int]) -> None:
    x = np.array(xs, dtype=np.int64)
    z = zigzag(x)
    assert [zigzag_int(v) for v in xs] == z.tolist()  # the scalar form, as the array one
    assert [unzigzag_int(u) for u in z.tolist()] == xs
    assert unzigzag(z).tolist() == xs
    assert all(int(u) == (2 * v if v >= 0 else -2 * v - 1) for u, v in zip(z, xs, strict=True))


@pytest.mark.parametrize(
    "data,count",
    [
        (b"\x80", 1),  # truncated
        (b"\x01\x02", 1),  # one too many
        (b"\x01", 2),  # one too few
        (b"\x81\x00", 1),  # non-canonical (trailing zero byte)
        (b"\xff" * 10 + b"\x01", 1),  # longer than 10 bytes
        (b"\xff" * 9 + b"\x02", 1),  # beyond 64 bits
        (b"\x00", 0),  # bytes for zero values
    ],
)
def test_varint_decoder_rejects(data: bytes, count: int) -> None:
    with pytest.raises(DecodeError):
        decode_varints(data, count, "t")


def test_scalar_varint_reader_rejects_non_canonical_and_over_limit() -> None:
    with pytest.raises(DecodeError, match="canonical"):
        Reader(b"\x80\x00").varint("x", 1000)
    with pytest.raises(DecodeError, match="limit"):
        Reader(varint(1001)).varint("x", 1000)
    with pytest.raises(DecodeError, match="truncated"):
        Reader(b"\x80").varint("x", 1000)


@given(st.lists(st.booleans(), max_size=70))
def test_bitmask_round_trip_and_strict_padding(bits: list[bool]) -> None:
    b = np.array(bits, dtype=bool)
    data = pack_bits(b)
    assert len(data) == math.ceil(len(bits) / 8)
    assert unpack_bits(data, len(bits), "t").tolist() == bits
    if len(bits) % 8:
        bad = bytearray(data)
        bad[-1] |= 1  # the last padding bit
        with pytest.raises(DecodeError, match="padding"):
            unpack_bits(bytes(bad), len(bits), "t")
    with pytest.raises(DecodeError):
        unpack_bits(data + b"\x00", len(bits), "t")


@given(st.integers(1, 3000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
@settings(max_examples=80)
def test_rice_round_trip(n: int, d: float, seed: int) -> None:
    m = np.random.default_rng(seed).random(n) < d
    idx = np.flatnonzero(m)
    g = gaps_from_indices(idx)
    assert (g >= 0).all()
    k = rice_best_k(g)
    data = rice_encode(g, k)
    assert len(data) == rice_nbytes(g, k)
    assert all(rice_nbytes(g, j) >= len(data) for j in range(0, 20))
    back = rice_decode(data, idx.size, k, n, "t")
    assert np.array_equal(indices_from_gaps(back, n, "t"), idx)


def test_rice_decoder_rejects_malformed() -> None:
    g = np.array([3, 0, 7, 1], dtype=np.int64)
    data = rice_encode(g, 1)
    with pytest.raises(DecodeError):
        rice_decode(data, 5, 1, 100, "t")  # count mismatch
    with pytest.raises(DecodeError):
        rice_decode(data + b"\x00", 4, 1, 100, "t")  # over-long
    with pytest.raises(DecodeError):
        rice_decode(data[:-1], 4, 1, 100, "t")  # truncated
    with pytest.raises(DecodeError, match="exceeds"):
        rice_decode(data, 4, 1, 5, "t")  # a gap beyond the tensor
    with pytest.raises(DecodeError, match="out of range"):
        indices_from_gaps(g, 14, "t")  # last index 14 is out of range for 14 coordinates
    assert indices_from_gaps(g, 15, "t").tolist() == [3, 4, 12, 14]


@pytest.mark.parametrize("d", [0.5, 0.4, 0.2, 0.1, 0.05, 0.01, 0.001])
def test_rice_mask_cost_is_close_to_the_entropy(d: float) -> None:
    n = 2_000_000
    m = np.random.default_rng(1).random(n) < d
    g = gaps_from_indices(np.flatnonzero(m))
    bits = 8 * rice_nbytes(g, rice_best_k(g))
    dhat = float(m.mean())
    # Rice's expected excess over H for geometric gaps is at most ~3% (at d = 0.4; see the
    # table in sparsefl.comm.entropy), i.e. at most 0.3% of a float32 update's bound
    assert bits <= 1.035 * n * binary_entropy(dhat) + 16
    assert 32 * m.sum() + bits <= 1.003 * n * (32 * dhat + binary_entropy(dhat)) + 16


def test_binary_entropy() -> None:
    assert binary_entropy(0.5) == 1.0
    assert binary_entropy(0.0) == binary_entropy(1.0) == 0.0
    assert binary_entropy(0.1) == pytest.approx(0.4689955935892812)
