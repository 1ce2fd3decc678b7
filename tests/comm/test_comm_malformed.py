"""Decoding trusts nothing: every malformed payload is a DecodeError, nothing else.

Two layers are tested. The CRC32 trailer turns any corruption into a DecodeError before a
field is read (*raw* mutations). Behind it, the structural checks must reject inconsistent
messages on their own: *resealed* mutations recompute the CRC so that only they stand guard.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefl.comm import (
    Update,
    codec_names,
    decode_tensor,
    decode_update,
    describe,
    encode_update,
    get_codec,
    spec_of,
)
from sparsefl.comm.entropy import encode_varints
from sparsefl.comm.format import (
    MaskMode,
    TensorHeader,
    VFmt,
    container_header,
    field_spans,
    name_record,
    seal,
)
from sparsefl.errors import DecodeError

F32 = 9  # dtype code of float32
AUTO = 9  # wire id of auto


def _msg(*records: tuple[str, bytes]) -> bytes:
    return seal(container_header(len(records)) + b"".join(name_record(n) + r for n, r in records))


def _record(
    mode: MaskMode,
    nnz: int,
    mask: bytes,
    values: bytes,
    shape=(10,),
    *,
    flags=0,
    param=0,
    vfmt=VFmt.F32,
    codec=AUTO,
    dtype=F32,
) -> bytes:
    h = TensorHeader(codec, dtype, vfmt, mode, flags, param, shape, nnz, len(mask), len(values))
    return h.to_bytes() + mask + values


def _f32(*xs: float) -> bytes:
    return np.array(xs, "<f4").tobytes()


SPEC = {"w": ((10,), torch.float32)}


def _reseal(data: bytes) -> bytes:
    return seal(data[:-4])


def _edit(data: bytes, field: str, value: int) -> bytes:
    """Set the first byte of header field ``field`` and recompute the CRC."""
    ((s, e),) = [(s, e) for f, s, e in field_spans(data) if f == field]
    b = bytearray(data)
    b[s] = value
    return _reseal(bytes(b))


@pytest.fixture
def good() -> tuple[bytes, Update]:
    u = Update({"w": torch.arange(10.0)}, {"w": torch.arange(10) % 3 == 0})
    return encode_update(u, "auto"), u


def test_valid_handmade_message_decodes(good: tuple[bytes, Update]) -> None:
    data = _msg(("w", _record(MaskMode.COO, 2, encode_varints(np.array([1, 3], np.uint64)), _f32(5.0, 7.0))))
    got = decode_update(data, SPEC)
    assert got.values["w"].tolist() == [0, 5, 0, 0, 0, 7, 0, 0, 0, 0]
    assert got.sent["w"].nonzero().ravel().tolist() == [1, 5]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + b"\x02" + d[5:], "version"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: d + b"\x00", "checksum"),
        (lambda d: d[:-1], "checksum"),
        (lambda d: d[:7], "shorter"),
        (lambda d: b"", "shorter"),
        (lambda d: _reseal(d[:-4] + b"\x00" + d[-4:]), "after the last"),
        (lambda d: _reseal(d[:-5] + d[-4:]), "truncated"),
    ],
)
def test_container_errors(good: tuple[bytes, Update], mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DecodeError, match=match):
        decode_update(mutate(good[0]), SPEC)


def test_every_truncation_and_every_resealed_truncation_is_rejected(
    good: tuple[bytes, Update],
) -> None:
    data = good[0]
    for i in range(len(data)):
        with pytest.raises(DecodeError):
            decode_update(data[:i], SPEC)
        if 5 <= i and i != len(data) - 4:  # (sealing data[:-4] rebuilds the message)
            with pytest.raises(DecodeError):
                decode_update(seal(data[:i]), SPEC)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("w.magic", 0, "tensor magic"),
        ("w.version", 2, "tensor version"),
        ("w.codec", 200, "unknown codec"),
        ("w.dtype", 99, "unknown dtype"),
        ("w.dtype", 6, "cannot be decoded into"),  # an int64 payload for a float32 receiver
        ("w.vfmt", 77, "unknown value format"),
        ("w.vfmt", int(VFmt.F16), "does not write F16"),
        ("w.mode", 42, "unknown mask mode"),
        ("w.flags", 0x80, "unknown flag"),
        ("w.flags", 2, "flags 2 invalid"),
        ("w.param", 3, "parameter 3 set"),
        ("w.ndim", 2, None),
        ("w.ndim", 99, "ndim 99"),
        ("w.shape[0]", 11, "shape"),
        ("w.nnz", 11, "nnz 11 exceeds"),
        ("w.nnz", 3, None),
        ("w.mask_len", 9, None),
        ("w.value_len", 3, None),
    ],
)
def test_header_field_errors(good: tuple[bytes, Update], field: str, value: int, match: str | None) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_update(_edit(good[0], field, value), SPEC)


def test_spec_errors(good: tuple[bytes, Update]) -> None:
    data = good[0]
    with pytest.raises(DecodeError, match="not a tensor the receiver expects"):
        decode_update(data, {"v": ((10,), torch.float32)})
    with pytest.raises(DecodeError, match="shape"):
        decode_update(data, {"w": ((2, 5), torch.float32)})
    with pytest.raises(DecodeError, match="cannot be decoded into"):
        decode_update(data, {"w": ((10,), torch.int32)})
    # a float64 receiver is fine: floating values convert
    assert decode_update(data, {"w": ((10,), torch.float64)}).values["w"].dtype == torch.float64


def test_names_must_be_unique_sorted_and_utf8() -> None:
    rec = _record(MaskMode.NONE, 10, b"", _f32(*range(10)))
    spec = {"a": SPEC["w"], "b": SPEC["w"]}
    assert set(decode_update(_msg(("a", rec), ("b", rec)), spec).values) == {"a", "b"}
    with pytest.raises(DecodeError, match="duplicated or out of order"):
        decode_update(_msg(("b", rec), ("a", rec)), spec)
    with pytest.raises(DecodeError, match="duplicated or out of order"):
        decode_update(_msg(("a", rec), ("a", rec)), spec)
    bad = seal(container_header(1) + b"\x01\xff" + rec)
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_update(bad, spec)


def _dec(rec: bytes, **kw) -> Update:  # type: ignore[no-untyped-def]
    return decode_update(_msg(("w", rec)), SPEC, **kw)


def test_coordinates_out_of_range_or_miscounted() -> None:
    gaps = encode_varints(np.array([4, 5], np.uint64))  # indices 4 and 10: 10 is out of range
    with pytest.raises(DecodeError, match="out of range"):
        _dec(_record(MaskMode.COO, 2, gaps, _f32(1, 2)))
    with pytest.raises(DecodeError, match="exceeds the tensor size"):
        _dec(_record(MaskMode.COO, 1, encode_varints(np.array([10], np.uint64)), _f32(1)))
    with pytest.raises(DecodeError, match="varints"):
        _dec(_record(MaskMode.COO, 3, gaps, _f32(1, 2, 3)))
    with pytest.raises(DecodeError, match="value bytes"):
        _dec(_record(MaskMode.COO, 1, b"\x01", _f32(1, 2)))
    with pytest.raises(DecodeError, match="bitmask has 2 entries, payload says 3"):
        _dec(_record(MaskMode.BITMASK, 3, bytes([0b10000000, 0b01000000]), _f32(1, 2, 3)))
    with pytest.raises(DecodeError, match="padding"):
        _dec(_record(MaskMode.BITMASK, 1, bytes([0b10000000, 0b00000001]), _f32(1)))
    with pytest.raises(DecodeError, match="FULL mask with nnz"):
        _dec(_record(MaskMode.FULL, 9, b"", _f32(*range(9))))
    with pytest.raises(DecodeError, match="mask bytes for mask mode EMPTY"):
        _dec(_record(MaskMode.EMPTY, 0, b"\x00", b""))
    with pytest.raises(DecodeError, match="Rice parameter"):
        _dec(_record(MaskMode.RICE, 1, b"\x80", _f32(1), param=40))
    # indices cannot fail to increase: gaps are index differences minus one, so any gap
    # sequence is strictly increasing; a zero gap is simply the next coordinate
    ok = _dec(_record(MaskMode.COO, 2, b"\x00\x00", _f32(1, 2)))
    assert ok.sent["w"].nonzero().ravel().tolist() == [0, 1]


def test_value_errors() -> None:
    with pytest.raises(DecodeError, match="NaN or infinite"):
        _dec(_record(MaskMode.NONE, 10, b"", _f32(*([1.0] * 9 + [float("nan")]))))
    got = _dec(_record(MaskMode.NONE, 10, b"", _f32(*([1.0] * 9 + [float("inf")]))), allow_nonfinite=True)
    assert got.values["w"][-1] == float("inf")
    i8 = 8  # wire id of int8
    for scale, q, match in [
        (-1.0, 1, "scale"),
        (float("nan"), 1, "scale"),
        (1.0, -128, "-128"),
        (0.0, 1, "zero scale"),
    ]:
        values = np.array([scale], "<f4").tobytes() + np.array([q], np.int8).tobytes()
        with pytest.raises(DecodeError, match=match):
            _dec(_record(MaskMode.COO, 1, b"\x00", values, vfmt=VFmt.I8, codec=i8))
    # a dense codec's value at an unsent coordinate must be zero
    f32 = 1  # wire id of float32
    with pytest.raises(DecodeError, match="unsent"):
        _dec(_record(MaskMode.EMPTY, 0, b"", _f32(*range(10)), flags=2, codec=f32))
    # integers out of the receiver's range, bools other than 0/1
    big = encode_update(Update({"i": torch.tensor([300])}), "auto")
    with pytest.raises(DecodeError, match="out of the range"):
        decode_update(big, {"i": ((1,), torch.int8)})
    two = _record(MaskMode.NONE, 1, b"", b"\x04", shape=(1,), vfmt=VFmt.INT, dtype=1)  # bool 2
    with pytest.raises(DecodeError, match="out of the range of torch.bool"):
        decode_update(_msg(("b", two)), {"b": ((1,), torch.bool)})


def test_known_mask_must_be_held_and_identical() -> None:
    m = torch.arange(100) % 3 == 0  # large enough that the 4-byte fingerprint beats a bitmask
    u = Update({"w": torch.ones(100)}, {"w": m})
    data = encode_update(u, "auto", known={"w": m})
    spec = {"w": ((100,), torch.float32)}
    assert describe(data)[0].mask_mode == "known"
    assert torch.equal(decode_update(data, spec, known={"w": m}).sent["w"], m)
    with pytest.raises(DecodeError, match="known mask the receiver lacks"):
        decode_update(data, spec)
    with pytest.raises(DecodeError, match="differs from the sender's"):
        decode_update(data, spec, known={"w": ~m})
    with pytest.raises(DecodeError, match="not a bool tensor"):
        decode_update(data, spec, known={"w": torch.ones(3, dtype=torch.bool)})


def test_decode_tensor_rejects_trailing_bytes() -> None:
    rec = _record(MaskMode.NONE, 10, b"", _f32(*range(10)))
    v, m = decode_tensor(rec, (10,), torch.float32)
    assert m is None and v.tolist() == list(range(10))
    with pytest.raises(DecodeError, match="after the end"):
        decode_tensor(rec + b"\x00", (10,), torch.float32)


def test_non_bytes_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        decode_update("SFLW", SPEC)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# fuzzing: a few hundred mutations per codec (benchmarks/codec.py --fuzz runs 100,000+)
# --------------------------------------------------------------------------------------------


@functools.cache
def _pool(codec: str) -> list[tuple[bytes, dict, dict | None, Update]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for d in (0.0, 0.03, 0.4, 0.8, 1.0):
        v = torch.randn(4, 75, generator=g)
        if codec == "sign":
            v = torch.sign(v) + (v == 0)
        h = torch.randn(6, generator=g).to(torch.float16)
        m = torch.rand(v.shape, generator=g) < d
        z = torch.where(torch.rand(40, generator=g) < d, v[0, :40], 0.0)
        # a channel-structured mask (ROWS): whole rows along dim 0, at least one kept unless d = 0
        rows = (torch.rand(12, generator=g) < d) | ((torch.arange(12) == 0) & (d > 0))
        r = v.reshape(-1)[:120].reshape(12, 5, 2).clone()
        rm = rows.reshape(12, 1, 1).expand(12, 5, 2).contiguous()
        u = Update(
            {
                "w": v,
                "h": (torch.sign(h) if codec == "sign" else h),
                "z": z,
                "n": torch.tensor(5),
                "e": torch.zeros(0),
                "r": r,
            },
            {"w": m, "r": rm},
        )
        known = {"w": m} if d == 0.4 else None
        data = encode_update(u, codec, known=known)
        spec = spec_of(u.values)
        out.append((data, spec, known, decode_update(data, spec, known=known)))
    return out


@pytest.mark.parametrize("codec", codec_names())
def test_fuzz_pool_covers_the_rows_mode(codec: str) -> None:
    """Every codec that may write ROWS has ROWS records among the messages the fuzzer mutates."""
    modes = {i.mask_mode for data, *_ in _pool(codec) for i in describe(data)}
    assert ("rows" in modes) == (MaskMode.ROWS in get_codec(codec).layouts)


def _same(a: Update, b: Update) -> bool:
    return (
        a.values.keys() == b.values.keys()
        and a.sent.keys() == b.sent.keys()
        and all(a.values[k].dtype == b.values[k].dtype and torch.equal(a.values[k], b.values[k]) for k in a.values)
        and all(torch.equal(a.sent[k], b.sent[k]) for k in a.sent)
    )


@st.composite
def mutants(draw: st.DrawFn, data: bytes) -> bytes:
    b = bytearray(data)
    op = draw(st.sampled_from(["flip", "byte", "field", "truncate", "extend", "insert", "delete"]))
    if op == "flip":
        for i in draw(st.lists(st.integers(0, 8 * len(b) - 1), min_size=1, max_size=3)):
            b[i // 8] ^= 1 << (i % 8)
    elif op == "byte":
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    elif op == "field":
        spans = [(s, e) for f, s, e in field_spans(data) if not f.endswith(("_section", "crc32")) and e > s]
        s, e = draw(st.sampled_from(spans))
        b[draw(st.integers(s, e - 1))] = draw(st.integers(0, 255))
    elif op == "truncate":
        del b[draw(st.integers(0, len(b) - 1)) :]
    elif op == "extend":
        b += draw(st.binary(min_size=1, max_size=16))
    elif op == "insert":
        i = draw(st.integers(0, len(b)))
        b[i:i] = draw(st.binary(min_size=1, max_size=8))
    else:
        i = draw(st.integers(0, len(b) - 1))
        del b[i : i + draw(st.integers(1, 8))]
    return bytes(b)


@pytest.mark.parametrize("codec", codec_names())
@given(data=st.data())
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_only_decode_errors_and_no_silent_corruption(codec: str, data: st.DataObject) -> None:
    msg, spec, known, ref = data.draw(st.sampled_from(_pool(codec)))
    mutant = data.draw(mutants(msg))
    # raw: the checksum catches it, or (mutation undone) it decodes to exactly the original
    try:
        got = decode_update(mutant, spec, known=known)
    except DecodeError:
        pass
    else:
        assert _same(got, ref), "a corrupted message decoded to something else"
    # resealed: the structural checks alone must reject it or produce a well-formed update
    try:
        got = decode_update(_reseal(mutant) if len(mutant) >= 4 else mutant, spec, known=known)
    except DecodeError:
        return
    for k, v in got.values.items():
        assert (tuple(v.shape), v.dtype) == tuple(spec[k])
        if k in got.sent:
            assert got.sent[k].dtype == torch.bool and got.sent[k].shape == v.shape
            assert bool((v[~got.sent[k]] == 0).all())


def _verdict(data: bytes, spec: dict) -> Update | str:
    try:
        return decode_update(data, spec)
    except DecodeError as e:
        return str(e)


def test_remembered_headers_change_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header the decoder has checked before is recognised by its bytes, and a message laid
    out as one decoded before is read along that layout: every resealed edit of every header
    byte of a dense message, and non-finite values in each dense record, get the same result,
    error message included, with both memos warm as with cold ones."""
    import sparsefl.comm as M
    import sparsefl.comm.codecs as C

    u = Update(
        {
            "a": torch.randn(3, 5),
            "b": torch.tensor(7),
            "c": torch.zeros(4),
            "d": torch.randn(6, dtype=torch.float64),
            "e": torch.randn(2).half(),
        }
    )
    data = encode_update(u, "auto")
    spec = spec_of(u.values)
    assert _same(decode_update(data, spec), u)  # warms the cache with every header
    mutants = []
    for f, s, e in field_spans(data):
        if f.endswith(("_section", "crc32")) or e == s:
            continue
        for value in (0, 1, 2, 0x7F, 0x80, 0xFF, data[s] ^ 1):
            b = bytearray(data)
            b[s] = value
            mutants.append(_reseal(bytes(b)))
    for f, s, e in field_spans(data):
        if f.endswith("value_section") and e - s > 1:  # a NaN, an infinity in each float record
            for bad in (b"\xff" * (e - s), b"\x00" * (e - s - 2) + b"\x80\x7f"):
                mutants.append(_reseal(data[:s] + bad + data[e:]))
    mutants.append(encode_update(Update({**u.values, "a": u.values["a"] * float("nan")}), "auto"))
    mutants.append(data)  # the message itself, along its layout
    for spec2 in (spec, {**spec, "a": ((5, 3), torch.float32)}, {**spec, "a": ((3, 5), torch.float64)}):
        _verdict(data, spec2)  # the layout of the message, where it decodes
        warm = [_verdict(m, spec2) for m in mutants]
        monkeypatch.setattr(C, "_CHECKED", {})
        monkeypatch.setattr(M, "_LAYOUTS", {})
        cold = [_verdict(m, spec2) for m in mutants]
        assert len(C._CHECKED) > 0 or spec2 is not spec  # (a wrong spec fails at the first record)
        for w, c in zip(warm, cold):
            assert (isinstance(w, str) and w == c) or (isinstance(w, Update) and isinstance(c, Update) and _same(w, c))
        monkeypatch.undo()


