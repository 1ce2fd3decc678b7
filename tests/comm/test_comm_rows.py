"""The ROWS mask mode: channel-structured masks (whole rows along dim 0) sent as row flags."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsefl.comm import Update, decode_tensor, decode_update, describe, encode_tensor, encode_update, spec_of
from sparsefl.comm.entropy import gaps_from_indices, pack_bits, rice_encode
from sparsefl.comm.format import MaskMode, TensorHeader, VFmt, container_header, name_record, seal, varint_len
from sparsefl.errors import DecodeError

F32 = 9  # dtype code of float32
AUTO = 9  # wire id of auto
ROW_CODECS = ["auto", "float32", "float16", "bfloat16", "int8"]  # codecs whose policy includes ROWS
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def row_mask(shape: tuple[int, ...], rows: torch.Tensor) -> torch.Tensor:
    """The mask of ``shape`` keeping exactly the rows (dim 0) where ``rows`` is True."""
    return rows.reshape(-1, *[1] * (len(shape) - 1)).expand(shape).contiguous()


@st.composite
def row_updates(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A float tensor of ndim 2-4, a row mask of any density (no rows and all rows included)."""
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=2, max_size=4)))
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 600)),) + shape[1:]  # many rows: Rice-coded flags
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    d = draw(st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 0.9, 1.0]))
    rows = rng.random(shape[0]) < d
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    v = torch.from_numpy(rng.standard_normal(math.prod(shape))).reshape(shape).to(dtype)
    return v, row_mask(shape, torch.from_numpy(rows)), rows


@pytest.mark.parametrize("codec", ROW_CODECS)
@given(data=st.data())
@SETTINGS
def test_row_masks_round_trip(codec: str, data: st.DataObject) -> None:
    v, m, rows = data.draw(row_updates())
    u = Update({"w": v, "b": v.reshape(-1)[:3].clone()}, {"w": m})
    msg = encode_update(u, codec)
    got = decode_update(msg, spec_of(u.values))
    assert torch.equal(got.sent["w"], m)
    assert bool((got.values["w"][~m] == 0).all())
    if codec == "auto":
        assert torch.equal(got.values["w"], torch.where(m, v, torch.zeros((), dtype=v.dtype)))
    elif codec == "float32":
        assert torch.equal(got.values["w"][m], v[m].float().to(v.dtype))
    info = {i.name: i for i in describe(msg)}["w"]
    kept = int(rows.sum())
    if kept in (0, rows.size):
        assert info.mask_mode == ("empty" if kept == 0 else "full")
    else:
        # ROWS or a layout at least as small (on a tie, e.g. a tiny tensor, the older one wins)
        assert info.mask_mode == "rows" or info.mask_nbytes <= math.ceil(rows.size / 8)
        if v[0].numel() >= 8 and rows.size >= 16:
            assert info.mask_mode == "rows"
    if info.mask_mode == "rows":
        assert info.mask_nbytes <= math.ceil(rows.size / 8)
        assert info.nnz == kept * v[0].numel()


@given(data=st.data())
@SETTINGS
def test_support_of_a_channel_pruned_dense_tensor_uses_rows(data: st.DataObject) -> None:
    """The downlink of a model whose pruned output channels are exact zeros."""
    v, m, rows = data.draw(row_updates())
    w = torch.where(m, v, torch.zeros((), dtype=v.dtype))
    w[m & (w == 0)] = 1.0  # the support must be exactly the kept rows
    msg = encode_update(Update({"w": w}), "auto")
    got = decode_update(msg, spec_of({"w": w}))
    assert not got.sent and torch.equal(got.values["w"], w)
    if 0 < rows.sum() < rows.size and w[0].numel() >= 8 and rows.size >= 16:
        assert describe(msg)[0].mask_mode == "rows"


def test_auto_chooses_rows_and_the_mask_costs_about_one_bit_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    shape = (64, 32, 3, 3)
    rows = torch.rand(64, generator=g) < 0.25
    m = row_mask(shape, rows)
    v = torch.randn(shape, generator=g)
    data = encode_update(Update({"w": v}, {"w": m}), "auto")
    (info,) = describe(data)
    kept = int(rows.sum())
    nnz = kept * 288
    assert info.mask_mode == "rows" and info.nnz == nnz
    assert info.mask_nbytes == math.ceil(64 / 8)
    # container 10 + name 2 + header (10 fixed, shape 1+1+1+1, nnz, two lengths) + mask + values
    header = 10 + 4 + varint_len(nnz) + varint_len(8) + varint_len(4 * nnz)
    assert len(data) == 10 + 2 + header + 8 + 4 * nnz
    # against the general layouts, which cost about H(d) bits per coordinate
    assert len(data) < len(encode_update(Update({"w": v}, {"w": m}), "coo-rice")) - 1000
    # sign values with the row mask: 1 bit per kept weight + the row flags
    s = torch.where(v >= 0, 1.0, -1.0)
    sd = encode_update(Update({"w": s}, {"w": m}), "sign")
    assert describe(sd)[0].mask_mode == "rows" and describe(sd)[0].value_nbytes == math.ceil(nnz / 8)


def test_rows_uses_rice_flags_when_smaller_and_packed_flags_otherwise() -> None:
    shape = (4096, 4)
    few = torch.zeros(4096, dtype=torch.bool)
    few[[5, 700, 4000]] = True
    rec = encode_tensor(torch.ones(shape), row_mask(shape, few), "auto")
    (info,) = describe(seal(container_header(1) + name_record("w") + rec))
    assert info.mask_mode == "rows" and info.mask_nbytes < 4096 // 8
    assert rec[6] == int(MaskMode.ROWS) and rec[8] > 0  # param byte: Rice parameter + 1
    v, m = decode_tensor(rec, shape, torch.float32)
    assert m is not None and torch.equal(m, row_mask(shape, few))
    half = torch.arange(16) % 2 == 0
    rec = encode_tensor(torch.ones(16, 5), row_mask((16, 5), half), "auto")
    assert rec[6] == int(MaskMode.ROWS) and rec[8] == 0  # packed: 2 bytes
    assert torch.equal(decode_tensor(rec, (16, 5), torch.float32)[1], row_mask((16, 5), half))


def test_rows_is_not_used_for_unstructured_masks_or_by_the_fixed_layout_codecs() -> None:
    g = torch.Generator().manual_seed(1)
    shape = (32, 16, 3)
    m = row_mask(shape, torch.rand(32, generator=g) < 0.5)
    m[3, 2, 1] = ~m[3, 2, 1]  # one coordinate off the structure
    v = torch.randn(shape, generator=g)
    assert describe(encode_update(Update({"w": v}, {"w": m}), "auto"))[0].mask_mode != "rows"
    rm = row_mask(shape, torch.arange(32) % 4 == 0)
    for codec, mode in (("bitmask", "bitmask"), ("coo", "coo"), ("coo-rice", "rice")):
        assert describe(encode_update(Update({"w": v}, {"w": rm}), codec))[0].mask_mode == mode
    # a 1-d tensor is never ROWS (its rows are its coordinates: that is BITMASK)
    one = torch.arange(64) % 4 == 0
    assert describe(encode_update(Update({"x": torch.ones(64)}, {"x": one}), "auto"))[0].mask_mode != "rows"


def test_known_row_mask_still_costs_the_fingerprint_only_when_smaller() -> None:
    shape = (64, 16)
    m = row_mask(shape, torch.arange(64) % 3 == 0)
    v = torch.ones(shape)
    assert describe(encode_update(Update({"w": v}, {"w": m}), "auto", known={"w": m}))[0].mask_mode == "known"
    small = row_mask((16, 16), torch.arange(16) % 3 == 0)  # 2 bytes of row flags beat the 4-byte fingerprint
    data = encode_update(Update({"w": torch.ones(16, 16)}, {"w": small}), "auto", known={"w": small})
    assert describe(data)[0].mask_mode == "rows"


# --------------------------------------------------------------------------------------------
# malformed ROWS payloads
# --------------------------------------------------------------------------------------------


SHAPE = (10, 3)
SPEC = {"w": (SHAPE, torch.float32)}


def _rows_msg(nnz: int, mask: bytes, nvalues: int, *, param: int = 0, shape=SHAPE, codec: int = AUTO) -> bytes:
    values = np.ones(nvalues, "<f4").tobytes()
    h = TensorHeader(codec, F32, VFmt.F32, MaskMode.ROWS, 0, param, shape, nnz, len(mask), len(values))
    return seal(container_header(1) + name_record("w") + h.to_bytes() + mask + values)