def test_message_laid_out_as_before_reads_only_its_other_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second message with the layout of the first (every name and dense header the same
    bytes) is read along it: only the records that are not dense in their own precision go
    through the record decoder, and the result is the full decoder's, dtypes and masks
    included; the dense values share a buffer but not their entries."""
    import sparsefl.comm as M

    def update(seed: int) -> Update:
        g = torch.Generator().manual_seed(seed)
        sent = torch.arange(20) % 3 == 0
        return Update(
            {
                "a": torch.randn(3, 5, generator=g),
                "b": torch.tensor(40 + seed),
                "c": torch.zeros(4),
                "d": torch.randn(6, generator=g, dtype=torch.float64),
                "e": torch.randn(2, generator=g).half(),
                "f": torch.randn(20, generator=g) * sent,
                "g": torch.randn((), generator=g),
            },
            {"f": sent},
        )

    u1, u2 = update(1), update(2)
    spec = spec_of(u1.values)
    d1, d2 = encode_update(u1, "auto"), encode_update(u2, "auto")
    assert len(d1) == len(d2) and d1 != d2
    monkeypatch.setattr(M, "_LAYOUTS", {})
    assert _same(decode_update(d1, spec), u1)
    calls: list[str] = []
    real = M.decode_record
    monkeypatch.setattr(M, "decode_record", lambda r, *a, **k: calls.append(r.where) or real(r, *a, **k))
    second = decode_update(d2, spec)
    assert calls == ["tensor 'b'", "tensor 'c'", "tensor 'f'"]
    monkeypatch.setattr(M, "_LAYOUTS", {})
    full = decode_update(d2, spec)
    assert len(calls) == 3 + 7 and _same(second, full) and _same(second, u2)
    second.values["a"].fill_(0)
    assert torch.equal(second.values["g"], u2.values["g"]) and torch.equal(second.values["e"], u2.values["e"])


def test_integer_scalars_read_with_python_ints_as_the_array_path_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-value integer record is read without arrays when it is a well-formed varint in
    range; every value, dtype, narrowing and resealed edit of its value section gets the
    general path's result, error message included."""
    import sparsefl.comm.codecs as C

    cases = []
    for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        info = (0, 1) if dt == torch.bool else (torch.iinfo(dt).min, torch.iinfo(dt).max)
        for v in {0, 1, -1, 63, 64, -65, 300, info[0], info[1]}:
            if info[0] <= v <= info[1]:
                cases.append(encode_update(Update({"x": torch.tensor(v, dtype=dt)}), "auto"))
    for data in list(cases):
        (s, e) = next((s, e) for f, s, e in field_spans(data) if f == "x.value_section")
        for edit in (b"\x80", b"\xff" * 11, b"\x81\x00", b"\x02\x00"[: e - s]):
            cases.append(_reseal(data[:s] + edit + data[e:]))
    specs = [{"x": ((), dt)} for dt in (torch.int64, torch.int8, torch.uint8, torch.bool, torch.float32)]
    read, real = [], C._int_scalar
    monkeypatch.setattr(C, "_int_scalar", lambda *a: (lambda t: read.append(t is not None) or t)(real(*a)))
    fast = [[_verdict(d, sp) for sp in specs] for d in cases]
    monkeypatch.setattr(C, "_int_scalar", lambda *a: None)
    slow = [[_verdict(d, sp) for sp in specs] for d in cases]
    assert sum(read) > 20 and not all(read)  # both paths taken
    for f_row, s_row in zip(fast, slow):
        for f, s in zip(f_row, s_row):
            assert (isinstance(f, str) and f == s) or (isinstance(f, Update) and isinstance(s, Update) and _same(f, s))