def test_handmade_rows_payload_decodes() -> None:
    flags = np.zeros(10, bool)
    flags[[1, 7]] = True
    got = decode_update(_rows_msg(6, pack_bits(flags), 6), SPEC)
    assert got.sent["w"].all(1).tolist() == flags.tolist() and got.sent["w"].sum() == 6
    rice = rice_encode(gaps_from_indices(np.array([1, 7])), 1)
    got2 = decode_update(_rows_msg(6, rice, 6, param=2), SPEC)
    assert torch.equal(got2.sent["w"], got.sent["w"]) and torch.equal(got2.values["w"], got.values["w"])


@pytest.mark.parametrize(
    "nnz,mask,nvalues,param,shape,match",
    [
        (5, bytes([0b01000001, 0]), 5, 0, SHAPE, "not a multiple of the row size 3"),  # nnz not k*rows
        (9, bytes([0b01000001, 0]), 9, 0, SHAPE, "keep 2 rows, payload says 3"),  # nnz disagrees
        (3, bytes([0b01000001, 0]), 3, 0, SHAPE, "keep 2 rows, payload says 1"),
        (6, bytes([0b01000001]), 6, 0, SHAPE, "1 bytes, expected 2"),  # too short
        (6, bytes([0b01000001, 0, 0]), 6, 0, SHAPE, "3 bytes, expected 2"),  # too long
        (6, bytes([0b01000000, 0b00100000]), 6, 0, SHAPE, "padding"),  # bit of row 10 (padding)
        (6, bytes([0b01000001, 0b00000001]), 6, 0, SHAPE, "padding"),
        (6, bytes([0b01000001, 0]), 5, 0, SHAPE, "value"),  # values short
        (6, bytes([0b01000001, 0]), 7, 0, SHAPE, "value"),  # values long
        (3, bytes([0b10000000]), 3, 0, (30,), "needs ndim >= 2"),  # a 1-d tensor
        (0, b"", 0, 0, (4, 0), "needs ndim >= 2 and coordinates"),  # no coordinates
        (6, bytes([0b01000001, 0]), 6, 33, SHAPE, "ROWS parameter 33"),
        (6, b"\x00", 6, 1, SHAPE, "unary stream holds 0"),  # Rice: missing codes
        (6, bytes([0b10000101]), 6, 1, SHAPE, "holds 3 codes, expected 2"),
        (3, bytes([0b00000000, 0b00000000, 0b01000000]), 3, 1, SHAPE, "exceeds the tensor size 10"),  # row 14
        (6, bytes([0b00010001, 0b00000000]), 6, 1, SHAPE, "extra bytes"),  # Rice: trailing byte
        (6, bytes([0b00000001]), 6, 2, SHAPE, "bytes cannot hold"),  # k=1: no room for the unary part
    ],
)
def test_malformed_rows_payloads_are_decode_errors(
    nnz: int, mask: bytes, nvalues: int, param: int, shape: tuple[int, ...], match: str
) -> None:
    spec = {"w": (shape, torch.float32)}
    with pytest.raises(DecodeError, match=match):
        decode_update(_rows_msg(nnz, mask, nvalues, param=param, shape=shape), spec)


def test_rows_from_a_codec_that_does_not_write_it_is_rejected() -> None:
    bitmask = 4  # wire id
    with pytest.raises(DecodeError, match="does not write mask mode ROWS"):
        decode_update(_rows_msg(6, bytes([0b01000001, 0]), 6, codec=bitmask), SPEC)


def test_every_resealed_single_byte_change_of_a_rows_message_is_rejected_or_well_formed() -> None:
    g = torch.Generator().manual_seed(3)
    shape = (40, 2, 3)
    m = row_mask(shape, torch.rand(40, generator=g) < 0.3)
    u = Update({"w": torch.randn(shape, generator=g)}, {"w": m})
    data = encode_update(u, "auto")
    assert describe(data)[0].mask_mode == "rows"
    spec = spec_of(u.values)
    for i in range(5, len(data) - 4):
        for delta in (1, 255, 0x80):
            b = bytearray(data)
            b[i] = (b[i] + delta) % 256
            try:
                got = decode_update(seal(bytes(b[:-4])), spec)
            except DecodeError:
                continue
            assert got.values["w"].shape == shape
            if "w" in got.sent:  # (a flipped support flag makes it a dense tensor)
                s = got.sent["w"]
                assert s.shape == shape and bool((got.values["w"][~s] == 0).all())
